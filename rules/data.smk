rule fetch:
    output:
        "resources/perturbqa/{file}",
    log:
        "logs/fetch/{file}.log",
    wildcard_constraints:
        file="|".join(re.escape(f) for f in FILES),
    conda:
        "../envs/data.yaml"
    params:
        sha256=lambda wildcards: config["data"]["sha256"][wildcards.file],
        source=lambda wildcards, resources: config["data"]["source"],  # not a trigger: any mirror, same bytes
    shell:
        "python -m synthpert fetch --source {params.source:q} --name {wildcards.file} "
        "--sha256 {params.sha256} --out {output} 2> {log}"


rule derive:
    input:
        lambda wildcards: config["data"]["derive"][wildcards.cell]["h5ad"],
    output:
        de="results/derived/{cell}/{cell}-de.csv",
        dir="results/derived/{cell}/{cell}-dir.csv",
        stats="results/derived/{cell}/stats.parquet",
        summary="results/derived/{cell}/summary.json",
    log:
        "logs/derive/{cell}.log",
    wildcard_constraints:
        cell="|".join(config["data"]["derive"]) or "(?!)",
    conda:
        "../envs/derive.yaml"
    threads: 8  # DESeq2 worker processes, one perturbation each; capped at --cores
    params:
        settings=result_settings("derive"),
    shell:
        "python -m synthpert derive --h5ad {input:q} --settings {params.settings:q} "
        "--threads {threads} --de {output.de} --dir {output.dir} --stats {output.stats} "
        "--summary {output.summary} 2> {log}"


rule prepare:
    input:
        [f for cell in config["data"]["cells"] for f in cell_files(cell)],
    output:
        tuples="results/data/tuples.parquet",
        splits=expand("results/data/splits/{split}.parquet", split=SPLITS),
        table5=report(
            "results/table5.csv", category="Data", caption="../report/table5.rst"
        ),
    log:
        "logs/prepare.log",
    conda:
        "../envs/data.yaml"
    params:
        cells=config["data"]["cells"],
        holdout=config["data"]["holdout"],
        cell_dirs=cell_dirs(),
    shell:
        "python -m synthpert prepare --input-dir resources/perturbqa --cells {params.cells} "
        "--cell-dir {params.cell_dirs} "
        "--holdout {params.holdout} --tuples {output.tuples} "
        "--splits-dir results/data/splits --table5 {output.table5} 2> {log}"


rule embedded_model:
    output:
        directory("resources/models/{name}"),
    log:
        "logs/embedded_model/{name}.log",
    wildcard_constraints:
        name="smollm2-135m-instruct",
    conda:
        "../envs/llm.yaml"
    shell:
        "python -m synthpert embedded-model --out {output} 2> {log}"
