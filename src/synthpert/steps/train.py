"""`synthpert train`: LoRA fine-tuning of the student with TRL's `SFTTrainer`.

The input is one SFT table (`results/sft/{split}/{variant}.parquet`, column `messages`:
system, user, assistant). Three things matter more than speed here:

* The loss covers the whole assistant turn, reasoning included, and nothing else. The
  chat template decides that: DeepSeek-R1-Distill's own template deletes everything up to
  `</think>` in assistant turns, so rendered naively "training on traces" trains on the
  answer alone. `resolve_chat_template` picks a template that keeps the turn verbatim
  (an explicit file, else TRL's training variant of the tokenizer's template when TRL
  ships one, else the tokenizer's own template if a probe shows it keeps the turn) and
  refuses otherwise. With `{% generation %}` markers the loss is TRL's
  `assistant_only_loss`; without them the rows become prompt/completion conversations and
  the loss is TRL's `completion_only_loss`. After TRL has tokenised the data, the first
  row's loss-carrying tokens are decoded and must contain the assistant turn.
* Nothing is cut silently: every conversation is tokenised first; those longer than
  `max_length` are dropped with a warning and counted in `train_metrics.json`
  (`too_long`); TRL then runs without truncation. If none is left the step fails.
* A killed or pre-empted job resumes from its last complete checkpoint in
  `checkpoints/` (a checkpoint of other data or settings is discarded with a warning).
  Outputs are staged in a hidden folder and moved into place at the end, the marker
  `train_metrics.json` last; the checkpoints are removed once the outputs are in place.
* A job holding several processes (`processes`, from its resources) starts itself again
  under torchrun or srun (`llm/launch.py`); the workers train data parallel (or FSDP,
  `train.sharding`) with the per-process batch and accumulation that keep the settings'
  effective batch (`llm.training.process_batches`); only rank 0 writes the outputs and the
  logs, and it resumes from the same checkpoints. One process is the plain command.

Outputs in `--out-dir`: `adapter/` (PEFT adapter + tokenizer with the training chat
template), `train_log.csv`, `loss.png`, `train_metrics.json`.
"""

from __future__ import annotations

import dataclasses
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
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from synthpert.core.arguments import add_settings_arguments
from synthpert.core.io import write_csv
from synthpert.core.settings import Train
from synthpert.errors import CommandError
from synthpert.llm import launch
from synthpert.llm.model import resolve_local_model
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

LOG_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm", "entropy", "mean_token_accuracy"]
ASSISTANT_ONLY = "assistant_only_loss"  # template has {% generation %} markers
COMPLETION_ONLY = "completion_only_loss"  # prompt/completion conversations

# A conversation shaped like a training row; the assistant content must survive rendering.
PROBE = [
    {"role": "system", "content": "Probe system prompt."},
    {"role": "user", "content": "Probe question?"},
    {"role": "assistant", "content": "<think>Probe reasoning that must be kept.</think><answer>probe</answer>"},
]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """The template that renders training rows, where it came from, and how the loss is masked."""

    text: str
    source: str
    loss: str  # ASSISTANT_ONLY or COMPLETION_ONLY


# --------------------------------------------------------------------------- inputs


def read_conversations(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """The `messages` of every row; each must end with its only assistant turn."""
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"SFT data {path} does not exist")
    df = pl.read_parquet(path)
    if "messages" not in df.columns:
        raise CommandError(f"{path} has no 'messages' column (columns: {df.columns})")
    if df.height == 0:
        raise CommandError(f"{path} has no rows to train on")
    conversations = []
    for i, messages in enumerate(df["messages"].to_list()):
        roles = [m.get("role") for m in messages or []]
        if not roles or roles[-1] != "assistant" or roles.count("assistant") != 1 or "user" not in roles:
            raise CommandError(
                f"{path} row {i}: messages must be [system,] user, assistant with one final assistant turn; "
                f"got roles {roles}"
            )
        if any(not isinstance(m.get("content"), str) for m in messages):
            raise CommandError(f"{path} row {i}: every message needs a text 'content'")
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return conversations


