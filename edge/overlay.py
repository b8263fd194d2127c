"""A picture of one detection: heatmap, region of interest, boxes and verdict over the image."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from edge.detection import Detection
from edge.images import ImageError

# Colours are fixed relative to the threshold so any two pictures compare:
# 0 is cold, the threshold is mid-scale and HOT_AT times the threshold is hottest. (A threshold
# at or below 0, which labelled defects can set, measures from threshold - 1 instead of 0.)
HOT_AT = 2.0
# Below SHOW_FROM x threshold the image is left untouched so good areas stay readable;
# opacity then ramps up to OPACITY at the threshold.
SHOW_FROM = 0.5
OPACITY = 0.6

# Overlays are for people to look at: one of a phone photo or a 12-megapixel camera frame is
# drawn on a copy shrunk to this longer side, which shows a defect plainly for a fraction of
# the memory and time (a full-size one took 575 MB and 1.4 s) and is saved as JPEG.
OVERLAY_SIDE = 1600
JPEG_QUALITY = 90

_BOX = (0, 0, 255)
_ROI = (255, 255, 255)
_STRIP = {"ok": (60, 140, 40), "ng": (40, 40, 200)}
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def draw_overlay(image_bgr: np.ndarray, detection: Detection) -> np.ndarray:
    """Return a copy of the image with the detection drawn on it and a label strip on top.

    The result is `strip` rows taller than the image: a strip saying OK/NG, score and
    threshold, then the image with the heatmap over the region of interest, its outline
    in white and the boxes in red. Example: `cv2.imwrite("x.png", draw_overlay(img, det))`.
    """
    if image_bgr.dtype != np.uint8 or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(
            f"draw_overlay takes uint8 HxWx3 BGR, got {image_bgr.dtype} {image_bgr.shape}"
        )
    height, width = image_bgr.shape[:2]
    x, y, w, h = detection.roi
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise ValueError(
            f"region of interest {detection.roi} is not inside the {width}x{height} image"
        )
    if not np.isfinite(detection.threshold):
        raise ValueError(f"draw_overlay needs a finite threshold, got {detection.threshold}")
    if detection.anomaly_map.ndim != 2 or detection.anomaly_map.size == 0:
        raise ValueError(
            f"the anomaly map must be a non-empty 2-D array, got {detection.anomaly_map.shape}"
        )

    picture = image_bgr.copy()
    cold = 0.0 if detection.threshold > 0 else detection.threshold - 1.0
    amap = cv2.resize(
        detection.anomaly_map.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR
    )
    ratio = (amap - np.float32(cold)) / np.float32(detection.threshold - cold)
    ratio = np.nan_to_num(ratio, nan=0.0, posinf=HOT_AT, neginf=0.0)
    level = np.clip(ratio * (255 / HOT_AT), 0, 255).astype(np.uint8)
    heat = cv2.applyColorMap(level, cv2.COLORMAP_TURBO).astype(np.float32)
    alpha = OPACITY * np.clip((ratio - SHOW_FROM) / (1.0 - SHOW_FROM), 0.0, 1.0)[..., None]
    region = picture[y : y + h, x : x + w]
    region[:] = np.rint(region * (1.0 - alpha) + heat * alpha).astype(np.uint8)

    line = max(1, round(max(width, height) / 500))
    # White edged with black, to show on light parts and dark ones alike.
    cv2.rectangle(picture, (x, y), (x + w - 1, y + h - 1), (0, 0, 0), line + 2)
    cv2.rectangle(picture, (x, y), (x + w - 1, y + h - 1), _ROI, line)
    for box in detection.boxes:
        corner = (box.x + box.w - 1, box.y + box.h - 1)
        cv2.rectangle(picture, (box.x, box.y), corner, _BOX, 2 * line)
    return np.vstack([_label_strip(detection, width), picture])


def _label_strip(detection: Detection, width: int) -> np.ndarray:
    strip_height = max(20, round(width * 0.06))
    strip = np.empty((strip_height, width, 3), np.uint8)
    strip[:] = _STRIP[detection.verdict]
    text = (
        f"{detection.verdict.upper()}   score {detection.score:.4g}"
        f"   threshold {detection.threshold:.4g}"
    )
    pad = strip_height // 4
    (text_w, text_h), _ = cv2.getTextSize(text, _FONT, 1.0, 2)
    scale = min(0.5 * strip_height / text_h, (width - 2 * pad) / text_w)
    thickness = max(1, round(2 * scale))
    (_, text_h), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    origin = (pad, (strip_height + text_h) // 2)
    cv2.putText(strip, text, origin, _FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return strip


def draw_preview(image_bgr: np.ndarray, detection: Detection, longer_side: int) -> np.ndarray:
    """draw_overlay on a copy shrunk to at most `longer_side` px: cheap enough for a live view."""
    scale = longer_side / max(image_bgr.shape[:2])
    if scale >= 1:
        return draw_overlay(image_bgr, detection)
    small = cv2.resize(image_bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    h, w = small.shape[:2]

    def fit(x: int, y: int, bw: int, bh: int) -> tuple[int, int, int, int]:
        sx, sy = min(int(x * scale), w - 1), min(int(y * scale), h - 1)
        return (
            sx,
            sy,
            max(1, min(round(bw * scale), w - sx)),
            max(1, min(round(bh * scale), h - sy)),
        )

    boxes = []
    for box in detection.boxes:
        x, y, bw, bh = fit(box.x, box.y, box.w, box.h)
        boxes.append(replace(box, x=x, y=y, w=bw, h=bh))
    return draw_overlay(small, replace(detection, roi=fit(*detection.roi), boxes=boxes))


def overlay_jpeg(image_bgr: np.ndarray, detection: Detection, source: object) -> bytes:
    """The overlay that detect and the evaluation report write: drawn at OVERLAY_SIDE at most,
    as JPEG. `source` (the image's path) names it in the ImageError if it cannot be encoded."""
    picture = draw_preview(image_bgr, detection, OVERLAY_SIDE)
    ok, jpg = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ImageError(f"the overlay of {source} cannot be encoded as JPEG")
    return bytes(jpg.tobytes())
