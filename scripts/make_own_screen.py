"""Make a small synthetic CRISPRi Perturb-seq screen (.h5ad) to try `synthpert derive` on.

Negative-binomial counts for control cells and cells of each perturbation; some
perturbations up- or down-regulate a few planted genes (and knock down their own gene
when it is measured). Raw counts go in the `counts` layer, log-normalised values in X,
the perturbation in obs `perturbation` (controls: `non-targeting`). Seeded: the same
arguments give the same file. Gene and perturbation names are borrowed from the demo's
K562 subset (data/perturbqa-demo), so the lookup rows of config/own_screen.yaml find
some of them in K562's training rows; the effects are random, not K562's.

    python scripts/make_own_screen.py --out data/own-screen/my_line.h5ad
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO_K562 = REPO / "data" / "perturbqa-demo" / "k562-de.csv"
CONTROL = "non-targeting"


def demo_names(n_perts: int, n_genes: int) -> tuple[list[str], list[str]]:
    """Perturbations and genes named like the demo's K562 rows: its perturbations first,
    then genes of its table, in a fixed order."""
    with open(DEMO_K562, newline="") as fh:
        rows = list(csv.DictReader(fh))
    genes = sorted({r["gene"] for r in rows})
    perts = sorted({r["pert"] for r in rows})
    perts += [g for g in genes if g not in perts][: max(0, n_perts - len(perts))]
    return perts[:n_perts], genes[:n_genes]


def synthetic_screen(
    perts: list[str], genes: list[str], cells_per_pert: int, control_cells: int, effect_share: float = 0.5,
    genes_per_effect: int = 4, fold: float = 4.0, dispersion: float = 0.2, seed: int = 0,
):
    """(AnnData, planted effects {(pert, gene): +1 up / -1 down}). Half the perturbations
    (`effect_share`) move `genes_per_effect` genes up and as many down by `fold`."""
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    base = np.exp(rng.normal(0.0, 1.0, len(genes)))  # mean count per cell, ~0.1 .. 10
    planted: dict[tuple[str, str], int] = {}
    labels = [CONTROL] * control_cells
    means = [np.tile(base, (control_cells, 1))]
    gene_index = {g: i for i, g in enumerate(genes)}
    for pert in perts:
        scale = np.ones(len(genes))
        if rng.random() < effect_share:
            candidates = [i for i in range(len(genes)) if genes[i] != pert and base[i] > 0.5]
            chosen = rng.choice(candidates, size=2 * genes_per_effect, replace=False)
            for k, i in enumerate(chosen):
                up = k < genes_per_effect
                scale[i] = fold if up else 1 / fold
                planted[(pert, genes[i])] = 1 if up else -1
        if pert in gene_index:
            scale[gene_index[pert]] = 0.1  # the knockdown itself
        labels += [pert] * cells_per_pert
        means.append(np.tile(base * scale, (cells_per_pert, 1)))
    mean = np.vstack(means) * np.exp(rng.normal(0.0, 0.3, (len(labels), 1)))  # per-cell depth
    r = 1.0 / dispersion
    counts = rng.negative_binomial(r, r / (r + mean)).astype(np.float32)
    depth = counts.sum(axis=1, keepdims=True).clip(min=1)
    adata = ad.AnnData(
        X=sparse.csr_matrix(np.log1p(counts / depth * 1e4)),
        obs=pd.DataFrame({"perturbation": pd.Categorical(labels)}, index=[f"cell{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=genes),
        layers={"counts": sparse.csr_matrix(counts)},
    )
    return adata, planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "own-screen" / "my_line.h5ad")
    parser.add_argument("--perts", type=int, default=24)
    parser.add_argument("--genes", type=int, default=120)
    parser.add_argument("--cells-per-pert", type=int, default=40)
    parser.add_argument("--control-cells", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    perts, genes = demo_names(args.perts, args.genes)
    adata, planted = synthetic_screen(perts, genes, args.cells_per_pert, args.control_cells, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.part")
    adata.write_h5ad(tmp)
    tmp.replace(args.out)
    print(f"{args.out}: {adata.n_obs} cells x {adata.n_vars} genes, {len(perts)} perturbations, {len(planted)} planted effects")


if __name__ == "__main__":
    main()
