"""Seeded samples shared by the trace and evaluation steps."""

from __future__ import annotations

import polars as pl


def sample_size(n: int, sample) -> int:
    """Rows to keep out of `n` for a `settings.Sample` (count wins over fraction)."""
    if sample.count is not None:
        return min(n, int(sample.count))
    if sample.fraction is not None:
        return min(n, round(n * float(sample.fraction)))
    return n


def stratified(df: pl.DataFrame, by: str, size: int, seed: int) -> pl.DataFrame:
    """Seeded sample of `size` rows with each `by` class in proportion (largest remainder),
    keeping at least one row of every class present when `size` allows."""
    if size >= df.height:
        return df
    counts = df.group_by(by).len().sort(by)
    classes, sizes = counts[by].to_list(), counts["len"].to_list()
    quotas = [size * s / df.height for s in sizes]
    alloc = [int(q) for q in quotas]
    if size >= len(classes):
        alloc = [max(1, a) for a in alloc]
    order = sorted(range(len(classes)), key=lambda i: quotas[i] - int(quotas[i]), reverse=True)
    i = 0
    while sum(alloc) < size:
        j = order[i % len(order)]
        if alloc[j] < sizes[j]:
            alloc[j] += 1
        i += 1
    while sum(alloc) > size:  # the at-least-one rule overshot: trim the largest
        j = max(range(len(alloc)), key=lambda k: alloc[k])
        alloc[j] -= 1
    parts = [
        df.filter(pl.col(by) == cls).sample(n, seed=seed) for cls, n in zip(classes, alloc, strict=True) if n > 0
    ]
    return pl.concat(parts)


def balanced(df: pl.DataFrame, by: str, size: int, seed: int) -> pl.DataFrame:
    """Seeded sample of about `size` rows with the same number of each `by` class (a class
    with fewer rows gives all it has)."""
    classes = sorted(df[by].unique().to_list())
    per_class = max(1, size // len(classes))
    parts = []
    for cls in classes:
        rows = df.filter(pl.col(by) == cls)
        parts.append(rows.sample(min(per_class, rows.height), seed=seed))
    return pl.concat(parts)
