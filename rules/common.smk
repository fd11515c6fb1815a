import hashlib
import json
import re
import shlex

from synthpert.core import config as cfg
from synthpert.core import paths, rows, splits
from synthpert.core import settings as step_settings
from synthpert.llm.embedded import embedded_dir, is_embedded

cfg.check(config)

# Rules run `python -m synthpert <step>` from this checkout's source, so a per-rule conda
# environment (envs/) needs only the third-party packages.
# (Braces are doubled twice: once for this f-string, once for Snakemake's formatting.)
SRC = shlex.quote(f"{workflow.basedir}/src")
shell.prefix(f"set -euo pipefail; export PYTHONPATH={SRC}:${{{{PYTHONPATH:-}}}}; ")

SPLITS = splits.splits(config)
FILES = [f"{c}-{k}.csv" for c in cfg.fetched_cells(config) for k in ("de", "dir")]
LLM_ROWS = [r for r in config["evaluate"]["rows"] if r in rows.LLM_ROWS]
BASELINE_ROWS = [r for r in config["evaluate"]["rows"] if r not in rows.LLM_ROWS]
# LLM rows answered together by one vLLM engine per shard (rule predict_student), and
# those answered one row per job (rule predict).
ENGINE_ROWS = rows.engine_rows(config)
SINGLE_ROWS = [
    r for r in LLM_ROWS if r not in ENGINE_ROWS and not rows.uses_evidence(r)
]
# Rows shown each question's evidence block (rule predict_evidence; off unless listed).
EVIDENCE_ROWS = [r for r in LLM_ROWS if rows.uses_evidence(r)]
# Table 4: the first held-out cell line (the paper holds out RPE1).
HOLDOUT_TABLE_SPLIT = SPLITS[1] if len(SPLITS) > 1 else None
# critic_select always writes both plain variants; the balanced one only when trained.
SFT_VARIANTS = rows.sft_variants(config)


wildcard_constraints:
    split="|".join(SPLITS),
    cell="|".join(config["data"]["cells"]),
    shard=r"\d+",
    variant="|".join(rows.TRAINED_ROWS),
    row="|".join(config["evaluate"]["rows"]),


# The one shell line of both trace rules: the evidence traces add `--evidence`.
TRACES_SHELL = (
    "python -m synthpert traces run --sample {{input.sample}} {evidence}--cell {{wildcards.cell}} "
    "--shard {{wildcards.shard}} --settings {{params.settings:q}} --run {{params.run:q}} "
    "--out {{output.traces}} 2> {{log}}"
)

# The one shell line of both predict rules (one row per job, or the rows one engine answers
# together); each fills in where its rows and adapters come from.
PREDICT_SHELL = (
    "python -m synthpert predict --questions {{input.questions}} --row {row} "
    "--cell {{wildcards.cell}} --shard {{wildcards.shard}} --split {{wildcards.split}} "
    "{adapters} --settings {{params.settings:q}} --run {{params.run:q}} --out {{output}} 2> {{log}}"
)

# The one shell line of both table rules (tables 1-2: AUROC; 3-4: classes, with their
# intervals and unseen-perturbation files named after the table).
TABLES_SHELL = (
    "python -m synthpert tables --table {{wildcards.n}} --split {{params.split}} "
    "--predictions {{input.predictions}} --splits-file {{input.split_file}} "
    "--questions {{input.questions}} --settings {{params.settings:q}} --out {out} 2> {{log}}"
)


def result_settings(step, **fixed):
    """What decides a step's output, as JSON (`synthpert.core.settings`): a job re-runs when it
    changes. Use as `params: settings=result_settings(step)`; `fixed` gives wildcards a
    rule does not have."""
    return lambda wildcards: step_settings.for_step(
        config, step, **dict(wildcards.items()), **fixed
    ).params_json()


def run_settings(step, **fixed):
    """How a step runs (concurrency, retries, batch sizes, caps, logging), as JSON. A
    params function of `resources` counts as derived from the job's resources, so
    Snakemake never re-runs a job because it changed; the training steps read their process
    count from those resources (`settings.job_processes`). Use as
    `params: run=run_settings(step)`.
    """
    return lambda wildcards, resources: step_settings.for_step(
        config,
        step,
        resources=dict(resources.items()),
        **dict(wildcards.items()),
        **fixed,
    ).run_json()


def model_files(name):
    """The files of model `name` a job reads: the converted embedded model, and a chat
    template file (its content decides the prompts)."""
    spec = config["models"][name]
    files = [str(embedded_dir(spec["model"]))] if is_embedded(spec["model"]) else []
    return files + ([spec["chat_template"]] if spec["chat_template"] else [])


def graded_shards(evidence):
    """The graded trace shards of a split (of the evidence traces with `evidence`)."""
    return lambda wildcards: [
        str(paths.graded_shard(wildcards.split, cell, shard, evidence=evidence))
        for cell in splits.train_cells(config, wildcards.split)
        for shard in range(config["traces"]["shards"])
    ]


def predictions(split, row):
    cells = splits.test_cells(config, split)
    if row in BASELINE_ROWS:
        return [str(paths.predictions(split, row, cell)) for cell in cells]
    return [
        str(paths.predictions(split, row, cell, shard))
        for cell in cells
        for shard in range(config["evaluate"]["shards"])
    ]


def all_predictions(split):
    return [p for row in config["evaluate"]["rows"] for p in predictions(split, row)]