def resolve_chat_template(tokenizer, template_path: str | os.PathLike | None = None) -> ChatTemplate:
    """Choose the template that renders training rows with the assistant turn kept verbatim.

    `template_path` (train.chat_template) wins; else TRL's training variant of the
    tokenizer's template (TRL ships them for DeepSeek-R1-Distill, Qwen3, Llama 3 ...);
    else the tokenizer's own template. The choice is checked on a probe conversation and
    refused with a CommandError when it would drop or move the assistant turn.
    """
    if template_path is not None:
        path = Path(template_path)
        if not path.is_file():
            raise CommandError(f"train.chat_template {path} does not exist")
        text, source = path.read_text(encoding="utf-8"), f"file {path}"
    else:
        own = tokenizer.chat_template
        own = own.get("default") if isinstance(own, dict) else own
        if not own:
            raise CommandError("the student's tokenizer has no chat template; set train.chat_template to a Jinja file")
        try:
            training = get_training_chat_template(tokenizer)
        except ValueError:  # TRL has no training variant of this template
            training = None
        if training is None:
            text, source = own, "the tokenizer's own template"
        else:
            text, source = training, "TRL's training variant of the tokenizer's template"
    template = ChatTemplate(text, source, ASSISTANT_ONLY if has_generation_markers(text) else COMPLETION_ONLY)
    _check_template(tokenizer, template)
    return template


def _check_template(tokenizer, template: ChatTemplate) -> None:
    hint = "set train.chat_template to a template that keeps the assistant turn (e.g. TRL's *_training.jinja)"
    full = tokenizer.apply_chat_template(PROBE, chat_template=template.text, tokenize=False)
    if PROBE[-1]["content"] not in full:
        raise CommandError(
            f"the chat template ({template.source}) does not keep the assistant turn verbatim (it drops the "
            f"reasoning?): {full!r}; {hint}"
        )
    if template.loss == COMPLETION_ONLY:
        prompt = tokenizer.apply_chat_template(
            PROBE[:-1], chat_template=template.text, tokenize=False, add_generation_prompt=True
        )
        if not full.startswith(prompt):
            raise CommandError(
                f"the chat template ({template.source}) has no {{% generation %}} markers and renders the prompt "
                f"differently alone ({prompt!r}) than before the answer ({full!r}); {hint}"
            )


def token_lengths(tokenizer, conversations: list[list[dict]], template: ChatTemplate) -> list[int]:
    """Tokens per rendered conversation: exactly what TRL tokenises in either loss mode."""
    ids = tokenizer.apply_chat_template(conversations, chat_template=template.text, tokenize=True, return_dict=True)
    return [len(row) for row in ids["input_ids"]]


def to_dataset(conversations: list[list[dict]], template: ChatTemplate):
    """A TRL conversational dataset: `messages`, or `prompt`/`completion` without generation markers."""
    if template.loss == ASSISTANT_ONLY:
        return Dataset.from_dict({"messages": conversations})
    return Dataset.from_dict({"prompt": [c[:-1] for c in conversations], "completion": [c[-1:] for c in conversations]})


# --------------------------------------------------------------------------- model and trainer


def load_student(path: str, dtype, load_in_4bit: bool = False, revision: str | None = None, sharded: bool = False):
    """The base model, optionally quantised to 4 bit (QLoRA; with FSDP its 4-bit weights are
    stored in `dtype`, which FSDP can shard, and placed by FSDP rather than here)."""
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": revision}
    if load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise CommandError("train.load_in_4bit needs bitsandbytes (pip install 'synthpert[gpu]')") from None
        compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
            **({"bnb_4bit_quant_storage": dtype} if sharded else {}),
        )  # fmt: skip
        if not sharded:  # this process's GPU (LOCAL_RANK under a launcher)
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise CommandError(f"cannot load the student {path!r}: {err}") from None
    model.config.use_cache = False  # no KV cache while training
    return model


