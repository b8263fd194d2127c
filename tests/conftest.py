"""Shared fixtures: small synthetic image data sets drawn by scripts/make_demo_data.py.

All are 160x120 BGR PNGs in train/normal (20 images), train/anomaly (6), test/normal (8) and
test/anomaly (8), except `textures`, which has no train/anomaly: it covers training without
labelled defects. `parts` and `textures` are drawn once per session and shared: read them,
never write into them. `dataset` is a test's own data set (metal parts unless parametrized
indirectly with "texture"); `make_dataset` draws any other variant.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from pathlib import Path

import make_demo_data  # from scripts/, put on sys.path by pytest's `pythonpath` setting
import pytest

TEST_COUNTS: dict[str, int] = {
    "train/normal": 20,
    "train/anomaly": 6,
    "test/normal": 8,
    "test/anomaly": 8,
}
TEST_SIZE = (160, 120)  # width, height: small so that tests stay fast

MakeDataset = Callable[..., Path]


@pytest.fixture(scope="session")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Metal parts, shared by the whole session (so that session fixtures can train on it)."""
    out = tmp_path_factory.mktemp("parts") / "data"
    return make_demo_data.write_dataset(out, "part", TEST_COUNTS, *TEST_SIZE)


@pytest.fixture(scope="session")
def textures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Woven texture with scratches, shared by the whole session; no train/anomaly folder."""
    out = tmp_path_factory.mktemp("textures") / "data"
    counts = {**TEST_COUNTS, "train/anomaly": 0}
    return make_demo_data.write_dataset(out, "texture", counts, *TEST_SIZE)


@pytest.fixture(scope="session")
def parts_model(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained once on `parts` with the default options; read it, never write it."""
    from edge.train import train

    out = tmp_path_factory.mktemp("models") / "parts.onnx"
    train(parts / "train", out)
    return out


@pytest.fixture
def make_dataset(tmp_path: Path) -> MakeDataset:
    """Return a function that writes a new data set under this test's tmp_path and returns its root.

    Arguments are those of make_demo_data.write_dataset, with test-sized defaults.
    """
    number = itertools.count()

    def make(
        kind: str = "part",
        counts: Mapping[str, int] = TEST_COUNTS,
        width: int = TEST_SIZE[0],
        height: int = TEST_SIZE[1],
        seed: int = 0,
    ) -> Path:
        out = tmp_path / f"{kind}-{next(number)}"
        return make_demo_data.write_dataset(out, kind, counts, width, height, seed)

    return make


@pytest.fixture
def dataset(request: pytest.FixtureRequest, make_dataset: MakeDataset) -> Path:
    """This test's own data set: metal parts, or the woven texture when parametrized so.

    @pytest.mark.parametrize("dataset", ["part", "texture"], indirect=True)
    """
    return make_dataset(getattr(request, "param", "part"))
