"""What the model says about one image: score, verdict, anomaly map, regions."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Box:
    """An anomalous region in image pixels, with the highest anomaly score inside it."""

    x: int
    y: int
    w: int
    h: int
    score: float

    def as_dict(self) -> dict[str, float | int]:
        return {"x": self.x, "y": self.y, "w": self.w, "h": self.h, "score": round(self.score, 4)}


@dataclass(frozen=True)
class Detection:
    """The model's answer for one image.

    `score` and `anomaly_map` are in the same units as `threshold`: a part is NG when
    `score > threshold`. `anomaly_map` covers the region of interest `roi` = (x, y, w, h)
    in image pixels at the model's patch resolution; `area` is the share of that region
    whose map value is above the threshold; `boxes` are those regions in image pixels.
    """

    score: float
    threshold: float
    anomaly_map: np.ndarray
    roi: tuple[int, int, int, int]
    area: float
    boxes: list[Box] = field(default_factory=list)

    @property
    def is_anomalous(self) -> bool:
        return self.score > self.threshold

    @property
    def verdict(self) -> str:
        return "ng" if self.is_anomalous else "ok"

    def as_dict(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "score": round(self.score, 4),
            "threshold": round(self.threshold, 4),
            "area": round(self.area, 4),
            "boxes": [b.as_dict() for b in self.boxes],
        }