def all_targets():
    targets = [
        "results/table5.csv",
        "results/table1.csv",
        "results/table2.csv",
        "results/table3.csv",
    ]
    views = ["1", "2", "3"]
    if HOLDOUT_TABLE_SPLIT in SPLITS:
        targets.append("results/table4.csv")
        views.append("4")
    targets += expand("results/plots/views_table{n}.png", n=views)
    if config["evaluate"]["cell_eval"]:
        targets += [
            "results/screen_scores.csv",
            "results/plots/screen_scores_auroc.png",
        ]
    for split in SPLITS:
        targets += [
            f"results/plots/{split}/roc_de3.png",
            f"results/plots/{split}/roc_dir.png",
            f"results/plots/{split}/confusion.png",
        ]
        if rows.plain_traces(config):
            targets.append(f"results/plots/{split}/critic_grades.png")
        if rows.evidence_traces(config):
            targets.append(f"results/plots/{split}/critic_grades_evidence.png")
        targets += expand(
            "results/models/{split}/{variant}/loss.png",
            split=split,
            variant=config["train"]["variants"],
        )
        targets += [
            f"results/models/{split}/{row}/{curve}.png"
            for row in config["evaluate"]["rows"]
            if row in rows.RL_ROWS
            for curve in ("reward", "kl")
        ]
    return targets


def row_model(wildcards):
    """The embedded model a row needs, if any (the teacher row asks the teacher)."""
    return model_files(rows.row_model_name(wildcards.row, config))


def row_adapter(wildcards):
    """The fine-tuned adapter of a trained row."""
    if wildcards.row in rows.ADAPTER_ROWS:
        return [str(paths.adapter_dir(wildcards.split, wildcards.row))]
    return []


def adapter_option(wildcards, input):
    """`--adapter PATH` for a fine-tuned row, nothing otherwise (derived from the input:
    the adapter's files, not this text, decide when a job re-runs)."""
    return f"--adapter {input.adapter}" if input.adapter else ""


def engine_adapters(wildcards):
    """The adapters of the fine-tuned rows among ENGINE_ROWS, in their order."""
    return [
        str(paths.adapter_dir(wildcards.split, row))
        for row in ENGINE_ROWS
        if row in rows.ADAPTER_ROWS
    ]


def rl_start_adapter(wildcards):
    """The SFT adapter a GRPO row continues (`synthpert_grpo`: the `synthpert` adapter)."""
    return str(paths.adapter_dir(wildcards.split, rows.RL_ROWS[wildcards.rl_row]))


TABLE_SPLIT = {"1": "default", "2": "default", "3": "default", "4": HOLDOUT_TABLE_SPLIT}


def table_inputs(wildcards):
    split = TABLE_SPLIT[wildcards.n]
    return {
        "predictions": all_predictions(split),
        "split_file": str(paths.split_table(split)),
        "questions": str(paths.questions(split)),
    }


def screen_split(wildcards):
    """The split of the configured screen (`default` for a screen asked for by path only)."""
    key = (wildcards.model, wildcards.cell, wildcards.pert)
    for entry in config["screens"]:
        if (entry["model"], entry["cell"], entry["pert"]) == key:
            return entry.get("split", "default")
    return "default"


def screen_inputs(wildcards):
    """The split table, the files of the screen's model, and the adapter of a trained row
    (names resolve as in `synthpert ask`: `models:` first, then model rows)."""
    split = screen_split(wildcards)
    name, trained = rows.model_of(wildcards.model, config)
    inputs = {
        "split_file": str(paths.split_table(split)),
        "model": model_files(name),
    }
    if trained:
        inputs["adapter"] = str(paths.adapter_dir(split, wildcards.model))
    return inputs


def screen_targets():
    """The CSV of every screen in config `screens:`."""
    return [
        f"results/screens/{s['model']}/{s['cell']}/{s['pert']}.csv"
        for s in config["screens"]
    ]


def score_screens_inputs(wildcards):
    """Every row's predictions of the default split, every configured screen's Parquet, and
    derive's statistics of each derived cell line (its real side)."""
    return {
        "predictions": all_predictions("default"),
        "screens": [t.removesuffix(".csv") + ".parquet" for t in screen_targets()],
        "stats": [
            f"results/derived/{c}/stats.parquet" for c in config["data"]["derive"]
        ],
    }


def score_screens_stats(wildcards, input):
    """`--stats CELL=PATH` arguments of the derived cell lines."""
    return " ".join(f"{c}={p}" for c, p in zip(config["data"]["derive"], input.stats))


def cell_files(cell):
    """A cell line's DE and direction CSVs: fetched from `data.source`, or derived from
    its own screen (`data.derive`)."""
    folder = (
        f"results/derived/{cell}"
        if cell in config["data"]["derive"]
        else "resources/perturbqa"
    )
    return [f"{folder}/{cell}-{kind}.csv" for kind in ("de", "dir")]


def cell_dirs():
    """`prepare --cell-dir` arguments: the folder of every derived cell line's CSVs."""
    return " ".join(f"{c}=results/derived/{c}" for c in config["data"]["derive"])


def plan_model_files():
    """The files of every model the plan counts tokens with."""
    names = {config[step]["model"] for step in ("traces", "critic", "train")}
    return [f for name in sorted(names) for f in model_files(name)]


def existing_request_logs(wildcards):
    """The request logs the configured jobs have written so far (known paths, never a
    glob): inputs of the plan, so it is redone when one is added or grows."""
    return [str(p) for p in paths.request_logs(config) if p.is_file()]
