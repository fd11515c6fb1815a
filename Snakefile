# SynthPert: teach a small LLM to predict CRISPRi knockdown effects from critic-filtered
# synthetic reasoning traces. Rules only wire files; every step is a `synthpert` subcommand.
#
#   snakemake --cores 2                               # offline demo (config/demo.yaml)
#   snakemake --profile profiles/slurm                # the paper (config/config.yaml) on SLURM
#   snakemake -n results/table3.csv                   # what one table needs


from snakemake.utils import min_version, validate

min_version("8.20")


if not workflow.overwrite_configfiles:

    configfile: f"{workflow.basedir}/config/demo.yaml"


validate(config, "src/synthpert/core/schema.yaml")


# With --sdm conda apptainer, every rule runs in this image, in its conda environment built
# into it (containers/synthpert.def, docs/cluster.md); other deployment methods ignore it.
# It is read where a rule is defined, so it stands before the includes.
containerized: f"{workflow.basedir}/containers/synthpert.sif"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/traces.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/screen.smk"
include: "rules/plan.smk"


report: "report/workflow.rst"


rule all:
    default_target: True
    input:
        all_targets(),
        screen_targets(),
