"""The synthetic data sets that the demo and the other tests are built on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import make_demo_data
import numpy as np
import pytest

MakeDataset = Callable[..., Path]


@pytest.mark.parametrize("dataset", make_demo_data.KINDS, indirect=True)
def test_dataset_has_the_layout_train_and_evaluate_read(dataset: Path) -> None:
    counts = {"train/normal": 20, "train/anomaly": 6, "test/normal": 8, "test/anomaly": 8}
    for split, count in counts.items():
        files = sorted((dataset / split).glob("*.png"))
        assert len(files) == count, split
        image = cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED)
        assert image.shape == (120, 160, 3)
        assert image.dtype == np.uint8


def test_anomalies_are_named_after_their_defect(dataset: Path) -> None:
    names = {p.stem.split("_")[0] for p in (dataset / "test" / "anomaly").glob("*.png")}
    assert names == set(make_demo_data.DEFECTS["part"])
    assert {p.stem.split("_")[0] for p in (dataset / "test" / "normal").glob("*.png")} == {"good"}


def test_same_seed_same_images_other_seed_other_images(make_dataset: MakeDataset) -> None:
    counts = {"train/normal": 2, "test/anomaly": 1}
    a = make_dataset(counts=counts, seed=1)
    b = make_dataset(counts=counts, seed=1, kind="part", width=160, height=120)
    c = make_dataset(counts=counts, seed=2)
    assert a != b  # two folders, drawn twice
    for name in ("train/normal/good_000.png", "test/anomaly/scratch_000.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    # Good parts vary from one to the next, as photographs do.
    good = sorted((a / "train/normal").glob("*.png"))
    assert good[0].read_bytes() != good[1].read_bytes()


@pytest.mark.parametrize(
    ("kind", "defect"),
    [(kind, defect) for kind, defects in make_demo_data.DEFECTS.items() for defect in defects],
)
def test_a_defect_changes_only_the_pixels_its_mask_covers(kind: str, defect: str) -> None:
    good, good_mask = make_demo_data.draw(kind, np.random.default_rng(7), 160, 120)
    bad, mask = make_demo_data.draw(kind, np.random.default_rng(7), 160, 120, defect)
    assert not good_mask.any()
    assert 10 < np.count_nonzero(mask) < 0.1 * mask.size
    change = np.abs(bad.astype(np.int16) - good.astype(np.int16)).max(axis=2)
    assert change[mask > 0].mean() > 40
    # Away from the defect (past the lens blur) the two photographs are identical.
    near = cv2.dilate(mask, np.ones((9, 9), np.uint8)) > 0
    assert not change[~near].any()


def test_session_textures_have_no_labelled_defects_for_training(textures: Path) -> None:
    assert not (textures / "train" / "anomaly").exists()
    assert len(list((textures / "train" / "normal").glob("*.png"))) == 20
    assert len(list((textures / "test" / "anomaly").glob("*.png"))) == 8


def test_refuses_to_write_into_a_folder_with_files(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        make_demo_data.write_dataset(tmp_path, counts={"train/normal": 1})
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_script_writes_the_demo_layout(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert (
        make_demo_data.main([str(out), "--kind", "texture", "--width", "64", "--height", "48"]) == 0
    )
    assert {str(p.relative_to(out)) for p in out.glob("*/*")} == set(make_demo_data.SPLITS)
    assert len(list(out.glob("*/*/*.png"))) == sum(make_demo_data.DEMO_COUNTS.values())
