"""The differential-expression tests of a perturbation against the control cells.

Each method yields, per kept perturbation, the log2 fold change and the raw p-value of
every tested gene (NaN where the test gives none); `calls` corrects and thresholds them.

- `deseq2` (default): pseudobulk DESeq2 (pydeseq2). Each perturbation's cells and the
  control cells are summed into pseudobulk samples (replicates or seeded
  pseudo-replicates, `screen_file`); one DESeq2 fit per perturbation against the control
  samples (`~condition`, size factors `poscounts`, Cook's outliers refitted), Wald test.
  A fit per perturbation keeps each design small; one fit with thousands of levels would
  not be. pydeseq2 spends milliseconds of Python per gene and fit (tens of seconds per
  perturbation at 8,000 genes), so with `threads` > 1 the fits run in that many worker
  processes, one perturbation each, one BLAS thread each: the speed-up is the core count.
- `wilcoxon`: scanpy's Wilcoxon rank-sum test per cell (`rank_genes_groups`, reference =
  the control) on counts normalised to 10,000 per cell and log1p-transformed; the fold
  change is scanpy's (log2 ratio of the groups' mean normalised expression).
- `pdex`: Arc Institute's `pdex` (the differential expression of the Virtual Cell Challenge
  and of `cell-eval`): a Mann-Whitney U test per gene of each perturbation's cells against
  the control cells, on counts normalised to 10,000 per cell and log1p-transformed, with
  the settings `cell-eval` runs it with (`mode="ref"`, `is_log1p=True`, geometric-mean
  fold change, `epsilon=0`). Its raw p-values go to `calls` like the other methods' (pdex's
  own FDR is also Benjamini-Hochberg per perturbation, so the default calls match it).
"""

from __future__ import annotations

import logging
import multiprocessing
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from synthpert.derivation.screen_file import Screen, compared_cells, pseudobulk

log = logging.getLogger(__name__)

NORMALISED_TOTAL = 1e4

# (perturbation, log2 fold change per tested gene, p-value per tested gene)
Result = tuple[str, np.ndarray, np.ndarray]


def tested_genes(mean_count: np.ndarray, min_mean_count: float) -> np.ndarray:
    """Indices of the genes expressed enough to test (mean count per compared cell)."""
    return np.flatnonzero(mean_count >= min_mean_count)


def deseq2(screen: Screen, min_mean_count: float, threads: int = 1) -> tuple[np.ndarray, Iterator[Result]]:
    """The tested genes, and a lazy sequence of one pseudobulk DESeq2 fit per perturbation."""
    sums = pseudobulk(screen)
    n_compared = sum(screen.n_cells.values())
    genes = tested_genes(sums.sum(axis=0) / n_compared, min_mean_count)
    return genes, _deseq2_fits(screen, sums[:, genes], threads)


