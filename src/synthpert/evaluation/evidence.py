"""The evidence block of a knockdown question: what the split's training rows already say.

For a tuple (cell line, perturbation, gene) of a split, from the split's training rows
(`role == "train"`) alone:

- `gene`: the target gene's DE rate and up share over the training knockdowns that
  measured it, in the question's cell line (`gene_cell_*`) and in the other cell lines
  (`gene_other_*`), with counts;
- `pair`: the same (perturbation, gene) pair in the other cell lines' training rows
  (`pair_cells`, `pair_labels`);
- `neighbours`: the target gene after the perturbation's k nearest neighbours, the very
  neighbours of the `knn` row (`evaluation.baselines.nearest_neighbours`) with their
  similarity; its effect is read in the reference rows of `knn` (the cell line's training
  rows, or every other cell line's where it has none, as in a `<cell>_holdout` split).
  `nn_de`/`nn_up` are the similarity-weighted votes, equal to `knn`'s scores.

A test label is never read: the rows are filtered to the training role first. A tuple
that is itself a training row is described without its own row (its gene counts in its
own cell line leave it out; a perturbation is never its own neighbour; the pair and the
other cell lines' counts hold no row of its cell line), so the same table serves the
questions and, later, training prompts.

`build` returns one row per tuple (`COLUMNS`), its `text` the block as a prompt shows it
(rendered by Polars expressions, `_text`); `render_json` is the JSON form of one such row.
"""

from __future__ import annotations

import json

import polars as pl

from synthpert.core.labels import CELL_DISPLAY, DOWN, NOT_DE, UP
from synthpert.core.settings import Evidence
from synthpert.errors import CommandError
from synthpert.evaluation.baselines import nearest_neighbours, reference_labels, reference_rows

KEY = ("cell", "pert", "gene")
COUNTS = (
    "gene_cell_n", "gene_cell_de", "gene_cell_up",
    "gene_other_n", "gene_other_de", "gene_other_up",
)  # fmt: skip
COLUMNS = (
    *KEY, "role", *COUNTS, "pair_cells", "pair_labels",
    "nn_source", "nn_k", "nn_found", "nn_measured", "nn_de", "nn_up", "nn_listed", "text",
)  # fmt: skip
HEADER = "Evidence from the training data:"
WORDS = {NOT_DE: "not DE", DOWN: "down", UP: "up"}


# --------------------------------------------------------------------------- the table


def build(splits: pl.DataFrame, tuples: pl.DataFrame, settings: Evidence) -> pl.DataFrame:
    """The evidence of every (cell, pert, gene) of `tuples` (unique, sorted), from the
    training rows of `splits` (columns of `baselines.load_splits`) alone."""
    if settings.k < 1:
        raise CommandError(f"evidence needs k >= 1 neighbours, got {settings.k}")
    train = splits.filter(pl.col("role") == "train").select(*KEY, "de", "label")
    if train.height == 0:
        raise CommandError("the split has no training rows")
    asked = (
        tuples.select(*KEY)
        .unique()
        .sort(*KEY)
        .join(splits.select(*KEY, "role"), on=list(KEY), how="left", maintain_order="left")
    )
    frame = _gene_counts(asked, train)
    frame = frame.join(_pairs(asked, train), on=list(KEY), how="left", maintain_order="left")
    frame = frame.join(_neighbour_votes(asked, train, settings), on=list(KEY), how="left", maintain_order="left")
    frame = frame.with_columns(
        pl.col("pair_cells").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        pl.col("pair_labels").fill_null(pl.lit([], dtype=pl.List(pl.Int64))),
        pl.col("pair_words").fill_null(""),
        nn_k=pl.lit(settings.k, dtype=pl.Int64),
    )
    frame = _switch_off(frame, settings)
    return frame.with_columns(text=_text()).select(COLUMNS)


