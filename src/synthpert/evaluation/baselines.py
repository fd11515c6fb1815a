"""Rows of the tables computed without an LLM: the floor any model must clear.

Every row answers the same questions as the LLM rows and writes the same predictions
format (one `de3` row per question, one `dir` row per differentially expressed question;
`raw_text` empty, `status` answered, `score_source` probabilities). Only training rows
(`role == "train"`) of the split are ever read, never a test label.

Rows:

- `majority`: the most frequent three-class label of the reference rows (always "not
  DE" on PerturbQA), constant DE score 0. Direction task: "up" when at least half of the
  reference DE rows go up, else "down"; constant up score 0.5.
- `transfer`: knowledge-free lookup in the *other* cell lines' training rows. DE score =
  mean DE label of the same (pert, gene) pair there (0 if absent) + 0.001 x the DE rate
  of the perturbation there (0 if absent: breaks ties between unseen pairs). Up score =
  fraction up among the pair's DE rows there (0.5 if none). Three-class: not DE unless
  the pair's mean DE label is >= 0.5, then up if the up score is >= 0.5, else down.
- `gene_prior`: per target gene, the DE rate over the reference rows measuring that gene
  (PerturbQA measures ~90 sampled genes per perturbation, so the rate is over the
  perturbations where the gene was measured); the up score is the fraction up among the
  gene's DE reference rows (0.5 if none). Unknown genes get the overall DE rate. Within
  one gene the score is constant, so its per-gene AUROC is 0.5 by construction: it shows
  how much of a pooled AUROC is gene identity alone.
- `knn`: a perturbation is described by its binary DE indicators over (cell line, gene)
  in the other cell lines' training rows; a test perturbation and a training
  perturbation of the question's cell line are described the same way (their rows in
  the question's own cell line never enter the description). For each perturbation, its
  k (settings `evaluate.knn_k`) most cosine-similar reference perturbations, itself excluded, ties
  broken by name, vote (a neighbour with zero similarity carries no weight): DE score =
  similarity-weighted mean DE label of the target gene among the neighbours that
  measured it; up score likewise over the neighbours where it was DE. PerturbQA measures
  ~90 sampled genes per perturbation, so for most tuples no neighbour measured the gene
  (the log says how many were scored from neighbours). Where no neighbour measured it
  (or the perturbation has no DE row in another cell line: an empty vector), the gene
  prior is used.

Reference rows: the training rows of the question's cell line; where that cell line has
none (a `{cell}_holdout` split), the training rows of all other cell lines.

Three-class predictions of `gene_prior` and `knn` need a DE threshold. It is chosen on
the reference rows alone: their scores are computed leave-one-out (the gene prior
without the tuple itself; kNN without the perturbation itself, which the self-exclusion
already does), and the threshold is the smallest score among the top ceil(r x N) of
them, r being the reference DE rate. So the rows called DE on training data match the
training DE rate. A DE call is "up" when the up score is >= 0.5, else "down"; the
direction task uses the same rule.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import polars as pl
from scipy import sparse
from sklearn.preprocessing import normalize

from synthpert.core.io import PREDICTION_COLUMNS, read_parquet_columns
from synthpert.core.labels import DOWN, NOT_DE, UP
from synthpert.core.rows import BASELINE_ROWS
from synthpert.errors import CommandError

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ("cell", "pert", "gene", "de", "label", "role")
QUESTION_COLUMNS = ("qid", "cell", "pert", "gene", "label")


# ---------------------------------------------------------------- input


def load_splits(path: str | Path) -> pl.DataFrame:
    """The columns of a splits parquet the baselines need (training rows only matter)."""
    frame = read_parquet_columns(path, SPLIT_COLUMNS, "splits file")
    bad = frame.filter(~pl.col("role").is_in(["train", "test"])).height
    if bad:
        raise CommandError(f"splits file {path}: {bad} rows have a role other than train/test")
    return frame.with_columns(pl.col("de").cast(pl.Int64), pl.col("label").cast(pl.Int64))


def load_questions(path: str | Path) -> pl.DataFrame:
    """The questions parquet (qid, cell, pert, gene, label); qids must be unique."""
    frame = read_parquet_columns(path, QUESTION_COLUMNS, "questions file").with_columns(
        pl.col("label").cast(pl.Int64)
    )
    if frame["qid"].is_duplicated().any():
        raise CommandError(f"questions file {path}: qid values are not unique")
    if not frame["label"].is_in([NOT_DE, DOWN, UP]).all():
        raise CommandError(f"questions file {path}: label must be 0, 1 or 2")
    return frame


# ---------------------------------------------------------------- rows


def predict(
    row: str, splits: pl.DataFrame, questions: pl.DataFrame, cell: str, knn_k: int | None = None
) -> pl.DataFrame:
    """Predictions of baseline `row` for the questions about `cell` (empty if none);
    `knn_k` is the knn row's number of neighbours (`evaluate.knn_k`)."""
    if row not in BASELINE_ROWS:
        raise CommandError(f"unknown baseline row {row!r}; expected one of {BASELINE_ROWS}")
    if row == "knn" and (knn_k is None or knn_k < 1):
        raise CommandError(f"the knn row needs knn_k >= 1, got {knn_k}")
    train = splits.filter(pl.col("role") == "train")
    asked = questions.filter(pl.col("cell") == cell)
    if asked.height == 0:
        scored = asked.with_columns(
            score_de=pl.lit(None, dtype=pl.Float64),
            score_up=pl.lit(None, dtype=pl.Float64),
            pred_de3=pl.lit(None, dtype=pl.Int64),
            pred_dir=pl.lit(None, dtype=pl.Int64),
        )
    elif row == "majority":
        scored = majority(train, asked, cell)
    elif row == "transfer":
        scored = transfer(train, asked, cell)
    elif row == "gene_prior":
        scored = gene_prior(train, asked, cell)
    else:
        scored = knn(train, asked, cell, knn_k)
    return to_predictions(scored)


