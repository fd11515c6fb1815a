"""Evaluation metrics: AUROC (PerturbQA's per-gene, pooled, the SynthPert paper's own) and
three-class scores.

Pure functions on numpy/polars, small enough to check by hand. Every result carries the
number of tuples it was computed on.

Four ranking views of one row: `auroc_per_gene` (PerturbQA's metric, from the row's scores:
the perturbations ranked for one target gene), `per_perturbation` (AUROC and average
precision of the genes ranked within one perturbation, a screen's ranking),
`auroc_pooled` (one AUROC over a cell line's tuples, from the same scores) and `auroc_paper`
(the SynthPert paper's released code: pooled, from the hard answer mapped to 1 / 0 / 0.5,
optionally on seeded random 20% subsets, `auroc_paper_subsets`).

Three-class scores are computed from a 3 x 4 confusion matrix: rows are the true class
(0 not DE, 1 down, 2 up), columns the predicted class plus a fourth column for answers
that could not be parsed. An unparsed answer is never dropped: it is wrong, so it lowers
the recall of its true class, accuracy, F1 and MCC, but no class's precision.

Bootstrap intervals resample tuples with replacement. All three-class metrics depend on
the tuples only through their confusion-matrix cell, so resampling n tuples is exactly a
multinomial draw of n over the observed cell frequencies: we draw the confusion matrices
directly (fast, and identical in distribution to resampling rows).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score

from synthpert.core.labels import CLASS_KEYS, DOWN, NOT_DE, UP

PAPER_SUBSET_FRACTION = 0.2  # the paper's code scored random subsets of the test set
PAPER_SUBSET_DRAWS = 3

CLASSES = (NOT_DE, DOWN, UP)
UNPARSED_COLUMN = len(CLASSES)  # index of the "unparsed" column of the confusion matrix
METRIC_NAMES = (
    *(f"{m}_{CLASS_KEYS[c]}" for c in CLASSES for m in ("precision", "recall", "f1")),
    "accuracy",
    "macro_f1",
    "balanced_accuracy",
    "mcc",
)


class Auroc(NamedTuple):
    """An AUROC with its sample: `n` tuples, `n_genes` genes averaged (per-gene only)."""

    value: float
    n: int
    n_genes: int | None = None


def auroc_per_gene(genes, truth, score) -> Auroc:
    """PerturbQA's metric: AUROC within each target gene, averaged over genes.

    Genes whose tuples are all one class are skipped (their AUROC is undefined). Ties
    count one half, as in `sklearn.metrics.roc_auc_score`; computed with the rank-sum
    (Mann-Whitney) identity per gene so that thousands of genes take milliseconds.
    `n` counts the tuples of the genes used.
    """
    per_gene = _per_group_auroc(_scored(genes, truth, score))
    if per_gene.height == 0:
        return Auroc(float("nan"), 0, 0)
    return Auroc(float(per_gene["auc"].mean()), int(per_gene["n"].sum()), per_gene.height)


class PerPert(NamedTuple):
    """The per-perturbation view: AUROC and average precision within each perturbation,
    averaged over the `n_perts` perturbations with both classes (`n` tuples)."""

    auroc: float
    ap: float
    n: int
    n_perts: int


def per_perturbation(perts, truth, score) -> PerPert:
    """Rank the genes within each perturbation (a screen's question: which genes does this
    knockdown change?): AUROC and average precision per perturbation, averaged.

    Perturbations whose tuples are all one class are skipped. Ties as in scikit-learn:
    AUROC counts a tie one half; average precision steps once per distinct score
    (`sklearn.metrics.average_precision_score`).
    """
    frame = _scored(perts, truth, score)
    aucs = _per_group_auroc(frame)
    if aucs.height == 0:
        return PerPert(float("nan"), float("nan"), 0, 0)
    kept = frame.join(aucs.select("group"), on="group", how="semi")
    # one step per distinct score, best first: precision at that threshold x recall gained
    steps = (
        kept.group_by("group", "s")
        .agg(pos=pl.col("y").sum(), n=pl.len())
        .sort(["group", "s"], descending=[False, True])
        .with_columns(
            tp=pl.col("pos").cum_sum().over("group"),
            seen=pl.col("n").cum_sum().over("group"),
            total=pl.col("pos").sum().over("group"),
        )
    )
    ap = (
        steps.group_by("group")
        .agg(ap=(pl.col("pos") / pl.col("total") * pl.col("tp") / pl.col("seen")).sum())
        .sort("group")
    )
    return PerPert(
        float(aucs["auc"].mean()), float(ap["ap"].mean()), int(aucs["n"].sum()), aucs.height
    )


def _scored(groups, truth, score) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "group": pl.Series(groups, dtype=pl.String),
            "y": pl.Series(_binary(truth), dtype=pl.Int64),
            "s": pl.Series(np.asarray(score, dtype=np.float64)),
        }
    )
    _check_scores(frame["s"])
    return frame


def _per_group_auroc(frame: pl.DataFrame) -> pl.DataFrame:
    """AUROC within each group of `_scored` tuples with both classes (`group, n, auc`), by
    the rank-sum identity."""
    return (
        frame.with_columns(rank=pl.col("s").rank("average").over("group"))
        .group_by("group")
        .agg(
            n=pl.len(),
            pos=pl.col("y").sum(),
            rank_pos=(pl.col("rank") * pl.col("y")).sum(),
        )
        .with_columns(neg=pl.col("n") - pl.col("pos"))
        .filter((pl.col("pos") > 0) & (pl.col("neg") > 0))
        .sort("group")  # a fixed summation order: the same inputs give the same bits
        .with_columns(
            auc=(pl.col("rank_pos") - pl.col("pos") * (pl.col("pos") + 1) / 2)
            / (pl.col("pos") * pl.col("neg"))
        )
    )


def auroc_pooled(truth, score) -> Auroc:
    """One AUROC over all tuples (NaN when only one class is present)."""
    y = _binary(truth)
    s = np.asarray(score, dtype=np.float64)
    _check_scores(pl.Series(s))
    if y.size == 0 or y.min() == y.max():
        return Auroc(float("nan"), int(y.size))
    return Auroc(float(roc_auc_score(y, s)), int(y.size))


def hard_answer_score(pred, task: str) -> np.ndarray:
    """The SynthPert code's score from a hard answer: 1 for a change (`de3`: down or up;
    `dir`: up), 0 for none (`de3`: not DE; `dir`: down), 0.5 for anything else (unparsed)."""
    p = pl.Series(pred).cast(pl.Int64, strict=False).fill_null(-1).to_numpy()
    if task == "de3":
        one, zero = np.isin(p, (DOWN, UP)), p == NOT_DE
    elif task == "dir":
        one, zero = p == UP, p == DOWN
    else:
        raise ValueError(f"task must be de3 or dir, not {task!r}")
    return np.where(one, 1.0, np.where(zero, 0.0, 0.5))


def auroc_paper(truth, pred, task: str) -> Auroc:
    """The paper's protocol on all tuples: pooled AUROC of the hard answers' 1 / 0 / 0.5.

    With only three score levels most pairs tie (each tie counts one half): with no unparsed
    answer it equals the balanced accuracy of the yes/no decision, not a ranking measure.
    """
    return auroc_pooled(truth, hard_answer_score(pred, task))


class SubsetAuroc(NamedTuple):
    """Mean and sample SD of an AUROC over `draws` random subsets of `n` tuples each
    (draws with one class only are left out of both; `draws` counts those kept)."""

    mean: float
    sd: float
    n: int
    draws: int


def auroc_paper_subsets(
    truth,
    pred,
    task: str,
    seed: int,
    fraction: float = PAPER_SUBSET_FRACTION,
    draws: int = PAPER_SUBSET_DRAWS,
) -> SubsetAuroc:
    """`auroc_paper` on `draws` random subsets (without replacement) of `fraction` of the
    tuples, as the paper's code scored them, but seeded: the same seed and tuple order give
    the same subsets, so rows answering the same questions are scored on the same tuples."""
    y = _binary(truth)
    score = hard_answer_score(pred, task)
    if y.size == 0:
        return SubsetAuroc(float("nan"), float("nan"), 0, 0)
    size = max(1, int(y.size * fraction))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        pick = rng.choice(y.size, size=size, replace=False)
        value = auroc_pooled(y[pick], score[pick]).value
        if not np.isnan(value):
            values.append(value)
    mean = float(np.mean(values)) if values else float("nan")
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return SubsetAuroc(mean, sd, size, len(values))


def confusion(truth, pred) -> np.ndarray:
    """3 x 4 counts: true class (rows) by predicted class, last column = unparsed.

    `pred` may hold nulls/NaN or any value outside 0/1/2: those are unparsed answers.
    """
    y = np.asarray(pl.Series(truth).cast(pl.Int64, strict=False).to_numpy())
    if not np.isin(y, CLASSES).all():
        raise ValueError("truth labels must all be 0 (not DE), 1 (down) or 2 (up)")
    p = pl.Series(pred).cast(pl.Int64, strict=False).fill_null(-1).to_numpy()
    p = np.where(np.isin(p, CLASSES), p, UNPARSED_COLUMN)
    cm = np.zeros((len(CLASSES), len(CLASSES) + 1), dtype=np.int64)
    np.add.at(cm, (y, p), 1)
    return cm


def scores_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Three-class metrics from confusion matrices of shape (..., 3, 4).

    Same definitions as scikit-learn (zero_division=0): per-class precision, recall and
    F1 over classes 0/1/2; accuracy; macro-F1 (mean of the three F1); balanced accuracy
    (mean recall over classes present in the truth); multiclass Matthews correlation
    (Gorodkin's R_K, with "unparsed" as an extra predicted category; 0 when undefined).
    """
    cm = np.asarray(cm, dtype=np.float64)
    k = len(CLASSES)
    tp = np.stack([cm[..., i, i] for i in range(k)], axis=-1)
    true_total = cm.sum(axis=-1)  # (..., 3)
    pred_total = cm.sum(axis=-2)  # (..., 4)
    n = true_total.sum(axis=-1)
    precision = _safe_div(tp, pred_total[..., :k])
    recall = _safe_div(tp, true_total)
    f1 = _safe_div(2 * tp, true_total + pred_total[..., :k])
    present = true_total > 0
    out: dict[str, np.ndarray] = {}
    for i, cls in enumerate(CLASSES):
        key = CLASS_KEYS[cls]
        out[f"precision_{key}"] = precision[..., i]
        out[f"recall_{key}"] = recall[..., i]
        out[f"f1_{key}"] = f1[..., i]
    correct = tp.sum(axis=-1)
    out["accuracy"] = _safe_div(correct, n)
    out["macro_f1"] = f1.mean(axis=-1)
    out["balanced_accuracy"] = _safe_div((recall * present).sum(axis=-1), present.sum(axis=-1))
    # Multiclass MCC: the true-class totals get a zero for the "unparsed" category.
    t = np.concatenate([true_total, np.zeros_like(true_total[..., :1])], axis=-1)
    cov_tp = correct * n - (t * pred_total).sum(axis=-1)
    cov_pp = n**2 - (pred_total**2).sum(axis=-1)
    cov_tt = n**2 - (t**2).sum(axis=-1)
    out["mcc"] = _safe_div(cov_tp, np.sqrt(cov_tt * cov_pp))
    return out


