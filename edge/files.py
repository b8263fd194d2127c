"""Files written whole or not at all: the model, the report and the results people read."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write data to path through a temporary file in the same folder, then rename it.

    Readers see the old file or the new one, never half of one; a failure leaves no temporary
    file behind. The file is made readable by others (0644): a model trained by one user is
    run by the station's own.

    >>> write_atomically(Path("out/report.html"), "<html>...")  # doctest: +SKIP
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
