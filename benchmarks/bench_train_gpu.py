"""Training throughput of the LoRA SFT step on a Llama-3.1-8B-shaped model.

The model is built from a `LlamaConfig` with random weights (nothing is downloaded): the
speed of a training step does not depend on the weights. It is trained through TRL's
`SFTTrainer` with the LoRA setup of `synthpert train` (rank 32, alpha 32, all attention
and MLP projections) on random token sequences, a few warm-up steps first, then timed
steps. One summary line per configuration:

    [name] tokens/s, s/step, peak GPU memory, MFU against the card's dense bf16 peak

Model FLOPs per trained token (the usual MFU convention: recomputation by gradient
checkpointing is not counted):

    4 * N_frozen + 6 * N_lora + 12 * L * d * S_eff

* `N_frozen`: weights of the frozen linear layers (lm_head included, the embedding table
  excluded: a lookup does no matmul). They run forward (2 FLOPs per weight) and backward
  for the activation gradient (2 more), but get no weight gradient, hence 4 instead of 6.
* `N_lora`: trainable LoRA weights: forward, activation and weight gradients (6).
* attention scores and values: 4 * S * d FLOPs per token per layer forward, x3 with the
  backward pass (PaLM convention, no discount for the causal mask); `S_eff` is
  sum(s_i^2) / sum(s_i) over the sequences (= S for fixed-length sequences).

Peaks (dense bf16): H100 SXM and H200 989 TFLOP/s, H100 PCIe 756, A100 312; others need
`--peak-tflops`. Default batch 4: on an H100 80GB it peaks at ~21 GiB with gradient
checkpointing, and batches of 8 or 16 were only ~4% faster (the step is compute-bound). Run `--sweep` to compare plain padding, padding-free, packing and Liger
kernels in one go. A CPU smoke run:

    python benchmarks/bench_train_gpu.py --layers 1 --hidden 64 --heads 4 --kv-heads 2 \\
        --intermediate 128 --vocab 512 --seq-len 64 --batch-size 2 --warmup-steps 1 --steps 2

`--processes N` trains data parallel in N processes (one per GPU; gloo on a CPU), started by
torchrun as `synthpert train` starts them: `--batch-size` is then per process, tokens/s are
those of all processes together and MFU is against N cards' peak. It has been run on CPUs
only (2 processes, gloo), never on several GPUs.

Exits non-zero when a configuration fails (out of memory included).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import random
import subprocess
import resource
import sys
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from synthpert.llm.training import distributed_arguments

PEAK_BF16_TFLOPS = [("H100", "PCIE", 756.0), ("H100", "", 989.0), ("H200", "", 989.0), ("A100", "", 312.0)]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SWEEP = {
    "padded": {},
    "padding_free": {"padding_free": True},
    "packing": {"packing": True},
    "liger": {"liger": True},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape = p.add_argument_group("model shape (defaults: Llama-3.1-8B)")
    shape.add_argument("--layers", type=int, default=32)
    shape.add_argument("--hidden", type=int, default=4096)
    shape.add_argument("--heads", type=int, default=32)
    shape.add_argument("--kv-heads", type=int, default=8)
    shape.add_argument("--intermediate", type=int, default=14336)
    shape.add_argument("--vocab", type=int, default=128256)
    shape.add_argument("--rope-theta", type=float, default=500000.0)
    run = p.add_argument_group("run")
    run.add_argument("--seq-len", type=int, default=2048)
    run.add_argument("--min-len", type=int, default=None, help="random lengths in [min-len, seq-len] (default: fixed)")
    run.add_argument("--batch-size", type=int, default=4)
    run.add_argument("--lora-r", type=int, default=32)
    run.add_argument("--lora-alpha", type=int, default=32)
    run.add_argument("--warmup-steps", type=int, default=3)
    run.add_argument("--steps", type=int, default=10, help="timed steps")
    run.add_argument("--no-grad-ckpt", action="store_true", help="disable gradient checkpointing")
    run.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, flash_attention_2, eager ...)")
    run.add_argument("--padding-free", action="store_true")
    run.add_argument("--packing", action="store_true", help="TRL packing (bfd, padding-free)")
    run.add_argument("--liger", action="store_true", help="Liger kernels (only if liger_kernel is installed)")
    run.add_argument("--sweep", action="store_true", help="run padded, padding_free, packing and liger in turn")
    run.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--processes", type=int, default=1, help="data-parallel processes (torchrun), one per GPU")
    return p.parse_args(argv)


def world() -> tuple[int, int]:
    """(rank, processes) under torchrun; (0, 1) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper()
    for chip, variant, tflops in PEAK_BF16_TFLOPS:
        if chip in name and variant in name:
            return tflops
    return None


