"""Metrics on hand-worked examples (every expected value derived in the comments)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import average_precision_score, matthews_corrcoef, roc_auc_score

from synthpert.evaluation.metrics import (
    METRIC_NAMES,
    auroc_paper,
    auroc_paper_subsets,
    auroc_per_gene,
    auroc_pooled,
    bootstrap_three_class,
    confusion,
    hard_answer_score,
    per_perturbation,
    scores_from_confusion,
    three_class_metrics,
)


def test_per_gene_auroc_ties_single_class_genes_and_average():
    genes = ["A", "A", "A", "B", "B", "B", "B", "C", "C", "D", "D", "D"]
    truth = [1, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0]
    score = [0.8, 0.8, 0.2, 0.1, 0.4, 0.35, 0.8, 0.5, 0.9, 0.1, 0.2, 0.3]
    # A: positive 0.8 vs negatives 0.8 (tie: 1/2) and 0.2 (win: 1) -> 1.5 / 2 = 0.75
    # B: positives 0.4, 0.35 vs negatives 0.1, 0.8 -> each beats 0.1 only -> 2 / 4 = 0.5
    # C (all DE) and D (none DE) have one class: skipped.
    result = auroc_per_gene(genes, truth, score)
    assert result.value == pytest.approx((0.75 + 0.5) / 2)
    assert result.n_genes == 2
    assert result.n == 7  # tuples of A and B
    assert roc_auc_score([1, 0, 0], [0.8, 0.8, 0.2]) == pytest.approx(0.75)


def test_per_gene_auroc_matches_sklearn_per_gene_loop():
    rng = np.random.default_rng(3)
    genes = rng.integers(0, 40, 600).astype(str)
    truth = rng.random(600) < 0.3
    score = np.round(rng.random(600) + 0.4 * truth, 1)  # rounding makes many ties
    expected = [
        roc_auc_score(truth[genes == g], score[genes == g])
        for g in np.unique(genes)
        if 0 < truth[genes == g].sum() < (genes == g).sum()
    ]
    result = auroc_per_gene(genes, truth, score)
    assert result.value == pytest.approx(np.mean(expected), abs=1e-12)
    assert result.n_genes == len(expected)


def test_per_perturbation_view_equals_sklearn_within_each_perturbation():
    # P1: genes a..d ranked within the knockdown, a tie between a DE and a not-DE gene
    # P2: one class only (skipped); P3: perfect ranking
    perts = ["P1"] * 4 + ["P2"] * 2 + ["P3"] * 3
    truth = [1, 0, 1, 0, 0, 0, 1, 0, 0]
    score = [0.9, 0.9, 0.3, 0.1, 0.5, 0.6, 0.8, 0.2, 0.1]
    # P1 AUROC: positive .9 vs (.9 tie, .1) = 1.5, .3 vs (.9, .1) = 1 -> 2.5 / 4 = 0.625
    # P1 AP: thresholds .9 (1 of 2 right, recall 1/2), .3 (2 of 3, recall 1) -> .5*.5 + .5*2/3
    result = per_perturbation(perts, truth, score)
    p1, p3 = slice(0, 4), slice(6, 9)
    y, s = np.array(truth), np.array(score)
    assert roc_auc_score(y[p1], s[p1]) == pytest.approx(0.625)
    assert average_precision_score(y[p1], s[p1]) == pytest.approx(0.25 + 1 / 3)
    assert result.auroc == pytest.approx((0.625 + 1.0) / 2)
    expected_ap = (average_precision_score(y[p1], s[p1]) + average_precision_score(y[p3], s[p3])) / 2
    assert result.ap == pytest.approx(expected_ap)
    assert result.n_perts == 2 and result.n == 7


def test_per_perturbation_view_matches_sklearn_loop_with_ties():
    rng = np.random.default_rng(5)
    perts = rng.integers(0, 30, 500).astype(str)
    truth = rng.random(500) < 0.25
    score = np.round(rng.random(500) + 0.3 * truth, 1)
    kept = [p for p in np.unique(perts) if 0 < truth[perts == p].sum() < (perts == p).sum()]
    result = per_perturbation(perts, truth, score)
    auc = np.mean([roc_auc_score(truth[perts == p], score[perts == p]) for p in kept])
    ap = np.mean([average_precision_score(truth[perts == p], score[perts == p]) for p in kept])
    assert result.auroc == pytest.approx(auc, abs=1e-12)
    assert result.ap == pytest.approx(ap, abs=1e-12)
    assert result.n_perts == len(kept)
    assert math.isnan(per_perturbation(["A", "A"], [1, 1], [0.1, 0.2]).auroc)


def test_pooled_auroc_rewards_gene_identity_that_per_gene_ignores():
    # A score that only knows the gene (X: 0.9, Y: 0.1); X is mostly DE, Y mostly not.
    genes = ["X", "X", "X", "Y", "Y", "Y"]
    truth = [1, 1, 0, 1, 0, 0]
    score = [0.9, 0.9, 0.9, 0.1, 0.1, 0.1]
    # per gene: all scores tied within a gene -> 0.5 and 0.5 -> 0.5
    assert auroc_per_gene(genes, truth, score).value == pytest.approx(0.5)
    # pooled: positives (0.9, 0.9, 0.1) vs negatives (0.9, 0.1, 0.1):
    # each 0.9 positive: 0.5 + 1 + 1 = 2.5 (twice), the 0.1 positive: 0 + 0.5 + 0.5 = 1
    # -> 6 / 9
    pooled = auroc_pooled(truth, score)
    assert pooled.value == pytest.approx(6 / 9)
    assert pooled.n == 6


def test_auroc_undefined_and_bad_input():
    result = auroc_per_gene(["A", "A", "B"], [1, 1, 0], [0.1, 0.2, 0.3])
    assert math.isnan(result.value) and result.n_genes == 0 and result.n == 0
    assert math.isnan(auroc_pooled([0, 0], [0.1, 0.2]).value)
    with pytest.raises(ValueError, match="missing"):
        auroc_pooled([0, 1], [0.1, None])
    with pytest.raises(ValueError, match="0/1"):
        auroc_per_gene(["A", "A"], [0, 2], [0.1, 0.2])


def test_paper_protocol_auroc_scores_hard_answers_with_ties_and_unparsed():
    # de3: truth is "changed" (label 1 or 2); a change answer scores 1, not DE 0, unparsed .5
    truth = [0, 0, 0, 1, 2, 2, 0, 1]
    pred = [0, 1, None, 1, 0, 2, 0, None]
    assert hard_answer_score(pred, "de3").tolist() == [0, 1, 0.5, 1, 0, 1, 0, 0.5]
    changed = [int(t != 0) for t in truth]
    # positives score (1, 0, 1, .5), negatives (0, 1, .5, 0); over the 16 pairs:
    #   a positive 1: beats 0, 0.5, 0 and ties 1 -> 3.5 (twice: 7)
    #   the positive 0: ties both 0s -> 1;  the positive .5: beats both 0s, ties .5 -> 2.5
    # -> (7 + 1 + 2.5) / 16 = 0.65625
    result = auroc_paper(changed, pred, "de3")
    assert result.value == pytest.approx(10.5 / 16) and result.n == 8
    assert result.value == pytest.approx(roc_auc_score(changed, [0, 1, 0.5, 1, 0, 1, 0, 0.5]))
    # dir: up 1, down 0; unparsed and any non-direction answer (not DE) .5
    up = [1, 1, 0, 0, 1]
    pred_dir = [2, None, 1, 2, 0]
    assert hard_answer_score(pred_dir, "dir").tolist() == [1, 0.5, 0, 1, 0.5]
    # positives (1, .5, .5) vs negatives (0, 1): 1 -> 1.5, each .5 -> 1 -> 3.5 / 6
    assert auroc_paper(up, pred_dir, "dir").value == pytest.approx(3.5 / 6)
    # with no unparsed answer it is the balanced accuracy of the yes/no decision
    assert auroc_paper([1, 1, 0, 0, 0], [2, 0, 0, 0, 1], "de3").value == pytest.approx(
        (1 / 2 + 2 / 3) / 2
    )
    with pytest.raises(ValueError, match="task"):
        hard_answer_score([0], "three")


def test_paper_protocol_subsets_are_seeded_and_sized():
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 2, 500)
    pred = np.where(rng.random(500) < 0.8, truth * 2, 2 - truth * 2).astype(float)
    pred[:25] = np.nan  # unparsed
    a = auroc_paper_subsets(truth, pred, "de3", seed=88)
    assert a == auroc_paper_subsets(truth, pred, "de3", seed=88)
    assert a != auroc_paper_subsets(truth, pred, "de3", seed=89)
    assert a.n == 100 and a.draws == 3 and a.sd > 0
    full = auroc_paper(truth, pred, "de3").value
    assert abs(a.mean - full) < 3 * a.sd + 0.02  # subsets scatter around the full-set value
    perfect = auroc_paper_subsets(truth, truth * 2, "de3", seed=1)
    assert perfect.mean == 1.0 and perfect.sd == 0.0
    # a subset with one class has no AUROC: left out of the mean, and counted out of draws
    one = auroc_paper_subsets([1] * 9 + [0], [2] * 10, "de3", seed=0, fraction=0.1)
    assert one.n == 1 and one.draws == 0 and math.isnan(one.mean) and math.isnan(one.sd)


def test_three_class_counts_an_unparsed_answer_as_wrong():
    truth = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, None, 1, 2, 2]
    # confusion (true x predicted, last column unparsed):
    #   not_de: 2 0 0 1 / down: 0 1 1 0 / up: 0 0 1 0
    cm = confusion(truth, pred)
    assert cm.tolist() == [[2, 0, 0, 1], [0, 1, 1, 0], [0, 0, 1, 0]]
    m = three_class_metrics(truth, pred)
    assert m["n"] == 6 and m["n_unparsed"] == 1
    assert m["precision_not_de"] == pytest.approx(1.0)  # 2 / 2 predicted not_de
    assert m["recall_not_de"] == pytest.approx(2 / 3)  # the unparsed one is missed
    assert m["f1_not_de"] == pytest.approx(0.8)  # 2*2 / (3 + 2)
    assert m["precision_down"] == pytest.approx(1.0)
    assert m["recall_down"] == pytest.approx(0.5)
    assert m["f1_down"] == pytest.approx(2 / 3)  # 2*1 / (2 + 1)
    assert m["precision_up"] == pytest.approx(0.5)
    assert m["recall_up"] == pytest.approx(1.0)
    assert m["f1_up"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)  # not 4/5: the unparsed answer stays
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 2 / 3) / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # MCC: t = (3, 2, 1, 0), p = (2, 1, 2, 1), c = 4, s = 6
    # (4*6 - (6 + 2 + 2)) / sqrt((36 - 10) * (36 - 14)) = 14 / sqrt(572)
    assert m["mcc"] == pytest.approx(14 / math.sqrt(572))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(truth, [0, 0, -1, 1, 2, 2]))


def test_balanced_accuracy_and_mcc_expose_the_majority_class():
    truth = [0] * 8 + [1, 2]
    m = three_class_metrics(truth, [0] * 10)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx(1 / 3)  # recalls 1, 0, 0
    assert m["mcc"] == 0.0  # a constant prediction carries no information
    assert m["macro_f1"] == pytest.approx((2 * 8 / 18) / 3)  # f1_not_de = 16/18
    perfect = three_class_metrics([0, 1, 2, 2], [0, 1, 2, 2])
    assert perfect["mcc"] == pytest.approx(1.0) and perfect["balanced_accuracy"] == 1.0


def test_float_predictions_with_nan_and_bad_truth():
    cm = confusion(np.array([0, 1, 2]), np.array([0.0, np.nan, 2.0]))
    assert cm[:, 3].tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="truth"):
        confusion([0, 3], [0, 0])
    empty = three_class_metrics([], [])
    assert empty["n"] == 0 and math.isnan(empty["accuracy"])


def test_vectorised_scores_match_one_at_a_time():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 20, size=(5, 3, 4))
    together = scores_from_confusion(batch)
    for i in range(5):
        alone = scores_from_confusion(batch[i])
        for name in METRIC_NAMES:
            assert together[name][i] == pytest.approx(float(alone[name]))


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, 300)
    pred = np.where(rng.random(300) < 0.7, truth, rng.integers(0, 3, 300))
    a = bootstrap_three_class(truth, pred, n_boot=500, seed=7)
    b = bootstrap_three_class(truth, pred, n_boot=500, seed=7)
    assert a.equals(b)
    assert a["metric"].to_list() == list(METRIC_NAMES)
    assert (a["lo"] <= a["value"]).all() and (a["value"] <= a["hi"]).all()
    assert (a["n"] == 300).all() and (a["n_boot"] == 500).all()
    accuracy = a.filter(pl.col("metric") == "accuracy").row(0, named=True)
    assert 0.05 < accuracy["hi"] - accuracy["lo"] < 0.15  # about 4 binomial SDs at n=300
    none = bootstrap_three_class(truth, pred, n_boot=0, seed=7)
    assert none["lo"].null_count() == len(METRIC_NAMES)


def test_multinomial_bootstrap_matches_resampling_rows():
    # Resampling tuples and drawing the confusion matrix multinomially are the same
    # distribution: compare the spread of the bootstrap accuracy both ways.
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 3, 200)
    pred = np.where(rng.random(200) < 0.6, truth, rng.integers(0, 3, 200)).astype(float)
    pred[:10] = np.nan
    cm_draws = bootstrap_three_class(truth, pred, n_boot=4000, seed=11)
    lo, hi = cm_draws.filter(pl.col("metric") == "accuracy").select("lo", "hi").row(0)
    idx = rng.integers(0, 200, size=(4000, 200))
    acc = (truth[idx] == np.nan_to_num(pred, nan=-1)[idx]).mean(axis=1)
    assert lo == pytest.approx(np.percentile(acc, 2.5), abs=0.015)
    assert hi == pytest.approx(np.percentile(acc, 97.5), abs=0.015)
