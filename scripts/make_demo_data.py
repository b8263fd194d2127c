"""Draw a synthetic inspection data set: good and defective parts, or a textured surface.

    python scripts/make_demo_data.py demo/data                  # metal parts, 320x240
    python scripts/make_demo_data.py out/cloth --kind texture   # woven texture with scratches

Writes 8-bit BGR PNGs in the layout `edge-inspect train` and `evaluate` read:
OUT/train/normal, OUT/train/anomaly, OUT/test/normal, OUT/test/anomaly. The same seed gives
the same images. The tests import this file (pytest puts scripts/ on sys.path) so that the
demo and the tests draw from one place.

Two kinds of scene:
- `part`: a machined metal flange on a conveyor belt, with slight shifts, rotation, lighting
  changes and sensor noise; defects are a scratch, a stain or a chipped edge.
- `texture`: a woven surface filling the frame; the defect is a scratch across it.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

KINDS = ("part", "texture")
DEFECTS: dict[str, tuple[str, ...]] = {
    "part": ("scratch", "stain", "chip"),
    "texture": ("scratch",),
}
SPLITS = ("train/normal", "train/anomaly", "test/normal", "test/anomaly")
DEMO_COUNTS: dict[str, int] = {
    "train/normal": 24,
    "train/anomaly": 8,
    "test/normal": 12,
    "test/anomaly": 12,
}


def draw(
    kind: str, rng: np.random.Generator, width: int, height: int, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene; return (BGR uint8 image HxWx3, defect mask uint8 HxW, 255 on the defect).

    `defect` is None for a good sample or one of DEFECTS[kind]. The same generator state with
    and without a defect gives the same picture except on the defect. Sizes scale with `width`,
    so a 160x120 image is the 320x240 one at half resolution.

        >>> image, mask = draw("part", np.random.default_rng(0), 160, 120, "scratch")
        >>> image.shape, image.dtype, bool(mask.any())
        ((120, 160, 3), dtype('uint8'), True)
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if defect is not None and defect not in DEFECTS[kind]:
        raise ValueError(f"unknown {kind} defect {defect!r}; expected one of {DEFECTS[kind]}")
    # Separate streams for the scene, the flaw and the camera, so that the same generator state
    # drawn with and without a defect gives the same photograph except on the defect.
    scene_rng, flaw_rng, camera_rng = (
        np.random.default_rng(s) for s in rng.integers(0, 2**63, size=3)
    )
    if kind == "part":
        scene, mask = _draw_part(scene_rng, flaw_rng, width, height, defect)
    else:
        scene, mask = _draw_texture(scene_rng, flaw_rng, width, height, defect)
    return _photograph(camera_rng, scene), mask


def write_dataset(
    out: Path,
    kind: str = "part",
    counts: Mapping[str, int] = DEMO_COUNTS,
    width: int = 320,
    height: int = 240,
    seed: int = 0,
) -> Path:
    """Write a data set under `out` (which must be missing or empty) and return `out`.

    `counts` maps each of SPLITS to a number of images; a split that is missing or 0 gets no
    folder. Every image has its own random stream, derived from (seed, kind, split, index), so
    changing one count leaves the other images as they were. Anomalies cycle through
    DEFECTS[kind] and are named after their defect: scratch_000.png, stain_001.png, ...

        >>> counts = {"train/normal": 4, "test/normal": 2, "test/anomaly": 2}
        >>> write_dataset(Path("/tmp/parts"), "part", counts, width=160, height=120)
        PosixPath('/tmp/parts')
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split {sorted(unknown)}; expected {', '.join(SPLITS)}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new folder or delete it first")
    for split_index, split in enumerate(SPLITS):
        if counts.get(split, 0) <= 0:
            continue  # no folder at all, as in a data set without labelled defects
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        defects = DEFECTS[kind]
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, KINDS.index(kind), split_index, i])
            defect = defects[i % len(defects)] if split.endswith("anomaly") else None
            image, _ = draw(kind, rng, width, height, defect)
            path = folder / f"{defect or 'good'}_{i:03d}.png"
            if not cv2.imwrite(str(path), image):
                raise OSError(f"could not write {path}")
    return out


# --- the part: a metal flange with a bore, four bolt holes and a printed orientation mark ---