def _gene_counts(asked: pl.DataFrame, train: pl.DataFrame) -> pl.DataFrame:
    """Counts of the target gene's training rows: in the cell line (less the tuple's own
    row) and in every other cell line."""
    is_up = (pl.col("label") == UP).cast(pl.Int64)
    per_cell = train.group_by("cell", "gene").agg(c_n=pl.len(), c_de=pl.col("de").sum(), c_up=is_up.sum())
    per_gene = train.group_by("gene").agg(a_n=pl.len(), a_de=pl.col("de").sum(), a_up=is_up.sum())
    own = train.select(*KEY, o_de=pl.col("de"), o_up=is_up)
    zero = pl.lit(0, dtype=pl.Int64)
    return (
        asked.join(per_cell, on=["cell", "gene"], how="left", maintain_order="left")
        .join(per_gene, on="gene", how="left", maintain_order="left")
        .join(own, on=list(KEY), how="left", maintain_order="left")
        .with_columns(
            pl.col("c_n", "c_de", "c_up", "a_n", "a_de", "a_up", "o_de", "o_up").cast(pl.Int64).fill_null(zero),
            o_n=pl.col("o_de").is_not_null().cast(pl.Int64),
        )
        .with_columns(
            gene_cell_n=pl.col("c_n") - pl.col("o_n"),
            gene_cell_de=pl.col("c_de") - pl.col("o_de"),
            gene_cell_up=pl.col("c_up") - pl.col("o_up"),
            gene_other_n=pl.col("a_n") - pl.col("c_n"),
            gene_other_de=pl.col("a_de") - pl.col("c_de"),
            gene_other_up=pl.col("a_up") - pl.col("c_up"),
        )
        .select(*KEY, "role", *COUNTS)
    )


def _pairs(asked: pl.DataFrame, train: pl.DataFrame) -> pl.DataFrame:
    """The same (pert, gene) in the other cell lines' training rows: cells and labels."""
    other = train.select("pert", "gene", pair_cell=pl.col("cell"), pair_label=pl.col("label").cast(pl.Int64))
    return (
        asked.select(*KEY)
        .join(other, on=["pert", "gene"], how="inner")
        .filter(pl.col("pair_cell") != pl.col("cell"))
        .sort(*KEY, "pair_cell")
        .group_by(*KEY, maintain_order=True)
        .agg(
            pair_cells=pl.col("pair_cell"),
            pair_labels=pl.col("pair_label"),
            pair_words=pl.format("{} {}", _display(pl.col("pair_cell")), _word(pl.col("pair_label"))).str.join("; "),
        )
    )


