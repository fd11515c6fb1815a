"""Time the evidence tables (`synthpert evidence-table`) on the full PerturbQA data, both
splits: every test tuple of the split is a question (the paper's config asks them all),
with the paper config's `evidence:` settings. Each split runs in a fresh process, so its
peak memory (max RSS) is its own; `--all-tuples` describes every tuple of the split
(training tuples too, as training prompts would need).

    python benchmarks/bench_evidence.py [--source ../shared/perturbqa] [--all-tuples]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("default", "rpe1_holdout")


def one(split_file: Path, out: Path, all_tuples: bool) -> None:
    """Child: build and write one table, print its phases as JSON."""
    t0 = time.perf_counter()
    import polars as pl

    from synthpert.core.config import load
    from synthpert.core.io import write_parquet
    from synthpert.core.settings import for_step
    from synthpert.evaluation.baselines import load_splits
    from synthpert.evaluation.evidence import build

    settings = for_step(load(REPO / "config" / "config.yaml"), "evidence")
    t1 = time.perf_counter()
    splits = load_splits(split_file)
    asked = splits if all_tuples else splits.filter(pl.col("role") == "test")
    t2 = time.perf_counter()
    table = build(splits, asked, settings)
    t3 = time.perf_counter()
    write_parquet(table, out)
    t4 = time.perf_counter()
    print(json.dumps({"imports_s": t1 - t0, "read_s": t2 - t1, "build_s": t3 - t2, "write_s": t4 - t3,
                      "blocks": table.height, "mb": out.stat().st_size / 1e6, "k": settings.k}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "perturbqa"))
    parser.add_argument("--all-tuples", action="store_true", help="every tuple of the split, not only its test tuples")
    parser.add_argument("--one", nargs=2, metavar=("SPLIT_FILE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(Path(args.one[0]), Path(args.one[1]), args.all_tuples)
        return
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = [sys.executable, "-m", "synthpert", "prepare", "--input-dir", args.source,
                "--cells", "k562", "rpe1", "hepg2", "jurkat", "--holdout", "rpe1",
                "--tuples", str(work / "tuples.parquet"), "--splits-dir", str(work / "splits"),
                "--table5", str(work / "table5.csv")]  # fmt: skip
        subprocess.run(data, env=env, check=True, stderr=subprocess.DEVNULL)
        for split in SPLITS:
            command = [sys.executable, __file__, "--one", str(work / "splits" / f"{split}.parquet"),
                       str(work / f"{split}.parquet")] + (["--all-tuples"] if args.all_tuples else [])  # fmt: skip
            start = time.perf_counter()
            child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
            output = child.stdout.read()
            _, status, usage = os.wait4(child.pid, 0)
            wall = time.perf_counter() - start
            if status:
                sys.exit(f"{split}: the child failed ({status})")
            got = json.loads(output)
            print(f"{split}: {got['blocks']:,} blocks (k={got['k']}) built in {got['build_s']:.2f} s "
                  f"(read {got['read_s']:.2f} s, write {got['write_s']:.2f} s, {got['mb']:.1f} MB; "
                  f"process {wall:.1f} s with imports {got['imports_s']:.1f} s), "
                  f"peak memory {usage.ru_maxrss / 1024:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