def _draw_part(
    rng: np.random.Generator, flaw: np.random.Generator, width: int, height: int, defect: str | None
) -> tuple[np.ndarray, np.ndarray]:
    s = width / 320.0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    scene = _belt(rng, width, height, s, xx)

    # Fixtures hold the part roughly in place: a few pixels of play and a few degrees of turn.
    cx = width / 2 + rng.uniform(-0.03, 0.03) * width
    cy = height / 2 + rng.uniform(-0.03, 0.03) * height
    turn = math.radians(rng.uniform(-6.0, 6.0))
    radius = 0.34 * height
    dx, dy = xx - cx, yy - cy
    r = np.hypot(dx, dy)
    angle = np.arctan2(dy, dx)

    # Soft shadow below and right of the part.
    shadow = _disc(np.hypot(dx - 4 * s, dy - 5 * s), radius + 2 * s)
    shadow = cv2.GaussianBlur(shadow, (0, 0), 4 * s)
    scene *= (1 - 0.55 * shadow)[..., None]

    # Metal: concentric turning marks, a light from the top left, a darker chamfer at the rim.
    turning = 6 * np.sin(r / (1.3 * s) + rng.uniform(0, 2 * np.pi))
    turning += cv2.GaussianBlur(rng.normal(0, 5, r.shape).astype(np.float32), (0, 0), 1.2 * s)
    light = 18 * np.cos(angle - math.radians(-135)) * np.clip(r / radius, 0, 1)
    grey = 150 + turning + light
    grey -= 35 * np.clip((r - (radius - 3 * s)) / (3 * s), 0, 1)
    metal_colour = np.array([1.0, 0.99, 0.96], np.float32)  # steel, a touch cool
    metal = grey[..., None] * metal_colour

    alpha = _disc(r, radius) * (1 - _disc(r, 0.3 * radius))
    for k in range(4):
        a = turn + math.pi / 4 + k * math.pi / 2
        hx, hy = cx + 0.66 * radius * math.cos(a), cy + 0.66 * radius * math.sin(a)
        alpha *= 1 - _disc(np.hypot(xx - hx, yy - hy), 0.09 * radius)

    # Printed orientation mark: a dark arrow pointing outwards, turning with the part.
    tip = (cx + 0.9 * radius * math.cos(turn), cy + 0.9 * radius * math.sin(turn))
    base, half = 0.5 * radius, 0.1 * radius
    across = (-half * math.sin(turn), half * math.cos(turn))
    foot = (cx + base * math.cos(turn), cy + base * math.sin(turn))
    arrow = [
        tip,
        (foot[0] + across[0], foot[1] + across[1]),
        (foot[0] - across[0], foot[1] - across[1]),
    ]
    _fill(metal, np.array(arrow), (40, 40, 46))

    mask = np.zeros((height, width), np.uint8)
    if defect == "chip":
        # A piece broken out of the rim: the belt shows through.
        a = turn + flaw.uniform(0, 2 * np.pi)
        kx, ky = cx + radius * math.cos(a), cy + radius * math.sin(a)
        chip = _disc(np.hypot(xx - kx, yy - ky), flaw.uniform(0.2, 0.28) * radius)
        mask[(chip > 0.5) & (alpha > 0.5)] = 255
        alpha *= 1 - chip
    scene = scene * (1 - alpha[..., None]) + metal * alpha[..., None]

    on_metal = alpha > 0.99
    if defect == "scratch":
        # A straight gouge across the face: bright where it catches the light, dark otherwise.
        a = flaw.uniform(0, 2 * np.pi)
        start_r = flaw.uniform(0.35, 0.6) * radius
        start = np.array([cx + start_r * math.cos(a), cy + start_r * math.sin(a)])
        heading = a + flaw.uniform(0.6, 2.5) * flaw.choice([-1, 1])
        end = start + flaw.uniform(0.5, 0.8) * radius * np.array(
            [math.cos(heading), math.sin(heading)]
        )
        line = _stroke([start, end], width, height, max(1, round(2 * s)))
        line *= on_metal
        colour = 235.0 if flaw.random() < 0.5 else 55.0
        scene = scene * (1 - line[..., None]) + colour * line[..., None]
        mask[line > 0.3] = 255
    elif defect == "stain":
        # Rust or oil: an irregular brown blob.
        a = flaw.uniform(0, 2 * np.pi)
        sr = flaw.uniform(0.45, 0.8) * radius
        sx, sy = cx + sr * math.cos(a), cy + sr * math.sin(a)
        size = flaw.uniform(0.1, 0.15) * radius
        wobble = cv2.GaussianBlur(
            flaw.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 2 * s
        )
        blob = _disc(np.hypot(xx - sx, yy - sy) + 6 * s * wobble, size) * on_metal
        rust = np.array([40, 70, 120], np.float32)
        scene = scene * (1 - 0.85 * blob[..., None]) + 0.85 * rust * blob[..., None]
        mask[blob > 0.3] = 255
    return scene, mask


def _belt(
    rng: np.random.Generator, width: int, height: int, s: float, xx: np.ndarray
) -> np.ndarray:
    """A dark rubber conveyor belt with faint lengthwise ribs."""
    grain = cv2.GaussianBlur(rng.normal(0, 6, (height, width)).astype(np.float32), (0, 0), 1.5 * s)
    ribs = 4 * np.sin(xx / (3 * s) + rng.uniform(0, 2 * np.pi))
    grey: np.ndarray = 62 + grain + ribs
    return grey[..., None] * np.array([1.05, 1.0, 0.95], np.float32)