def three_class_metrics(truth, pred) -> dict[str, float | int]:
    """Point estimates of the three-class metrics, with `n` and `n_unparsed` (NaN if n = 0)."""
    cm = confusion(truth, pred)
    scores = {name: _point(value, cm) for name, value in scores_from_confusion(cm).items()}
    return {"n": int(cm.sum()), "n_unparsed": int(cm[:, UNPARSED_COLUMN].sum()), **scores}


def bootstrap_three_class(truth, pred, n_boot: int, seed: int, level: float = 0.95) -> pl.DataFrame:
    """Percentile bootstrap intervals of the three-class metrics (tuples resampled).

    One row per metric: `metric, value, lo, hi, n, n_boot`. With `n_boot == 0` or no
    tuples, `lo`/`hi` are null (and with no tuples `value` is NaN).
    """
    cm = confusion(truth, pred)
    n = int(cm.sum())
    point = scores_from_confusion(cm)
    lo = hi = None
    if n_boot > 0 and n > 0:
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(n, cm.ravel() / n, size=n_boot).reshape(n_boot, *cm.shape)
        boot = scores_from_confusion(draws)
        tail = (1 - level) / 2 * 100
        lo = {m: float(np.percentile(boot[m], tail)) for m in METRIC_NAMES}
        hi = {m: float(np.percentile(boot[m], 100 - tail)) for m in METRIC_NAMES}
    return pl.DataFrame(
        {
            "metric": list(METRIC_NAMES),
            "value": [_point(point[m], cm) for m in METRIC_NAMES],
            "lo": [lo[m] if lo else None for m in METRIC_NAMES],
            "hi": [hi[m] if hi else None for m in METRIC_NAMES],
            "n": [n] * len(METRIC_NAMES),
            "n_boot": [n_boot] * len(METRIC_NAMES),
        },
        schema_overrides={"lo": pl.Float64, "hi": pl.Float64},
    )


def _point(value, cm: np.ndarray) -> float:
    """A metric of no tuples is undefined (NaN), not zero."""
    return float(value) if cm.sum() else float("nan")


def _binary(truth) -> np.ndarray:
    y = np.asarray(pl.Series(truth).cast(pl.Int64, strict=False).to_numpy())
    if not np.isin(y, (0, 1)).all():
        raise ValueError("AUROC truth must be 0/1 with no missing values")
    return y.astype(np.int64)


def _check_scores(scores: pl.Series) -> None:
    if scores.null_count() or scores.is_nan().any():
        raise ValueError("AUROC scores must not be missing (null or NaN)")


def _safe_div(num, den):
    num, den = np.broadcast_arrays(
        np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    )
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out
