"""Reading a Perturb-seq screen (.h5ad), checked before any work.

The file is opened with h5py and read through anndata's element readers: `obs` and `var`
whole (they are small), the count matrix (X or a layer) in chunks of rows, sparse
through anndata's backed sparse dataset or dense through h5py. So pseudobulk sums never
hold the cell matrix in memory; only the Wilcoxon test loads the cells it compares.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import sparse

from synthpert.core.settings import Derive
from synthpert.errors import CommandError

log = logging.getLogger(__name__)

CHUNK = 8192  # cells read at a time
SHOW = 10  # names shown in an error


@dataclass
class Screen:
    """A checked screen: which cells are compared, and how they are grouped.

    `code[i]` is cell i's perturbation (an index into `perts`), `len(perts)` for a control
    cell, or -1 for a cell of a skipped perturbation; `replicate[i]` is its pseudobulk
    sample within that group (0 .. n_replicates - 1)."""

    path: Path
    matrix: str  # "X" or "layers/<name>"
    genes: np.ndarray
    perts: list[str]
    control: str
    code: np.ndarray
    replicate: np.ndarray
    n_replicates: int
    n_cells: dict[str, int]  # per kept perturbation, and the control
    skipped: dict[str, int] = field(default_factory=dict)  # perturbations with too few cells

    @property
    def control_code(self) -> int:
        return len(self.perts)


def _shown(names) -> str:
    names = list(names)
    return f"{names[:SHOW]}{' ...' if len(names) > SHOW else ''}"


def open_screen(path: str | Path, settings: Derive) -> Screen:
    """Read `obs` and `var` of the screen and check them against `settings`: the
    perturbation (and replicate) column, the counts layer, unique gene names, control
    cells, and perturbations with enough cells (those with fewer are skipped, listed in
    the log). Raises CommandError naming what is missing and what was expected."""
    import h5py
    from anndata.io import read_elem

    path = Path(path)
    if not path.is_file():
        raise CommandError(f"{path}: screen file not found")
    try:
        with h5py.File(path, "r") as f:
            obs, var = read_elem(f["obs"]), read_elem(f["var"])
            layers = sorted(f["layers"].keys()) if "layers" in f else []
            has_x = "X" in f
    except (OSError, KeyError) as err:
        raise CommandError(f"{path}: not a readable .h5ad file (AnnData): {err}") from None
    s = settings
    if s.layer is None and not has_x:
        raise CommandError(f"{path}: no X matrix; set layer to one of its layers {layers}")
    if s.layer is not None and s.layer not in layers:
        raise CommandError(f"{path}: no layer {s.layer!r} (the raw counts); its layers are {layers}")
    for key in ("perturbation_column", "replicate_column"):
        column = getattr(s, key)
        if column is not None and column not in obs.columns:
            raise CommandError(f"{path}: obs has no column {column!r} ({key}); its columns are {list(obs.columns)}")
    genes = np.asarray(var.index.astype(str))
    dup = sorted(set(genes[np.asarray(var.index.duplicated())]))
    if dup:
        raise CommandError(f"{path}: {len(dup)} duplicate gene names in var: {_shown(dup)}; make them unique first")

    labels = obs[s.perturbation_column].astype(str).to_numpy()
    if labels.size == 0:
        raise CommandError(f"{path}: no cells")
    names, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    per_label = dict(zip(names.tolist(), counts.tolist(), strict=True))
    if s.control not in per_label:
        common = sorted(per_label, key=per_label.get, reverse=True)
        raise CommandError(
            f"{path}: no control cells: no cell has {s.perturbation_column} == {s.control!r}; "
            f"most frequent values: {_shown(common)}"
        )
    too_few = {p: n for p, n in per_label.items() if p != s.control and n < s.min_cells}
    perts = sorted(p for p in per_label if p != s.control and p not in too_few)
    if too_few:
        log.warning(
            "%d perturbation(s) with fewer than %d cells skipped: %s",
            len(too_few), s.min_cells, ", ".join(f"{p} ({n})" for p, n in sorted(too_few.items())),
        )
    if not perts:
        raise CommandError(f"{path}: no perturbation has at least min_cells = {s.min_cells} cells")
    code_of = {p: i for i, p in enumerate(perts)} | {s.control: len(perts)}
    code = np.array([code_of.get(n, -1) for n in names.tolist()], dtype=np.int64)[inverse]
    replicate, n_rep = _replicates(obs, code, s)
    n_cells = {p: per_label[p] for p in perts} | {s.control: per_label[s.control]}
    log.info(
        "%s: %d cells, %d genes; %d perturbations kept, %d skipped, %d control cells; %d pseudobulk samples each (%s)",
        path, labels.size, genes.size, len(perts), len(too_few), per_label[s.control], n_rep,
        f"replicates from {s.replicate_column!r}" if s.replicate_column else "seeded pseudo-replicates",
    )
    matrix = "X" if s.layer is None else f"layers/{s.layer}"
    return Screen(path, matrix, genes, perts, s.control, code, replicate, n_rep, n_cells, too_few)


def _replicates(obs, code: np.ndarray, s: Derive) -> tuple[np.ndarray, int]:
    """Each cell's pseudobulk sample within its group: the level of `replicate_column`,
    or a seeded split of the group's cells into `pseudo_replicates` near-equal parts."""
    if s.replicate_column is not None:
        levels, replicate = np.unique(obs[s.replicate_column].astype(str).to_numpy(), return_inverse=True)
        return replicate.astype(np.int64), len(levels)
    rng = np.random.default_rng(s.seed)
    replicate = np.zeros(code.size, dtype=np.int64)
    order = np.argsort(code, kind="stable")
    bounds = np.flatnonzero(np.diff(code[order])) + 1
    for cells in np.split(order, bounds):
        replicate[rng.permutation(cells)] = np.arange(cells.size) % s.pseudo_replicates
    return replicate, s.pseudo_replicates