def reference_rows(train: pl.DataFrame, cell: str) -> pl.DataFrame:
    """Training rows of `cell`, or of every other cell line when `cell` has none."""
    own = train.filter(pl.col("cell") == cell)
    return own if own.height else train.filter(pl.col("cell") != cell)


def majority(train: pl.DataFrame, asked: pl.DataFrame, cell: str) -> pl.DataFrame:
    """Constant answers: the reference's most frequent label and majority direction."""
    ref = reference_rows(train, cell)
    if ref.height == 0:
        raise CommandError("the split has no training rows")
    counts = ref.group_by("label").len().sort(["len", "label"], descending=[True, False])
    label = int(counts["label"][0])
    de_rows = ref.filter(pl.col("de") == 1)
    direction = UP if de_rows.height == 0 or (de_rows["label"] == UP).mean() >= 0.5 else DOWN
    return asked.with_columns(
        score_de=pl.lit(0.0),
        score_up=pl.lit(0.5),
        pred_de3=pl.lit(label, dtype=pl.Int64),
        pred_dir=pl.lit(direction, dtype=pl.Int64),
    )


def transfer(train: pl.DataFrame, asked: pl.DataFrame, cell: str) -> pl.DataFrame:
    """Look the same (pert, gene) pair up in the other cell lines' training rows."""
    other = train.filter(pl.col("cell") != cell)
    pair = other.group_by("pert", "gene").agg(
        pair_de=pl.col("de").mean(),
        n_de=pl.col("de").sum(),
        n_up=(pl.col("label") == UP).sum(),
    )
    pert = other.group_by("pert").agg(pert_de=pl.col("de").mean())
    scored = (
        asked.join(pair, on=["pert", "gene"], how="left", maintain_order="left")
        .join(pert, on="pert", how="left", maintain_order="left")
        .with_columns(
            score_de=pl.col("pair_de").fill_null(0.0) + 0.001 * pl.col("pert_de").fill_null(0.0),
            score_up=pl.when(pl.col("n_de") > 0)
            .then(pl.col("n_up") / pl.col("n_de"))
            .otherwise(0.5),
        )
    )
    return _finish(scored, is_de=pl.col("pair_de").fill_null(0.0) >= 0.5)


