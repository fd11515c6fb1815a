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


rule score_screens:
    input:
        unpack(score_screens_inputs),
    output:
        scores=report(
            "results/screen_scores.csv",
            category="Screens scored by cell-eval",
            caption="../report/screen_scores.rst",
        ),
        per_pert="results/screen_scores_per_pert.csv",
        tables=directory("results/celleval"),
        plot=report(
            "results/plots/screen_scores_auroc.png",
            category="Screens scored by cell-eval",
            caption="../report/screen_scores.rst",
        ),
    log:
        "logs/score_screens.log",
    conda:
        "../envs/celleval.yaml"
    params:
        stats=score_screens_stats,
    shell:
        "python -m synthpert score-screens --predictions {input.predictions} "
        "--screens {input.screens} --stats {params.stats} --tables {output.tables} "
        "--plot {output.plot} --out {output.scores} 2> {log}"
