"""Time the data step on the full PerturbQA data: fetch + SHA-256 verification of the
eight files from a local mirror, then the three-class table, both splits and table 5.

    python benchmarks/bench_data.py [--source ../shared/perturbqa] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from synthpert.core.io import write_csv, write_parquet
from synthpert.steps import fetch as download
from synthpert.steps import prepare as data

REPO = Path(__file__).resolve().parents[1]


def run_once(source: str, sha256: dict[str, str], work: Path) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    for name, digest in sha256.items():
        download.fetch(source, name, digest, work / "raw" / name)
    t1 = time.perf_counter()
    tuples = data.build_tuples(work / "raw", ["k562", "rpe1", "hepg2", "jurkat"])
    write_parquet(tuples, work / "tuples.parquet")
    for name in data.split_names(["rpe1"]):
        write_parquet(data.make_split(tuples, name), work / "splits" / f"{name}.parquet")
    write_csv(data.table5(tuples), work / "table5.csv")
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, tuples.height


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "perturbqa"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sha256 = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["data"]["sha256"]
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            fetch_s, prep_s, n = run_once(args.source, sha256, Path(tmp))
        print(f"run {i + 1}: fetch+verify {fetch_s:.2f} s, prepare {prep_s:.2f} s, "
              f"total {fetch_s + prep_s:.2f} s for {n:,} tuples")


if __name__ == "__main__":
    main()
