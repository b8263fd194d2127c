"""Scores a labelled test folder with a model file and writes metrics, overlays and a report."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edge import __version__
from edge.detection import Detection
from edge.files import staged_folder, write_atomically
from edge.images import ImageError, has_entries, list_images, read_image
from edge.metrics import summarize
from edge.model import Model
from edge.overlay import overlay_jpeg
from edge.report import write_report


@dataclass(frozen=True)
class ImageResult:
    """One test image: its label ("ok" from normal/, "ng" from anomaly/) and the model's answer."""

    path: Path
    label: str
    detection: Detection
    ms: float

    @property
    def overlay_name(self) -> str:
        """Its overlay's file name in the report's overlays/ folder (part.jpg and part.png
        in one folder each get their own)."""
        return f"{self.label}-{self.path.name}.jpg"

    def as_dict(self) -> dict[str, object]:
        return {
            "file": str(self.path),
            "label": self.label,
            **self.detection.as_dict(),
            "ms": round(self.ms, 2),
        }


def json_metrics(metrics: dict[str, object]) -> dict[str, object]:
    """The metrics with NaN (AUROC without defects, say) as None, so that JSON can hold them."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}


def score_folder(
    model: Model,
    data: Path,
    progress: Callable[[int, int], None] | None = None,
    failed: list[tuple[Path, str]] | None = None,
) -> list[ImageResult]:
    """Run the model on data/normal and data/anomaly (at least one must hold images).

    An image that cannot be judged (unreadable, another size) raises ImageError, or, given
    a `failed` list, is added to it as (path, reason) and the others are judged.
    """
    groups = [(data / "normal", "ok"), (data / "anomaly", "ng")]
    # A missing or empty normal/ or anomaly/ is allowed: a station's test split may have no
    # defects yet. One holding files but no images (defects sorted into subfolders, say) is
    # refused rather than silently left out.
    todo = [
        (p, label)
        for folder, label in groups
        if has_entries(folder)
        for p in list_images(folder, labelled=True)
    ]
    if not todo:
        if not data.is_dir():
            raise ImageError(f"test folder {data} does not exist")
        raise ImageError(f"folder {data} has neither normal/ nor anomaly/ images to evaluate")
    results = []
    for i, (path, label) in enumerate(todo):
        try:
            image = read_image(path)
            t0 = time.perf_counter()
            try:
                detection = model.detect(image)  # checks the frame against the model first
            except ValueError as exc:
                raise ImageError(f"image {path}: {exc}") from None
        except ImageError as exc:
            if failed is None:
                raise
            failed.append((path, str(exc)))
        else:
            ms = (time.perf_counter() - t0) * 1000
            results.append(ImageResult(path, label, detection, ms))
        if progress:
            progress(i + 1, len(todo))
    return results


def metrics_of(model: Model, results: list[ImageResult]) -> dict[str, object]:
    """AUROC, AP, and accuracy/precision/recall/F1 at the model's own threshold."""
    normal = [r.detection.score for r in results if r.label == "ok"]
    anomaly = [r.detection.score for r in results if r.label == "ng"]
    figures = summarize(normal, anomaly, model.threshold)
    ms = np.array([r.ms for r in results])
    return {
        **figures,
        "normal_images": len(normal),
        "anomaly_images": len(anomaly),
        "ms_p50": float(np.percentile(ms, 50)),
        "ms_p95": float(np.percentile(ms, 95)),
        "model_id": model.id,
    }


def about(model: Model, data: Path) -> dict[str, str]:
    """What an evaluation was of, for the report and the JSON: enough to trace it later."""
    meta = model.meta
    return {
        "model": f"{model.path} ({model.id}), trained {meta.created}",
        "test_data": str(data.resolve()),
        "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "threshold_rule": meta.calibration,
        "expected_false_reject_rate": meta.false_rejects,
    }


def write_outputs(
    model: Model,
    results: list[ImageResult],
    metrics: dict[str, object],
    out: Path,
    json_file: Path | None = None,
    *,
    data: Path | None = None,
    failed: list[tuple[Path, str]] | None = None,
) -> Path:
    """Write overlays/*.jpg, scores.csv, results.json and report.html under out (and the
    metrics and results to json_file); return the report's path. `data` is the test folder
    the results are of, `failed` the images that could not be judged.

    All or nothing: they replace the previous ones only once everything is written, so a
    failed or interrupted run leaves the previous report as it was.
    """
    info = about(model, data) if data is not None else {}
    doc = to_json(metrics, results, info, failed or [], out / "overlays")
    with staged_folder(out) as stage:
        _write_report_files(model, results, metrics, doc, stage, info, failed or [])
        if json_file is not None:
            write_atomically(json_file, doc)
    return out / "report.html"


_ABOUT_NAMES = {
    "model": "Model",
    "test_data": "Test data",
    "evaluated": "Evaluated",
    "tool_version": "edge-inspect",
    "threshold_rule": "Threshold rule",
    "expected_false_reject_rate": "Expected false rejects (from training)",
}


def _write_report_files(
    model: Model,
    results: list[ImageResult],
    metrics: dict[str, object],
    doc: str,
    out: Path,
    info: dict[str, str],
    failed: list[tuple[Path, str]],
) -> None:
    """The report folder's files; `doc` is to_json() of the metrics and results."""
    overlays = out / "overlays"
    overlays.mkdir()
    rows = []
    for r in results:
        (overlays / r.overlay_name).write_bytes(
            overlay_jpeg(read_image(r.path), r.detection, r.path)
        )
        rows.append(
            {
                "name": f"{r.path.parent.name}/{r.path.name}",  # normal/27.png, anomaly/27.png
                "label": r.label,
                "verdict": r.detection.verdict,
                "score": r.detection.score,
                "overlay": f"overlays/{r.overlay_name}",
            }
        )
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file", "label", "verdict", "score", "threshold", "area", "boxes", "ms"])
    for r in results:
        d = r.detection
        writer.writerow(
            [
                r.path,
                r.label,
                d.verdict,
                f"{d.score:.4f}",
                f"{d.threshold:.4f}",
                f"{d.area:.4f}",
                len(d.boxes),
                f"{r.ms:.2f}",
            ]
        )
    write_atomically(out / "scores.csv", buf.getvalue())
    write_atomically(out / "results.json", doc)
    title = f"Evaluation of {model.path.name} ({model.id})"
    named = {_ABOUT_NAMES[k]: v for k, v in info.items()}
    lost = [(f"{p.parent.name}/{p.name}", why) for p, why in failed]
    write_report(out / "report.html", title, metrics, rows, named, lost)


def to_json(
    metrics: dict[str, object],
    results: list[ImageResult],
    info: dict[str, str] | None = None,
    failed: list[tuple[Path, str]] | None = None,
    overlays: Path | None = None,
) -> str:
    """Metrics, what was evaluated, per-image results (with each overlay's path when the
    overlays folder is given) and the images that could not be judged, as one JSON document
    (NaN becomes null)."""
    doc = json_metrics(metrics)
    doc.update(info or {})
    doc["images"] = [
        {**r.as_dict(), **({"overlay": str(overlays / r.overlay_name)} if overlays else {})}
        for r in results
    ]
    doc["failed"] = [{"file": str(p), "error": why} for p, why in failed or []]
    return json.dumps(doc, indent=2) + "\n"
