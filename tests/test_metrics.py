"""luna.metrics (per-sample rows, curves, thresholds) and luna.froc (LUNA16 FROC and CPM): hand and edge cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from luna.evaluation import METRICS_COLUMNS, combine_metrics
from luna.froc import FROC_RATES, SENSITIVITY_COLUMNS, froc, froc_bootstrap, froc_bootstrap_samples
from luna.metrics import (
    HISTORY_COLUMNS,
    MetricsError,
    auc_score,
    format_row,
    metric_row,
    pr_curve,
    roc_curve,
)

# ----------------------------------------------------------------------------------------------------
# metric row
# ----------------------------------------------------------------------------------------------------

# Hand-made table (label, probability, loss):
#   i  label  prob  loss   prediction (p > 0.5)  outcome
#   0  1      0.9   0.1    pos                   TP
#   1  1      0.5   0.7    neg (exactly 0.5)     FN
#   2  1      0.3   1.2    neg                   FN
#   3  0      0.7   1.2    pos                   FP
#   4  0      0.5   0.7    neg                   TN
#   5  0      0.2   0.2    neg                   TN
#   6  0.5    0.1   0.1    neg (label 0.5 = neg) TN
#   7  0      0.0   0.0    neg                   TN
# n = 8, n_pos = 3, n_neg = 5; TP = 1, FN = 2, FP = 1, TN = 4.
# loss_all = (0.1+0.7+1.2+1.2+0.7+0.2+0.1+0.0)/8 = 4.2/8 = 0.525
# loss_pos = (0.1+0.7+1.2)/3 = 2/3;  loss_neg = (1.2+0.7+0.2+0.1+0.0)/5 = 2.2/5 = 0.44
# correct_all = (1+4)/8 = 62.5 %; correct_neg = 4/5 = 80 %; correct_pos = 1/3 = 33.33 %
# precision = 1/(1+1) = 0.5; recall = 1/(1+2) = 1/3; f1 = 2 * 0.5 * 1/3 / (0.5 + 1/3) = (1/3)/(5/6) = 0.4
# AUC: positives {0.9, 0.5, 0.3} vs negatives {0.7, 0.5, 0.2, 0.1, 0.0}, 15 pairs:
#   0.9 beats all 5 -> 5; 0.5 beats 0.2, 0.1, 0.0 and ties 0.5 -> 3.5; 0.3 beats 0.2, 0.1, 0.0 -> 3
#   (5 + 3.5 + 3) / 15 = 11.5/15
LABELS = [1, 1, 1, 0, 0, 0, 0.5, 0]
PROBS = [0.9, 0.5, 0.3, 0.7, 0.5, 0.2, 0.1, 0.0]
LOSSES = [0.1, 0.7, 1.2, 1.2, 0.7, 0.2, 0.1, 0.0]


def test_metric_row_equals_hand_computation():
    row = metric_row(LABELS, PROBS, LOSSES, epoch=3, split="val")
    assert list(row) == HISTORY_COLUMNS
    assert (row["epoch"], row["split"], row["n"], row["n_pos"], row["n_neg"]) == (3, "val", 8, 3, 5)
    expected = {
        "loss_all": 0.525, "loss_neg": 0.44, "loss_pos": 2 / 3,
        "correct_all": 62.5, "correct_neg": 80.0, "correct_pos": 100 / 3,
        "precision": 0.5, "recall": 1 / 3, "f1": 0.4, "auc": 11.5 / 15,
    }
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, rel=1e-12), key
    assert isinstance(row["n"], int) and isinstance(row["auc"], float)


def test_all_negative_model_gives_nan_precision_and_f1():
    # nothing above 0.5 (0.5 itself is negative): TP = FP = 0 -> precision 0/0 = NaN, recall 0/2 = 0
    row = metric_row([1, 1, 0, 0], [0.5, 0.4, 0.1, 0.2], [1, 1, 0, 0], epoch=1, split="train")
    assert math.isnan(row["precision"]) and math.isnan(row["f1"])
    assert row["recall"] == 0.0
    assert row["correct_pos"] == 0.0 and row["correct_neg"] == 100.0
    # AUC still exists: positives {0.5, 0.4} vs negatives {0.1, 0.2} -> all 4 pairs won -> 1.0
    assert row["auc"] == 1.0


def test_wrong_positive_predictions_give_f1_zero_not_nan():
    # TP = 0, FP = 1, FN = 1: precision 0/1 = 0, recall 0/1 = 0, both defined -> f1 = 2TP/(2TP+FP+FN) = 0
    row = metric_row([1, 0], [0.2, 0.9], [1, 1], epoch=1, split="val")
    assert (row["precision"], row["recall"], row["f1"]) == (0.0, 0.0, 0.0)


def test_only_negatives_gives_nan_for_positive_class_metrics():
    row = metric_row([0, 0, 0], [0.9, 0.1, 0.2], [2.0, 0.1, 0.3], epoch=1, split="val")
    assert (row["n_pos"], row["n_neg"]) == (0, 3)
    for key in ("loss_pos", "correct_pos", "recall", "f1", "auc"):
        assert math.isnan(row[key]), key
    assert row["precision"] == 0.0  # TP 0 of 1 positive prediction
    assert row["loss_neg"] == pytest.approx(0.8) and row["correct_neg"] == pytest.approx(200 / 3)


def test_only_positives_gives_nan_for_negative_class_metrics():
    row = metric_row([1, 1], [0.9, 0.4], [0.1, 0.9], epoch=2, split="val")
    for key in ("loss_neg", "correct_neg", "auc"):
        assert math.isnan(row[key]), key
    assert (row["precision"], row["recall"], row["f1"]) == (1.0, 0.5, pytest.approx(2 / 3))


def test_empty_input_is_all_nan_not_a_crash():
    row = metric_row([], [], [], epoch=0, split="val")
    assert row["n"] == 0
    assert all(math.isnan(row[key]) for key in HISTORY_COLUMNS[5:])


def test_length_mismatch_is_a_clear_error():
    with pytest.raises(MetricsError, match="differ in length"):
        metric_row([1, 0], [0.5], [0.1, 0.2], epoch=1, split="val")


def _pairwise_auc(labels, probs):
    pos = [p for l, p in zip(labels, probs) if l > 0.5]
    neg = [p for l, p in zip(labels, probs) if l <= 0.5]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_with_ties_equals_brute_force_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=300)
    probs = np.round(rng.random(300) * 0.5 + 0.3 * labels, 1)  # one decimal: many ties
    assert len(np.unique(probs)) < 15
    assert auc_score(labels, probs) == pytest.approx(_pairwise_auc(labels, probs), rel=1e-12)


def test_auc_is_nan_for_nan_probability():
    assert math.isnan(auc_score([1, 0], [np.nan, 0.2]))


def test_format_row_shows_counts_and_nan():
    line = format_row(metric_row(LABELS, PROBS, LOSSES, epoch=3, split="train"))
    assert line.startswith("E3 trn 0.5250 loss,  62.5% correct, 0.5000 precision, 0.3333 recall, 0.4000 f1")
    assert "neg 0.4400 loss,  80.0% correct (4 of 5)" in line
    assert "pos 0.6667 loss,  33.3% correct (1 of 3)" in line
    line = format_row(metric_row([0, 0], [0.1, 0.2], [0.1, 0.2], epoch=1, split="val"))
    assert "nan precision" in line and "(0 of 0)" in line


def test_roc_and_pr_curves():
    # labels/probs: positives 0.9, 0.5, 0.3; negatives 0.7, 0.5, 0.2, 0.1, 0.0 (table above)
    fpr, tpr, thresholds = roc_curve(LABELS, PROBS)
    # thresholds inf, 0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.0; p >= t counts: TP 0,1,1,2,3,3,3,3; FP 0,0,1,2,2,3,4,5
    np.testing.assert_array_equal(thresholds, [np.inf, 0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.0])
    np.testing.assert_allclose(tpr, np.array([0, 1, 1, 2, 3, 3, 3, 3]) / 3)
    np.testing.assert_allclose(fpr, np.array([0, 0, 1, 2, 2, 3, 4, 5]) / 5)
    # trapezoid area under the ROC points = Mann-Whitney AUC
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert area == pytest.approx(11.5 / 15)
    precision, recall, pr_thresholds = pr_curve(LABELS, PROBS)
    np.testing.assert_array_equal(pr_thresholds, thresholds[1:])
    np.testing.assert_allclose(precision, [1 / 1, 1 / 2, 2 / 4, 3 / 5, 3 / 6, 3 / 7, 3 / 8])
    np.testing.assert_allclose(recall, np.array([1, 1, 2, 3, 3, 3, 3]) / 3)


# ----------------------------------------------------------------------------------------------------
# FROC / CPM
# ----------------------------------------------------------------------------------------------------

def _annotations(rows):
    return pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])


def _predictions(rows):
    return pd.DataFrame(rows, columns=["series_uid", "coord_x", "coord_y", "coord_z", "probability"])


def hand_case():
    """Val scans A, B, C, D (D: no candidates); E is a train scan whose rows must be ignored.

    Scan A: nodules N1 (0,0,0) d10 (r 5), N2 (8,0,0) d10 (r 5); excluded X1 (50,50,50) d -1 (-> 10 mm,
            r 5) and X3 (-4,0,0) d4 (r 2).
      a1 (1,0,0)       0.9  -> N1 (dist 1)
      a2 (0,1,0)       0.6  -> N1 again (multiple hits on one nodule)
      a3 (4,0,0)       0.7  -> N1 (dist 4) AND N2 (dist 4): inside two nodules, hits both
      a4 (50,50,54.9)  0.95 -> X1 only (dist 4.9 < 5 thanks to the -1 -> 10 mm rule): dropped
      a5 (0,0,5)       0.4  -> dist to N1 exactly 5 = r: no hit (strict <) -> FP
      a6 (100,0,0)     0.7  -> nothing -> FP (ties with N2's best score 0.7)
      a7 (-3,0,0)      0.99 -> N1 (dist 3) and X3 (dist 1): a nodule hit wins -> N1 best = 0.99
      => N1 best = max(0.9, 0.6, 0.7, 0.99) = 0.99, N2 best = 0.7; FPs 0.4, 0.7
    Scan B: nodule N3 (0,0,0) d6 (r 3), never detected.
      b1 (10,0,0) 0.1 -> FP;  b2 (0,0,3) 0.3 -> dist 3 = r: no hit -> FP
    Scan C: nodule N4 (0,0,0) d8 (r 4); 103 candidates (> 100):
      c0 (0,0,2) 0.85 -> N4; 97 far away at 0.5; 5 far away at 0.2.
      Sorted: 0.85, 0.5 x 97 (places 2-98), 0.2 x 5 (places 99-103): the 101st is 0.2, so only the 98
      strictly above 0.2 are kept (a plain "first 100" would keep two of the 0.2s as FPs).
      => N4 best = 0.85; 97 FPs at 0.5
    Scan D: nodule N6 (5,5,5) d5, no candidates: never detected, and D still divides the FP count.
    Scan E (train): nodule and a 0.99 candidate on it: ignored.

    Totals: n_scans = 4; nodules N1, N2, N3, N4, N6 = 5; hit N1 0.99, N4 0.85, N2 0.7 -> n_hit 3;
    FPs 0.7 (a6), 97 x 0.5, 0.4 (a5), 0.3 (b2), 0.1 (b1) -> n_fp 101.
    Curve (threshold: FPs >= t / 4, hits >= t / 5):
      inf  : (0, 0)
      0.99 : FP 0,   hits 1 -> (0, 0.2)
      0.85 : FP 0,   hits 2 -> (0, 0.4)
      0.7  : FP 1,   hits 3 -> (0.25, 0.6)   the tie a6/N2 is one point
      0.5  : FP 98          -> (24.5, 0.6)
      0.4  : FP 99          -> (24.75, 0.6)
      0.3  : FP 100         -> (25.0, 0.6)
      0.1  : FP 101         -> (25.25, 0.6)
    Sensitivities: at 0.125 halfway between (0, 0.4) and (0.25, 0.6) -> 0.5; at 0.25 -> 0.6;
    at 0.5 ... 8 on the flat 0.6 segment -> 0.6.  CPM = (0.5 + 6 * 0.6) / 7 = 4.1 / 7.
    (Taking the tie at 0.7 FP-first would give 0.4 at 0.125; hit-first 0.6.)
    """
    annotations = _annotations([
        ("A", 0, 0, 0, 10), ("A", 8, 0, 0, 10), ("B", 0, 0, 0, 6), ("C", 0, 0, 0, 8), ("D", 5, 5, 5, 5),
        ("E", 0, 0, 0, 10),
    ])
    excluded = _annotations([("A", 50, 50, 50, -1), ("A", -4, 0, 0, 4), ("E", 30, 0, 0, -1)])
    rows = [
        ("A", 1, 0, 0, 0.9), ("A", 0, 1, 0, 0.6), ("A", 4, 0, 0, 0.7), ("A", 50, 50, 54.9, 0.95),
        ("A", 0, 0, 5, 0.4), ("A", 100, 0, 0, 0.7), ("A", -3, 0, 0, 0.99),
        ("B", 10, 0, 0, 0.1), ("B", 0, 0, 3, 0.3),
        ("C", 0, 0, 2, 0.85),
    ]
    rows += [("C", 100 + i, 100, 100, 0.5) for i in range(97)]
    rows += [("C", 200 + i, 0, 0, 0.2) for i in range(5)]
    rows += [("E", 0, 0, 0, 0.99), ("E", 60, 0, 0, 0.98)]
    predictions = _predictions(rows).sample(frac=1.0, random_state=3)  # row order must not matter
    return predictions, annotations, excluded, ["A", "B", "C", "D"]


def test_froc_hand_case():
    predictions, annotations, excluded, val = hand_case()
    result = froc(predictions, annotations, val, annotations_excluded=excluded)
    assert (result.n_scans, result.n_nodules, result.n_hit, result.n_fp) == (4, 5, 3, 101)
    assert result.n_candidates == 7 + 2 + 98  # scan C cut to 98, scan E not counted
    assert result.n_ignored_excluded == 1  # a4 (a7 hits N1, so it is not "ignored")
    assert list(result.curve.columns) == ["threshold", "fp_per_scan", "sensitivity"]
    np.testing.assert_array_equal(result.curve["threshold"], [np.inf, 0.99, 0.85, 0.7, 0.5, 0.4, 0.3, 0.1])
    np.testing.assert_allclose(result.curve["fp_per_scan"], [0, 0, 0, 0.25, 24.5, 24.75, 25.0, 25.25])
    np.testing.assert_allclose(result.curve["sensitivity"], [0, 0.2, 0.4, 0.6, 0.6, 0.6, 0.6, 0.6])
    assert list(result.sensitivities) == SENSITIVITY_COLUMNS
    np.testing.assert_allclose(list(result.sensitivities.values()), [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6])
    assert result.cpm == pytest.approx(4.1 / 7)


def test_froc_rules_each_change_the_result():
    predictions, annotations, excluded, val = hand_case()
    # without the excluded findings a4 (0.95) becomes a FP and a7 stays a hit: 102 FPs
    result = froc(predictions, annotations, val)
    assert (result.n_fp, result.n_hit) == (102, 3)
    # without the top-100 cut the five 0.2s of scan C are FPs too
    result = froc(predictions, annotations, val, annotations_excluded=excluded, max_per_scan=None)
    assert result.n_fp == 106 and 0.2 in set(result.curve["threshold"])
    # one more val scan without candidates or nodules: 5 scans divide the FPs
    result = froc(predictions, annotations, val + ["F"], annotations_excluded=excluded)
    assert result.curve["fp_per_scan"].iloc[3] == pytest.approx(1 / 5)


def test_froc_top_cut_keeps_exactly_100_without_ties():
    # 150 FP candidates with distinct probabilities on one scan: the top 100 stay
    rows = [("S", 100 + i, 0, 0, (i + 1) / 1000) for i in range(150)]
    result = froc(_predictions(rows), _annotations([("S", 0, 0, 0, 5)]), ["S"])
    assert result.n_fp == 100 and result.curve["threshold"].iloc[-1] == pytest.approx(0.051)


def test_froc_interpolation_past_the_end_is_the_last_value():
    # Scans S, T; nodules S1 (hit at 0.9) and T1 (never hit); FPs 0.5, 0.4, 0.3 on S.
    # Curve: (0,0), t=0.9 (0, 0.5), t=0.5 (0.5, 0.5), t=0.4 (1.0, 0.5), t=0.3 (1.5, 0.5).
    # 0.125 ... 1 on the curve -> 0.5; 2, 4, 8 lie past its end (1.5) -> the last value 0.5, not 0.
    rows = [("S", 0, 0, 0, 0.9), ("S", 50, 0, 0, 0.5), ("S", 60, 0, 0, 0.4), ("S", 70, 0, 0, 0.3)]
    annotations = _annotations([("S", 0, 0, 0, 6), ("T", 0, 0, 0, 6)])
    result = froc(_predictions(rows), annotations, ["S", "T"])
    assert result.curve["fp_per_scan"].iloc[-1] == pytest.approx(1.5)
    assert list(result.sensitivities.values()) == pytest.approx([0.5] * 7)
    assert result.cpm == pytest.approx(0.5)
    # a rising curve: hits at 0.9 and 0.2, FPs at 0.5 and 0.4 on two scans:
    # (0,0), 0.9 (0, 0.5), 0.5 (0.5, 0.5), 0.4 (1, 0.5), 0.2 (1, 1.0);
    # at 0.125, 0.25, 0.5: 0.5; at 1 the duplicate x = 1 reads the later point (1.0), as numpy.interp does on
    # exact FP counts (the official script's fpr * negatives / scans may round past 1 and read 0.5 there:
    # froc.py's departures); 2, 4, 8 past the end -> 1.0.  CPM = (3 * 0.5 + 4 * 1.0) / 7 = 5.5 / 7
    rows = [("S", 0, 0, 0, 0.9), ("S", 50, 0, 0, 0.5), ("S", 60, 0, 0, 0.4), ("T", 1, 0, 0, 0.2)]
    result = froc(_predictions(rows), annotations, ["S", "T"])
    assert list(result.sensitivities.values()) == pytest.approx([0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0])
    assert result.cpm == pytest.approx(5.5 / 7)


def test_froc_edge_cases():
    annotations = _annotations([("S", 0, 0, 0, 6)])
    # no predictions: the curve is the single point (0, 0); every sensitivity and CPM is 0
    result = froc(_predictions([]), annotations, ["S", "T"])
    assert len(result.curve) == 1 and result.cpm == 0.0
    assert list(result.sensitivities.values()) == [0.0] * 7
    # no nodules: sensitivities and CPM are NaN, FPs still counted
    result = froc(_predictions([("S", 0, 0, 0, 0.9)]), _annotations([]), ["S"])
    assert result.n_fp == 1 and math.isnan(result.cpm)
    assert all(math.isnan(v) for v in result.sensitivities.values())
    # a LUNA16 submission frame (seriesuid, coordX, ...) is accepted
    submission = pd.DataFrame({"seriesuid": ["S"], "coordX": [0.0], "coordY": [0.0], "coordZ": [1.0],
                               "probability": [0.7]})
    assert froc(submission, annotations, ["S"]).n_hit == 1


def test_froc_bad_input_is_a_clear_error():
    annotations = _annotations([("S", 0, 0, 0, 6)])
    with pytest.raises(MetricsError, match="missing column"):
        froc(pd.DataFrame({"series_uid": ["S"]}), annotations, ["S"])
    with pytest.raises(MetricsError, match=r"row 1: probability = 'x'"):
        froc(_predictions([("S", 0, 0, 0, 0.5), ("S", 0, 0, 0, "x")]), annotations, ["S"])
    with pytest.raises(MetricsError, match="no val scans"):
        froc(_predictions([]), annotations, [])


def _reference_froc(predictions, annotations, excluded, val, max_per_scan=100):
    """A literal, loop-by-loop transcription of the official script's rules (slow, independent)."""
    fp_scores, hit_scores, n_nodules = [], [], 0
    for uid in val:
        cands = [r for r in predictions.itertuples(index=False) if r.series_uid == uid]
        if len(cands) > max_per_scan:
            cut = sorted((c.probability for c in cands), reverse=True)[max_per_scan]
            cands = [c for c in cands if c.probability > cut]
        remaining = set(range(len(cands)))
        findings = [(r, True) for r in annotations.itertuples(index=False) if r.seriesuid == uid]
        findings += [(r, False) for r in excluded.itertuples(index=False) if r.seriesuid == uid]
        for finding, included in findings:
            n_nodules += included
            diameter = 10.0 if finding.diameter_mm < 0 else finding.diameter_mm
            matches = []
            for k, c in enumerate(cands):
                d2 = (c.coord_x - finding.coordX) ** 2 + (c.coord_y - finding.coordY) ** 2 + (
                    c.coord_z - finding.coordZ) ** 2
                if d2 < (diameter / 2) ** 2:
                    matches.append(c.probability)
                    remaining.discard(k)
            if included and matches:
                hit_scores.append(max(matches))
        fp_scores += [cands[k].probability for k in remaining]
    curve = [(0.0, 0.0)]
    for t in sorted(set(fp_scores + hit_scores), reverse=True):
        curve.append((sum(s >= t for s in fp_scores) / len(val), sum(s >= t for s in hit_scores) / n_nodules))
    xs, ys = zip(*curve)
    sens = [float(np.interp(rate, xs, ys)) for rate in FROC_RATES]
    return curve, sens, len(fp_scores), len(hit_scores)


@pytest.mark.parametrize("seed", [0, 1])
def test_froc_matches_loop_reference_on_random_data(seed):
    rng = np.random.default_rng(seed)
    uids = [f"s{i}" for i in range(8)]
    nodules = _annotations([(rng.choice(uids), *rng.uniform(0, 30, 3), rng.uniform(3, 12)) for _ in range(10)])
    excluded = _annotations([(rng.choice(uids), *rng.uniform(0, 30, 3), rng.choice([-1.0, 4.0]))
                             for _ in range(10)])
    probs = np.round(rng.random(600), 2)  # ties
    predictions = _predictions([(rng.choice(uids[:7]), *rng.uniform(0, 30, 3), p) for p in probs])
    val = uids[1:]  # s0 rows are not val; s7 has no candidates
    result = froc(predictions, nodules, val, annotations_excluded=excluded, max_per_scan=60)
    curve, sens, n_fp, n_hit = _reference_froc(predictions, nodules, excluded, val, max_per_scan=60)
    assert (result.n_fp, result.n_hit) == (n_fp, n_hit) and n_hit > 0
    np.testing.assert_allclose(result.curve[["fp_per_scan", "sensitivity"]].to_numpy(), np.array(curve))
    np.testing.assert_allclose(list(result.sensitivities.values()), sens)


def test_froc_bootstrap_is_deterministic_and_brackets_the_estimate():
    predictions, annotations, excluded, val = hand_case()
    first = froc_bootstrap(predictions, annotations, val, excluded, n_bootstrap=200, seed=7)
    second = froc_bootstrap(predictions, annotations, val, excluded, n_bootstrap=200, seed=7)
    assert first == second
    assert list(first) == ["cpm"] + SENSITIVITY_COLUMNS
    for low, high, n_samples in first.values():
        assert 0.0 <= low <= high <= 1.0
        assert n_samples == 200  # every scan but one holds a nodule: all 200 samples drew one
    assert first["cpm"].low < 4.1 / 7 < first["cpm"].high
    assert froc_bootstrap(predictions, annotations, val, excluded, n_bootstrap=200, seed=8) != first


def test_froc_bootstrap_samples_are_the_intervals_draws_and_paired_across_predictions():
    predictions, annotations, excluded, val = hand_case()
    samples = froc_bootstrap_samples(predictions, annotations, val, excluded, n_bootstrap=200, seed=7)
    assert samples.shape == (200, len(SENSITIVITY_COLUMNS))
    interval = froc_bootstrap(predictions, annotations, val, excluded, n_bootstrap=200, seed=7)["cpm"]
    assert (interval.low, interval.high) == tuple(np.percentile(samples.mean(axis=1), [2.5, 97.5]))
    # other predictions for the same scans get the same draws: halving every score keeps every ranking, so
    # every sample is unchanged (different draws would not give equal rows)
    lowered = predictions.assign(probability=predictions["probability"] * 0.5)
    halved = froc_bootstrap_samples(lowered, annotations, val, excluded, n_bootstrap=200, seed=7)
    np.testing.assert_allclose(halved, samples)
    other = froc_bootstrap_samples(predictions, annotations, val, excluded, n_bootstrap=200, seed=8)
    assert not np.array_equal(other, samples)


def test_froc_bootstrap_counts_the_samples_without_nodules_it_leaves_out():
    # One nodule among five scans: a sample draws none of its scan with probability (4/5)^5 = 0.328; those
    # samples have no sensitivity, are left out of the percentiles and out of n_samples.
    scans = [f"s{k}" for k in range(5)]
    annotations = pd.DataFrame({"seriesuid": ["s0"], "coordX": [0.0], "coordY": [0.0], "coordZ": [0.0],
                                "diameter_mm": [6.0]})
    predictions = pd.DataFrame({"series_uid": ["s0", "s1", "s2"], "coord_x": [0.0, 50.0, 50.0],
                                "coord_y": [0.0, 0.0, 0.0], "coord_z": [0.0, 0.0, 0.0],
                                "probability": [0.6, 0.9, 0.3]})
    n_bootstrap, seed = 2000, 5
    result = froc_bootstrap(predictions, annotations, scans, None, n_bootstrap=n_bootstrap, seed=seed)
    rng = np.random.default_rng(seed)
    drew_nodule = sum(int(0 in rng.integers(0, 5, size=5)) for _ in range(n_bootstrap))
    assert result["cpm"].n_samples == drew_nodule
    assert 0.60 * n_bootstrap < drew_nodule < 0.74 * n_bootstrap  # 1 - 0.328 = 0.672 expected
    assert all(interval.n_samples == drew_nodule for interval in result.values())
    # no scan holds a nodule: nothing is defined
    empty = froc_bootstrap(predictions, annotations.iloc[:0], scans, None, n_bootstrap=50, seed=seed)
    assert all(math.isnan(i.low) and math.isnan(i.high) and i.n_samples == 0 for i in empty.values())


@pytest.mark.parametrize("value, shown", [(float("-inf"), "-inf"), (float("inf"), "inf"), (float("nan"), "nan"),
                                          ("x", "'x'")])
def test_froc_refuses_a_probability_that_is_not_finite(value: object, shown: str) -> None:
    predictions, annotations, excluded, val = hand_case()
    predictions = predictions.astype({"probability": object})
    predictions.iloc[2, predictions.columns.get_loc("probability")] = value
    with pytest.raises(MetricsError) as info:
        froc(predictions, annotations, val, excluded)
    assert str(info.value) == f"predictions: row 2: probability = {shown} is not a finite number"


def test_froc_bootstrap_single_draw_pattern_equals_froc_on_duplicated_scans():
    # Resampling scans = duplicating them: the weighted curve must equal froc() on a data set in which
    # the drawn scans appear under new UIDs, as often as drawn (the FP divisor stays the scan count).
    predictions, annotations, excluded, val = hand_case()
    seed, n_scans = 11, len(val)
    draws = np.random.default_rng(seed).integers(0, n_scans, size=n_scans)
    copies_p, copies_a, copies_x, new_val = [], [], [], []
    for k, index in enumerate(draws):
        uid = val[index]
        for frame, out in ((predictions, copies_p), (annotations, copies_a), (excluded, copies_x)):
            column = "series_uid" if "series_uid" in frame else "seriesuid"
            part = frame.loc[frame[column] == uid].copy()
            part[column] = f"{uid}#{k}"
            out.append(part)
        new_val.append(f"{uid}#{k}")
    expected = froc(pd.concat(copies_p), pd.concat(copies_a), new_val, pd.concat(copies_x))
    interval = froc_bootstrap(predictions, annotations, val, excluded, n_bootstrap=1, seed=seed)
    assert interval["cpm"].low == interval["cpm"].high == pytest.approx(expected.cpm)
    for name in SENSITIVITY_COLUMNS:
        assert interval[name].low == pytest.approx(expected.sensitivities[name])


def test_metrics_columns_and_combine():
    assert METRICS_COLUMNS == ["fold"] + HISTORY_COLUMNS + ["threshold", "cpm", "sens_at_0.125", "sens_at_0.25",
                                                            "sens_at_0.5", "sens_at_1", "sens_at_2", "sens_at_4",
                                                            "sens_at_8"]
    predictions, annotations, excluded, val = hand_case()
    row = metric_row(LABELS, PROBS, LOSSES, epoch=3, split="test")
    combined = combine_metrics(row, froc(predictions, annotations, val, excluded), fold=2, threshold=0.4)
    assert list(combined) == METRICS_COLUMNS
    assert combined["fold"] == 2 and combined["threshold"] == 0.4
    assert combined["cpm"] == pytest.approx(4.1 / 7) and combined["sens_at_0.125"] == pytest.approx(0.5)
    assert math.isnan(combine_metrics(row, None)["cpm"]) and combine_metrics(row, None)["fold"] == "all"


def test_metric_row_at_a_threshold_per_sample():
    labels = np.array([1, 1, 0, 0, 1, 0])
    probs = np.array([0.6, 0.35, 0.4, 0.2, 0.7, 0.65])
    losses = np.zeros(6)
    at_03 = metric_row(labels, probs, losses, epoch=1, split="test", threshold=0.3)
    assert (at_03["precision"], at_03["recall"]) == (pytest.approx(3 / 5), 1.0)
    # first three samples at 0.5, last three at 0.66: positives 0.6 | 0.7 -> TP 2, FP 0
    mixed = metric_row(labels, probs, losses, epoch=1, split="test", threshold=np.r_[[0.5] * 3, [0.66] * 3])
    assert (mixed["precision"], mixed["recall"]) == (1.0, pytest.approx(2 / 3))
    assert mixed["auc"] == metric_row(labels, probs, losses, epoch=1, split="test")["auc"]  # threshold-free


def test_choose_threshold_policies():
    from luna.metrics import MetricsError, choose_threshold

    labels = np.array([1, 0, 1, 0, 0, 1, 0, 0])
    probs = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.2, 0.1])
    assert choose_threshold(labels, probs, "0.35") == 0.35
    # F1 of the top-k as positive: k=1 0.5, k=3 0.667, k=6 0.667 -> the highest cut on ties: between 0.7 and 0.6
    assert choose_threshold(labels, probs, "max_f1") == pytest.approx(0.65)
    assert choose_threshold(labels, probs, "recall:0.6") == pytest.approx(0.65)  # 2 of 3 from the top 3
    assert choose_threshold(labels, probs, "recall:1") == pytest.approx(0.3)  # down to 0.4, cut halfway to 0.2
    assert choose_threshold(np.ones(2), np.array([0.3, 0.2]), "recall:1") == pytest.approx(0.1)  # all positive
    chosen = choose_threshold(labels, probs, "max_f1")
    assert metric_row(labels, probs, np.zeros(8), epoch=1, split="s", threshold=chosen)["f1"] == pytest.approx(2 / 3)
    # fp_per_scan over 2 scans: 5 negatives at 0.8, 0.6, 0.5, 0.2, 0.1
    assert choose_threshold(labels, probs, "fp_per_scan:1", n_scans=2) == pytest.approx(0.55)  # 2 FP: 0.8, 0.6
    assert choose_threshold(labels, probs, "fp_per_scan:1.5", n_scans=2) == pytest.approx(0.3)  # 3 FP, down to 0.4
    assert choose_threshold(labels, probs, "fp_per_scan:0.25", n_scans=2) == pytest.approx(0.85)  # none past 0.9
    assert choose_threshold(labels, probs, "fp_per_scan:0", n_scans=2) == pytest.approx(0.85)  # above every negative
    assert choose_threshold(labels, probs, "fp_per_scan:5", n_scans=2) == pytest.approx(0.05)  # every sample
    assert choose_threshold(np.zeros(3), np.array([0.3, 0.3, 0.1]), "fp_per_scan:0.5", n_scans=1) == 0.3  # none
    assert choose_threshold(np.zeros(3), np.array([0.3, 0.2, 0.1]), "fp_per_scan:1", n_scans=1) == pytest.approx(0.25)
    with pytest.raises(MetricsError, match="number of scans"):
        choose_threshold(labels, probs, "fp_per_scan:1")
    for bad in ("1.5", "0", "recall:0", "recall:x", "best", "fp_per_scan:-1", "fp_per_scan:x",
                "fp_per_scan:inf"):
        with pytest.raises(MetricsError, match="threshold policy"):
            choose_threshold(labels, probs, bad)
    with pytest.raises(MetricsError, match="no positive sample"):
        choose_threshold(np.zeros(3), np.array([0.1, 0.2, 0.3]), "max_f1")


