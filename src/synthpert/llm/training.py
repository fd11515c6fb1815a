"""What the training steps (`train`: SFT, `grpo`: RL after it) share: the precision a
student trains in, how a batch is split over several processes (`llm/launch.py` starts
them), checkpoints that resume only their own run, and outputs staged then moved into
place with their marker last."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import resource
import shutil
from pathlib import Path
from typing import Any

import torch

from synthpert.core.io import atomic_path
from synthpert.errors import CommandError
from synthpert.llm.model import resolve_dtype

log = logging.getLogger(__name__)

SAVE_TOTAL_LIMIT = 2  # checkpoints kept on disk: the newest and one spare


def precision(dtype_setting: str = "auto", load_in_4bit: bool = False) -> tuple[Any, str]:
    """(torch dtype to load the student in, name): `llm.model.resolve_dtype`, so a model
    trains in the precision its answers are keyed under."""
    cuda = torch.cuda.is_available()
    if load_in_4bit and not cuda:
        raise CommandError("train.load_in_4bit (QLoRA through bitsandbytes) needs a CUDA GPU; none is available")
    dtype_setting = resolve_dtype(dtype_setting)  # the rule every backend names the model with
    if dtype_setting == "float16" and not cuda:
        raise CommandError("dtype float16 training needs a CUDA GPU; use float32 or auto on CPU")
    return getattr(torch, dtype_setting), dtype_setting


def trainer_arguments(model, seed: int, logging_steps: int, save_steps: int) -> dict[str, Any]:
    """The `TrainingArguments` both trainers share: precision of the loaded student, logging
    from the first step, checkpoints every `save_steps` (the last two kept), seeds."""
    cuda = torch.cuda.is_available()
    return dict(
        bf16=model.dtype == torch.bfloat16,
        fp16=model.dtype == torch.float16,
        gradient_checkpointing=cuda,  # memory is what limits a GPU; a CPU run is limited by time
        logging_steps=logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=SAVE_TOTAL_LIMIT,
        seed=seed,
        data_seed=seed,
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
    )


def process_batches(batch_size: int, accumulation: int, processes: int, section: str) -> tuple[int, int]:
    """(per-process batch, gradient accumulation) that keep an optimizer step at
    `batch_size` x `accumulation` sequences (the settings' effective batch) over `processes`
    processes: the accumulation shrinks first, then the per-process batch. One process
    keeps both as they are."""
    total = batch_size * accumulation
    for per_process in range(batch_size, 0, -1):
        if total % (per_process * processes) == 0:
            steps = total // (per_process * processes)
            log.info(
                "%d process(es) x batch %d x accumulation %d = %d sequences per optimizer step "
                "(%s.batch_size %d x %s.gradient_accumulation_steps %d)",
                processes, per_process, steps, total, section, batch_size, section, accumulation,
            )  # fmt: skip
            return per_process, steps
    raise CommandError(
        f"{section}.batch_size {batch_size} x {section}.gradient_accumulation_steps {accumulation} = {total} sequences "
        f"per step cannot be split evenly over {processes} processes; make it a multiple of {processes}"
    )


FSDP_ARGUMENTS = dict(  # the LoRA student's layers sharded, TRL's and PEFT's documented setup
    fsdp="full_shard auto_wrap",
    fsdp_config={
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "use_orig_params": False,
        "cpu_ram_efficient_loading": True,
        "sync_module_states": True,
        "state_dict_type": "FULL_STATE_DICT",  # the adapter is saved whole, by rank 0
    },
)


def distributed_arguments(processes: int, sharding: str = "none") -> dict[str, Any]:
    """The `TrainingArguments` of several processes (none for one: today's path):
    data parallel without searching for unused parameters (the frozen base has none to
    reduce), non-reentrant gradient checkpointing (DDP and FSDP need it), or FSDP; on CPUs,
    gloo."""
    if processes == 1:
        if sharding != "none":
            log.warning("sharding %r needs several processes; training in one process without it", sharding)
        return {}
    args: dict[str, Any] = {
        "ddp_find_unused_parameters": False,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
    }
    if not torch.cuda.is_available():  # CPU processes: accelerate joins them only when told so, through gloo
        args.update(use_cpu=True, ddp_backend="gloo")
    if sharding == "fsdp":
        args.update(FSDP_ARGUMENTS)
    elif sharding != "none":
        raise CommandError(f"sharding must be 'none' or 'fsdp', got {sharding!r}")
    return args


def fingerprint(data: Path, identity: dict[str, Any]) -> str:
    """Identity of a run (data bytes + what shapes the training): a checkpoint resumes only its own run."""
    h = hashlib.sha256()
    with open(data, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    h.update(json.dumps(identity, sort_keys=True, default=str).encode())
    return h.hexdigest()


def resume_point(checkpoint_dir: Path, run_id: str) -> Path | None:
    """The newest complete checkpoint of this run; stale or incomplete ones are removed. An
    empty folder (the trainer makes its output folder before this is asked) is a new run."""
    marker = checkpoint_dir / "run.json"
    if checkpoint_dir.exists() and any(checkpoint_dir.iterdir()):
        stale = not marker.exists() or json.loads(marker.read_text()).get("fingerprint") != run_id
        if stale:
            log.warning("discarding checkpoints in %s: they belong to other data or settings", checkpoint_dir)
            shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        with atomic_path(marker) as tmp:
            tmp.write_text(json.dumps({"fingerprint": run_id}))
    steps = {}
    for path in checkpoint_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            steps[int(match.group(1))] = path
    last = None
    for step in sorted(steps, reverse=True):
        if last is None and (steps[step] / "trainer_state.json").exists():
            last = steps[step]
        elif last is None:  # killed while saving: trainer_state.json is written last
            log.warning("removing incomplete checkpoint %s", steps[step])
            shutil.rmtree(steps[step])
    return last


def peak_memory() -> tuple[int, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


def move_into_place(staging: Path, out_dir: Path, names: list[str]) -> None:
    """Replace the outputs; the last name (the marker) goes in last."""
    marker = out_dir / names[-1]
    marker.unlink(missing_ok=True)
    for name in names:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)
