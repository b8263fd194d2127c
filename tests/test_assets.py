"""Finding the backbone: override, checkout, installed wheel."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import pytest

from edge import assets
from edge.assets import BACKBONE_ENV, backbone_path

REPO = Path(__file__).resolve().parent.parent


def test_a_checkout_uses_its_models_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKBONE_ENV, raising=False)
    assert backbone_path() == REPO / "models" / "backbone-lite0.onnx"


def test_the_backbone_is_the_one_models_readme_describes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKBONE_ENV, raising=False)
    readme = (REPO / "models" / "README.md").read_text()
    recorded = re.search(r"SHA-256[^0-9a-f]*([0-9a-f]{64})", readme)
    assert recorded, "models/README.md must state the backbone's SHA-256"
    assert hashlib.sha256(backbone_path().read_bytes()).hexdigest() == recorded.group(1)


def test_the_environment_variable_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mine = tmp_path / "other.onnx"
    mine.write_bytes(b"onnx")
    monkeypatch.setenv(BACKBONE_ENV, str(mine))
    assert backbone_path() == mine


def test_a_missing_override_is_an_error_not_a_fallback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(BACKBONE_ENV, str(tmp_path / "gone.onnx"))
    with pytest.raises(FileNotFoundError, match=rf"{BACKBONE_ENV}=.*gone\.onnx"):
        backbone_path()


def test_a_wheel_install_finds_it_under_the_prefix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Stand-in for site-packages: the package is not inside a checkout.
    monkeypatch.delenv(BACKBONE_ENV, raising=False)
    monkeypatch.setattr(assets, "CHECKOUT", tmp_path / "site-packages")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    installed = tmp_path / "share" / "edge-inspect" / "models" / "backbone-lite0.onnx"
    installed.parent.mkdir(parents=True)
    installed.write_bytes(b"onnx")
    assert backbone_path() == installed


def test_nowhere_names_the_places_it_looked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(BACKBONE_ENV, raising=False)
    monkeypatch.setattr(assets, "CHECKOUT", tmp_path / "site-packages")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(assets, "DISTRIBUTION", "edge-inspect-not-installed")
    with pytest.raises(FileNotFoundError, match=BACKBONE_ENV) as raised:
        backbone_path()
    assert str(tmp_path / "share" / "edge-inspect" / "models") in str(raised.value)
