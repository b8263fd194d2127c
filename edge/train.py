"""Builds a model file from a folder of good (and optionally defective) images."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist

import cv2
import numpy as np
import onnx
import onnxruntime as ort

from edge import __version__, graph
from edge.assets import backbone_path
from edge.files import write_atomically
from edge.images import has_entries, list_images, pixel_hash, read_image
from edge.metrics import best_threshold
from edge.model import FORMAT_VERSION, ModelMeta, session_options

log = logging.getLogger(__name__)

MIN_NORMAL = 10
BANK_RATIO = 0.1  # share of all training patches kept in the memory bank
BANK_MAX = 1536  # bounds inference time: one [patches x bank] matrix product per frame
# Bounds training memory when a dataset grows to hundreds of images (the page lets it): at
# most this many patches go into the coreset (120 MB), and at most this many good views are
# held out for calibration. Twenty images at the default size stay well under both.
PATCH_BUDGET = 200_000
CALIBRATION_VIEWS = 200
MAX_THREADS = 64
NEAR_COPY = 0.5  # see near_copies()

Progress = Callable[[str, int, int], None]


class TrainError(ValueError):
    """Training data or options that cannot make a model; the message says which and why."""


class OptionError(TrainError):
    """An option value that cannot be used, whatever the images (the command line's fault)."""


@dataclass(frozen=True)
class TrainOptions:
    """How to build a model. `roi` is (x, y, w, h) in camera pixels."""

    size: int = 256
    roi: tuple[int, int, int, int] | None = None
    # Extra shifted copies of each good image: parts never sit exactly on the stride-8 grid
    # nor in the same place twice, and the copies let the bank hold each patch at other
    # offsets. No rotation by default: it turns straight edges (busbars, part outlines) into
    # slanted ones, which then pass as good where a crack is just that.
    augment: int = 3
    shift: float = 0.03  # largest shift, as a share of the region's size
    rotate_deg: float = 0.0  # largest rotation
    false_reject_rate: float = 0.01  # target share of good parts rejected, without labelled defects
    threads: int = 0  # onnxruntime threads; 0 = all cores
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    meta: ModelMeta
    normal_scores: np.ndarray  # held-out (leave-one-out) scores of the good images
    anomaly_scores: np.ndarray
    seconds: float


def _quiet(stage: str, done: int, total: int) -> None:
    pass


class _Checks:
    """Checks training images one at a time, as they are read (a dozen phone photos would not
    fit in a Pi's memory at once): one size when a region of interest needs it, a region that
    fits, and no picture twice (leave-one-out would calibrate it against its twin)."""

    def __init__(self, roi: tuple[int, int, int, int] | None) -> None:
        self.roi = roi
        self.first: tuple[Path, tuple[int, int]] | None = None
        self.odd: Path | None = None  # the first image whose size differs from the first one's
        self.seen: dict[str, Path] = {}

    def add(self, path: Path, image: np.ndarray) -> None:
        hw = image.shape[:2]
        if self.first is None:
            self.first = (path, hw)
            if self.roi is not None:
                x, y, w, h = self.roi
                if w < 16 or h < 16:
                    raise OptionError(f"ROI {self.roi} is smaller than 16x16 pixels")
                if x < 0 or y < 0 or x + w > hw[1] or y + h > hw[0]:
                    raise TrainError(f"ROI {self.roi} does not fit in the {hw[1]}x{hw[0]} images")
        elif hw != self.first[1]:
            if self.roi is not None:
                first, (fh, fw) = self.first
                raise TrainError(
                    f"image {path} is {hw[1]}x{hw[0]} but {first.name} is {fw}x{fh}; "
                    "a region of interest needs all images the same size"
                )
            self.odd = self.odd or path
        key = pixel_hash(image)
        if key in self.seen:
            raise TrainError(
                f"images {self.seen[key]} and {path} are the same picture; keep one of them"
            )
        self.seen[key] = path

    @property
    def image_hw(self) -> tuple[int, int] | None:
        """The common (h, w) of the images, or None when they differ."""
        return None if self.odd or self.first is None else self.first[1]


def placements(count: int, opts: TrainOptions) -> np.ndarray:
    """count rows of (x shift, y shift, turn) for the augmented copies, shifts as shares of the
    region and turns in degrees: the copies of all the images together spread evenly over the
    allowed range, so the bank sees every offset (and turn), not a random bunch of them.

    The points are Roberts' sequence in 2 dimensions, or 3 with turns: point k is
    frac(start + k * phi^-(1..d)), phi the root of x^(d+1) = x + 1; any run of consecutive
    points covers the square (cube) evenly, where random draws leave clumps and gaps. The
    seed picks the start.
    """
    d = 3 if opts.rotate_deg else 2
    phi = 2.0
    for _ in range(40):
        phi = (1 + phi) ** (1 / (d + 1))
    start = np.random.default_rng(opts.seed).uniform(size=d)
    u = (start + np.arange(1, count + 1)[:, None] * phi ** -np.arange(1.0, d + 1)) % 1.0
    if d == 2:
        u = np.column_stack([u, np.full(count, 0.5)])  # no turn
    out: np.ndarray = (2 * u - 1) * np.array([opts.shift, opts.shift, opts.rotate_deg])
    return out


def _augment(image: np.ndarray, moves: np.ndarray) -> Iterator[np.ndarray]:
    """Copies of image, made one at a time, each shifted (and turned, if asked) as a row of
    placements() says, as a part placed again would be. The strip uncovered at the border
    repeats the edge pixels: mirroring them would add structure (a mirrored corner or line)
    that no real image shows."""
    h, w = image.shape[:2]
    for dx, dy, angle in moves:
        m = cv2.getRotationMatrix2D((w / 2, h / 2), float(angle), 1.0).astype(np.float64)
        m[:, 2] += np.array([dx * w, dy * h])
        yield cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


def coreset(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of n rows of x chosen greedily so every row is close to a chosen one (k-center).

    Distances are taken in a 64-d random projection, as PatchCore does, to keep it fast.
    """
    if n >= len(x):
        return np.arange(len(x))
    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(x.shape[1], 64)).astype(np.float32) / 8.0
    z = x @ proj
    zz = np.einsum("ij,ij->i", z, z)

    def sq_dist(j: int) -> np.ndarray:
        # |z - z_j|^2 = |z|^2 - 2 z.z_j + |z_j|^2: one matrix-vector product, several times
        # faster than forming z - z_j, which matters with augmented copies in x.
        out: np.ndarray = zz - 2 * (z @ z[j]) + zz[j]
        return out

    chosen = np.empty(n, dtype=np.int64)
    centre = z.mean(0)
    chosen[0] = int(np.argmin(zz - 2 * (z @ centre)))  # nearest the mean, without a copy of z
    dist = sq_dist(chosen[0])
    for i in range(1, n):
        chosen[i] = int(np.argmax(dist))
        np.minimum(dist, sq_dist(chosen[i]), out=dist)
    return chosen


def position_stats(raw_maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per position class: the mean of held-out good distances and 1 / their spread.

    The spread is floored at the interior's, so a quiet class is never amplified; classes a
    small map lacks take the statistics of all cells.
    """
    classes = [graph.position_classes(*m.shape).ravel() for m in raw_maps]
    values = np.concatenate([m.ravel() for m in raw_maps]).astype(np.float64)
    cls = np.concatenate(classes)
    n = graph.POSITION_CLASSES
    interior = values[cls == n - 1]
    floor = float(interior.std()) if interior.size > 1 else float(values.std())
    mean = np.full(n, values.mean())
    scale = np.full(n, max(float(values.std()), floor))
    for c in range(n):
        v = values[cls == c]
        if v.size > 1:
            mean[c], scale[c] = v.mean(), max(float(v.std()), floor)
    scale = np.maximum(scale, 1e-6)
    return mean.astype(np.float32), (1.0 / scale).astype(np.float32)


def near_copies(fmaps: list[np.ndarray], owners: list[int]) -> dict[int, set[int]]:
    """For each image with a held-out view, the other images that are near copies of it.

    Two shots of one part in one place (a burst, or a part left in its fixture) are not two
    samples of good parts: leaving one out while its copy stays in the bank scores it as if
    nothing ever varied, and sets the threshold too low. Image j is a near copy of view i
    when their patches, position by position, differ by less than NEAR_COPY times as much
    as i's patches differ from their neighbours one cell over (both as root mean squares):
    a yardstick of the picture's own, which holds when every image is a copy.

    Measured: shots differing by sensor noise come to 0.1-0.47; the same cookie placed again,
    0.56; different parts in the development sets' training images, 0.7 and more. Only the
    held-out views are compared (at most CALIBRATION_VIEWS): in a larger set, a copy whose
    twin was not drawn goes unseen.
    """

    def yardstick(f: np.ndarray) -> float:
        # mean over positions of the squared patch distance to the next cell down, and across
        steps = [
            np.square(np.diff(f[0], axis=a)).sum(0).mean() for a in (1, 2) if f.shape[a + 1] > 1
        ]
        return float(np.mean(steps)) if steps else 0.0

    out: dict[int, set[int]] = {}
    own = [yardstick(f) for f in fmaps]
    for i, j in itertools.combinations(range(len(fmaps)), 2):
        if owners[i] == owners[j] or fmaps[i].shape != fmaps[j].shape:
            continue
        diff = (fmaps[i] - fmaps[j]).ravel()  # one view's size at a time, never all of them
        aligned = float(np.dot(diff, diff)) / (fmaps[i].shape[2] * fmaps[i].shape[3])
        if aligned < NEAR_COPY**2 * min(own[i], own[j]):
            out.setdefault(owners[i], set()).add(owners[j])
            out.setdefault(owners[j], set()).add(owners[i])
    return out


def _check_copies(copies: dict[int, set[int]], owners: list[int], paths: list[Path]) -> None:
    """Say when some good images are near copies of others; refuse when fewer than MIN_NORMAL
    different pictures are left, as there would be too few to learn from and calibrate."""
    pairs = sorted((a, b) for a, twins in copies.items() for b in twins if a < b)
    if not pairs:
        return
    root = list(range(len(paths)))

    def find(k: int) -> int:
        while root[k] != k:
            k = root[k]
        return k

    for a, b in pairs:
        root[find(a)] = find(b)
    shown = set(owners)
    distinct = len({find(k) for k in shown})
    a, b = pairs[0]
    example = f"{paths[a].name} and {paths[b].name}"
    if distinct < MIN_NORMAL:
        raise TrainError(
            f"of the {len(shown)} good images compared, only {distinct} "
            f"{'differs' if distinct == 1 else 'differ'} by more than camera noise; the "
            f"others are near copies (such as {example}: the same part in the same place). "
            f"Take at least {MIN_NORMAL} different good parts, or place the part again between "
            "shots"
        )
    log.warning(
        "%d good images are near copies of others (such as %s); each is held out with its "
        "copies when the threshold is set",
        len(copies),
        example,
    )


def _hash_files(paths: list[Path]) -> str:
    digests = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in paths)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _threshold(
    normal: np.ndarray, anomaly: np.ndarray, false_reject_rate: float, good: str
) -> tuple[float, str, float]:
    """(threshold, rule, expected false-reject rate) from held-out good and defect scores.

    `good` says what the good scores are of, for the rule: "20 held-out good images".

    Held-out good scores are modelled as a normal distribution: that gives the threshold for a
    target false-reject rate when there are no labelled defects, and the expected rate always.
    """
    fit = NormalDist(float(normal.mean()), max(float(normal.std(ddof=1)), 1e-6))
    if len(anomaly):
        t = best_threshold(normal, anomaly)
        rule = f"best separation of {good} and {len(anomaly)} labelled defective images"
    else:
        t = fit.inv_cdf(1 - false_reject_rate)
        rule = (
            f"{100 * false_reject_rate:g} % expected false rejects, from a normal fit to "
            f"{good} (leave-one-out)"
        )
    return t, rule, 1 - fit.cdf(t)


def train(
    data: Path,
    output: Path,
    opts: TrainOptions = TrainOptions(),
    progress: Progress = _quiet,
) -> TrainResult:
    """Train a model from data/normal (and data/anomaly if present) and write it to output.

    >>> train(Path("data"), Path("station.onnx")).meta.threshold  # doctest: +SKIP
    41.7
    """
    start = time.monotonic()
    if output.suffix.lower() != ".onnx":
        raise OptionError(f"model file name {output} must end in .onnx")
    if output.exists() and not output.is_file():  # found now, not after minutes of training
        raise TrainError(f"model file {output} exists and is not a file")
    if not 0 < opts.false_reject_rate < 0.5:
        raise OptionError(
            f"false-reject rate {100 * opts.false_reject_rate:g} % must be between 0 and 50 %"
        )
    if not 0 <= opts.threads <= MAX_THREADS:
        raise OptionError(f"threads {opts.threads} must be between 0 (all cores) and {MAX_THREADS}")
    if opts.size % 16 or not 64 <= opts.size <= 1024:
        raise OptionError(f"input size {opts.size} must be a multiple of 16 between 64 and 1024")
    if opts.augment < 0:
        raise OptionError(f"augment {opts.augment} must be 0 or more copies")
    if not 0 <= opts.shift <= 0.2:
        raise OptionError(f"shift {100 * opts.shift:g} % must be between 0 and 20 %")
    if not 0 <= opts.rotate_deg <= 45:
        raise OptionError(f"rotation {opts.rotate_deg:g} degrees must be between 0 and 45")
    if opts.augment == 0 and (opts.rotate_deg or opts.shift != TrainOptions.shift):
        raise OptionError(
            "shift and rotation act on the augmented copies; they need augment above 0"
        )
    normal_dir, anomaly_dir = data / "normal", data / "anomaly"
    if data.is_file():
        raise TrainError(f"training folder {data} is a file; give the folder that holds normal/")
    if not data.is_dir():
        raise TrainError(f"training folder {data} does not exist")
    if not normal_dir.is_dir():
        hint = (
            f" (give {data / 'train'}, which has one)" if (data / "train/normal").is_dir() else ""
        )
        raise TrainError(f"training folder {data} has no normal/ folder of good images{hint}")
    normal_paths = list_images(normal_dir, labelled=True)
    if len(normal_paths) < MIN_NORMAL:
        raise TrainError(
            f"folder {normal_dir} holds {len(normal_paths)} images; "
            f"training needs at least {MIN_NORMAL} good ones"
        )
    anomaly_paths: list[Path] = []
    if has_entries(anomaly_dir):
        anomaly_paths = list_images(anomaly_dir, labelled=True)
    checks = _Checks(opts.roi)

    backbone_file = backbone_path()
    backbone = onnx.load(str(backbone_file))
    threads = opts.threads or os.cpu_count() or 1
    features = ort.InferenceSession(
        graph.build_feature_graph(backbone, None, opts.roi, opts.size).SerializeToString(),
        session_options(threads),
        providers=["CPUExecutionProvider"],
    )

    moves = placements(len(normal_paths) * opts.augment, opts)
    sampler = np.random.default_rng(opts.seed + 1)
    total = len(normal_paths) * (1 + opts.augment)
    per_view = max(1, PATCH_BUDGET // total)
    # Patches go straight into one buffer: pages never written cost no memory.
    x = np.empty((0, 0), np.float32)
    owner = np.empty(total * per_view, np.int64)
    used = 0
    # Calibration views: the good images as taken and, when turns are declared normal
    # (rotate_deg > 0), their turned copies too, so that such a turn is not rejected; a
    # random CALIBRATION_VIEWS of them when there are more.
    views_wanted = [
        (i, c)
        for i in range(len(normal_paths))
        for c in range(1 + opts.augment)
        if c == 0 or opts.rotate_deg
    ]
    if len(views_wanted) > CALIBRATION_VIEWS:
        keep = sampler.choice(len(views_wanted), CALIBRATION_VIEWS, replace=False)
        views_wanted = [views_wanted[k] for k in sorted(keep)]
    calibration = set(views_wanted)
    fmaps: list[np.ndarray] = []
    fmap_owner: list[int] = []
    done = 0
    for i, path in enumerate(normal_paths):
        image = read_image(path)
        checks.add(path, image)
        mine = moves[i * opts.augment : (i + 1) * opts.augment]
        views = itertools.chain([image], _augment(image, mine))
        for copy, view in enumerate(views):
            (fmap,) = features.run(None, {"image": view})
            if (i, copy) in calibration:
                fmaps.append(fmap)
                fmap_owner.append(i)
            p = fmap[0].reshape(fmap.shape[1], -1).T
            if len(p) > per_view:
                p = p[np.sort(sampler.choice(len(p), per_view, replace=False))]
            if not x.size:
                x = np.empty((total * per_view, p.shape[1]), np.float32)
            x[used : used + len(p)] = p
            owner[used : used + len(p)] = i
            used += len(p)
            done += 1
            progress("features", done, total)
    x, owner = x[:used], owner[:used]
    channels = x.shape[1]

    n_bank = min(BANK_MAX, max(1, int(len(x) * BANK_RATIO)))
    progress("memory bank", 0, 1)
    chosen = coreset(x, n_bank, opts.seed)
    bank, bank_owner = x[chosen], owner[chosen]
    progress("memory bank", 1, 1)

    scorer = ort.InferenceSession(
        graph.build_scoring_graph(channels).SerializeToString(),
        session_options(threads),
        providers=["CPUExecutionProvider"],
    )

    classes = graph.POSITION_CLASSES
    # The usual map size of the good images: scores of other sizes are made comparable to it.
    ref_cells = round(float(np.median([f.shape[2] * f.shape[3] for f in fmaps])))
    stats = {
        "mean": np.zeros(classes, np.float32),
        "inv_scale": np.ones(classes, np.float32),
        "ref_cells": np.array([ref_cells], np.float32),
    }

    def score(fmap: np.ndarray, keep: np.ndarray) -> tuple[float, np.ndarray]:
        b = bank[keep]
        out = scorer.run(
            None,
            {
                "features": fmap,
                "bank": np.ascontiguousarray(b.T),
                "bank_sq": (b * b).sum(1),
                **stats,
            },
        )
        return float(out[0][0]), out[2][0, 0]

    # Held-out maps: each good image against the bank without the entries it contributed. They
    # give the distances good parts show at each position class, then the held-out scores.
    steps = 2 * len(fmaps) + len(anomaly_paths)
    # An image is held out with its near copies, in every view of it (turned copies too).
    copies = near_copies(fmaps, fmap_owner)
    _check_copies(copies, fmap_owner, normal_paths)
    held_out = [~np.isin(bank_owner, [i, *copies.get(i, ())]) for i in fmap_owner]
    raw_maps = []
    for i, fmap in enumerate(fmaps):
        raw_maps.append(score(fmap, held_out[i])[1])
        progress("calibration", i + 1, steps)
    mean, inv_scale = position_stats(raw_maps)
    stats.update(mean=mean, inv_scale=inv_scale)
    normal_scores = []
    for i, fmap in enumerate(fmaps):
        normal_scores.append(score(fmap, held_out[i])[0])
        progress("calibration", len(fmaps) + i + 1, steps)
    everything = np.ones(len(bank), dtype=bool)
    anomaly_scores = []
    for j, path in enumerate(anomaly_paths):
        image = read_image(path)
        checks.add(path, image)
        (fmap,) = features.run(None, {"image": image})
        anomaly_scores.append(score(fmap, everything)[0])
        progress("calibration", 2 * len(fmaps) + j + 1, steps)
    ns, ans = np.array(normal_scores), np.array(anomaly_scores)
    image_hw = checks.image_hw
    if image_hw is None:
        log.warning("images differ in size (e.g. %s); the model will take any size", checks.odd)
    n_normal, n_anomaly = len(normal_paths), len(anomaly_paths)
    taken = sum(c == 0 for _, c in views_wanted)
    turned = len(views_wanted) - taken
    sample = "" if taken == n_normal else f"a random {taken} of "
    good = f"{sample}{n_normal} held-out good images"
    if turned:
        good += f" and {turned} turned copies"
    threshold, rule, frr = _threshold(ns, ans, opts.false_reject_rate, good)

    meta = ModelMeta(
        format_version=FORMAT_VERSION,
        tool_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        input="image: uint8 [H, W, 3], BGR, HWC (an OpenCV frame)",
        colour_order="BGR",
        layout="HWC",
        image_size=f"{image_hw[1]}x{image_hw[0]}" if image_hw else "any",
        roi=",".join(str(v) for v in opts.roi) if opts.roi else "",
        input_size=opts.size,
        map_stride=graph.STRIDE,
        threshold=threshold,
        calibration=rule,
        expected_false_reject_rate=frr,
        backbone={p.key: p.value for p in backbone.metadata_props}.get(
            "edge_inspect.backbone", backbone_file.stem
        ),
        backbone_sha256=hashlib.sha256(backbone_file.read_bytes()).hexdigest(),
        train_normal_count=n_normal,
        train_anomaly_count=n_anomaly,
        train_images_sha256=_hash_files(normal_paths + anomaly_paths),
        bank_size=len(bank),
        augment=opts.augment,
        shift=opts.shift,
        rotate_deg=opts.rotate_deg,
    )
    model = graph.build_model_graph(
        backbone, image_hw, opts.roi, opts.size, bank, mean, inv_scale, ref_cells
    )
    for k, v in meta.to_props().items():
        model.metadata_props.add(key=k, value=v)
    write_atomically(output, model.SerializeToString())
    return TrainResult(meta, ns, ans, time.monotonic() - start)
