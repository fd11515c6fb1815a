"""`synthpert grpo`: reinforcement learning after SFT. TRL's `GRPOTrainer` continues a trained
adapter (the `synthpert` row's, for `synthpert_grpo`) on training tuples the traces did not use,
rewarded by the evaluation's parser against the PerturbQA label (`evaluation/rewards.py`).

* Prompts: the split's training tuples less the trace sample, drawn by `rl.sample` (balanced
  by class by default, so "not DE", 86% of tuples, cannot win the reward), asked exactly as
  the evaluation asks a local model: the C.1 question rendered by the student's chat template,
  then the `<think>` prefill. The token ids TRL will see are checked against the evaluation's.
  An evidence row (`synthpert_grpo_evidence`, from `synthpert_evidence`) adds each tuple's
  evidence block, built here from the split's training rows as `synthpert evidence-table` builds it.
* Advantages are the reward minus its group mean, unscaled (`scale_rewards="none"`): on a
  balanced batch, an answer given whatever the question gains nothing.
* Generation runs through vLLM (TRL's `use_vllm`) when the student's backend is `vllm` and a
  GPU is present, as the evaluation would; otherwise through transformers. The engine is
  colocated in every training process (`rl.vllm_mode: colocate`), or a `trl vllm-serve` on the
  job's last GPU while the others train (`server`, `llm/launch.py`).
* A killed job resumes from its last complete checkpoint, as `train` does; a job of several
  processes is launched, split and written (rank 0 only) as `train`'s is.

Outputs in `--out-dir`: `adapter/`, `grpo_log.csv` (reward, per-class correctness, KL per
logged step), `reward.png`, `kl.png`, `grpo_metrics.json` (written last: the marker).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from synthpert.core.arguments import add_settings_arguments
from synthpert.core.digest import folder_digest, text_digest
from synthpert.core.figures import save_figure
from synthpert.core.io import write_csv
from synthpert.core.labels import CLASS_KEYS, NOT_DE
from synthpert.core.sampling import balanced, sample_size
from synthpert.core.settings import Generation, Grpo, GrpoEvidence, Sample
from synthpert.errors import CommandError
from synthpert.evaluation.answers import qid_expr, question_request, with_evidence
from synthpert.evaluation.baselines import load_splits
from synthpert.evaluation.evidence import KEY, build
from synthpert.evaluation.rewards import TASK, CompletionRewards
from synthpert.llm import launch
from synthpert.llm.model import check_adapter, load_tokenizer, resolve_local_model
from synthpert.llm.prompting import encode, render
from synthpert.llm.training import (
    distributed_arguments,
    fingerprint,
    move_into_place,
    peak_memory,
    precision,
    process_batches,
    resume_point,
    trainer_arguments,
)

log = logging.getLogger(__name__)

TUPLE = ["cell", "pert", "gene"]
CLASS_COLUMNS = [f"correct/{CLASS_KEYS[c]}" for c in sorted(CLASS_KEYS)]
LOG_COLUMNS = [
    "step", "reward", "reward_std", "rewards/correct/mean", "rewards/well_formed/mean", *CLASS_COLUMNS,
    "kl", "loss", "entropy", "completions/mean_length", "completions/clipped_ratio", "learning_rate",
]  # fmt: skip
OUTPUTS = ["adapter", "grpo_log.csv", "reward.png", "kl.png", "grpo_metrics.json"]  # the marker last


# --------------------------------------------------------------------------- prompts


def draw_prompts(split_df: pl.DataFrame, traced: pl.DataFrame, sample: Sample) -> pl.DataFrame:
    """Training tuples of the split that the traces did not sample, drawn by `sample`
    (balanced by class, or uniformly); sorted first, so the draw depends on data and seed only."""
    missing = [c for c in [*TUPLE, "label", "role"] if c not in split_df.columns]
    if missing:
        raise CommandError(f"the split table lacks column(s) {missing}; found {split_df.columns}")
    if any(c not in traced.columns for c in TUPLE):
        raise CommandError(f"the trace sample needs columns {TUPLE}; found {traced.columns}")
    pool = (
        split_df.filter(pl.col("role") == "train")
        .join(traced.select(TUPLE).unique(), on=TUPLE, how="anti")
        .select([*TUPLE, "label"])
        .sort(TUPLE)
    )
    if pool.height == 0:
        raise CommandError("no training tuple is left for GRPO once the trace sample is taken out")
    size = sample_size(pool.height, sample)
    drawn = balanced(pool, "label", size, sample.seed) if sample.balanced else pool.sample(size, seed=sample.seed)
    return drawn.with_columns(qid_expr().alias("qid")).sort(TUPLE)


def prompt_texts(tokenizer, rows: pl.DataFrame, generation: Generation) -> tuple[list[str], str]:
    """Each tuple's prompt as the evaluation renders it for a local model (chat template, then
    the prefill), and the prefill. TRL tokenises text with special tokens, so a BOS the
    tokenizer adds itself is taken off the text; the ids must equal the evaluation's."""
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    texts, prefill = [], ""
    for q in rows.iter_rows(named=True):
        request = question_request(q, TASK, generation, local=True)
        rendered, prefill = render(tokenizer, request) + request.prefill, request.prefill
        text = rendered.removeprefix(tokenizer.bos_token) if adds_bos else rendered
        if tokenizer(text)["input_ids"] != encode(tokenizer, rendered):
            raise CommandError(f"TRL would tokenise the GRPO prompt of {q['qid']} differently from the evaluation")
        texts.append(text)
    return texts, prefill


