"""Files written whole or not at all: the model, the report and the results people read."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def open_atomically(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file to write (text, or bytes with mode "wb") that appears at `path` only when the
    block ends without an error.

    Readers see the old file or the new one, never half of one; a failure (or Ctrl-C) leaves
    no temporary file behind. Errors name `path`, not the temporary file. The file is made
    readable by others (0644): a model trained by one user is run by the station's own.

    >>> with open_atomically(Path("out/records.csv")) as f:  # doctest: +SKIP
    ...     f.write("seq,verdict\\n")
    """
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise OSError(errno.EEXIST, f"it is {kind}", str(path))
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write data to path whole or not at all (see open_atomically).

    >>> write_atomically(Path("out/report.html"), "<html>...")  # doctest: +SKIP
    """
    with open_atomically(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A folder to write a set of outputs into; they replace those of the same names in `out`
    only when the block ends without an error, so a failed or interrupted run leaves `out` as
    it was. Other files in `out` are left alone.

    >>> with staged_folder(Path("evaluation")) as stage:  # doctest: +SKIP
    ...     (stage / "report.html").write_text("...")
    """
    if out.exists() and not out.is_dir():
        raise OSError(errno.ENOTDIR, "it is not a folder", str(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(out)) from exc
    try:
        yield stage
        old = Path(tempfile.mkdtemp(prefix=".old-", dir=stage))
        # Folders (the overlays) first, then the files that point into them.
        for entry in sorted(stage.iterdir(), key=lambda p: (p.is_file(), p.name)):
            if entry == old:
                continue
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                target.rename(old / entry.name)  # a folder cannot be replaced in one step
            os.replace(entry, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