def chunks(screen: Screen, chunk: int = CHUNK) -> Iterator[tuple[int, sparse.csr_matrix]]:
    """(first row, counts of the next `chunk` cells as CSR), checked to be counts."""
    import h5py
    from anndata.io import sparse_dataset

    with h5py.File(screen.path, "r") as f:
        elem = f[screen.matrix]
        matrix = elem if isinstance(elem, h5py.Dataset) else sparse_dataset(elem)
        n = matrix.shape[0]
        for start in range(0, n, chunk):
            block = matrix[start : start + chunk]
            block = sparse.csr_matrix(block)
            _check_counts(screen, block, start)
            yield start, block


def _check_counts(screen: Screen, block: sparse.csr_matrix, start: int) -> None:
    data = block.data
    bad = (data < 0) | (data != np.floor(data))
    if bad.any():
        row = int(np.searchsorted(block.indptr, np.flatnonzero(bad)[0], side="right")) - 1
        raise CommandError(
            f"{screen.path}: {screen.matrix} holds {data[bad][0]!r} (cell {start + row}): raw counts "
            "(non-negative integers) are needed; set layer to the layer of raw counts"
        )


def pseudobulk(screen: Screen) -> np.ndarray:
    """Summed counts per (group, replicate) sample: row `code * n_replicates + replicate`
    for every kept perturbation and the control (the last group)."""
    from tqdm import tqdm

    n_samples = (len(screen.perts) + 1) * screen.n_replicates
    sums = np.zeros((n_samples, screen.genes.size), dtype=np.float64)
    sample = np.where(screen.code >= 0, screen.code * screen.n_replicates + screen.replicate, -1)
    with tqdm(total=sample.size, unit="cell", desc="pseudobulk", mininterval=5) as bar:
        for start, block in chunks(screen):
            rows = sample[start : start + block.shape[0]]
            keep = np.flatnonzero(rows >= 0)
            indicator = sparse.csr_matrix(
                (np.ones(keep.size), (rows[keep], keep)), shape=(n_samples, block.shape[0])
            )
            summed = (indicator @ block).tocoo()
            sums[summed.row, summed.col] += summed.data
            bar.update(block.shape[0])
    return sums


def compared_cells(screen: Screen) -> tuple[sparse.csr_matrix, np.ndarray]:
    """The counts of every kept and control cell (CSR, float32) and their group labels."""
    keep = screen.code >= 0
    blocks = [block[keep[start : start + block.shape[0]]].astype(np.float32) for start, block in chunks(screen)]
    names = np.array(screen.perts + [screen.control], dtype=object)
    return sparse.vstack(blocks, format="csr"), names[screen.code[keep]]