# --------------------------------------------------------------------------- trainer


def use_vllm(cfg: Grpo) -> bool:
    """Generate with vLLM (TRL's colocated engine) where the evaluation would: a vllm student on a GPU."""
    return cfg.model.backend == "vllm" and torch.cuda.is_available()


def vllm_arguments(cfg: Grpo) -> dict[str, Any]:
    """TRL's vLLM settings: colocated, or the server the launcher started (`llm/launch.py`)."""
    if not use_vllm(cfg):
        return {"use_vllm": False}
    if cfg.vllm_mode == "colocate":
        return {"use_vllm": True, "vllm_mode": "colocate"}
    host, _, port = os.environ.get(launch.VLLM_SERVER, "").rpartition(":")
    if not host:
        raise CommandError(f"rl.vllm_mode server: no vLLM server was started for this job ({launch.VLLM_SERVER} unset)")
    return {"use_vllm": True, "vllm_mode": "server", "vllm_server_host": host, "vllm_server_port": int(port)}


def build_trainer(model, tokenizer, dataset, cfg: Grpo, rewards: CompletionRewards, checkpoint_dir) -> GRPOTrainer:
    processes = launch.world_size()
    batch, accumulation = process_batches(cfg.batch_size, cfg.gradient_accumulation_steps, processes, "rl")
    args = GRPOConfig(
        output_dir=str(checkpoint_dir),
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_k=0,  # plain sampling at the temperature, as the evaluation samples
        beta=cfg.beta,
        scale_rewards="none",  # advantages: reward minus the group mean (see evaluation/rewards.py)
        reward_weights=[1.0, cfg.format_weight],
        **vllm_arguments(cfg),
        **trainer_arguments(model, cfg.seed, cfg.logging_steps, cfg.save_steps),
        **distributed_arguments(processes),
    )
    return GRPOTrainer(
        model=model, reward_funcs=rewards.functions(), args=args, train_dataset=dataset, processing_class=tokenizer
    )


def load_policy(path: str, adapter: str, dtype, revision: str | None):
    """The student with the SFT adapter, trainable (GRPO continues it; with beta > 0 TRL keeps a
    frozen copy as the reference of the KL)."""
    try:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision)
    except OSError as err:
        raise CommandError(f"cannot load the student {path!r}: {err}") from None
    base.config.use_cache = False
    return PeftModel.from_pretrained(base, adapter, is_trainable=True)


