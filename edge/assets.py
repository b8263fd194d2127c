"""Where the files that ship with edge-inspect (the ONNX backbone) are on this machine."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

BACKBONE_ENV = "EDGE_INSPECT_BACKBONE"
BACKBONE_NAME = "backbone-lite0.onnx"
DISTRIBUTION = "edge-inspect"
# The repository root when the package is used from a checkout (editable install, or tests).
CHECKOUT = Path(__file__).resolve().parent.parent


def backbone_path() -> Path:
    """Return the path of the backbone ONNX file, or raise FileNotFoundError naming where it looked.

    Looked for, in order: the file named by $EDGE_INSPECT_BACKBONE (an error if that file is
    missing, never a silent fallback), `models/` of the checkout this package runs from, and
    `share/edge-inspect/models/` under sys.prefix, where a wheel installed into a venv puts it.
    As a last resort the installed distribution's file list is asked, which covers `--user`
    and Debian's /usr/local installs.

        >>> backbone_path().name
        'backbone-lite0.onnx'
    """
    override = os.environ.get(BACKBONE_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{BACKBONE_ENV}={override} does not name a file")
        return path

    candidates = [
        CHECKOUT / "models" / BACKBONE_NAME,
        Path(sys.prefix) / "share" / "edge-inspect" / "models" / BACKBONE_NAME,
    ]
    for path in candidates:
        if path.is_file():
            return path
    installed = _installed_backbone()
    if installed is not None:
        return installed
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"{BACKBONE_NAME} not found in {looked} or in the {DISTRIBUTION} installation; "
        f"reinstall edge-inspect or set {BACKBONE_ENV}"
    )


def _installed_backbone() -> Path | None:
    try:
        files = importlib.metadata.distribution(DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == BACKBONE_NAME:
            path = Path(str(file.locate()))
            if path.is_file():
                return path.resolve()
    return None
