"""The station's own labelled images, laid out as `train` and `evaluate` read them.

<root>/train/normal, train/anomaly, test/normal, test/anomaly. New images go to `train`
except that about one in five of each label is kept back in `test`, so that a model trained
here is judged on images it has not seen (as Lookout for Vision split a single dataset).
An item is named by its path below the root, "train/normal/cap-20261126-093000-<hash>.png",
where the hash is of the pixels (images.pixel_hash).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge.files import write_atomically
from edge.images import IMAGE_SUFFIXES, ImageError, pixel_hash, read_image

SPLITS = ("train", "test")
LABELS = ("normal", "anomaly")
TEST_SHARE = 0.2
_ITEM = re.compile(r"^(train|test)/(normal|anomaly)/([A-Za-z0-9][A-Za-z0-9._-]{0,120})$")


class DatasetError(ValueError):
    """A dataset request that cannot be done; the message says which item and why."""


@dataclass(frozen=True)
class Item:
    split: str
    label: str
    name: str
    bytes: int
    mtime: float

    @property
    def id(self) -> str:
        return f"{self.split}/{self.label}/{self.name}"

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "split": self.split,
            "label": self.label,
            "name": self.name,
            "bytes": self.bytes,
            "mtime": self.mtime,
        }


class Dataset:
    """Labelled images under `root`; safe to use from several threads.

    >>> ds = Dataset(state_dir / "dataset")                  # doctest: +SKIP
    >>> ds.add(frame, "normal", "cap").id                    # doctest: +SKIP
    'train/normal/cap-20261126-093000-3f9a0c1b2d4e5f60.png'
    """

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes  # None: no limit
        self._lock = threading.Lock()

    def items(self) -> list[Item]:
        """Every image, newest first."""
        out = []
        for split in SPLITS:
            for label in LABELS:
                folder = self.root / split / label
                if not folder.is_dir():
                    continue
                for path in folder.iterdir():
                    if path.suffix.lower() in IMAGE_SUFFIXES and _ITEM.match(
                        f"{split}/{label}/{path.name}"
                    ):
                        try:
                            st = path.stat()
                        except FileNotFoundError:
                            continue  # deleted a moment ago
                        out.append(Item(split, label, path.name, st.st_size, st.st_mtime))
        return sorted(out, key=lambda i: (-i.mtime, i.id))

    def counts(self) -> dict[str, int]:
        """How many images per "split/label", e.g. {"train/normal": 18, "test/normal": 4, ...}."""
        out = {f"{s}/{lb}": 0 for s in SPLITS for lb in LABELS}
        for item in self.items():
            out[f"{item.split}/{item.label}"] += 1
        return out

    def path(self, item_id: str) -> Path:
        """The file of an item, or DatasetError when the id is malformed or not there."""
        if not _ITEM.match(item_id) or ".." in item_id:
            raise DatasetError(f"dataset item {item_id[:140]!r} is not a valid item name")
        path = self.root / item_id
        if not path.is_file():
            raise DatasetError(f"dataset item {item_id} does not exist")
        return path

    def add(self, image: np.ndarray, label: str, origin: str) -> Item:
        """Save a BGR image losslessly (PNG) under `label`, in train or test (see module doc)."""
        check_label(label)
        ok, png = cv2.imencode(".png", image)
        if not ok:
            raise DatasetError("the image cannot be encoded as PNG")
        key = pixel_hash(image)  # in the name, so that the same picture is not added twice
        with self._lock:
            items = self.items()
            twin = next((i for i in items if i.name.endswith(f"-{key}.png")), None)
            if twin is not None:
                raise DatasetError(f"this picture is in the dataset already, as {twin.id}")
            used = sum(i.bytes for i in items)
            if self.max_bytes is not None and used + len(png) > self.max_bytes:
                raise DatasetError(
                    f"the dataset holds {used / 1e6:.1f} MB and this image would take it over "
                    f"its limit of {self.max_bytes / 1e6:g} MB ([web] dataset_max_mb); "
                    "delete images first"
                )
            have = {s: sum(i.split == s and i.label == label for i in items) for s in SPLITS}
            total = have["train"] + have["test"] + 1
            split = "test" if have["test"] + 1 <= TEST_SHARE * total else "train"
            name = f"{origin}-{time.strftime('%Y%m%d-%H%M%S')}-{key}.png"
            path = self.root / split / label / name
            write_atomically(path, png.tobytes())
            st = path.stat()
            return Item(split, label, path.name, st.st_size, st.st_mtime)

    def add_file(self, source: Path, label: str, origin: str) -> Item:
        """Add a saved image file (a frame from the history), checked like any image input."""
        return self.add(read_image(source), label, origin)

    def move(self, item_id: str, label: str | None = None, split: str | None = None) -> Item:
        """Relabel an item and/or move it between train and test."""
        with self._lock:
            path = self.path(item_id)
            old_split, old_label, name = item_id.split("/")
            new_label = label or old_label
            new_split = split or old_split
            check_label(new_label)
            if new_split not in SPLITS:
                raise DatasetError(f"split {new_split[:40]!r} is not one of {', '.join(SPLITS)}")
            target = self.root / new_split / new_label / name
            if target != path:
                if target.exists():
                    raise DatasetError(f"dataset item {new_split}/{new_label}/{name} exists")
                target.parent.mkdir(parents=True, exist_ok=True)
                path.rename(target)
            st = target.stat()
            return Item(new_split, new_label, name, st.st_size, st.st_mtime)

    def delete(self, item_id: str) -> None:
        with self._lock:
            self.path(item_id).unlink()

    def thumbnail(self, item_id: str, longer_side: int = 200) -> bytes:
        """A small JPEG of an item for the page."""
        path = self.path(item_id)
        try:
            image = read_image(path)
        except ImageError as exc:
            raise DatasetError(str(exc)) from None
        scale = longer_side / max(image.shape[:2])
        if scale < 1:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        ok, jpg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
        if not ok:
            raise DatasetError(f"dataset item {item_id} cannot be shown")
        return bytes(jpg.tobytes())


def check_label(value: object) -> str:
    """The label, if it is one (a value from a request, say); DatasetError otherwise."""
    if value not in LABELS:
        raise DatasetError(f"label must be one of {', '.join(LABELS)}")
    return str(value)
