"""How well scores separate normal from anomalous images: AUROC, AP, confusion, threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Confusion:
    """Counts at one threshold, with anomalies as the positive class (NG = score > threshold)."""

    tp: int
    fp: int
    tn: int
    fn: int

    # A ratio with nothing to count is NaN (n/a), never a number that looks measured: with
    # no defective images there is no recall, and with no NG verdicts no precision.

    @property
    def accuracy(self) -> float:
        total = self.tp + self.fp + self.tn + self.fn
        return (self.tp + self.tn) / total if total else math.nan

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def f1(self) -> float:
        """0 when defects were all missed (precision is then n/a, but the F1 is plainly 0)."""
        if self.tp + self.fn == 0:
            return math.nan
        if self.tp == 0:
            return 0.0
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r)


def auroc(normal_scores: npt.ArrayLike, anomaly_scores: npt.ArrayLike) -> float:
    """Area under the ROC curve: the chance an anomaly outscores a normal image, ties half.

    Example: `auroc([0.1, 0.4], [0.35, 0.8])` -> `0.75`.
    """
    normal, anomaly = _both(normal_scores, anomaly_scores)
    normal.sort()
    below = np.searchsorted(normal, anomaly, side="left")
    at_or_below = np.searchsorted(normal, anomaly, side="right")
    wins = below.sum() + 0.5 * (at_or_below - below).sum()
    return float(wins / (normal.size * anomaly.size))


def average_precision(normal_scores: npt.ArrayLike, anomaly_scores: npt.ArrayLike) -> float:
    """Average precision with anomalies as positives: sum of precision times recall gained.

    Tied scores enter together, as scikit-learn's average_precision_score does.
    Example: `average_precision([0.1, 0.4], [0.35, 0.8])` -> `0.8333...`.
    """
    normal, anomaly = _both(normal_scores, anomaly_scores)
    scores = np.concatenate([normal, anomaly])
    positive = np.concatenate([np.zeros(normal.size), np.ones(anomaly.size)])
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    tp = np.cumsum(positive)
    # Only the last position of each run of equal scores is a real threshold.
    last = np.append(scores[1:] != scores[:-1], True)
    tp, taken = tp[last], np.flatnonzero(last) + 1
    precision = tp / taken
    recall = tp / anomaly.size
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def confusion(
    normal_scores: npt.ArrayLike, anomaly_scores: npt.ArrayLike, threshold: float
) -> Confusion:
    """Count right and wrong verdicts at `threshold`; either group may be empty.

    Example: `confusion([0.1, 0.4], [0.35, 0.8], 0.3)` -> `Confusion(tp=2, fp=1, tn=1, fn=0)`.
    """
    normal, anomaly = _scores(normal_scores, "normal"), _scores(anomaly_scores, "anomaly")
    tp = int(np.count_nonzero(anomaly > threshold))
    fp = int(np.count_nonzero(normal > threshold))
    return Confusion(tp=tp, fp=fp, tn=normal.size - fp, fn=anomaly.size - tp)


def best_threshold(normal_scores: npt.ArrayLike, anomaly_scores: npt.ArrayLike) -> float:
    """The threshold with the highest accuracy, midway between two neighbouring scores.

    Among equally accurate thresholds the one with the widest gap to its neighbours wins,
    then the lowest. Example: `best_threshold([1, 2, 3], [5, 6])` -> `4.0`.
    """
    normal, anomaly = _both(normal_scores, anomaly_scores)
    normal.sort()
    anomaly.sort()
    values = np.unique(np.concatenate([normal, anomaly]))
    # Cut i calls values[:i] OK and values[i:] NG; cut 0 calls everything NG.
    ok_normal = np.searchsorted(normal, values, side="right")
    ng_anomaly = anomaly.size - np.searchsorted(anomaly, values, side="right")
    correct = np.concatenate([[anomaly.size], ok_normal + ng_anomaly])
    gaps = np.diff(values)
    margin = np.concatenate([[0.0], gaps, [0.0]])
    middle = values[:-1] + gaps / 2
    # Neighbouring floats can round their midpoint up onto the upper score; keep it below.
    middle = np.where(middle < values[1:], middle, values[:-1])
    thresholds = np.concatenate([[np.nextafter(values[0], -np.inf)], middle, [values[-1]]])
    best = np.flatnonzero(correct == correct.max())
    return float(thresholds[best[np.argmax(margin[best])]])


def summarize(
    normal_scores: npt.ArrayLike, anomaly_scores: npt.ArrayLike, threshold: float
) -> dict[str, float | int]:
    """All the figures the report shows, keyed as write_report expects.

    AUROC and AP are NaN when either group is empty. Example: `summarize(n, a, 2.5)["auroc"]`.
    """
    counts = confusion(normal_scores, anomaly_scores, threshold)
    ranked = counts.tp + counts.fn > 0 and counts.tn + counts.fp > 0
    nan = float("nan")
    return {
        "auroc": auroc(normal_scores, anomaly_scores) if ranked else nan,
        "average_precision": average_precision(normal_scores, anomaly_scores) if ranked else nan,
        "accuracy": counts.accuracy,
        "precision": counts.precision,
        "recall": counts.recall,
        "f1": counts.f1,
        "threshold": float(threshold),
        "tp": counts.tp,
        "fp": counts.fp,
        "tn": counts.tn,
        "fn": counts.fn,
    }


def _scores(scores: npt.ArrayLike, group: str) -> npt.NDArray[np.float64]:
    array = np.array(scores, dtype=np.float64).ravel()
    if not np.all(np.isfinite(array)):
        raise ValueError(f"the {group} scores hold a value that is not a finite number")
    return array


def _both(
    normal_scores: npt.ArrayLike, anomaly_scores: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    normal, anomaly = _scores(normal_scores, "normal"), _scores(anomaly_scores, "anomaly")
    if normal.size == 0 or anomaly.size == 0:
        raise ValueError("the metric needs at least one normal and one anomaly score")
    return normal, anomaly