def lora_config(cfg: Train):
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_trainer(
    model, tokenizer, conversations, cfg: Train, template: ChatTemplate, checkpoint_dir, callbacks=()
) -> SFTTrainer:
    """The SFTTrainer of a training run; TRL tokenises and masks the rows here.

    `max_length` is not passed to TRL: rows were measured and filtered before, so TRL
    must not truncate anything. Under a launcher, the batch is split over the processes.
    """
    tokenizer.chat_template = template.text  # TRL renders with it; saved with the adapter
    processes = launch.world_size()
    batch, accumulation = process_batches(cfg.batch_size, cfg.gradient_accumulation_steps, processes, "train")
    args = SFTConfig(
        output_dir=str(checkpoint_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_length=None,
        assistant_only_loss=template.loss == ASSISTANT_ONLY,
        completion_only_loss=template.loss == COMPLETION_ONLY,
        **trainer_arguments(model, cfg.seed, cfg.logging_steps, cfg.save_steps),
        **distributed_arguments(processes, cfg.sharding),
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(conversations, template),
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        callbacks=list(callbacks),
    )


def loss_text(tokenizer, example: dict) -> str:
    """The text of the tokens that carry loss in one prepared example (labels != -100)."""
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])


def check_loss_covers_assistant(tokenizer, example: dict, assistant: str) -> None:
    """Refuse to train when TRL's prepared row loses or cuts the assistant turn."""
    if _squash(assistant) not in _squash(loss_text(tokenizer, example)):
        raise CommandError(
            "the training loss does not cover the whole assistant turn (reasoning included); set "
            "train.chat_template to a template that keeps it"
        )


def _squash(text: str) -> str:
    return " ".join(text.split())  # decoding may normalise white space


# --------------------------------------------------------------------------- checkpoints


# --------------------------------------------------------------------------- outputs


class TokenCounter(TrainerCallback):
    """Tokens trained in this process: TRL logs them (`num_tokens`) cumulatively per process."""

    def __init__(self):
        self.tokens = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.tokens = max(self.tokens, int((logs or {}).get("num_tokens", 0)))