def test_choose_threshold_calls_a_zero_probability_when_it_must():
    """A float32 softmax can give exactly 0: the cut that calls every sample then lies below 0 (a positive is
    p > threshold), so recall 1 is what the returned cut delivers."""
    from luna.metrics import choose_threshold

    labels = np.array([1, 0, 1, 1])
    probs = np.array([0.9, 0.5, 0.3, 0.0])
    cut = choose_threshold(labels, probs, "recall:1")
    assert cut == -0.5 and (probs > cut).all()
    assert choose_threshold(labels, probs, "recall:0.6") == pytest.approx(0.15)
    assert choose_threshold(np.zeros(2), np.array([0.0, 0.0]), "fp_per_scan:5", n_scans=1) == -0.5


def test_froc_hit_sums_squares_as_the_official_script():
    """Squared distances summed x + y + z from the left, as noduleCADEvaluationLUNA16.py: this candidate lies one
    rounding step inside the 28.81 mm sphere that way, outside when the sum is taken in another order."""
    from luna.froc import _hits

    nodule = np.array([[-9.3534, 55.7888, -46.3938]])
    candidate = np.array([[-20.27537134862434, 53.443123822750394, -37.29916586050254]])
    squares = [(c - n) * (c - n) for c, n in zip(candidate[0].tolist(), nodule[0].tolist())]
    radius_squared = (28.81 / 2.0) ** 2
    assert (squares[0] + squares[1]) + squares[2] < radius_squared <= (squares[0] + squares[2]) + squares[1]
    assert _hits(candidate, nodule, np.array([28.81])).tolist() == [[True]]
