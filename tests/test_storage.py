"""Saved frames: JPEGs on disk within a quota, oldest out first, never an exception for the disk."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.storage import FrameStore

WALL = 1_795_685_400.0  # 2026-11-26 09:30 UTC
DAY = "2026-11-26"


def frame(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Noise, so that every JPEG is a few kilobytes and no two are alike."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def files_on_disk(root: Path) -> dict[str, int]:
    """Every file under root, relative to root's parent (as the store names them), with its size."""
    return {
        p.relative_to(root.parent).as_posix(): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file()
    }


def test_save_writes_jpegs_in_the_folder_of_the_day(tmp_path: Path) -> None:
    store = FrameStore(tmp_path / "frames", quota_bytes=10_000_000)
    image, overlay = frame(1), frame(2, height=60)
    paths = store.save("00000001-ng", image, overlay, wall=WALL)
    assert paths == (f"frames/{DAY}/00000001-ng.jpg", f"frames/{DAY}/00000001-ng-overlay.jpg")
    for path, picture in zip(paths, (image, overlay), strict=True):
        assert path is not None
        jpeg = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
        np.testing.assert_array_equal(cv2.imread(str(tmp_path / path)), cv2.imdecode(jpeg, 1))
    assert store.usage_bytes == sum(files_on_disk(tmp_path / "frames").values())
    assert store.last_error is None and store.evicted() == []


def test_save_without_overlay_and_today_by_default(tmp_path: Path) -> None:
    store = FrameStore(tmp_path / "frames", quota_bytes=10_000_000)
    frame_path, overlay_path = store.save("00000002-ok", frame(1), None)
    assert frame_path == f"frames/{time.strftime('%Y-%m-%d', time.gmtime())}/00000002-ok.jpg"
    assert overlay_path is None
    assert list(files_on_disk(tmp_path / "frames")) == [frame_path]


def test_a_taken_name_keeps_the_older_file(tmp_path: Path) -> None:
    store = FrameStore(tmp_path / "frames", quota_bytes=10_000_000)
    first = store.save("00000007-ng", frame(1), frame(2), wall=WALL)
    second = store.save("00000007-ng", frame(3), frame(4), wall=WALL)
    assert second == (f"frames/{DAY}/00000007-ng-2.jpg", f"frames/{DAY}/00000007-ng-2-overlay.jpg")
    assert set(files_on_disk(tmp_path / "frames")) == {*first, *second}


def test_quota_holds_and_the_oldest_go_first(tmp_path: Path) -> None:
    root = tmp_path / "frames"
    size = len(cv2.imencode(".jpg", frame(0), [cv2.IMWRITE_JPEG_QUALITY, 90])[1])
    quota = 10 * size  # room for about five frames with their overlays
    store = FrameStore(root, quota_bytes=quota)
    saved: list[str] = []
    evicted: list[str] = []
    for i in range(30):
        paths = store.save(f"{i:08d}-ng", frame(2 * i), frame(2 * i + 1), wall=WALL)
        assert None not in paths
        saved.extend(p for p in paths if p is not None)
        evicted.extend(store.evicted())
        on_disk = files_on_disk(root)
        assert sum(on_disk.values()) == store.usage_bytes <= quota

    on_disk = files_on_disk(root)
    assert evicted == saved[: len(evicted)]  # oldest first, in save order, each once
    assert sorted(on_disk) == sorted(saved[len(evicted) :])  # the rest, the newest, are there
    assert len(on_disk) >= 8
    assert store.evicted() == []


def test_empty_day_folders_go_with_their_last_file(tmp_path: Path) -> None:
    root = tmp_path / "frames"
    store = FrameStore(root, quota_bytes=10_000_000)
    old = store.save("00000001-ng", frame(1), None, wall=WALL - 86_400)
    store.quota_bytes = store.usage_bytes * 3 // 2  # the next frame fits once the old one goes
    new = store.save("00000002-ng", frame(2), None, wall=WALL)
    assert store.evicted() == [old[0]]
    assert [p.name for p in root.iterdir()] == [DAY]
    assert list(files_on_disk(root)) == [new[0]]


