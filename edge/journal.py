"""The verdict journal: every verdict goes into a local SQLite file before it is published."""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

# One tuple of statements per schema version; a journal at user_version N gets the rest applied.
# Partial indexes keep the backlog, NG list and forget_path cheap without slowing appends much;
# queries must spell `published = 0` and `verdict = 'ng'` literally for SQLite to use them.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE records (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            wall REAL NOT NULL,
            part_id TEXT,
            verdict TEXT NOT NULL CHECK (verdict IN ('ok', 'ng')),
            score REAL NOT NULL,
            threshold REAL NOT NULL,
            area REAL NOT NULL,
            boxes TEXT NOT NULL,
            capture_to_decision_ms REAL NOT NULL,
            inference_ms REAL NOT NULL,
            over_budget INTEGER NOT NULL,
            model_id TEXT NOT NULL,
            frame_seq INTEGER NOT NULL,
            frame_path TEXT,
            overlay_path TEXT,
            published INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX records_unpublished ON records (seq) WHERE published = 0",
        "CREATE INDEX records_ng ON records (seq) WHERE verdict = 'ng'",
        "CREATE INDEX records_frame ON records (frame_path) WHERE frame_path IS NOT NULL",
        "CREATE INDEX records_overlay ON records (overlay_path) WHERE overlay_path IS NOT NULL",
    ),
    # Pruning by age finds the old records through this, wherever they lie in seq order (a
    # clock set a year ahead and put right), and the delivered ones without passing over the
    # undelivered (a broker gone for months).
    ("CREATE INDEX records_age ON records (published, wall)",),
)
SCHEMA_VERSION = len(_MIGRATIONS)
BUSY_TIMEOUT_S = 5.0
_EXPORT_BATCH = 1000  # rows read per lock hold, so an export never stalls the inspection loop


