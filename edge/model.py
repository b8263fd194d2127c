"""Loads a model file, checks its contract, and scores frames with onnxruntime."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort

from edge.detection import Box, Detection

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
PREFIX = "edge_inspect."


class ModelError(ValueError):
    """A model file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class ModelMeta:
    """The contract stored in a model file's metadata_props (all values are strings there)."""

    format_version: str
    tool_version: str
    created: str
    input: str
    colour_order: str
    layout: str
    image_size: str  # "WxH" the model was trained on, or "any"
    roi: str  # "x,y,w,h" in image pixels, or "" for the whole image
    input_size: int  # longer side of the region after resizing
    map_stride: int
    threshold: float
    calibration: str
    expected_false_reject_rate: float
    backbone: str
    backbone_sha256: str
    train_normal_count: int
    train_anomaly_count: int
    train_images_sha256: str
    bank_size: int
    augment: int
    # Added after the first release: files without them were made with these values.
    shift: float = 0.03
    rotate_deg: float = 0.0

    def to_props(self) -> dict[str, str]:
        return {PREFIX + k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str) -> ModelMeta:
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = props.get(PREFIX + f.name)
            if raw is None and f.default is not MISSING:
                continue
            if raw is None:
                raise ModelError(
                    f"model {source} is not an edge-inspect model (no {PREFIX}{f.name})"
                )
            try:
                values[f.name] = {"int": int, "float": float}.get(str(f.type), str)(raw)
            except ValueError:
                raise ModelError(f"model {source} has a bad {f.name} value {raw!r}") from None
        meta = cls(**values)  # type: ignore[arg-type]
        if meta.format_version != FORMAT_VERSION:
            raise ModelError(
                f"model {source} has format {meta.format_version}; "
                f"this edge-inspect reads format {FORMAT_VERSION}"
            )
        meta._check(source)
        return meta

    def _check(self, source: str) -> None:
        """The values the program computes with must make sense (a hand-edited file, say)."""

        def bad(name: str) -> ModelError:
            return ModelError(f"model {source} has a bad {name} value {getattr(self, name)!r}")

        if not math.isfinite(self.threshold):
            raise bad("threshold")
        try:
            hw = self.image_hw
        except ValueError:
            raise bad("image_size") from None
        if hw is not None and min(hw) < 1:
            raise bad("image_size")
        try:
            roi = self.roi_box
        except ValueError:
            raise bad("roi") from None
        if roi is not None:
            x, y, w, h = roi
            if x < 0 or y < 0 or w < 1 or h < 1:
                raise bad("roi")
            if hw is not None and (x + w > hw[1] or y + h > hw[0]):
                raise ModelError(
                    f"model {source} has a region of interest {self.roi} outside its "
                    f"{self.image_size} images"
                )

    @property
    def image_hw(self) -> tuple[int, int] | None:
        if self.image_size == "any":
            return None
        w, h = self.image_size.split("x")  # ValueError unless "WxH"
        return int(h), int(w)

    @property
    def false_rejects(self) -> str:
        """The expected false-reject rate as people read it: "1.00 %", or "under 0.01 %"."""
        rate = self.expected_false_reject_rate
        return f"{100 * rate:.2f} %" if rate >= 1e-4 else "under 0.01 %"

    @property
    def roi_box(self) -> tuple[int, int, int, int] | None:
        if not self.roi:
            return None
        x, y, w, h = (int(v) for v in self.roi.split(","))  # ValueError unless 4 integers
        return x, y, w, h