def test_a_frame_bigger_than_the_quota_is_refused_and_nothing_deleted(tmp_path: Path) -> None:
    store = FrameStore(tmp_path / "frames", quota_bytes=10_000_000)
    kept = store.save("small", frame(1, 16, 16), None, wall=WALL)
    store.quota_bytes = store.usage_bytes + 100
    assert store.save("big", frame(2, 480, 640), None, wall=WALL) == (None, None)
    assert store.last_error is not None and "more than the whole quota" in store.last_error
    assert list(files_on_disk(tmp_path / "frames")) == [kept[0]]
    assert store.evicted() == []


def test_a_restart_knows_the_usage_and_the_order(tmp_path: Path) -> None:
    root = tmp_path / "frames"
    store = FrameStore(root, quota_bytes=10_000_000)
    saved = [store.save(f"{i:08d}-ng", frame(i), None, wall=WALL)[0] for i in range(6)]
    # Timestamps are coarse (many files share one); set them so the order is certain.
    for n, path in enumerate(saved):
        assert path is not None
        os.utime(tmp_path / path, ns=(10**18 + n, 10**18 + n))
    (root / DAY / ".00000006-ng.jpg.tmp").write_bytes(b"half a jpeg")  # a save cut short
    (root / "notes.txt").write_text("not ours to count or delete")

    again = FrameStore(root, quota_bytes=store.usage_bytes)
    assert again.usage_bytes == store.usage_bytes
    assert not (root / DAY / ".00000006-ng.jpg.tmp").exists()
    again.save("00000006-ng", frame(6), None, wall=WALL)
    gone = again.evicted()
    assert gone and gone == saved[: len(gone)]
    assert (root / "notes.txt").exists()
    assert again.usage_bytes <= again.quota_bytes


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_disk_error_returns_none_and_leaves_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    root = tmp_path / "frames"
    store = FrameStore(root, quota_bytes=10_000_000)
    old = store.save("00000001-ng", frame(1), frame(2), wall=WALL)
    usage = store.usage_bytes
    calls: list[str] = []
    real_replace = os.replace

    def failing_replace(src: str | Path, dst: str | Path) -> None:
        calls.append(str(dst))
        if "overlay" in str(dst):  # the image lands, its overlay never does: all or nothing
            raise OSError(code, os.strerror(code), str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    assert store.save("00000002-ng", frame(3), frame(4), wall=WALL) == (None, None)
    assert store.last_error is not None
    assert "00000002-ng" in store.last_error and os.strerror(code) in store.last_error
    on_disk = files_on_disk(root)
    assert not [p for p in on_disk if p.endswith(".tmp") or "00000002" in p]
    assert store.usage_bytes == sum(on_disk.values())
    if code == errno.ENOSPC:  # a full disk: the oldest files were deleted to make room, in vain
        assert store.evicted() == list(old) and on_disk == {}
    else:  # deleting frames does not cure a read-only disk or a refused permission
        assert store.evicted() == [] and store.usage_bytes == usage

    monkeypatch.setattr(os, "replace", real_replace)
    assert None not in store.save("00000003-ng", frame(5), frame(6), wall=WALL)
    assert store.last_error is None


def test_a_disk_that_recovers_on_the_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FrameStore(tmp_path / "frames", quota_bytes=10_000_000)
    old = store.save("00000001-ok", frame(1), None, wall=WALL)
    real_replace = os.replace
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def full_once(src: str | Path, dst: str | Path) -> None:
        if failures:
            raise failures.pop()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_once)
    paths = store.save("00000002-ng", frame(2), frame(3), wall=WALL)
    assert None not in paths and store.last_error is None
    assert store.evicted() == [old[0]]
    assert sorted(files_on_disk(tmp_path / "frames")) == sorted(p for p in paths if p)


def test_bad_pictures_and_names_are_programming_errors(tmp_path: Path) -> None:
    store = FrameStore(tmp_path / "frames", quota_bytes=10_000_000)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        store.save("x", frame(1).astype(np.float32), None)
    with pytest.raises(ValueError, match="overlay must be uint8 HxWx3"):
        store.save("x", frame(1), frame(1)[:, :, 0])
    for name in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="plain file name"):
            store.save(name, frame(1), None)
