"""Time and peak memory of `synthpert derive` on a large synthetic screen.

Default size: 2,000 perturbations x 100 cells (+ 5,000 control cells) x 8,000 genes,
sparse negative-binomial counts (about 10% non-zero). The screen is written to a
temporary .h5ad first; the derivation then runs in a child process, whose peak resident
memory (ru_maxrss) is what this prints.

A full pseudobulk DESeq2 derivation fits DESeq2 once per perturbation (tens of seconds
each at 8,000 genes on one CPU core), which is hours on a small machine; `--threads N`
runs the fits in N worker processes, as the rule's `threads` does. `--fit N` fits
the first N perturbations only, times them and extrapolates the fitting time linearly to
all of them; reading, checking and pseudobulking the whole screen, and the calls and
files for all perturbations x genes (the N fitted perturbations' statistics reused for
the others, under their names), run at full size, so the memory printed is that of a
full derivation. `--fit 0` (or a value >= --perts) fits every perturbation.

    python benchmarks/bench_derive.py                    # full size, 20 fits
    python benchmarks/bench_derive.py --fit 8 --threads 2  # the same, fits in 2 workers
    python benchmarks/bench_derive.py --perts 200 --genes 2000 --fit 0
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"

CHILD = r"""
import itertools, json, resource, sys, time
from pathlib import Path
import numpy as np
from synthpert.core.settings import Derive
from synthpert.derivation.calls import perturbqa_files, stats_table
from synthpert.derivation.methods import METHODS
from synthpert.derivation.screen_file import open_screen
from synthpert.core.io import write_csv, write_parquet

def worker_peak_gib():
    # The largest peak RSS (VmHWM) of the living worker processes. Not ru_maxrss: a spawned
    # worker is forked before it execs, and ru_maxrss keeps the parent's size from then.
    kids = [pid for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()]
    peaks = [0]
    for pid in kids:
        status = Path(f"/proc/{pid}/status")
        if status.exists():
            peaks += [int(l.split()[1]) for l in status.read_text().splitlines() if l.startswith("VmHWM:")]
    return max(peaks) / 2**20  # KiB

h5ad, out, method, fit, threads = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
s = Derive("perturbation", "non-targeting", None, None, 3, method, "benjamini-hochberg", 0.05, 20, 0.01, 0.25, 0)
times = {}
t = time.monotonic(); screen = open_screen(h5ad, s); times["open_and_check_s"] = time.monotonic() - t
t = time.monotonic(); tested, results = METHODS[method](screen, s.min_mean_count, threads); times["read_and_prepare_s"] = time.monotonic() - t
n = len(screen.perts) if fit <= 0 else min(fit, len(screen.perts))
t = time.monotonic(); fitted = list(itertools.islice(results, n)); times["fit_s"] = time.monotonic() - t
times["worker_peak_gib"] = worker_peak_gib(); results.close()
times["fitted_perturbations"] = n
times["fit_s_per_perturbation"] = times["fit_s"] / n
reused = [(p, *fitted[i % n][1:]) for i, p in enumerate(screen.perts)]
t = time.monotonic()
stats = stats_table(reused, screen.genes[tested], screen.n_cells, s)
de, direction = perturbqa_files(stats)
write_parquet(stats, out / "stats.parquet"); write_csv(de, out / "de.csv"); write_csv(direction, out / "dir.csv")
times["calls_and_files_s"] = time.monotonic() - t
times["tuples"] = stats.height
times["genes_tested"] = int(tested.size)
times["main_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(times))
"""


def make_screen(path: Path, perts: int, cells: int, controls: int, genes: int, seed: int) -> int:
    """Write the synthetic screen; return its number of non-zero counts."""
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    base = np.exp(rng.normal(-2.8, 1.2, genes))  # mean counts per cell: ~10% non-zero overall
    r = 5.0
    blocks, labels = [], []
    for group in ["non-targeting"] + [f"P{i:05d}" for i in range(perts)]:
        n = controls if group == "non-targeting" else cells
        mean = np.tile(base, (n, 1))
        if group != "non-targeting":
            hit = rng.choice(genes, size=20, replace=False)
            mean[:, hit] *= np.where(np.arange(20) < 10, 3.0, 1 / 3)
        blocks.append(sparse.csr_matrix(rng.negative_binomial(r, r / (r + mean)).astype(np.float32)))
        labels += [group] * n
    X = sparse.vstack(blocks, format="csr")
    adata = ad.AnnData(
        X=X,
        obs=pd.DataFrame({"perturbation": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=[f"G{i:05d}" for i in range(genes)]),
    )
    adata.write_h5ad(path)
    return int(X.nnz)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perts", type=int, default=2000)
    parser.add_argument("--cells", type=int, default=100, help="cells per perturbation")
    parser.add_argument("--controls", type=int, default=5000)
    parser.add_argument("--genes", type=int, default=8000)
    parser.add_argument("--fit", type=int, default=20, help="perturbations fitted (0 = all)")
    parser.add_argument("--method", default="deseq2", choices=["deseq2", "wilcoxon", "pdex"])
    parser.add_argument("--threads", type=int, default=1, help="worker processes for the DESeq2 fits")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_derive.") as tmp:
        h5ad = Path(tmp) / "screen.h5ad"
        t = time.monotonic()
        nnz = make_screen(h5ad, args.perts, args.cells, args.controls, args.genes, args.seed)
        n_cells = args.perts * args.cells + args.controls
        print(
            f"screen: {args.perts} perturbations x {args.cells} cells + {args.controls} controls = {n_cells} cells "
            f"x {args.genes} genes, {nnz / (n_cells * args.genes):.1%} non-zero, "
            f"{h5ad.stat().st_size / 2**30:.2f} GiB on disk, written in {time.monotonic() - t:.0f} s",
            flush=True,
        )
        t = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(h5ad), tmp, args.method, str(args.fit), str(args.threads)],
            env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        )
        wall = time.monotonic() - t
        if done.returncode != 0:
            sys.exit(f"derivation failed:\n{done.stderr[-3000:]}")
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = usage.ru_utime + usage.ru_stime
        times = json.loads(done.stdout.strip().splitlines()[-1])
    fitted = times["fitted_perturbations"]
    workers = args.threads if args.method == "deseq2" and args.threads > 1 else 0
    peak = times["main_peak_gib"] + workers * times["worker_peak_gib"]
    print(f"method {args.method}: {json.dumps(times)}")
    print(
        f"wall time of the child {wall:.0f} s (CPU {cpu:.0f} s); peak resident memory {times['main_peak_gib']:.2f} GiB"
        + (f" + {workers} workers x {times['worker_peak_gib']:.2f} GiB" if workers else "")
        + f" = at most {peak:.2f} GiB (limit 8 GiB)"
    )
    if fitted < args.perts:
        full = wall - times["fit_s"] + times["fit_s_per_perturbation"] * args.perts
        print(
            f"fitted {fitted} of {args.perts} perturbations ({times['fit_s_per_perturbation']:.1f} s each, "
            f"{max(args.threads, 1)} worker(s)): a full derivation would take about {full / 3600:.1f} h here "
            "(linear extrapolation)"
        )


if __name__ == "__main__":
    main()