class JournalError(RuntimeError):
    """The journal cannot be opened, read or written; the message names the file and the reason.

    `disk_full` says the disk (or the file's size limit) ran out, which freeing space mends.
    """

    def __init__(self, message: str, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


@dataclass(frozen=True)
class Record:
    """One verdict as the journal holds it; `seq` is the journal's own, strictly increasing id."""

    seq: int
    wall: float
    part_id: str | None
    verdict: str
    score: float
    threshold: float
    area: float
    boxes: list[dict[str, float | int]]
    capture_to_decision_ms: float
    inference_ms: float
    over_budget: bool
    model_id: str
    frame_seq: int
    frame_path: str | None
    overlay_path: str | None
    published: bool

    @property
    def time(self) -> str:
        """Capture time as ISO 8601 UTC with milliseconds: "2026-11-26T09:30:00.125+00:00"."""
        return datetime.fromtimestamp(self.wall, tz=timezone.utc).isoformat(timespec="milliseconds")

    def payload(self) -> dict[str, object]:
        """The JSON-able dict an MQTT verdict carries: every field but `published`, plus `time`.

        Example: `json.dumps(record.payload())` -> `{"seq": 7, "time": "2026-...", ...}`.
        """
        out: dict[str, object] = {"seq": self.seq, "time": self.time}
        for name in _COLUMNS:
            if name not in ("seq", "published"):
                out[name] = getattr(self, name)
        out["boxes"] = [dict(box) for box in self.boxes]  # a copy: the record stays as stored
        return out


_COLUMNS = tuple(f.name for f in fields(Record))
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM records"
_FLOAT_FIELDS = ("wall", "score", "threshold", "area", "capture_to_decision_ms", "inference_ms")


def _claim(lock: Path, journal: Path) -> int:
    """Hold an exclusive flock on `lock` (released when the process ends, however it ends);
    raise JournalError naming the process that holds it already."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise JournalError(f"journal {journal} cannot be locked: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise JournalError(
            f"journal {journal} is in use by another station (process {holder}); "
            "each station needs a state_dir of its own"
        ) from None
    except OSError as e:
        os.close(fd)
        raise JournalError(
            f"journal {journal} cannot be locked: {e.strerror or e} "
            "(put state_dir on a local file system)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Journal:
    """The SQLite journal of verdicts at `path`, safe to share between threads.

    Example:
        journal = Journal(state_dir / "journal.db")
        record = journal.append(wall=time.time(), verdict="ng", score=1.7, ...)
        publish(record.payload()); journal.mark_published(record.seq)
    """

    def __init__(self, path: Path, writer: bool = False) -> None:
        """writer=True: this process is the station that writes it, and no other may be, while
        it is open (two stations on one journal publish each other's records)."""
        self.path = path
        self._lock = threading.Lock()
        self._writer_lock: int | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise JournalError(f"journal {path} cannot be created: {e.strerror or e}") from None
        if writer:
            self._writer_lock = _claim(path.with_name(path.name + ".lock"), path)
        try:
            # Autocommit (isolation_level=None): one INSERT is one short transaction. WAL lets
            # another process (the CLI's export) read while the station writes; NORMAL sync
            # survives a crashed process, and only fsyncs at checkpoints, which keeps writes cheap.
            self._conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            self._release()
            raise JournalError(f"journal {path} cannot be opened: {e}") from None
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                log.warning("journal %s runs in %s mode: this filesystem has no WAL", path, mode)
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate(upgrade=writer)
        except sqlite3.DatabaseError as e:
            self._conn.close()
            self._release()
            if "not a database" in str(e):
                raise JournalError(
                    f"journal {path} is not a SQLite database; move it aside to start a new one"
                ) from None
            raise JournalError(f"journal {path} cannot be opened: {e}") from None
        except JournalError:
            self._conn.close()
            self._release()
            raise

    def _migrate(self, upgrade: bool) -> None:
        """Create the tables in a new file; bring an older journal up to date only for the
        station that writes it (`records` reading the journal of an older station that is
        still running must not leave it a format it cannot open after a restart)."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(
                    f"journal {self.path} has schema version {version}, newer than this "
                    f"edge-inspect knows ({SCHEMA_VERSION}); upgrade edge-inspect"
                )
            if version == 0:
                tables = [
                    row[0]
                    for row in conn.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table' "
                        "AND name NOT LIKE 'sqlite_%' ORDER BY name"
                    )
                ]
                if tables:
                    raise JournalError(
                        f"journal {self.path} is a SQLite database but not an edge-inspect "
                        f"journal (it has tables {', '.join(tables)})"
                    )
            if version and not upgrade:  # older versions only lack indexes readers need not
                conn.execute("COMMIT")
                return
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _guard(self, action: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock and turn any sqlite3 error into a JournalError naming file and action."""
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as e:
                # SQLITE_FULL (13); Python 3.10 has no error code, only the message
                full = getattr(e, "sqlite_errorcode", 13) == 13 and "is full" in str(e)
                raise JournalError(f"journal {self.path} cannot {action}: {e}", full) from None

    def append(
        self,
        *,
        wall: float,
        verdict: str,
        score: float,
        threshold: float,
        area: float,
        boxes: list[dict[str, float | int]],
        capture_to_decision_ms: float,
        inference_ms: float,
        over_budget: bool,
        model_id: str,
        frame_seq: int,
        part_id: str | None = None,
        frame_path: str | None = None,
        overlay_path: str | None = None,
    ) -> Record:
        """Store one verdict and return it as a Record with its new `seq`.

        Raises ValueError for a verdict other than "ok"/"ng" or a non-finite number (a bug
        upstream), JournalError when the file cannot be written (disk full, read-only).
        """
        if verdict not in ("ok", "ng"):
            raise ValueError(f"verdict must be 'ok' or 'ng', got {verdict!r}")
        numbers = {
            name: float(value)
            for name, value in zip(
                _FLOAT_FIELDS,
                (wall, score, threshold, area, capture_to_decision_ms, inference_ms),
                strict=True,
            )
        }
        for name, value in numbers.items():
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        # A JSON round trip gives plain ints and floats (numpy scalars via .item()), so the
        # Record returned here equals the one read back later.
        boxes_json = json.dumps(boxes, default=_plain, allow_nan=False)
        record = Record(
            seq=0,
            part_id=part_id,
            verdict=verdict,
            boxes=json.loads(boxes_json),
            over_budget=bool(over_budget),
            model_id=model_id,
            frame_seq=int(frame_seq),
            frame_path=frame_path,
            overlay_path=overlay_path,
            published=False,
            **numbers,
        )
        values = [getattr(record, name) for name in _COLUMNS[1:]]
        values[_COLUMNS.index("boxes") - 1] = boxes_json
        with self._guard("append a record") as conn:
            cursor = conn.execute(
                f"INSERT INTO records ({', '.join(_COLUMNS[1:])}) "
                f"VALUES ({', '.join('?' * (len(_COLUMNS) - 1))})",
                values,
            )
            seq = cursor.lastrowid
        assert seq is not None
        return replace(record, seq=seq)

    def mark_published(self, seq: int) -> None:
        """Note that record `seq` reached the broker; an unknown seq is ignored."""
        with self._guard(f"mark record {seq} published") as conn:
            conn.execute("UPDATE records SET published = 1 WHERE seq = ?", (seq,))

    def unpublished(self, limit: int = 500, before: int | None = None) -> list[Record]:
        """Records not yet delivered, oldest first, at most `limit`, only seq < `before` if given.

        Example, draining the backlog after an outage:
            while batch := journal.unpublished(before=first_live_seq): publish each, mark each
        """
        where = "published = 0" + (" AND seq < ?" if before is not None else "")
        params: list[object] = [] if before is None else [before]
        return self._select(where, params, "seq", limit, "read the backlog")

    def recent(
        self, limit: int = 100, ng_only: bool = False, before_seq: int | None = None
    ) -> list[Record]:
        """The newest records first, for the page; `before_seq` (the last seq seen) pages on."""
        terms = ["verdict = 'ng'"] if ng_only else []
        params: list[object] = []
        if before_seq is not None:
            terms.append("seq < ?")
            params.append(before_seq)
        return self._select(" AND ".join(terms), params, "seq DESC", limit, "read recent records")

    def get(self, seq: int) -> Record | None:
        """The record with this seq, or None."""
        found = self._select("seq = ?", [seq], "seq", 1, f"read record {seq}")
        return found[0] if found else None

    def set_paths(self, seq: int, frame_path: str | None, overlay_path: str | None) -> None:
        """Record where the frame and overlay of record `seq` were saved (relative to state dir)."""
        with self._guard(f"set the paths of record {seq}") as conn:
            conn.execute(
                "UPDATE records SET frame_path = ?, overlay_path = ? WHERE seq = ?",
                (frame_path, overlay_path, seq),
            )

    def forget_path(self, path: str) -> None:
        """The frame store deleted `path`: clear it from every record that points to it."""
        with self._guard(f"forget {path}") as conn:
            conn.execute("UPDATE records SET frame_path = NULL WHERE frame_path = ?", (path,))
            conn.execute("UPDATE records SET overlay_path = NULL WHERE overlay_path = ?", (path,))

    def counts(self) -> dict[str, int]:
        """How many records in all, how many NG and how many not yet published."""
        with self._guard("count records") as conn:
            total, ng, unpublished = conn.execute(
                "SELECT (SELECT count(*) FROM records),"
                " (SELECT count(*) FROM records WHERE verdict = 'ng'),"
                " (SELECT count(*) FROM records WHERE published = 0)"
            ).fetchone()
        return {"total": total, "ng": ng, "unpublished": unpublished}

    def backlog(self) -> int:
        """How many records are not yet published (cheap: a partial index holds just those)."""
        with self._guard("count the backlog") as conn:
            n: int = conn.execute("SELECT count(*) FROM records WHERE published = 0").fetchone()[0]
        return n

    def prune(
        self, before_wall: float, keep_last: int, keep_unpublished: bool = True, batch: int = 2000
    ) -> tuple[int, int]:
        """Delete the oldest records captured before `before_wall`, and any beyond the newest
        `keep_last`, at most `batch` of them (short lock, called often). Return how many went
        and how many of those had not been published.

        While `keep_unpublished`, age alone never takes a record not yet published (the
        backlog); the count limit does, so that a broker gone for weeks cannot fill the disk.
        Example, once a minute: `journal.prune(time.time() - 30 * 86400, keep_last=2_000_000)`.
        """
        # Each search walks an index and stops after `batch` rows, and the rows found are
        # deleted by number: a search of the whole table took 150 ms at 2 million records, and
        # so did letting SQLite match the found rows against a million undelivered ones.
        by_count = "SELECT seq, published FROM records WHERE seq <= ? ORDER BY seq LIMIT ?"
        by_age = (
            "SELECT seq, published FROM records WHERE published = {} AND wall < ? "
            "ORDER BY wall LIMIT ?"
        )
        gone = unpublished = 0
        with self._guard("delete old records") as conn:
            newest = conn.execute("SELECT max(seq) FROM records").fetchone()[0] or 0
            searches = [(by_count, newest - keep_last), (by_age.format(1), before_wall)]
            if not keep_unpublished:
                searches.append((by_age.format(0), before_wall))
            for search, limit in searches:
                if gone >= batch:
                    break
                rows = conn.execute(search, (limit, batch - gone)).fetchall()
                for i in range(0, len(rows), 500):  # one statement per 500: one a row is slow
                    part = [r[0] for r in rows[i : i + 500]]
                    marks = ",".join("?" * len(part))
                    conn.execute(f"DELETE FROM records WHERE seq IN ({marks})", part)
                gone += len(rows)
                unpublished += sum(not r[1] for r in rows)
        return gone, unpublished

    def export_csv(self, out: IO[str], since: float | None = None, ng_only: bool = False) -> int:
        """Write a header and one row per record, oldest first, and return the number of rows.

        `since` keeps records captured at or after that time.time(). Columns are the Record's
        fields with `time` (ISO 8601 UTC) after `seq`; boxes are JSON, booleans true/false.
        Example: `with open("x.csv", "w", newline="") as f: journal.export_csv(f, ng_only=True)`.
        """
        writer = csv.writer(out)
        writer.writerow(["seq", "time", *_COLUMNS[1:]])
        terms = ["seq > ?"]
        if since is not None:
            terms.append("wall >= ?")
        if ng_only:
            terms.append("verdict = 'ng'")
        rows, last = 0, 0
        # Batches keyed on seq, each under the lock only while it is read, so that a long export
        # from the page's thread does not hold up appends.
        while batch := self._select(
            " AND ".join(terms),
            [last] if since is None else [last, since],
            "seq",
            _EXPORT_BATCH,
            "export records",
        ):
            for r in batch:
                cells = [getattr(r, name) for name in _COLUMNS]
                cells[_COLUMNS.index("boxes")] = json.dumps(r.boxes)
                writer.writerow([r.seq, r.time, *(_csv_cell(c) for c in cells[1:])])
            rows += len(batch)
            last = batch[-1].seq
        return rows

    def close(self) -> None:
        """Close the file; later calls raise JournalError."""
        with self._lock:
            self._conn.close()
            self._release()

    def _release(self) -> None:
        if self._writer_lock is not None:
            os.close(self._writer_lock)  # closing the descriptor ends its flock
            self._writer_lock = None

    def _select(
        self, where: str, params: list[object], order: str, limit: int, action: str
    ) -> list[Record]:
        sql = f"{_SELECT}{' WHERE ' + where if where else ''} ORDER BY {order} LIMIT ?"
        with self._guard(action) as conn:
            rows = conn.execute(sql, [*params, limit]).fetchall()
        return [_record(row) for row in rows]


def _record(row: tuple[object, ...]) -> Record:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["boxes"] = json.loads(str(values["boxes"]))
    values["over_budget"] = bool(values["over_budget"])
    values["published"] = bool(values["published"])
    return Record(**values)  # type: ignore[arg-type]


def _plain(value: object) -> object:
    """json.dumps fallback: numpy scalars (anything with .item()) become Python numbers."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"box value {value!r} of type {type(value).__name__} is not a number")


def _csv_cell(value: object) -> object:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value