# --- the texture: a woven surface, defect is a scratch across it ---


def _draw_texture(
    rng: np.random.Generator, flaw: np.random.Generator, width: int, height: int, defect: str | None
) -> tuple[np.ndarray, np.ndarray]:
    s = width / 320.0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    period = 8 * s
    px, py = rng.uniform(0, 2 * np.pi, 2)
    weave = 14 * np.sin(2 * np.pi * xx / period + px) * np.sin(2 * np.pi * yy / period + py)
    fibres = cv2.GaussianBlur(
        rng.normal(0, 10, (height, width)).astype(np.float32), (0, 0), 0.8 * s
    )
    blotches = cv2.GaussianBlur(
        rng.normal(0, 40, (height, width)).astype(np.float32), (0, 0), 12 * s
    )
    grey = 150 + weave + fibres + blotches
    scene = grey[..., None] * np.array([0.78, 0.9, 1.0], np.float32)  # undyed linen

    mask = np.zeros((height, width), np.uint8)
    if defect == "scratch":
        # A slightly curved pull or scuff, from a third to two thirds of the width long.
        length = flaw.uniform(0.35, 0.65) * width
        a = flaw.uniform(0, np.pi)
        mid = np.array([flaw.uniform(0.3, 0.7) * width, flaw.uniform(0.3, 0.7) * height])
        direction = np.array([math.cos(a), math.sin(a)])
        normal = np.array([-direction[1], direction[0]])
        bend = flaw.uniform(-0.08, 0.08) * length
        points = [
            mid + t * length / 2 * direction + (1 - t * t) * bend * normal
            for t in np.linspace(-1, 1, 9)
        ]
        line = _stroke(points, width, height, max(1, round(2 * s)))
        # Lighter or darker than the weave around it, which still shows through.
        scene += flaw.choice([-70.0, 70.0]) * line[..., None]
        mask[line > 0.3] = 255
    return scene, mask


# --- shared drawing helpers ---


def _photograph(rng: np.random.Generator, scene: np.ndarray) -> np.ndarray:
    """What the camera makes of the scene: lens softness, uneven light, exposure, sensor noise."""
    height, width = scene.shape[:2]
    image: np.ndarray = cv2.GaussianBlur(scene.astype(np.float32), (0, 0), 0.5 + 0.2 * rng.random())
    gx, gy = rng.uniform(-0.06, 0.06, 2)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    shading = 1 + gx * (2 * xx / width - 1) + gy * (2 * yy / height - 1)
    image = image * (rng.uniform(0.9, 1.1) * shading)[..., None] + rng.uniform(-8, 8)
    image += rng.normal(0, rng.uniform(1.5, 3.0), image.shape)
    photo: np.ndarray = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return photo


def _disc(distance: np.ndarray, radius: float) -> np.ndarray:
    """1 inside `radius`, 0 outside, with a one-pixel anti-aliased edge."""
    return np.clip(radius - distance + 0.5, 0, 1).astype(np.float32)


def _stroke(points: Sequence[np.ndarray], width: int, height: int, thickness: int) -> np.ndarray:
    """Coverage (0..1) of an anti-aliased polyline through `points`."""
    layer = np.zeros((height, width), np.uint8)
    shift = 4  # cv2 draws with sub-pixel coordinates in 1/16 pixel
    pts = np.rint(np.array(points) * (1 << shift)).astype(np.int32)
    cv2.polylines(layer, [pts], False, 255, thickness, cv2.LINE_AA, shift)
    return layer.astype(np.float32) / 255.0


def _fill(scene: np.ndarray, points: np.ndarray, colour: tuple[int, int, int]) -> None:
    shift = 4
    pts = np.rint(points * (1 << shift)).astype(np.int32)
    cover = np.zeros(scene.shape[:2], np.uint8)
    cv2.fillPoly(cover, [pts], 255, cv2.LINE_AA, shift)
    a = cover.astype(np.float32)[..., None] / 255.0
    scene *= 1 - a
    scene += a * np.array(colour, np.float32)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to create (must be missing or empty)")
    parser.add_argument("--kind", choices=KINDS, default="part")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        write_dataset(args.out, args.kind, DEMO_COUNTS, args.width, args.height, args.seed)
    except OSError as err:  # FileExistsError included: never write over a folder with files
        print(f"make_demo_data: {err}", file=sys.stderr)
        return 1
    total = sum(DEMO_COUNTS.values())
    print(f"wrote {total} {args.kind} images ({args.width}x{args.height}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