def write_log(history: list[dict], csv_path: Path, png_path: Path) -> list[dict]:
    """train_log.csv and loss.png from the trainer's log history (all sessions of a resumed run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [{col: entry.get(col) for col in LOG_COLUMNS} for entry in history if "loss" in entry]
    schema = {col: pl.Int64 if col == "step" else pl.Float64 for col in LOG_COLUMNS}
    write_csv(pl.DataFrame(rows, schema=schema), csv_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="." if len(rows) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("LoRA fine-tuning loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return rows


# --------------------------------------------------------------------------- the step


def train(data, cfg: Train, out_dir, checkpoint_dir=None) -> dict[str, Any] | None:
    """Fine-tune the student on one SFT table; returns the metrics written to train_metrics.json
    (None in a worker other than rank 0: it writes nothing)."""
    data, out_dir = Path(data), Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir / "checkpoints"
    for name in ("max_length", "batch_size", "save_steps", "logging_steps", "lora_r"):
        if getattr(cfg, name) < 1:
            raise CommandError(f"train.{name} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.model.local:
        raise CommandError(f"the student {cfg.model.model!r} must use backend 'local' or 'vllm', not {cfg.model.backend!r}")
    dtype, dtype_name = precision(cfg.model.dtype, cfg.load_in_4bit)  # fails before loading anything
    conversations = read_conversations(data)
    student = resolve_local_model(cfg.model.model)

    tokenizer = AutoTokenizer.from_pretrained(student, revision=cfg.model.revision)
    template = resolve_chat_template(tokenizer, cfg.chat_template)
    lengths = token_lengths(tokenizer, conversations, template)
    keep = [n <= cfg.max_length for n in lengths]
    too_long = keep.count(False)
    if too_long:
        log.warning(
            "dropping %d of %d conversations longer than max_length %d tokens (longest: %d)",
            too_long, len(lengths), cfg.max_length, max(lengths),
        )  # fmt: skip
    kept = [c for c, k in zip(conversations, keep) if k]
    if not kept:
        raise CommandError(f"every conversation in {data} is longer than train.max_length {cfg.max_length}")
    kept_tokens = sum(n for n, k in zip(lengths, keep) if k)
    log.info(
        "%d conversations (%d tokens) with %s; loss: %s", len(kept), kept_tokens, template.source, template.loss
    )

    sharded = cfg.sharding != "none" and launch.world_size() > 1  # FSDP needs several processes
    model = load_student(student, dtype, cfg.load_in_4bit, cfg.model.revision, sharded=sharded)
    counter = TokenCounter()
    trainer = build_trainer(model, tokenizer, kept, cfg, template, checkpoint_dir, [counter])
    # What decides the weights: a checkpoint of other data or settings is never resumed
    # (checkpoint and logging intervals and the process count are run settings and do not
    # count; sharding does, since FSDP writes its checkpoints in its own layout). Rank 0
    # cleans up first, the other processes then find the same checkpoint.
    identity = {**cfg.params(), "student": student, "dtype": dtype_name, "template": template.text}
    if sharded:
        identity["sharding"] = cfg.sharding
    with trainer.accelerator.main_process_first():
        resume = resume_point(checkpoint_dir, fingerprint(data, identity))
    check_loss_covers_assistant(tokenizer, trainer.train_dataset[0], kept[0][-1]["content"])
    prepared = max(map(len, trainer.train_dataset["input_ids"]))
    if prepared > cfg.max_length:  # guards the promise that nothing is truncated or overlong
        raise CommandError(f"TRL prepared a row of {prepared} tokens, more than train.max_length {cfg.max_length}")

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if resume is not None:
        log.info("resuming from %s", resume)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    runtime = time.perf_counter() - start
    memory, memory_source = peak_memory()
    trainer.accelerator.wait_for_everyone()  # every rank has written its part of the last checkpoint
    if not trainer.is_world_process_zero():
        return None

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".tmp-train-"))
    try:
        trainer.save_model(str(staging / "adapter"))  # adapter + tokenizer with the training template
        logged = write_log(trainer.state.log_history, staging / "train_log.csv", staging / "loss.png")
        metrics = {
            "model": student,
            "precision": "4bit-" + dtype_name if cfg.load_in_4bit else dtype_name,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "chat_template": template.source,
            "loss_mask": template.loss,
            "examples": len(conversations),
            "examples_trained": len(kept),
            "too_long": too_long,
            "max_length": cfg.max_length,
            "longest_tokens": max(lengths),
            "tokens_per_epoch": kept_tokens,
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "resumed_from_step": int(resume.name.split("-")[-1]) if resume else None,
            "processes": trainer.accelerator.num_processes,
            "batch_per_process": trainer.args.per_device_train_batch_size,
            "gradient_accumulation": trainer.args.gradient_accumulation_steps,
            "train_runtime_s": runtime,
            "session_tokens": counter.tokens,
            "tokens_per_second": counter.tokens / runtime if runtime > 0 else None,
            "peak_memory_bytes": memory,
            "peak_memory_source": memory_source,
            "final_loss": logged[-1]["loss"] if logged else None,
            "mean_loss_session": output.training_loss,
        }
        log.info(
            "trained %d steps, %d tokens in %.1f s: %.0f tokens/s; peak memory %.2f GiB (%s); final loss %s",
            metrics["steps"], counter.tokens, runtime, metrics["tokens_per_second"] or 0, memory / 2**30,
            memory_source, metrics["final_loss"],
        )  # fmt: skip
        (staging / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        move_into_place(staging, out_dir, ["adapter", "train_log.csv", "loss.png", "train_metrics.json"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(checkpoint_dir)  # the run is complete: nothing left to resume
    return metrics


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="SFT table (parquet with a 'messages' column)")
    add_settings_arguments(parser, "train")
    parser.add_argument(
        "--out-dir", required=True, help="folder for adapter/, train_log.csv, loss.png and train_metrics.json"
    )
    parser.add_argument(
        "--checkpoint-dir", default=None, help="where checkpoints live while training (default: OUT_DIR/checkpoints)"
    )


def main(args) -> None:
    cfg = Train.from_cli(args.settings, args.run)
    if not launch.run_step(args.argv, cfg.processes):  # several processes: the workers ran the step
        train(args.data, cfg, args.out_dir, args.checkpoint_dir)
