rule screen:
    input:
        unpack(screen_inputs),
    output:
        csv="results/screens/{model}/{cell}/{pert}.csv",
        parquet="results/screens/{model}/{cell}/{pert}.parquet",
        summary="results/screens/{model}/{cell}/{pert}.summary.json",
        plot=report(
            "results/screens/{model}/{cell}/{pert}.png",
            category="Screens",
            subcategory="{model}",
            labels={"model": "{model}", "cell": "{cell}", "perturbation": "{pert}"},
        ),
    log:
        "logs/screens/{model}/{cell}/{pert}.log",
    wildcard_constraints:
        model=r"[^/]+",
        pert=r"[^/]+",
    conda:
        "../envs/llm.yaml"
    params:
        settings=result_settings("screen"),
        run=run_settings("screen"),
        split=screen_split,
    shell:
        "python -m synthpert screen --model {wildcards.model} --cell {wildcards.cell} "
        "--pert {wildcards.pert:q} --split {params.split} --all-measured --results results "
        "--settings {params.settings:q} --run {params.run:q} --out {output.csv} 2> {log}"
