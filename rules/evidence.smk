rule evidence_table:
    input:
        split_file="results/data/splits/{split}.parquet",
        questions="results/eval/{split}/questions.parquet",
    output:
        "results/evidence/{split}.parquet",
    log:
        "logs/evidence/{split}.log",
    conda:
        "../envs/evaluate.yaml"
    params:
        settings=result_settings("evidence"),
        run=run_settings("evidence"),
    shell:
        "python -m synthpert evidence-table --splits-file {input.split_file} "
        "--questions {input.questions} --settings {params.settings:q} --run {params.run:q} "
        "--out {output} 2> {log}"


# The blocks of the trace sample's tuples, shown to the teacher (variant synthpert_evidence):
# a table of their own, so the questions' table does not depend on the trace sample.
use rule evidence_table as evidence_traces with:
    input:
        split_file="results/data/splits/{split}.parquet",
        questions="results/traces/{split}/sample.parquet",
    output:
        "results/evidence/{split}.traces.parquet",
    log:
        "logs/evidence/{split}.traces.log",
