"""Cut the small, deterministic, real PerturbQA subset that the demo ships.

Per cell line, a seeded sample of perturbations from each of PerturbQA's splits; every
gene row of a chosen perturbation is kept, in both files, in the upstream row order.

    python scripts/make_demo_data.py ../shared/perturbqa data/perturbqa-demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

from synthpert.core.labels import CELLS
from synthpert.steps.fetch import sha256_file

ATTRIBUTION = """\
# PerturbQA demo subset

A small deterministic subset of the PerturbQA benchmark files, cut by
`scripts/make_demo_data.py` (seed {seed}; per cell line {train} training and {test} test
perturbations, chosen by seeded sampling; every gene row of a chosen perturbation kept).
It lets the offline demo run the whole workflow with no network.

Source: the PerturbQA datasets (`perturbqa/datasets/` of the Genentech/PerturbQA repository),
licensed CC BY 4.0 by Wu, Littman, Levine, Qiu, Biancalani, Richmond, Huetter,
"Contextualizing biological perturbation experiments through language", ICLR 2025; derived
from the Perturb-seq screens of Replogle et al. (2022, K562 and RPE1) and Nadig et al.
(HepG2 and Jurkat). The rows are unchanged; only a subset is kept.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=6, help="training perturbations per cell line")
    parser.add_argument("--test", type=int, default=3, help="test perturbations per cell line")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sums = []
    for cell in CELLS:
        de = pl.read_csv(args.source / f"{cell}-de.csv")
        chosen = []
        for split, n in (("train", args.train), ("test", args.test)):
            perts = de.filter(pl.col("split") == split)["pert"].unique().sort()
            chosen += perts.sample(n, seed=args.seed).to_list()
        for kind in ("de", "dir"):
            name = f"{cell}-{kind}.csv"
            df = pl.read_csv(args.source / name).filter(pl.col("pert").is_in(chosen))
            df.write_csv(args.out / name)
            sums.append(f"{sha256_file(args.out / name)}  {name}")
    (args.out / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    (args.out / "README.md").write_text(ATTRIBUTION.format(seed=args.seed, train=args.train, test=args.test))


if __name__ == "__main__":
    main()