def _neighbour_votes(asked: pl.DataFrame, train: pl.DataFrame, settings: Evidence) -> pl.DataFrame:
    """Per tuple: the knn row's neighbours of its perturbation, how many measured the gene
    in the reference rows, their similarity-weighted DE and up votes, the first listed."""
    parts = []
    for cell in asked["cell"].unique().sort().to_list():
        mine = asked.filter(pl.col("cell") == cell).select(*KEY)
        ref = reference_rows(train, cell)
        source = "cell" if train.filter(pl.col("cell") == cell).height else "other"
        neighbours = nearest_neighbours(train, cell, mine["pert"].unique().to_list(), settings.k)
        found = neighbours.group_by("pert").agg(nn_found=pl.len().cast(pl.Int64))
        labels = reference_labels(ref).select(
            neighbour=pl.col("pert"),
            gene=pl.col("gene"),
            de=pl.col("de"),
            up=pl.col("up"),
            n=pl.col("n_rows").cast(pl.Int64),
            n_de=pl.col("n_de").cast(pl.Int64),
            n_up=(pl.col("up").fill_null(0.0) * pl.col("n_de")).round(0).cast(pl.Int64),
        )
        measured = (
            mine.join(neighbours, on="pert", how="inner")
            .join(labels, on=["neighbour", "gene"], how="inner")
            .sort(*KEY, "rank")
        )
        sim = pl.col("similarity")
        has_up = pl.col("up").is_not_null()
        votes = measured.group_by(*KEY, maintain_order=True).agg(
            nn_measured=pl.len().cast(pl.Int64),
            nn_de=(sim * pl.col("de")).sum() / sim.sum(),
            nn_up=pl.when(has_up.any())
            .then((sim * pl.col("up")).filter(has_up).sum() / sim.filter(has_up).sum())
            .otherwise(None),
            nn_listed=pl.struct(pl.col("neighbour").alias("pert"), "similarity", "n", "n_de", "n_up").head(
                settings.max_listed
            ),
            nn_words=pl.format("{} ({}) {}", "neighbour", _two_decimals(sim), _effect())
            .head(settings.max_listed)
            .str.join("; "),
        )
        parts.append(
            mine.join(found, on="pert", how="left", maintain_order="left")
            .join(votes, on=list(KEY), how="left", maintain_order="left")
            .with_columns(
                nn_source=pl.lit(source),
                nn_found=pl.col("nn_found").fill_null(0),
                nn_measured=pl.col("nn_measured").fill_null(0),
            )
        )
    listed = pl.List(pl.Struct({"pert": pl.String, "similarity": pl.Float64, "n": pl.Int64, "n_de": pl.Int64, "n_up": pl.Int64}))
    columns = ("nn_source", "nn_found", "nn_measured", "nn_de", "nn_up", "nn_listed", "nn_words")
    return pl.concat(
        [p.with_columns(pl.col("nn_listed").cast(listed)).select(*KEY, *columns) for p in parts], how="vertical"
    ).with_columns(pl.col("nn_listed").fill_null(pl.lit([], dtype=listed)))


def _switch_off(frame: pl.DataFrame, settings: Evidence) -> pl.DataFrame:
    """Null the sources the settings leave out, so neither the table nor the text has them."""
    off = []
    if not settings.gene:
        off += list(COUNTS)
    if not settings.pair:
        off += ["pair_cells", "pair_labels", "pair_words"]
    if not settings.neighbours:
        off += ["nn_source", "nn_k", "nn_found", "nn_measured", "nn_de", "nn_up", "nn_listed", "nn_words"]
    return frame.with_columns(pl.lit(None, dtype=frame.schema[c]).alias(c) for c in off)


# --------------------------------------------------------------------------- the block


def _display(cell: pl.Expr) -> pl.Expr:
    """A cell id as people write it (`display_cell`)."""
    return cell.replace(CELL_DISPLAY)


def _word(label: pl.Expr) -> pl.Expr:
    return label.replace_strict(WORDS, return_dtype=pl.String)