# --------------------------------------------------------------------------- outputs


def write_log(history: list[dict], csv_path: Path, reward_png: Path, kl_png: Path) -> list[dict]:
    """grpo_log.csv, the reward curve (total, correctness, per class) and the KL curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{c: entry.get(c) for c in LOG_COLUMNS} for entry in history if "reward" in entry]
    schema = {c: pl.Int64 if c == "step" else pl.Float64 for c in LOG_COLUMNS}
    write_csv(pl.DataFrame(rows, schema=schema), csv_path)
    steps = [r["step"] for r in rows]
    marker = "." if len(rows) < 50 else None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [r["reward"] for r in rows], marker=marker, label="reward (weighted sum)", lw=2)
    ax.plot(steps, [r["rewards/correct/mean"] for r in rows], marker=marker, label="correct")
    for column in CLASS_COLUMNS:
        ax.plot(steps, [r[column] for r in rows], ls="--", marker=marker, label=column.replace("/", ": "))
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("GRPO reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, reward_png)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    kl = [r["kl"] for r in rows]
    if any(v is not None for v in kl):
        ax.plot(steps, kl, marker=marker)
    else:
        ax.text(0.5, 0.5, "rl.beta = 0: no reference, no KL", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("KL(policy || SFT adapter)")
    ax.set_title("GRPO KL to the starting adapter")
    ax.grid(alpha=0.3)
    save_figure(fig, kl_png)
    plt.close(fig)
    return rows


def _mean(rows: list[dict], column: str, last: bool) -> float | None:
    values = [r[column] for r in rows if r[column] is not None]
    return (values[-1] if last else values[0]) if values else None


# --------------------------------------------------------------------------- the step


def grpo(split_file, trace_sample, adapter, cfg: Grpo, out_dir, checkpoint_dir=None) -> dict[str, Any] | None:
    """Continue `adapter` by GRPO; returns the metrics written to grpo_metrics.json (None in a
    worker other than rank 0)."""
    out_dir = Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir / "checkpoints"
    if cfg.batch_size % cfg.num_generations:
        raise CommandError(f"rl.batch_size {cfg.batch_size} must be a multiple of rl.num_generations {cfg.num_generations}")
    if not cfg.model.local:
        raise CommandError(f"the student {cfg.model.model!r} must use backend 'local' or 'vllm', not {cfg.model.backend!r}")
    check_adapter(str(adapter))
    for path in (split_file, trace_sample):
        if not Path(path).is_file():
            raise CommandError(f"{path} does not exist")
    dtype, dtype_name = precision(cfg.model.dtype)
    rows = draw_prompts(pl.read_parquet(split_file), pl.read_parquet(trace_sample), cfg.sample)
    if isinstance(cfg, GrpoEvidence):  # an evidence row: each prompt holds its tuple's block
        blocks = build(load_splits(split_file), rows.select(KEY), cfg.evidence)
        rows = with_evidence(rows, blocks, "grpo")
    counts = {CLASS_KEYS[c]: n for c, n in sorted(rows.group_by("label").len().iter_rows())}
    log.info("%d GRPO prompts by class: %s", rows.height, counts)
    if not cfg.sample.balanced:
        log.warning("rl.sample is not balanced by class: a policy that always answers the majority class gains")

    student = resolve_local_model(cfg.model.model)
    tokenizer = load_tokenizer(cfg.model, student)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    generation = Generation(cfg.max_completion_length, cfg.temperature, 1.0, None)
    texts, prefill = prompt_texts(tokenizer, rows, generation)
    dataset = Dataset.from_dict({"prompt": texts, "label": rows["label"].to_list()})

    identity = {
        **cfg.params(), "student": student, "dtype": dtype_name, "adapter": folder_digest(adapter),
        "prompts": text_digest(json.dumps(texts)),
    }  # fmt: skip
    model = load_policy(student, str(adapter), dtype, cfg.model.revision)
    eos = model.generation_config.eos_token_id
    stop_ids = {i for i in [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id] if i is not None}
    trainer = build_trainer(model, tokenizer, dataset, cfg, CompletionRewards(prefill, stop_ids), checkpoint_dir)
    with trainer.accelerator.main_process_first():  # rank 0 cleans up, the others find the same checkpoint
        resume = resume_point(checkpoint_dir, fingerprint(Path(split_file), identity))

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if resume is not None:
        log.info("resuming from %s", resume)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    runtime = time.perf_counter() - start
    memory, memory_source = peak_memory()
    trainer.accelerator.wait_for_everyone()  # every rank has written its part of the last checkpoint
    if not trainer.is_world_process_zero():
        return None

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".tmp-grpo-"))
    try:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        policy.save_pretrained(str(staging / "adapter"), selected_adapters=["default"])  # not the frozen reference
        tokenizer.save_pretrained(str(staging / "adapter"))
        logged = write_log(
            trainer.state.log_history, staging / "grpo_log.csv", staging / "reward.png", staging / "kl.png"
        )
        metrics = {
            "model": student,
            "precision": dtype_name,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "generation": f"vllm ({cfg.vllm_mode})" if use_vllm(cfg) else "transformers",
            "processes": trainer.accelerator.num_processes,
            "batch_per_process": trainer.args.per_device_train_batch_size,
            "gradient_accumulation": trainer.args.gradient_accumulation_steps,
            "prompts": rows.height,
            "prompts_by_class": counts,
            "not_de_share": counts.get(CLASS_KEYS[NOT_DE], 0) / rows.height,
            "steps": trainer.state.global_step,
            "resumed_from_step": int(resume.name.split("-")[-1]) if resume else None,
            "train_runtime_s": runtime,
            "peak_memory_bytes": memory,
            "peak_memory_source": memory_source,
            **{
                f"{column}_{when}": _mean(logged, column, when == "last")
                for column in ("reward", "rewards/correct/mean", *CLASS_COLUMNS, "kl")
                for when in ("first", "last")
            },
        }
        log.info(
            "GRPO %d steps in %.1f s; reward %s -> %s; KL %s",
            metrics["steps"], runtime, metrics["reward_first"], metrics["reward_last"], metrics["kl_last"],
        )  # fmt: skip
        (staging / "grpo_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        move_into_place(staging, out_dir, OUTPUTS)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(checkpoint_dir)  # the run is complete: nothing left to resume
    return metrics


def add_arguments(parser) -> None:
    parser.add_argument("--split-file", required=True, help="the split table (results/data/splits/{split}.parquet)")
    parser.add_argument("--trace-sample", required=True, help="the traces' sample (its tuples are not GRPO prompts)")
    parser.add_argument("--adapter", required=True, help="the SFT adapter GRPO continues")
    add_settings_arguments(parser, "grpo")
    parser.add_argument("--out-dir", required=True, help="folder for adapter/, grpo_log.csv, reward.png, kl.png, grpo_metrics.json")
    parser.add_argument("--checkpoint-dir", default=None, help="where checkpoints live while training")


def main(args) -> None:
    cfg = Grpo.from_cli(args.settings, args.run)
    server = cfg.vllm_mode == "server" and use_vllm(cfg)
    if server and launch.plan(cfg.processes).launcher != "worker":
        # generation on the job's last GPU, training on the others
        with launch.vllm_server(resolve_local_model(cfg.model.model), cfg.processes) as training_env:
            if not launch.run_step(args.argv, cfg.processes - 1, training_env):
                os.environ.update(training_env)  # one training process: this one
                grpo(args.split_file, args.trace_sample, args.adapter, cfg, args.out_dir, args.checkpoint_dir)
        return
    if not launch.run_step(args.argv, cfg.processes):  # several processes: the workers ran the step
        grpo(args.split_file, args.trace_sample, args.adapter, cfg, args.out_dir, args.checkpoint_dir)