def tokenizer() -> PreTrainedTokenizerFast:
    """A stand-in tokenizer: the data are token ids already; TRL only needs a pad token."""
    vocab = {"<pad>": 0, "<eos>": 1}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>", eos_token="<eos>"
    )


def sequences(args, count: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    low = args.min_len or args.seq_len
    return [[rng.randrange(2, args.vocab) for _ in range(rng.randint(low, args.seq_len))] for _ in range(count)]


class StepTimer(TrainerCallback):
    """Wall time and tokens between the end of the warm-up and the end of the last step."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None
        self.tokens: dict[int, int] = {}

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs:
            self.tokens[state.global_step] = int(logs["num_tokens"])


def run(args, name: str, padding_free=False, packing=False, liger=False) -> bool:
    if liger and importlib.util.find_spec("liger_kernel") is None:
        print(f"[{name}] unavailable: liger_kernel is not installed", flush=True)
        return True
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq_len, 8192), rope_theta=args.rope_theta, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    steps = args.warmup_steps + args.steps
    # packing fills each row to seq_len from shorter sequences: make enough of them
    data = sequences(args, steps * args.batch_size * args.processes * (4 if packing else 1))
    trainer = model = None
    try:
        rank, processes = world()
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn)
        model.config.use_cache = False
        frozen = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        sft = SFTConfig(
            output_dir=tempfile.mkdtemp(prefix="bench-train-"),
            max_steps=steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=1e-4,
            warmup_steps=0,
            bf16=dtype == torch.bfloat16,
            gradient_checkpointing=not args.no_grad_ckpt,
            max_length=None if padding_free and not packing else args.seq_len,
            padding_free=padding_free,
            packing=packing,
            use_liger_kernel=liger,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=args.seed,
            **distributed_arguments(processes),  # as synthpert train runs several processes (gloo on a CPU)
        )
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=TARGETS,
                          task_type="CAUSAL_LM")  # fmt: skip
        timer = StepTimer(args.warmup_steps)
        trainer = SFTTrainer(
            model=model,
            args=sft,
            train_dataset=Dataset.from_dict({"input_ids": data}),
            processing_class=tokenizer(),
            peft_config=lora,
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # one summary line, not one log line per step
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        seconds = timer.end - timer.start
        tokens = timer.tokens[steps] - timer.tokens[args.warmup_steps]
        memory = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        lengths = [len(s) for s in data]
        s_eff = sum(n * n for n in lengths) / sum(lengths)
        flops_per_token = 4 * frozen + 6 * trainable + 12 * args.layers * args.hidden * s_eff
        tflops = flops_per_token * tokens / seconds / 1e12
        peak = peak_tflops(args)
        mfu = f"{tflops / (peak * processes):.1%}" if peak else "n/a"
        device = torch.cuda.get_device_name() if cuda else "cpu"
        device += f" x {processes} processes" if processes > 1 else ""
        if rank != 0:  # rank 0 reports for all
            return True
        print(
            f"[{name}] {tokens / seconds:,.0f} tokens/s | {seconds / args.steps:.3f} s/step | "
            f"peak memory {memory / 2**30:.1f} GiB | MFU {mfu} ({tflops:.0f} model TFLOP/s, peak {peak or 'n/a'}) | "
            f"batch {args.batch_size} x seq {args.seq_len} | {args.layers} layers, frozen {frozen / 1e6:,.0f} M, "
            f"LoRA {trainable / 1e6:,.1f} M | {str(dtype).removeprefix('torch.')}, grad ckpt "
            f"{'off' if args.no_grad_ckpt else 'on'}, {args.attn} | {device}",
            flush=True,
        )
        return True
    except Exception as err:  # one failing configuration (e.g. out of memory) must not hide the others
        print(f"[{name}] FAILED: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", flush=True)
        return False
    finally:
        del trainer, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def launch(args, argv) -> int:
    """Run this benchmark in `args.processes` workers under torchrun; their exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.processes}",
               __file__, *argv]  # fmt: skip
    return subprocess.run(command).returncode


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.processes > 1 and "WORLD_SIZE" not in os.environ:
        return launch(args, argv)
    if args.steps < 1 or args.warmup_steps < 1:
        sys.exit("--steps and --warmup-steps must be at least 1 (the first step compiles and allocates)")
    if args.sweep:
        configs = SWEEP
    else:
        flags = {"padding_free": args.padding_free, "packing": args.packing, "liger": args.liger}
        configs = {"+".join(k for k, v in flags.items() if v) or "padded": {k: v for k, v in flags.items() if v}}
    results = [run(args, name, **options) for name, options in configs.items()]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