def _deseq2_fits(screen: Screen, sums: np.ndarray, threads: int) -> Iterator[Result]:
    r = screen.n_replicates
    control = _nonempty(sums[screen.control_code * r : (screen.control_code + 1) * r])
    jobs = ((pert, control, _nonempty(sums[code * r : (code + 1) * r])) for code, pert in enumerate(screen.perts))
    if threads <= 1:
        yield from (_fit_perturbation(*job) for job in jobs)
        return
    # spawn, not fork: the parent holds Polars' and BLAS's threads, which fork can deadlock
    pool = ProcessPoolExecutor(threads, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield from _in_order(pool, jobs, ahead=2 * threads)
    finally:
        pool.shutdown(cancel_futures=True)


def _in_order(pool: ProcessPoolExecutor, jobs: Iterable[tuple], ahead: int) -> Iterator[Result]:
    """The pool's results in the jobs' order, with at most `ahead` jobs submitted and not yet
    taken: the perturbations' pseudobulks are not all copied into the pool's queue at once."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(_fit_perturbation, *job))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _fit_perturbation(pert: str, control: np.ndarray, treated: np.ndarray) -> Result:
    from pydeseq2.default_inference import DefaultInference

    lfc, pvalue = _deseq2_fit(control, treated, [f"g{i}" for i in range(control.shape[1])], DefaultInference(n_cpus=1))
    return pert, lfc, pvalue


def _nonempty(samples: np.ndarray) -> np.ndarray:
    """Pseudobulk samples with any count (a replicate level may lack a perturbation)."""
    return samples[samples.sum(axis=1) > 0]


def _deseq2_fit(control: np.ndarray, treated: np.ndarray, gene_names: list[str], inference):
    """log2 fold change and Wald p-value of every gene, perturbed vs control samples."""
    import pandas as pd
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats
    from threadpoolctl import threadpool_limits

    counts = pd.DataFrame(
        np.vstack([control, treated]).astype(np.int64),
        index=[f"s{i}" for i in range(len(control) + len(treated))],
        columns=gene_names,
    )
    metadata = pd.DataFrame({"condition": ["control"] * len(control) + ["perturbed"] * len(treated)}, index=counts.index)
    # Many small fits: threaded BLAS only contends (4x slower measured on 2 cores).
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydeseq2 warns about all-zero genes, which come back NaN
        dds = DeseqDataSet(
            counts=counts, metadata=metadata, design="~condition", size_factors_fit_type="poscounts",
            refit_cooks=True, inference=inference, quiet=True,
        )
        dds.deseq2()
        stats = DeseqStats(dds, contrast=["condition", "perturbed", "control"], inference=inference, quiet=True)
        stats.summary()  # Wald test; Cook's outliers get p = NaN
    return stats.results_df["log2FoldChange"].to_numpy(), stats.results_df["pvalue"].to_numpy()


def log_normalised_cells(screen: Screen, min_mean_count: float):
    """The tested genes, and the compared cells (AnnData, `obs.group`) normalised to
    `NORMALISED_TOTAL` counts on every gene, log1p-transformed, then cut to the tested genes
    (var names: their positions): what the per-cell tests (Wilcoxon, pdex) read."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    counts, groups = compared_cells(screen)
    genes = tested_genes(np.asarray(counts.mean(axis=0)).ravel(), min_mean_count)
    obs = pd.DataFrame({"group": pd.Categorical(groups)}, index=[str(i) for i in range(len(groups))])
    adata = ad.AnnData(X=counts, obs=obs)
    sc.pp.normalize_total(adata, target_sum=NORMALISED_TOTAL)  # on every gene, before choosing
    sc.pp.log1p(adata)
    adata = adata[:, genes].copy()
    adata.var_names = [str(i) for i in range(genes.size)]  # positions among the tested genes
    return genes, adata


def wilcoxon(screen: Screen, min_mean_count: float, threads: int = 1) -> tuple[np.ndarray, Iterator[Result]]:
    """The tested genes, and scanpy's Wilcoxon rank-sum test of every perturbation."""
    import scanpy as sc

    genes, adata = log_normalised_cells(screen, min_mean_count)
    log.info("Wilcoxon rank-sum test: %d perturbations x %d genes", len(screen.perts), genes.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(
            adata, "group", groups=screen.perts, reference=screen.control, method="wilcoxon",
            n_genes=genes.size, corr_method="benjamini-hochberg", tie_correct=True,
        )
    table = sc.get.rank_genes_groups_df(adata, group=None)
    return genes, _wilcoxon_results(screen, table, genes.size)


def _wilcoxon_results(screen: Screen, table, n_genes: int) -> Iterator[Result]:
    for pert, rows in table.groupby("group", observed=True, sort=False):
        order = rows["names"].astype(int).to_numpy()  # the AnnData's var names are 0 .. n_genes - 1
        lfc, pvalue = np.full(n_genes, np.nan), np.full(n_genes, np.nan)
        lfc[order] = rows["logfoldchanges"].to_numpy()
        pvalue[order] = rows["pvals"].to_numpy()
        yield str(pert), lfc, pvalue


def pdex(screen: Screen, min_mean_count: float, threads: int = 1) -> tuple[np.ndarray, Iterator[Result]]:
    """The tested genes, and Arc's pdex (Mann-Whitney U per gene) of every perturbation, on
    cells normalised as cell-eval normalises them before pdex."""
    from pdex import pdex as run_pdex

    genes, adata = log_normalised_cells(screen, min_mean_count)
    log.info("pdex (Mann-Whitney U): %d perturbations x %d genes", len(screen.perts), genes.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = run_pdex(
            adata, groupby="group", mode="ref", reference=screen.control, threads=max(threads, 1),
            is_log1p=True, geometric_mean=True, epsilon=0.0,
        )
    return genes, _pdex_results(screen, table, genes.size)


def _pdex_results(screen: Screen, table, n_genes: int) -> Iterator[Result]:
    by_pert = table.partition_by("target", as_dict=True)
    for pert in screen.perts:
        rows = by_pert.get((pert,))
        lfc, pvalue = np.full(n_genes, np.nan), np.full(n_genes, np.nan)
        if rows is not None:
            order = rows["feature"].cast(int).to_numpy()  # var names are 0 .. n_genes - 1
            lfc[order] = rows["log2_fold_change"].to_numpy()
            pvalue[order] = rows["p_value"].to_numpy()
        yield pert, lfc, pvalue


METHODS = {"deseq2": deseq2, "wilcoxon": wilcoxon, "pdex": pdex}