def gene_prior(train: pl.DataFrame, asked: pl.DataFrame, cell: str) -> pl.DataFrame:
    """Per-gene DE rate and up fraction in the reference rows; threshold from training."""
    ref = reference_rows(train, cell)
    stats = _gene_stats(ref)
    rate = _rate(ref)
    scored = _prior_scores(asked, stats, rate)
    training = ref.with_columns(n_rows=pl.lit(1.0), n_de=pl.col("de").cast(pl.Float64))
    threshold = _rate_threshold(_loo_prior(training, stats, rate)["prior_de"].to_numpy(), rate)
    scored = scored.with_columns(score_de=pl.col("prior_de"), score_up=pl.col("prior_up"))
    return _finish(scored, is_de=pl.col("score_de") >= threshold)


def knn(train: pl.DataFrame, asked: pl.DataFrame, cell: str, k: int) -> pl.DataFrame:
    """Neighbour perturbations (by DE profile in the other cell lines) vote per gene."""
    ref = reference_rows(train, cell)
    stats = _gene_stats(ref)
    rate = _rate(ref)
    labels = reference_labels(ref)
    queries, candidates, weights = _neighbours(train, cell, asked["pert"], k)
    genes = sorted(labels["gene"].unique().to_list())
    votes = _vote_matrices(labels, candidates, genes)
    numerators = {name: weights @ matrix for name, matrix in votes.items()}

    def vote(frame: pl.DataFrame, prior: pl.DataFrame) -> pl.DataFrame:
        qi = _index(frame["pert"], queries)
        gi = _index(frame["gene"], genes)
        known = gi >= 0
        got = {}
        for name, matrix in numerators.items():
            values = np.zeros(frame.height)
            if known.any():
                values[known] = np.asarray(matrix[qi[known], gi[known]]).ravel()
            got[name] = values
        de = np.divide(
            got["de"], got["measured"], out=np.full(frame.height, np.nan), where=got["measured"] > 0
        )
        up = np.divide(
            got["up"],
            got["de_measured"],
            out=np.full(frame.height, np.nan),
            where=got["de_measured"] > 0,
        )
        return prior.with_columns(
            nn_de=pl.Series(de), nn_up=pl.Series(up), from_neighbours=pl.Series(got["measured"] > 0)
        ).with_columns(
            score_de=pl.col("nn_de").fill_nan(None).fill_null(pl.col("prior_de")),
            score_up=pl.col("nn_up").fill_nan(None).fill_null(pl.col("prior_up")),
        )

    scored = vote(asked, _prior_scores(asked, stats, rate))
    training = vote(labels, _loo_prior(labels, stats, rate))
    threshold = _rate_threshold(training["score_de"].to_numpy(), float(labels["de"].mean()))
    log.info(
        "knn %s: %.1f%% of questions scored from neighbours (rest: gene prior), threshold %.4f",
        cell,
        100 * scored["from_neighbours"].mean() if scored.height else 0.0,
        threshold,
    )
    return _finish(scored, is_de=pl.col("score_de") >= threshold)


# ---------------------------------------------------------------- helpers


def _finish(scored: pl.DataFrame, is_de: pl.Expr) -> pl.DataFrame:
    """Three-class and direction predictions from the scores and a DE decision."""
    direction = pl.when(pl.col("score_up") >= 0.5).then(pl.lit(UP)).otherwise(pl.lit(DOWN))
    return scored.with_columns(
        pred_de3=pl.when(is_de).then(direction).otherwise(pl.lit(NOT_DE)).cast(pl.Int64),
        pred_dir=direction.cast(pl.Int64),
    )


def _rate(ref: pl.DataFrame) -> float:
    return float(ref["de"].mean()) if ref.height else 0.0


def _gene_stats(ref: pl.DataFrame) -> pl.DataFrame:
    return ref.group_by("gene").agg(
        g_n=pl.len().cast(pl.Float64),
        g_de=pl.col("de").sum().cast(pl.Float64),
        g_up=(pl.col("label") == UP).sum().cast(pl.Float64),
    )


def _prior_scores(frame: pl.DataFrame, stats: pl.DataFrame, rate: float) -> pl.DataFrame:
    """Gene prior of each row of `frame`, in its order (overall rate for unknown genes)."""
    return frame.join(stats, on="gene", how="left", maintain_order="left").with_columns(
        prior_de=(pl.col("g_de") / pl.col("g_n")).fill_null(rate),
        prior_up=pl.when(pl.col("g_de") > 0).then(pl.col("g_up") / pl.col("g_de")).otherwise(0.5),
    )


