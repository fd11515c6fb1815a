def row_model(wildcards):
    """The embedded model a row needs, if any (the teacher row asks the teacher)."""
    row = wildcards.row
    return model_files(config["traces"]["model"] if row == "teacher" else config["train"]["model"])


def row_adapter(wildcards):
    """The fine-tuned adapter of a trained row."""
    if wildcards.row in cfg.TRAINED_ROWS:
        return [f"results/models/{wildcards.split}/{wildcards.row}/adapter"]
    return []


rule questions:
    input:
        "results/data/splits/{split}.parquet",
    output:
        "results/eval/{split}/questions.parquet",
    params:
        settings=settings("evaluate"),
    log:
        "logs/eval/{split}/questions.log",
    conda:
        "../envs/data.yaml"
    shell:
        "python -m synthpert questions --split-file {input} --settings {params.settings:q} "
        "--out {output} 2> {log}"


rule predict:
    input:
        questions="results/eval/{split}/questions.parquet",
        model=row_model,
        adapter=row_adapter,
    output:
        "results/predictions/{split}/{row}/{cell}/{shard}.parquet",
    params:
        settings=settings("evaluate", "models", "traces", "train"),
        adapter=lambda wildcards, input: f"--adapter {input.adapter}" if input.adapter else "",
    log:
        "logs/predict/{split}/{row}/{cell}/{shard}.log",
    wildcard_constraints:
        row="|".join(LLM_ROWS) or "none",
    conda:
        "../envs/llm.yaml"
    shell:
        "python -m synthpert predict --questions {input.questions} --row {wildcards.row} "
        "--cell {wildcards.cell} --shard {wildcards.shard} --split {wildcards.split} "
        "{params.adapter} --settings {params.settings:q} --out {output} 2> {log}"


rule baseline:
    input:
        split_file="results/data/splits/{split}.parquet",
        questions="results/eval/{split}/questions.parquet",
    output:
        "results/predictions/{split}/{row}/{cell}.parquet",
    params:
        settings=settings("evaluate"),
    log:
        "logs/baseline/{split}/{row}/{cell}.log",
    wildcard_constraints:
        row="|".join(BASELINE_ROWS) or "none",
    conda:
        "../envs/evaluate.yaml"
    shell:
        "python -m synthpert baseline --row {wildcards.row} --cell {wildcards.cell} "
        "--splits-file {input.split_file} --questions {input.questions} "
        "--settings {params.settings:q} --out {output} 2> {log}"


TABLE_SPLIT = {"1": "default", "2": "default", "3": "default", "4": HOLDOUT_TABLE_SPLIT}


def table_inputs(wildcards):
    split = TABLE_SPLIT[wildcards.n]
    return {
        "predictions": all_predictions(split),
        "split_file": f"results/data/splits/{split}.parquet",
        "questions": f"results/eval/{split}/questions.parquet",
    }


rule auroc_table:
    input:
        unpack(table_inputs),
    output:
        report("results/table{n}.csv", category="Tables", caption="../report/tables.rst"),
    params:
        settings=settings("evaluate"),
        split=lambda wildcards: TABLE_SPLIT[wildcards.n],
    log:
        "logs/tables/table{n}.log",
    wildcard_constraints:
        n="[12]",
    conda:
        "../envs/evaluate.yaml"
    shell:
        "python -m synthpert tables --table {wildcards.n} --split {params.split} "
        "--predictions {input.predictions} --splits-file {input.split_file} "
        "--questions {input.questions} --settings {params.settings:q} --out {output} 2> {log}"


rule class_table:
    input:
        unpack(table_inputs),
    output:
        table=report("results/table{n}.csv", category="Tables", caption="../report/tables.rst"),
        ci="results/table{n}_ci.csv",
        unseen=report(
            "results/table{n}_unseen.csv", category="Tables", caption="../report/unseen.rst"
        ),
    params:
        settings=settings("evaluate"),
        split=lambda wildcards: TABLE_SPLIT[wildcards.n],
    log:
        "logs/tables/table{n}.log",
    wildcard_constraints:
        n="[34]",
    conda:
        "../envs/evaluate.yaml"
    shell:
        "python -m synthpert tables --table {wildcards.n} --split {params.split} "
        "--predictions {input.predictions} --splits-file {input.split_file} "
        "--questions {input.questions} --settings {params.settings:q} "
        "--out {output.table} 2> {log}"


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
