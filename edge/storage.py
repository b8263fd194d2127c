"""Saved frames and overlays on disk, within a quota: the oldest files go first."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import deque
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

SUFFIX = ".jpg"
_TEMP_SUFFIX = ".tmp"
# Errors that freeing space can cure; for the others (read-only, permission) deleting is no help.
_SPACE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT})


class FrameStore:
    """JPEG frames under `root` (<state_dir>/frames/<YYYY-MM-DD>/), at most `quota_bytes` in all.

    One thread saves (the inspection loop). Disk problems never raise: `save` returns
    (None, None) and `last_error` says why; it is None again after the next good save.
    Example:
        store = FrameStore(state_dir / "frames", quota_bytes=500_000_000)
        frame_path, overlay_path = store.save(f"{record.seq:08d}-ng", image, overlay)
        for path in store.evicted(): journal.forget_path(path)
    """

    def __init__(self, root: Path, quota_bytes: int, jpeg_quality: int = 90) -> None:
        if quota_bytes <= 0:
            raise ValueError(f"quota_bytes must be positive, got {quota_bytes}")
        self.root = root
        self.quota_bytes = quota_bytes
        self.jpeg_quality = jpeg_quality
        self.usage_bytes = 0
        self.last_error: str | None = None
        self._files: deque[tuple[str, int]] = deque()  # (path relative to root, size), oldest first
        self._evicted: list[str] = []
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.last_error = f"frame folder {root} cannot be created: {e.strerror or e}"
            log.warning("%s", self.last_error)
            return
        self._scan()

    def _scan(self) -> None:
        """Learn the files already saved (oldest by mtime, then name); drop leftover temp files."""
        found: list[tuple[int, str, int]] = []
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(folder, name)
                try:
                    if name.startswith(".") and name.endswith(_TEMP_SUFFIX):
                        os.unlink(path)  # a save interrupted by a crash or power cut
                        continue
                    if not name.endswith(SUFFIX):
                        continue
                    st = os.stat(path)
                except OSError:
                    continue
                rel = Path(path).relative_to(self.root).as_posix()
                found.append((st.st_mtime_ns, rel, st.st_size))
        found.sort()
        self._files.extend((rel, size) for _, rel, size in found)
        self.usage_bytes = sum(size for _, _, size in found)
        log.info(
            "frame store %s holds %d files, %d of %d bytes",
            self.root,
            len(found),
            self.usage_bytes,
            self.quota_bytes,
        )

    def save(
        self,
        name: str,
        image: np.ndarray,
        overlay: np.ndarray | None,
        *,
        wall: float | None = None,
    ) -> tuple[str | None, str | None]:
        """Save `image` (and `overlay`) as JPEGs named after `name` in the folder of the day.

        The day is UTC, of `wall` (a time.time()) or now. Returns the paths relative to the
        state dir, "frames/2026-11-26/00000123-ng.jpg" and "...-ng-overlay.jpg" (None where no
        overlay), or (None, None) when the disk refuses them. If the name is taken (a camera
        frame number that restarted, say) a "-2", "-3"... suffix keeps the older file.
        """
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"frame name {name!r} must be a plain file name without a dot first")
        pictures = [self._encode(image, "image")]
        if overlay is not None:
            pictures.append(self._encode(overlay, "overlay"))
        need = sum(len(p) for p in pictures)
        if need > self.quota_bytes:
            self.last_error = (
                f"frame {name} needs {need} bytes, more than the whole quota of "
                f"{self.quota_bytes} bytes; nothing saved"
            )
            return None, None
        self._evict(self.usage_bytes + need - self.quota_bytes)
        day = time.strftime("%Y-%m-%d", time.gmtime(wall))
        for attempt in (1, 2):
            try:
                rels = self._write(day, name, pictures)
            except OSError as e:
                target = self.root / day
                self.last_error = f"frame {name} cannot be saved in {target}: {e.strerror or e}"
                if attempt == 1 and e.errno in _SPACE_ERRORS:
                    # The disk is fuller than our quota knows (other files share it): make room.
                    self._evict(need)
                continue
            self.last_error = None
            prefix = self.root.name
            out = [f"{prefix}/{rel}" for rel in rels]
            return out[0], (out[1] if len(out) > 1 else None)
        log.warning("%s", self.last_error)
        return None, None

    def free(self, nbytes: int) -> int:
        """Delete the oldest saved files until `nbytes` are freed (for the journal, on a full
        disk); returns the bytes freed, 0 when there was nothing to delete."""
        before = self.usage_bytes
        self._evict(nbytes)
        return before - self.usage_bytes

    def evicted(self) -> list[str]:
        """The paths (relative to the state dir) deleted since the last call, oldest first."""
        out, self._evicted = self._evicted, []
        return out

    def _encode(self, picture: np.ndarray, what: str) -> bytes:
        if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
            raise ValueError(f"{what} must be uint8 HxWx3 BGR, got {picture.dtype} {picture.shape}")
        ok, data = cv2.imencode(SUFFIX, picture, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise ValueError(f"{what} of shape {picture.shape} cannot be encoded as JPEG")
        return data.tobytes()

    def _write(self, day: str, name: str, pictures: list[bytes]) -> list[str]:
        """Write all pictures or none: each via a temp file and os.replace; returns rel paths."""
        folder = self.root / day
        folder.mkdir(parents=True, exist_ok=True)
        stem, n = name, 1
        while (folder / f"{stem}{SUFFIX}").exists() or (
            folder / f"{stem}-overlay{SUFFIX}"
        ).exists():
            n += 1
            stem = f"{name}-{n}"
        finals = [folder / f"{stem}{SUFFIX}", folder / f"{stem}-overlay{SUFFIX}"][: len(pictures)]
        done: list[Path] = []
        temp: Path | None = None
        try:
            for final, data in zip(finals, pictures, strict=False):
                temp = folder / f".{final.name}{_TEMP_SUFFIX}"
                with open(temp, "wb") as f:
                    f.write(data)
                os.replace(temp, final)
                temp = None
                done.append(final)
        except OSError:
            for path in [*done, *([temp] if temp is not None else [])]:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        rels = [f"{day}/{final.name}" for final in finals]
        for rel, data in zip(rels, pictures, strict=True):
            self._files.append((rel, len(data)))
            self.usage_bytes += len(data)
        return rels

    def _evict(self, free_bytes: int) -> None:
        """Delete the oldest files until `free_bytes` are freed or none are left."""
        freed = 0
        folders: set[Path] = set()
        while freed < free_bytes and self._files:
            rel, size = self._files[0]
            path = self.root / rel
            try:
                path.unlink()
            except FileNotFoundError:
                pass  # already gone (deleted by hand): forget it all the same
            except OSError as e:
                log.warning("frame store cannot delete %s: %s", path, e.strerror or e)
                break
            self._files.popleft()
            self.usage_bytes -= size
            freed += size
            folders.add(path.parent)
            self._evicted.append(f"{self.root.name}/{rel}")
        for folder in folders:
            if folder != self.root:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only succeeds once the day's folder is empty