def read_meta(path: Path) -> ModelMeta:
    """Read and check the metadata of a model file without starting a session."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ModelError(f"model {path} does not exist") from None
    except Exception as exc:
        raise ModelError(
            f"model {path} is not a readable ONNX file ({type(exc).__name__})"
        ) from None
    return ModelMeta.from_props({p.key: p.value for p in proto.metadata_props}, str(path))


def give_back_memory() -> None:
    """Hand memory freed by a dropped model back to the system. glibc keeps it otherwise: each
    model swap left 15-40 MB more resident, measured (180 -> 300 MB over a shift's swaps).
    Nothing happens where the C library has no malloc_trim (musl, macOS)."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


class Model:
    """A loaded model file.

    >>> model = Model(Path("models/station.onnx"))       # doctest: +SKIP
    >>> model.detect(frame).verdict                        # doctest: +SKIP
    'ok'
    """

    def __init__(self, path: Path, threads: int = 1, providers: list[str] | None = None) -> None:
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise ModelError(f"model {path} does not exist") from None
        except OSError as exc:
            raise ModelError(f"model {path} cannot be read ({exc.strerror})") from None
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.id = self.sha256[:12]
        try:
            proto = onnx.load_from_string(data)
        except Exception as exc:
            raise ModelError(
                f"model {path} is not a readable ONNX file ({type(exc).__name__})"
            ) from None
        self.meta = ModelMeta.from_props({p.key: p.value for p in proto.metadata_props}, str(path))
        try:
            self._session = ort.InferenceSession(
                data, session_options(threads), providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelError(f"model {path} cannot be loaded by onnxruntime: {exc}") from None
        # onnxruntime falls back to the CPU with only a Python warning: say it where it shows.
        missing = [p for p in providers or [] if p not in self._session.get_providers()]
        if missing:
            log.warning(
                "model %s: onnxruntime here has no %s; it runs on %s",
                self.path.name,
                " or ".join(missing),
                ", ".join(self._session.get_providers()),
            )
        names = [i.name for i in self._session.get_inputs()]
        outs = [o.name for o in self._session.get_outputs()]
        if names != ["image"] or outs != ["score", "anomaly_map"]:
            raise ModelError(
                f"model {path} does not have the image -> score, anomaly_map interface"
            )
        self._warm_up()

    def _warm_up(self) -> None:
        """One inference on a grey frame, so the first real frame is not the slow one."""
        h, w = self.meta.image_hw or (240, 320)
        roi = self.meta.roi_box
        if roi is not None:
            h, w = max(h, roi[1] + roi[3]), max(w, roi[0] + roi[2])
        try:
            _, amap = self.run(np.full((h, w, 3), 128, np.uint8))
        except Exception as exc:
            raise ModelError(f"model {self.path} fails on a test frame: {exc}") from None
        if amap.ndim != 2 or amap.size == 0:
            raise ModelError(
                f"model {self.path} gives an anomaly map of shape {amap.shape}, not a 2-D map"
            )

    @property
    def threshold(self) -> float:
        return self.meta.threshold

    def check_frame(self, image: np.ndarray) -> None:
        """Raise ValueError unless image is what this model takes (uint8 HxWx3, trained size)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"frame must be uint8 HxWx3 BGR, got {image.dtype} {image.shape}")
        hw = self.meta.image_hw
        if hw is not None and image.shape[:2] != hw:
            raise ValueError(
                f"frame is {image.shape[1]}x{image.shape[0]} but model {self.path.name} "
                f"was trained on {hw[1]}x{hw[0]} images"
            )
        roi = self.meta.roi_box
        if roi is not None and (
            roi[0] + roi[2] > image.shape[1] or roi[1] + roi[3] > image.shape[0]
        ):
            raise ValueError(f"frame {image.shape[1]}x{image.shape[0]} does not hold the ROI {roi}")

    def run(self, image: np.ndarray) -> tuple[float, np.ndarray]:
        """Raw model outputs for a BGR frame: (score, anomaly map [h, w])."""
        self.check_frame(image)
        score, amap = self._session.run(None, {"image": image})
        return float(score[0]), amap[0, 0]

    def detect(self, image: np.ndarray) -> Detection:
        """Score a BGR frame and describe where it is anomalous."""
        score, amap = self.run(image)
        roi = self.meta.roi_box or (0, 0, image.shape[1], image.shape[0])
        return describe(score, amap, self.threshold, roi)


def describe(
    score: float, amap: np.ndarray, threshold: float, roi: tuple[int, int, int, int]
) -> Detection:
    """Turn a score and an anomaly map over roi into a Detection with area and boxes."""
    rx, ry, rw, rh = roi
    # Upsample 4x so region outlines follow the map's interpolation, not its cell grid. The
    # interpolation shaves peaks, so cells over the threshold count as they are: a part
    # judged NG by a hair always has its region and box.
    size = (amap.shape[1] * 4, amap.shape[0] * 4)
    fine = cv2.resize(amap, size, interpolation=cv2.INTER_LINEAR)
    cells = cv2.resize(amap, size, interpolation=cv2.INTER_NEAREST)
    mask = ((fine > threshold) | (cells > threshold)).astype(np.uint8)
    area = float(mask.mean())
    boxes: list[Box] = []
    if area > 0:
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        sx, sy = rw / fine.shape[1], rh / fine.shape[0]
        for i in range(1, count):
            x, y, w, h, _ = stats[i]
            peak = float(np.maximum(fine, cells)[labels == i].max())
            boxes.append(
                Box(
                    x=rx + int(x * sx),
                    y=ry + int(y * sy),
                    w=max(1, round(w * sx)),
                    h=max(1, round(h * sy)),
                    score=peak,
                )
            )
        boxes.sort(key=lambda b: b.score, reverse=True)
    return Detection(
        score=score, threshold=threshold, anomaly_map=amap, roi=roi, area=area, boxes=boxes
    )
