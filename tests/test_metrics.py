"""Metrics against values worked out by hand, and properties that must hold for any scores."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.metrics import (
    Confusion,
    auroc,
    average_precision,
    best_threshold,
    confusion,
    summarize,
)

# Scores on a grid of quarters, so ties are common and every value is exact in binary.
quarters = st.lists(st.integers(0, 20).map(lambda i: i / 4), min_size=1, max_size=25)


def test_auroc_worked_example() -> None:
    # Pairs (normal, anomaly): (0.1,0.35) win, (0.1,0.8) win, (0.4,0.35) loss, (0.4,0.8) win.
    assert auroc([0.1, 0.4], [0.35, 0.8]) == 0.75


def test_auroc_counts_ties_as_half() -> None:
    # Pairs: (1,1) tie, (1,2) win, (2,1) loss, (2,2) tie -> (0.5 + 1 + 0 + 0.5) / 4.
    assert auroc([1, 2], [1, 2]) == 0.5
    # (3,3) tie, (3,4) win, (3,5) win, (1,*) three wins -> 5.5 / 6.
    assert auroc([3, 1], [3, 4, 5]) == pytest.approx(5.5 / 6)


def test_auroc_extremes() -> None:
    assert auroc([1, 2, 3], [4, 5]) == 1.0
    assert auroc([4, 5], [1, 2, 3]) == 0.0
    assert auroc([2, 2, 2], [2, 2]) == 0.5


def test_auroc_accepts_arrays_of_any_shape_and_dtype() -> None:
    normal = np.array([[0.1], [0.4]], dtype=np.float32)
    assert auroc(normal, np.array([0.35, 0.8])) == 0.75


def test_average_precision_worked_example() -> None:
    # Ranked: 0.8 (anomaly) P=1 R=1/2; 0.4 (normal); 0.35 (anomaly) P=2/3 R=1.
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert average_precision([0.1, 0.4], [0.35, 0.8]) == pytest.approx(5 / 6)


def test_average_precision_enters_ties_together() -> None:
    # Threshold 0.9: the normal and one anomaly tie -> P=1/2, R=1/2.
    # Threshold 0.5: the second anomaly -> P=2/3, R=1. AP = 1/2 * 1/2 + 1/2 * 2/3 = 7/12.
    assert average_precision([0.9, 0.1], [0.9, 0.5]) == pytest.approx(7 / 12)
    # Everything tied: one step to R=1 at P = 2/5.
    assert average_precision([1, 1, 1], [1, 1]) == pytest.approx(2 / 5)


def test_average_precision_extremes() -> None:
    assert average_precision([1, 2, 3], [4, 5]) == 1.0
    # Anomalies ranked last: recall 1/2 at P=1/3, recall 1 at P=2/4 -> 1/6 + 1/4 = 5/12.
    assert average_precision([4, 5], [1, 2]) == pytest.approx(5 / 12)


def test_confusion_counts_ng_as_score_above_threshold() -> None:
    counts = confusion([0.1, 0.4, 0.5], [0.35, 0.8, 0.5], threshold=0.5)
    # 0.5 equals the threshold, so it is OK whichever group it is in.
    assert counts == Confusion(tp=1, fp=0, tn=3, fn=2)
    assert counts.accuracy == pytest.approx(4 / 6)
    assert counts.precision == 1.0
    assert counts.recall == pytest.approx(1 / 3)
    assert counts.f1 == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))


def test_confusion_worked_example() -> None:
    counts = confusion([0.1, 0.4], [0.35, 0.8], 0.3)
    assert counts == Confusion(tp=2, fp=1, tn=1, fn=0)
    assert counts.accuracy == 0.75
    assert counts.precision == pytest.approx(2 / 3)
    assert counts.recall == 1.0
    assert counts.f1 == pytest.approx(0.8)


def test_confusion_ratios_with_nothing_to_count_are_not_numbers() -> None:
    """An evaluation without defects showed recall and F1 as 0.0000, as if measured."""
    none_flagged = confusion([1, 2], [3], threshold=10)
    assert none_flagged == Confusion(tp=0, fp=0, tn=2, fn=1)
    assert math.isnan(none_flagged.precision)  # no NG verdicts to be right or wrong
    assert none_flagged.recall == 0.0
    assert none_flagged.f1 == 0.0  # every defect missed: plainly 0
    only_normal = confusion([1, 2], [], threshold=1.5)
    assert only_normal == Confusion(tp=0, fp=1, tn=1, fn=0)
    assert only_normal.precision == 0.0
    assert math.isnan(only_normal.recall) and math.isnan(only_normal.f1)
    assert only_normal.accuracy == 0.5
    assert math.isnan(Confusion(0, 0, 0, 0).accuracy)


def test_best_threshold_prefers_the_widest_gap_among_equal_accuracy() -> None:
    # Cuts 2|3 and 10|20 both get 4 of 5 right (one mistake each); 10|20 has the wider gap.
    assert best_threshold([1, 2, 10], [3, 20]) == 15.0
    # Cuts 1|2 and 4|5 both get 3 of 4 right; gaps 1 and 1: the lower cut wins.
    assert best_threshold([1, 5], [2, 6]) == 1.5


def test_best_threshold_with_overlap_maximises_accuracy() -> None:
    # normal 1 2 4, anomaly 3 5 6: cut 4|5 gives 5 of 6 right (3 missed), cut 2|3 gives
    # 5 of 6 right (4 flagged). Gaps 1 and 1: the lower cut, 2.5, wins.
    assert best_threshold([1, 2, 4], [3, 5, 6]) == 2.5


def test_best_threshold_can_flag_everything() -> None:
    # Anomalies below normal: flagging all gets 3 of 4 right, better than any split.
    threshold = best_threshold([5], [1, 2, 3])
    assert threshold < 1
    assert confusion([5], [1, 2, 3], threshold) == Confusion(tp=3, fp=1, tn=0, fn=0)


def test_best_threshold_can_pass_everything() -> None:
    threshold = best_threshold([4, 5, 6], [1])
    assert confusion([4, 5, 6], [1], threshold).accuracy == 0.75


def test_best_threshold_of_neighbouring_floats_stays_between_them() -> None:
    low = 1.0
    high = float(np.nextafter(low, 2.0))
    threshold = best_threshold([low], [high])
    assert confusion([low], [high], threshold) == Confusion(tp=1, fp=0, tn=1, fn=0)


def test_summarize_has_what_the_report_shows() -> None:
    figures = summarize([0.1, 0.4], [0.35, 0.8], 0.3)
    assert figures == {
        "auroc": 0.75,
        "average_precision": pytest.approx(5 / 6),
        "accuracy": 0.75,
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "threshold": 0.3,
        "tp": 2,
        "fp": 1,
        "tn": 1,
        "fn": 0,
    }


def test_summarize_with_only_normal_images() -> None:
    figures = summarize([0.1, 0.4], [], 0.3)
    assert math.isnan(figures["auroc"])
    assert math.isnan(figures["average_precision"])
    assert figures["fp"] == 1 and figures["tn"] == 1


@pytest.mark.parametrize("metric", [auroc, average_precision, best_threshold])
def test_ranking_metrics_need_both_groups(metric: Callable[..., float]) -> None:
    with pytest.raises(ValueError, match="at least one normal and one anomaly"):
        metric([], [1.0])
    with pytest.raises(ValueError, match="at least one normal and one anomaly"):
        metric([1.0], [])


def test_scores_must_be_finite() -> None:
    with pytest.raises(ValueError, match="anomaly scores hold a value that is not a finite"):
        auroc([1.0], [float("nan")])
    with pytest.raises(ValueError, match="normal scores hold"):
        confusion([float("inf")], [1.0], 0.5)


def brute_auroc(normal: list[float], anomaly: list[float]) -> float:
    wins = sum(1.0 if a > n else 0.5 if a == n else 0.0 for n in normal for a in anomaly)
    return wins / (len(normal) * len(anomaly))


def brute_average_precision(normal: list[float], anomaly: list[float]) -> float:
    ap, recall_before = 0.0, 0.0
    for t in sorted(set(normal + anomaly), reverse=True):
        tp = sum(a >= t for a in anomaly)
        fp = sum(n >= t for n in normal)
        recall = tp / len(anomaly)
        ap += (recall - recall_before) * tp / (tp + fp)
        recall_before = recall
    return ap


@given(normal=quarters, anomaly=quarters)
def test_auroc_matches_pairwise_count(normal: list[float], anomaly: list[float]) -> None:
    assert auroc(normal, anomaly) == pytest.approx(brute_auroc(normal, anomaly))


@given(normal=quarters, anomaly=quarters)
def test_auroc_is_symmetric(normal: list[float], anomaly: list[float]) -> None:
    assert auroc(normal, anomaly) + auroc(anomaly, normal) == pytest.approx(1.0)


@given(normal=quarters, anomaly=quarters)
def test_average_precision_matches_definition(normal: list[float], anomaly: list[float]) -> None:
    value = average_precision(normal, anomaly)
    assert value == pytest.approx(brute_average_precision(normal, anomaly))
    assert 0.0 < value <= 1.0


@given(normal=quarters, anomaly=quarters, threshold=st.integers(-1, 21).map(lambda i: i / 4))
def test_confusion_adds_up(normal: list[float], anomaly: list[float], threshold: float) -> None:
    counts = confusion(normal, anomaly, threshold)
    assert counts.tp + counts.fn == len(anomaly)
    assert counts.tn + counts.fp == len(normal)
    assert 0.0 <= counts.f1 <= 1.0


@given(normal=quarters, anomaly=quarters)
def test_no_threshold_beats_best_threshold(normal: list[float], anomaly: list[float]) -> None:
    best = confusion(normal, anomaly, best_threshold(normal, anomaly)).accuracy
    candidates = [min(normal + anomaly) - 1, *normal, *anomaly]
    assert all(confusion(normal, anomaly, t).accuracy <= best for t in candidates)


@given(normal=quarters, anomaly=quarters)
def test_best_threshold_is_never_a_score(normal: list[float], anomaly: list[float]) -> None:
    # Midway between neighbours, so no score sits on it, unless it passes everything.
    threshold = best_threshold(normal, anomaly)
    assert threshold not in normal + anomaly or threshold == max(normal + anomaly)
