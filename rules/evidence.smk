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