def _loo_prior(frame: pl.DataFrame, stats: pl.DataFrame, rate: float) -> pl.DataFrame:
    """Gene prior of reference rows without their own rows (`n_rows`, `n_de` of each).

    The overall rate stands in where the gene has no other row.
    """
    rest_n = pl.col("g_n") - pl.col("n_rows")
    rest_de = pl.col("g_de") - pl.col("n_de")
    return frame.join(stats, on="gene", how="left", maintain_order="left").with_columns(
        prior_de=pl.when(rest_n > 0).then(rest_de / rest_n).otherwise(rate),
        prior_up=pl.when(pl.col("g_de") > 0).then(pl.col("g_up") / pl.col("g_de")).otherwise(0.5),
    )


def _rate_threshold(scores: np.ndarray, rate: float) -> float:
    """Smallest of the top ceil(rate x N) scores: calls the training DE rate DE."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0 or rate <= 0:
        return math.inf
    top = max(1, math.ceil(rate * scores.size))
    return float(np.sort(scores)[::-1][top - 1])


def _index(values: pl.Series, vocabulary: list[str]) -> np.ndarray:
    """Position of each value in the sorted `vocabulary`, -1 where absent."""
    lookup = pl.DataFrame(  # typed: an empty vocabulary (no other cell line's DE row) is a String column too
        {"v": pl.Series(vocabulary, dtype=pl.String), "i": np.arange(len(vocabulary), dtype=np.int64)}
    )
    joined = pl.DataFrame({"v": values}).join(lookup, on="v", how="left", maintain_order="left")
    return joined["i"].fill_null(-1).to_numpy()


def reference_labels(ref: pl.DataFrame) -> pl.DataFrame:
    """The reference rows' labels, one row per (pert, gene): mean DE label `de`, fraction
    up among its DE rows `up` (null if none), `n_rows`, `n_de` (floats)."""
    return ref.group_by("pert", "gene").agg(
        de=pl.col("de").mean(),
        up=pl.when(pl.col("de").sum() > 0)
        .then((pl.col("label") == UP).sum() / pl.col("de").sum())
        .otherwise(None),
        n_rows=pl.len().cast(pl.Float64),
        n_de=pl.col("de").sum().cast(pl.Float64),
    )


def nearest_neighbours(train: pl.DataFrame, cell: str, perts, k: int) -> pl.DataFrame:
    """The neighbours the knn row votes with: for each perturbation of `perts` asked about
    `cell`, its k most similar reference perturbations of positive similarity (`pert,
    neighbour, similarity, rank`; rank 1 = most similar, ties by name), from the training
    rows `train` alone (the description is the other cell lines' rows)."""
    queries, candidates, weights = _neighbours(train, cell, pl.Series(list(perts), dtype=pl.String), k)
    coo = weights.tocoo()
    frame = pl.DataFrame(
        {
            "pert": pl.Series(np.asarray(queries, dtype=object)[coo.row], dtype=pl.String),
            "neighbour": pl.Series(np.asarray(candidates, dtype=object)[coo.col], dtype=pl.String),
            "similarity": pl.Series(coo.data, dtype=pl.Float64),
        }
    )
    wanted = pl.DataFrame({"pert": pl.Series(list(perts), dtype=pl.String)}).unique()
    return (
        frame.join(wanted, on="pert", how="semi")
        .sort(["pert", "similarity", "neighbour"], descending=[False, True, False])
        .with_columns(rank=pl.int_range(1, pl.len() + 1).over("pert").cast(pl.Int64))
    )


def _neighbours(
    train: pl.DataFrame, cell: str, asked: pl.Series, k: int
) -> tuple[list[str], list[str], sparse.csr_matrix]:
    """Queries (the asked perturbations and the reference ones, sorted: `_neighbour_weights`
    describes the candidates by their query rows), candidates (the reference perturbations
    of `cell`, sorted) and their `_neighbour_weights`."""
    ref = reference_rows(train, cell)
    other = train.filter(pl.col("cell") != cell)
    candidates = sorted(ref["pert"].unique().to_list())
    queries = sorted(set(asked.to_list()) | set(candidates))
    return queries, candidates, _neighbour_weights(other, queries, candidates, k)


def _neighbour_weights(
    other: pl.DataFrame, queries: list[str], candidates: list[str], k: int
) -> sparse.csr_matrix:
    """(queries x candidates) cosine weights of each query's k nearest candidates."""
    de = (
        other.filter(pl.col("de") == 1)
        .select("pert", feature=pl.concat_str("cell", pl.lit("\t"), "gene"))
        .unique()
    )
    features = sorted(de["feature"].unique().to_list())
    rows = _index(de["pert"], queries)
    keep = rows >= 0
    cols = _index(de["feature"], features)[keep]
    x = sparse.csr_matrix(
        (np.ones(cols.size), (rows[keep], cols)), shape=(len(queries), max(len(features), 1))
    )
    x = normalize(x, norm="l2", axis=1)
    cand_index = _index(pl.Series(candidates, dtype=pl.String), queries)
    xc_t = x[cand_index].T.tocsc()
    self_col = _index(pl.Series(queries, dtype=pl.String), candidates)
    out_rows, out_cols, out_vals = [], [], []
    chunk = 1024
    for start in range(0, len(queries), chunk):
        stop = min(start + chunk, len(queries))
        sim = (x[start:stop] @ xc_t).toarray()
        mine = np.nonzero(self_col[start:stop] >= 0)[0]
        sim[mine, self_col[start:stop][mine]] = -1.0  # never one's own neighbour
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # ties: candidate name order
        top = np.take_along_axis(sim, order, axis=1)
        r, c = np.nonzero(top > 0)
        out_rows.append(r + start)
        out_cols.append(order[r, c])
        out_vals.append(top[r, c])
    shape = (len(queries), len(candidates))
    if not out_rows:
        return sparse.csr_matrix(shape)
    return sparse.csr_matrix(
        (np.concatenate(out_vals), (np.concatenate(out_rows), np.concatenate(out_cols))),
        shape=shape,
    )


def _vote_matrices(
    labels: pl.DataFrame, candidates: list[str], genes: list[str]
) -> dict[str, sparse.csr_matrix]:
    """(candidates x genes) matrices: DE label, measured, up fraction, DE measured."""
    r = _index(labels["pert"], candidates)
    c = _index(labels["gene"], genes)
    shape = (len(candidates), max(len(genes), 1))
    has_de = labels["up"].is_not_null().to_numpy()

    def matrix(values, mask=None):
        mask = np.ones(r.size, dtype=bool) if mask is None else mask
        return sparse.csr_matrix(
            (np.asarray(values, dtype=np.float64)[mask], (r[mask], c[mask])), shape=shape
        )

    return {
        "de": matrix(labels["de"].to_numpy()),
        "measured": matrix(np.ones(r.size)),
        "up": matrix(labels["up"].fill_null(0.0).to_numpy(), has_de),
        "de_measured": matrix(np.ones(r.size), has_de),
    }


def to_predictions(scored: pl.DataFrame) -> pl.DataFrame:
    """The predictions format: a de3 row per question, a dir row per DE question."""
    base = scored.select("qid", "cell", "pert", "gene", "label")
    common = dict(
        raw_text=pl.lit(""), status=pl.lit("answered"), score_source=pl.lit("probabilities")
    )
    de3 = base.with_columns(
        task=pl.lit("de3"),
        pred=scored["pred_de3"].cast(pl.Int64),
        score_de=scored["score_de"].cast(pl.Float64),
        score_up=pl.lit(None, dtype=pl.Float64),
        **common,
    )
    direction = base.with_columns(
        task=pl.lit("dir"),
        pred=scored["pred_dir"].cast(pl.Int64),
        score_de=pl.lit(None, dtype=pl.Float64),
        score_up=scored["score_up"].cast(pl.Float64),
        **common,
    ).filter(pl.col("label") != NOT_DE)
    return pl.concat([de3.select(PREDICTION_COLUMNS), direction.select(PREDICTION_COLUMNS)]).sort("qid", "task")


# ---------------------------------------------------------------- CLI