def _two_decimals(value: pl.Expr) -> pl.Expr:
    """A number in [0, 1] as `0.42` (rounded half up)."""
    hundredths = (value * 100).round(0).cast(pl.Int64)
    return pl.format("{}.{}", hundredths // 100, (hundredths % 100).cast(pl.String).str.zfill(2))


def _percent(de: pl.Expr, n: pl.Expr) -> pl.Expr:
    """`de` of `n` as a percentage with one decimal (`5.0`)."""
    tenths = (1000 * de / n).round(0).cast(pl.Int64)
    return pl.format("{}.{}", tenths // 10, tenths % 10)


def _effect() -> pl.Expr:
    """One neighbour's effect on the gene: a class for one row, else counts of its rows."""
    one = pl.when(pl.col("n_de") == 0).then(pl.lit(WORDS[NOT_DE]))
    one = one.when(pl.col("n_up") > 0).then(pl.lit(WORDS[UP])).otherwise(pl.lit(WORDS[DOWN]))
    return pl.when(pl.col("n") == 1).then(one).otherwise(pl.format("DE {}/{}, {} up", "n_de", "n", "n_up"))


def _gene_line(where: pl.Expr, prefix: str) -> pl.Expr:
    n, de, up = (pl.col(f"{prefix}_{x}") for x in ("n", "de", "up"))
    share = pl.format("DE after {} of {} knockdowns ({}%); {} up, {} down", de, n, _percent(de, n), up, de - up)
    said = pl.when(n > 0).then(share).otherwise(pl.lit("no training knockdown measured it"))
    return pl.when(n.is_not_null()).then(pl.format("- {} in {}: {}.", "gene", where, said))


def _neighbour_line() -> pl.Expr:
    where = pl.when(pl.col("nn_source") == "cell").then(_display(pl.col("cell"))).otherwise(pl.lit("other cell lines"))
    found, measured = pl.col("nn_found"), pl.col("nn_measured")
    votes = pl.concat_str(
        pl.lit("weighted DE "),
        _two_decimals(pl.col("nn_de")),
        pl.when(pl.col("nn_up").is_not_null()).then(pl.lit(", up ") + _two_decimals(pl.col("nn_up"))).otherwise(pl.lit("")),
    )
    listed = pl.col("nn_listed").list.len()
    more = pl.when(measured > listed).then(pl.format("; +{} more", measured - listed)).otherwise(pl.lit(""))
    listing = pl.when(listed > 0).then(pl.format(": {}{}", "nn_words", more)).otherwise(pl.lit(""))
    line = (
        pl.when(found == 0)
        .then(pl.format("- Knockdowns similar to {}: none found (no DE profile to compare).", "pert"))
        .when(measured == 0)
        .then(pl.format("- {} after the {} knockdowns most similar to {}: none measured it in {}.", "gene", found, "pert", where))
        .otherwise(
            pl.format(
                "- {} after the {} knockdowns most similar to {} (similarity): {} measured it in {}, {}{}.",
                "gene", found, "pert", measured, where, votes, listing,
            )  # fmt: skip
        )
    )
    return pl.when(pl.col("nn_source").is_not_null()).then(line)


def _text() -> pl.Expr:
    """The block as a prompt shows it: compact lines with counts, one per source kept."""
    cell = _display(pl.col("cell"))
    pair = pl.when(pl.col("pair_words").is_not_null()).then(
        pl.format(
            "- {} after {} knockdown in other cell lines: {}.",
            "gene", "pert", pl.when(pl.col("pair_words") == "").then(pl.lit("not measured")).otherwise("pair_words"),
        )  # fmt: skip
    )
    lines = [
        pl.lit(HEADER),
        _gene_line(cell, "gene_cell"),
        _gene_line(pl.lit("other cell lines"), "gene_other"),
        pair,
        _neighbour_line(),
    ]
    return pl.concat_str(lines, separator="\n", ignore_nulls=True)


def render_json(row: dict) -> str:
    """The block's JSON form: its numbers by source (absent sources left out)."""
    block: dict = {"cell": row["cell"], "pert": row["pert"], "gene": row["gene"], "role": row["role"]}
    if row["gene_cell_n"] is not None:
        for name, prefix in (("gene_in_cell", "gene_cell"), ("gene_in_other_cells", "gene_other")):
            block[name] = {"measured": row[f"{prefix}_n"], "de": row[f"{prefix}_de"], "up": row[f"{prefix}_up"]}
    if row["pair_cells"] is not None:
        block["pair_in_other_cells"] = [
            {"cell": c, "label": label, "answer": WORDS[label]} for c, label in zip(row["pair_cells"], row["pair_labels"])
        ]
    if row["nn_source"] is not None:
        block["neighbours"] = {
            "effect_in": row["cell"] if row["nn_source"] == "cell" else "other cell lines",
            "k": row["nn_k"],
            "found": row["nn_found"],
            "measured": row["nn_measured"],
            "weighted_de": row["nn_de"],
            "weighted_up": row["nn_up"],
            "listed": row["nn_listed"],
        }
    block["text"] = row["text"]
    return json.dumps(block, indent=2)
