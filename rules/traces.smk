rule trace_sample:
    input:
        "results/data/splits/{split}.parquet",
    output:
        "results/traces/{split}/sample.parquet",
    log:
        "logs/traces/{split}/sample.log",
    conda:
        "../envs/data.yaml"
    params:
        settings=result_settings("trace_sample"),
        run=run_settings("trace_sample"),
    shell:
        "python -m synthpert traces sample --split-file {input} --settings {params.settings:q} "
        "--run {params.run:q} --out {output} 2> {log}"


rule traces:
    input:
        sample="results/traces/{split}/sample.parquet",
        model=model_files(config["traces"]["model"]),
    output:
        traces="results/traces/{split}/{cell}/{shard}.parquet",
        usage="results/traces/{split}/{cell}/{shard}.usage.json",
    log:
        "logs/traces/{split}/{cell}/{shard}.log",
    conda:
        "../envs/llm.yaml"
    params:
        settings=result_settings("traces"),
        run=run_settings("traces"),
    shell:
        TRACES_SHELL.format(evidence="")


rule critic_grade:
    input:
        traces="results/traces/{split}/{cell}/{shard}.parquet",
        model=model_files(config["critic"]["model"]),
    output:
        "results/traces/{split}/{cell}/{shard}.graded.parquet",
    log:
        "logs/critic/{split}/{cell}/{shard}.log",
    conda:
        "../envs/llm.yaml"
    params:
        settings=result_settings("critic_grade"),
        run=run_settings("critic_grade"),
    shell:
        "python -m synthpert critic grade --traces {input.traces} --settings {params.settings:q} "
        "--run {params.run:q} --out {output} 2> {log}"


rule critic_select:
    input:
        graded_shards(evidence=False),
    output:
        sft=expand("results/sft/{{split}}/{variant}.parquet", variant=SFT_VARIANTS),
        stats="results/sft/{split}/critic_stats.csv",
        grades="results/sft/{split}/grades.csv",
    log:
        "logs/critic/{split}/select.log",
    conda:
        "../envs/data.yaml"
    params:
        settings=result_settings("critic_select"),
        run=run_settings("critic_select"),
        out_dir="results/sft/{split}",
    shell:
        "python -m synthpert critic select --grades {input} --split {wildcards.split} "
        "--settings {params.settings:q} --run {params.run:q} --out-dir {params.out_dir} 2> {log}"


# The evidence traces (variant synthpert_evidence, docs/evidence.md): the same sample, the
# teacher shown each tuple's evidence block, the critic grading them with the block in the
# query, and their own SFT set and statistics.
rule traces_evidence:
    input:
        sample="results/traces/{split}/sample.parquet",
        evidence="results/evidence/{split}.traces.parquet",
        model=model_files(config["traces"]["model"]),
    output:
        traces="results/traces/{split}/evidence/{cell}/{shard}.parquet",
        usage="results/traces/{split}/evidence/{cell}/{shard}.usage.json",
    log:
        "logs/traces/{split}/evidence/{cell}/{shard}.log",
    conda:
        "../envs/llm.yaml"
    params:
        settings=result_settings("traces"),
        run=run_settings("traces"),
    shell:
        TRACES_SHELL.format(evidence="--evidence {input.evidence} ")


use rule critic_grade as critic_grade_evidence with:
    input:
        traces="results/traces/{split}/evidence/{cell}/{shard}.parquet",
        model=model_files(config["critic"]["model"]),
    output:
        "results/traces/{split}/evidence/{cell}/{shard}.graded.parquet",
    log:
        "logs/critic/{split}/evidence/{cell}/{shard}.log",


rule critic_select_evidence:
    input:
        graded_shards(evidence=True),
    output:
        sft="results/sft/{split}/synthpert_evidence.parquet",
        stats="results/sft/{split}/critic_stats_evidence.csv",
        grades="results/sft/{split}/grades_evidence.csv",
    log:
        "logs/critic/{split}/select_evidence.log",
    conda:
        "../envs/data.yaml"
    params:
        settings=result_settings("critic_select", evidence=True),
        run=run_settings("critic_select"),
        out_dir="results/sft/{split}",
    shell:
        "python -m synthpert critic select --evidence --grades {input} --split {wildcards.split} "
        "--settings {params.settings:q} --run {params.run:q} --out-dir {params.out_dir} 2> {log}"


rule plot_grades:
    input:
        "results/sft/{split}/grades.csv",
    output:
        report(
            "results/plots/{split}/critic_grades.png",
            category="Critic",
            labels={"split": "{split}"},
            caption="../report/grades.rst",
        ),
    log:
        "logs/plots/{split}/critic_grades.log",
    conda:
        "../envs/evaluate.yaml"
    shell:
        "python -m synthpert plots grades --grades {input} --out {output} 2> {log}"


use rule plot_grades as plot_grades_evidence with:
    input:
        "results/sft/{split}/grades_evidence.csv",
    output:
        report(
            "results/plots/{split}/critic_grades_evidence.png",
            category="Critic",
            labels={"split": "{split} (traces with evidence)"},
            caption="../report/grades.rst",
        ),
    log:
        "logs/plots/{split}/critic_grades_evidence.log",
