rule questions:
    input:
        "results/data/splits/{split}.parquet",
    output:
        "results/eval/{split}/questions.parquet",
    log:
        "logs/eval/{split}/questions.log",
    conda:
        "../envs/data.yaml"
    params:
        settings=result_settings("questions"),
        run=run_settings("questions"),
    shell:
        "python -m synthpert questions --split-file {input} --settings {params.settings:q} "
        "--run {params.run:q} --out {output} 2> {log}"


rule predict:
    input:
        questions="results/eval/{split}/questions.parquet",
        model=row_model,
        adapter=row_adapter,
    output:
        "results/predictions/{split}/{row}/{cell}/{shard}.parquet",
    log:
        "logs/predict/{split}/{row}/{cell}/{shard}.log",
    wildcard_constraints:
        row="|".join(SINGLE_ROWS) or "none",
    conda:
        "../envs/llm.yaml"
    params:
        settings=result_settings("predict"),
        run=run_settings("predict"),
        adapter=adapter_option,
    shell:
        PREDICT_SHELL.format(row="{wildcards.row}", adapters="{params.adapter}")


rule predict_evidence:
    input:
        questions="results/eval/{split}/questions.parquet",
        evidence="results/evidence/{split}.parquet",
        model=row_model,
        adapter=row_adapter,
    output:
        "results/predictions/{split}/{row}/{cell}/{shard}.parquet",
    log:
        "logs/predict/{split}/{row}/{cell}/{shard}.log",
    wildcard_constraints:
        row="|".join(EVIDENCE_ROWS) or "none",
    conda:
        "../envs/llm.yaml"
    params:
        settings=result_settings("predict"),
        run=run_settings("predict"),
        adapter=adapter_option,
    shell:
        "python -m synthpert predict --questions {input.questions} --evidence {input.evidence} "
        "--row {wildcards.row} --cell {wildcards.cell} --shard {wildcards.shard} "
        "--split {wildcards.split} {params.adapter} --settings {params.settings:q} "
        "--run {params.run:q} --out {output} 2> {log}"


if ENGINE_ROWS:

    rule predict_student:
        input:
            questions="results/eval/{split}/questions.parquet",
            model=model_files(config["train"]["model"]),
            adapters=engine_adapters,
        output:
            [
                f"results/predictions/{{split}}/{row}/{{cell}}/{{shard}}.parquet"
                for row in ENGINE_ROWS
            ],
        log:
            "logs/predict/{split}/student/{cell}/{shard}.log",
        conda:
            "../envs/llm.yaml"
        params:
            rows=ENGINE_ROWS,
            settings=result_settings("predict", row=ENGINE_ROWS[0]),
            run=run_settings("predict", row=ENGINE_ROWS[0]),
        shell:
            PREDICT_SHELL.format(
                row="{params.rows}", adapters="--adapter {input.adapters}"
            )


rule baseline:
    input:
        split_file="results/data/splits/{split}.parquet",
        questions="results/eval/{split}/questions.parquet",
    output:
        "results/predictions/{split}/{row}/{cell}.parquet",
    log:
        "logs/baseline/{split}/{row}/{cell}.log",
    wildcard_constraints:
        row="|".join(BASELINE_ROWS) or "none",
    conda:
        "../envs/evaluate.yaml"
    params:
        settings=result_settings("baseline"),
        run=run_settings("baseline"),
    shell:
        "python -m synthpert baseline --row {wildcards.row} --cell {wildcards.cell} "
        "--splits-file {input.split_file} --questions {input.questions} "
        "--settings {params.settings:q} --run {params.run:q} --out {output} 2> {log}"


rule auroc_table:
    input:
        unpack(table_inputs),
    output:
        report(
            "results/table{n}.csv", category="Tables", caption="../report/tables.rst"
        ),
    log:
        "logs/tables/table{n}.log",
    wildcard_constraints:
        n="[12]",
    conda:
        "../envs/evaluate.yaml"
    params:
        settings=result_settings("tables"),
        split=lambda wildcards: TABLE_SPLIT[wildcards.n],
    shell:
        TABLES_SHELL.format(out="{output}")


rule class_table:
    input:
        unpack(table_inputs),
    output:
        table=report(
            "results/table{n}.csv", category="Tables", caption="../report/tables.rst"
        ),
        ci="results/table{n}_ci.csv",
        unseen=report(
            "results/table{n}_unseen.csv",
            category="Tables",
            caption="../report/unseen.rst",
        ),
    log:
        "logs/tables/table{n}.log",
    wildcard_constraints:
        n="[34]",
    conda:
        "../envs/evaluate.yaml"
    params:
        settings=result_settings("tables"),
        split=lambda wildcards: TABLE_SPLIT[wildcards.n],
    shell:
        TABLES_SHELL.format(out="{output.table}")


rule plot_roc:
    input:
        lambda wildcards: all_predictions(wildcards.split),
    output:
        report(
            "results/plots/{split}/roc_{task}.png",
            category="ROC curves",
            labels={"split": "{split}", "task": "{task}"},
            caption="../report/roc.rst",
        ),
    log:
        "logs/plots/{split}/roc_{task}.log",
    wildcard_constraints:
        task="de3|dir",
    conda:
        "../envs/evaluate.yaml"
    shell:
        "python -m synthpert plots roc --task {wildcards.task} --predictions {input} --out {output} 2> {log}"


rule plot_confusion:
    input:
        lambda wildcards: all_predictions(wildcards.split),
    output:
        report(
            "results/plots/{split}/confusion.png",
            category="Confusion matrices",
            labels={"split": "{split}"},
            caption="../report/confusion.rst",
        ),
    log:
        "logs/plots/{split}/confusion.log",
    conda:
        "../envs/evaluate.yaml"
    shell:
        "python -m synthpert plots confusion --predictions {input} --out {output} 2> {log}"


rule plot_views:
    input:
        "results/table{n}.csv",
    output:
        report(
            "results/plots/views_table{n}.png",
            category="Metric views",
            labels={"table": "{n}"},
            caption="../report/views.rst",
        ),
    log:
        "logs/plots/views_table{n}.log",
    wildcard_constraints:
        n="[1-4]",
    conda:
        "../envs/evaluate.yaml"
    shell:
        "python -m synthpert plots views --table-file {input} --out {output} 2> {log}"
