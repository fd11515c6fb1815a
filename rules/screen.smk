def screen_split(wildcards):
    """The split of the configured screen (`default` for a screen asked for by path only)."""
    key = (wildcards.model, wildcards.cell, wildcards.pert)
    for entry in config["screens"]:
        if (entry["model"], entry["cell"], entry["pert"]) == key:
            return entry.get("split", "default")
    return "default"


def screen_inputs(wildcards):
    """The split table, the embedded model the screen's model needs, and the adapter of a
    trained row (names resolve as in `synthpert ask`: `models:` first, then model rows).
    """
    model, split = wildcards.model, screen_split(wildcards)
    if model in config["models"]:
        name = model
    elif model in cfg.LLM_ROWS:
        name = (
            config["traces"]["model"]
            if model == "teacher"
            else config["train"]["model"]
        )
    else:
        raise ValueError(
            f"screen model {model!r} is neither in models: {sorted(config['models'])} "
            f"nor a model row {sorted(cfg.LLM_ROWS)}"
        )
    inputs = {
        "split_file": f"results/data/splits/{split}.parquet",
        "model": model_files(name),
    }
    if model not in config["models"] and model in cfg.TRAINED_ROWS:
        inputs["adapter"] = f"results/models/{split}/{model}/adapter"
    return inputs


def screen_targets():
    """The CSV of every screen in config `screens:`."""
    return [
        f"results/screens/{s['model']}/{s['cell']}/{s['pert']}.csv"
        for s in config["screens"]
    ]


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
        settings=settings("models", "evaluate", "traces", "train"),
        split=screen_split,
    shell:
        "python -m synthpert screen --model {wildcards.model} --cell {wildcards.cell} "
        "--pert {wildcards.pert:q} --split {params.split} --all-measured --results results "
        "--settings {params.settings:q} --out {output.csv} 2> {log}"
