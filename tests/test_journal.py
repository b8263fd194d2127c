"""The verdict journal: real SQLite files, reopened, exported, read from other threads."""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.journal import SCHEMA_VERSION, Journal, JournalError, Record

T0 = 1_795_685_400.125  # 2026-11-26 09:30:00.125 UTC


def verdict(i: int, verdict: str = "ok", **changes: Any) -> dict[str, Any]:
    """The fields of the i-th verdict of a test run, as the station would append them."""
    fields: dict[str, Any] = {
        "wall": T0 + i * 0.1,
        "part_id": f"P{i:04d}",
        "verdict": verdict,
        "score": 1.5 if verdict == "ng" else 0.25,
        "threshold": 1.0,
        "area": 0.02 if verdict == "ng" else 0.0,
        "boxes": [{"x": 10, "y": 20, "w": 30, "h": 40, "score": 1.5}] if verdict == "ng" else [],
        "capture_to_decision_ms": 42.5,
        "inference_ms": 30.25,
        "over_budget": False,
        "model_id": "parts-v1",
        "frame_seq": 1000 + i,
    }
    fields.update(changes)
    return fields


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "state" / "journal.db")
    yield j
    j.close()


def test_append_returns_increasing_seq_and_get_reads_it_back(journal: Journal) -> None:
    records = [journal.append(**verdict(i, "ng" if i % 3 == 0 else "ok")) for i in range(10)]
    seqs = [r.seq for r in records]
    assert seqs == sorted(seqs) and len(set(seqs)) == 10
    assert all(not r.published for r in records)
    for r in records:
        assert journal.get(r.seq) == r
    assert journal.get(10_000) is None
    assert records[0].boxes == [{"x": 10, "y": 20, "w": 30, "h": 40, "score": 1.5}]


def test_payload_is_json_with_iso_time_and_no_published(journal: Journal) -> None:
    record = journal.append(**verdict(0, "ng", frame_path="frames/2026-11-24/x.jpg"))
    payload = json.loads(json.dumps(record.payload()))
    assert payload["seq"] == record.seq
    assert payload["time"] == "2026-11-26T09:30:00.125+00:00"
    assert payload["wall"] == T0
    assert payload["verdict"] == "ng"
    assert payload["boxes"] == [{"x": 10, "y": 20, "w": 30, "h": 40, "score": 1.5}]
    assert payload["frame_path"] == "frames/2026-11-24/x.jpg"
    assert payload["overlay_path"] is None
    assert "published" not in payload
    assert set(payload) == {f for f in Record.__dataclass_fields__ if f != "published"} | {"time"}


def test_numpy_numbers_are_stored_as_plain_numbers(journal: Journal) -> None:
    box = {"x": np.int64(3), "y": np.int32(4), "w": 5, "h": 6, "score": np.float32(2.5)}
    record = journal.append(
        **verdict(0, "ng", score=np.float32(2.5), boxes=[box], over_budget=np.bool_(True))
    )
    assert record == journal.get(record.seq)
    assert record.boxes == [{"x": 3, "y": 4, "w": 5, "h": 6, "score": 2.5}]
    assert type(record.score) is float and record.over_budget is True
    json.dumps(record.payload())


def test_bad_verdicts_are_programming_errors(journal: Journal) -> None:
    with pytest.raises(ValueError, match="verdict"):
        journal.append(**verdict(0, "maybe"))
    with pytest.raises(ValueError, match="score"):
        journal.append(**verdict(0, score=float("nan")))
    assert journal.counts()["total"] == 0


def test_everything_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    first = Journal(path)
    written = [first.append(**verdict(i, "ng" if i == 2 else "ok")) for i in range(5)]
    first.mark_published(written[0].seq)
    first.set_paths(written[2].seq, "frames/a.jpg", "frames/a-overlay.jpg")
    first.close()

    again = Journal(path)
    assert again.recent(limit=10)[::-1] == [
        replace(written[0], published=True),
        *written[1:2],
        replace(written[2], frame_path="frames/a.jpg", overlay_path="frames/a-overlay.jpg"),
        *written[3:],
    ]
    later = again.append(**verdict(5))
    assert later.seq > written[-1].seq
    assert again.counts() == {"total": 6, "ng": 1, "unpublished": 5}
    again.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_backlog_is_delivered_in_order_each_once(journal: Journal) -> None:
    seqs = [journal.append(**verdict(i)).seq for i in range(12)]
    # Live verdicts 0-2 went out; then the broker was lost for 3-11.
    for seq in seqs[:3]:
        journal.mark_published(seq)
    live = journal.append(**verdict(12))  # broker back: published live
    journal.mark_published(live.seq)

    delivered: list[int] = []
    while batch := journal.unpublished(limit=4, before=live.seq):
        for record in batch:
            delivered.append(record.seq)
            journal.mark_published(record.seq)
    assert delivered == seqs[3:]
    assert journal.unpublished() == []
    assert journal.counts()["unpublished"] == 0


def test_unpublished_before_leaves_newer_records_out(journal: Journal) -> None:
    seqs = [journal.append(**verdict(i)).seq for i in range(5)]
    assert [r.seq for r in journal.unpublished(before=seqs[3])] == seqs[:3]
    assert [r.seq for r in journal.unpublished(limit=2)] == seqs[:2]


def test_recent_newest_first_with_ng_only_and_paging(journal: Journal) -> None:
    records = [journal.append(**verdict(i, "ng" if i % 2 else "ok")) for i in range(9)]
    assert [r.seq for r in journal.recent(limit=3)] == [r.seq for r in records[::-1][:3]]
    ng = [r.seq for r in records if r.verdict == "ng"][::-1]
    assert [r.seq for r in journal.recent(ng_only=True)] == ng
    page = journal.recent(limit=2, ng_only=True, before_seq=ng[1])
    assert [r.seq for r in page] == ng[2:4]


def test_forget_path_clears_only_records_that_point_to_it(journal: Journal) -> None:
    a = journal.append(**verdict(0, "ng", frame_path="frames/a.jpg", overlay_path="frames/b.jpg"))
    b = journal.append(**verdict(1, "ng"))
    journal.set_paths(b.seq, "frames/c.jpg", "frames/a.jpg")
    journal.forget_path("frames/a.jpg")
    got_a, got_b = journal.get(a.seq), journal.get(b.seq)
    assert got_a is not None and got_b is not None
    assert (got_a.frame_path, got_a.overlay_path) == (None, "frames/b.jpg")
    assert (got_b.frame_path, got_b.overlay_path) == ("frames/c.jpg", None)


def test_export_csv_parses_back(journal: Journal) -> None:
    records = [journal.append(**verdict(i, "ng" if i in (1, 4) else "ok")) for i in range(6)]
    journal.mark_published(records[1].seq)

    out = io.StringIO()
    assert journal.export_csv(out) == 6
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert list(rows[0]) == ["seq", "time", *(f for f in Record.__dataclass_fields__ if f != "seq")]
    assert [int(row["seq"]) for row in rows] == [r.seq for r in records]
    first, ng = rows[0], rows[1]
    assert float(first["wall"]) == records[0].wall
    assert first["part_id"] == "P0000" and first["frame_path"] == ""
    assert json.loads(ng["boxes"]) == records[1].boxes
    assert (ng["published"], first["published"], first["over_budget"]) == ("true", "false", "false")
    assert ng["time"] == records[1].time

    out = io.StringIO()
    assert journal.export_csv(out, since=records[2].wall, ng_only=True) == 1
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [int(row["seq"]) for row in rows] == [records[4].seq]


def test_export_csv_of_more_than_one_batch(journal: Journal) -> None:
    for i in range(2500):
        journal.append(**verdict(i))
    out = io.StringIO()
    assert journal.export_csv(out) == 2500
    seqs = [int(row["seq"]) for row in csv.DictReader(io.StringIO(out.getvalue()))]
    assert seqs == sorted(set(seqs)) and len(seqs) == 2500


def test_a_file_that_is_not_sqlite_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    path.write_bytes(b"this is a text file, not a database\n" * 100)
    with pytest.raises(JournalError, match=re.escape(f"journal {path} is not a SQLite database")):
        Journal(path)


def test_another_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    with pytest.raises(JournalError, match=r"not an edge-inspect journal.*photos"):
        Journal(path)


def test_a_journal_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    Journal(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(JournalError, match="newer than this edge-inspect knows"):
        Journal(path)


def test_a_path_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "journal.db").mkdir()
    with pytest.raises(JournalError, match="cannot be opened"):
        Journal(tmp_path / "journal.db")


# The tests run as root, which ignores file permissions, and there is no tiny filesystem to
# fill here, so the failures are made inside SQLite itself on the journal's own connection:
# max_page_count gives exactly the SQLITE_FULL error that a full disk gives ("database or disk
# is full") and query_only the SQLITE_READONLY of a read-only file.


def test_a_full_disk_raises_journal_error_and_recovers(journal: Journal) -> None:
    journal.append(**verdict(0))
    pages = journal._conn.execute("PRAGMA page_count").fetchone()[0]
    journal._conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(
        JournalError, match=re.escape(f"journal {journal.path} cannot append a record: ") + ".*full"
    ):
        for i in range(1, 500):  # a few fit in the last page; one soon needs a new page
            journal.append(**verdict(i, part_id="x" * 500))
    stored = journal.counts()["total"]

    journal._conn.execute(f"PRAGMA max_page_count = {pages + 1000}")  # space freed
    record = journal.append(**verdict(999))
    assert journal.get(record.seq) == record
    assert journal.counts()["total"] == stored + 1


def test_a_read_only_journal_raises_journal_error(journal: Journal) -> None:
    record = journal.append(**verdict(0))
    journal._conn.execute("PRAGMA query_only = ON")
    with pytest.raises(JournalError, match=r"cannot append a record: .*readonly"):
        journal.append(**verdict(1))
    with pytest.raises(JournalError, match=f"cannot mark record {record.seq} published"):
        journal.mark_published(record.seq)
    assert journal.recent() == [record]  # reading still works


def test_a_closed_journal_raises_journal_error(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    journal.close()
    with pytest.raises(JournalError, match="cannot append a record"):
        journal.append(**verdict(0))


def test_readers_in_other_threads_while_writing(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)
    other = Journal(path)  # a second connection, as the CLI's export would have (WAL)
    errors: list[BaseException] = []
    stop = threading.Event()
    seen: dict[str, list[int]] = {"shared": [], "other": []}

    def read(j: Journal, key: str) -> None:
        try:
            while not stop.is_set():
                seen[key].append(j.counts()["total"])
                newest = j.recent(limit=5)
                assert [r.seq for r in newest] == sorted((r.seq for r in newest), reverse=True)
        except BaseException as e:
            errors.append(e)

    readers = [
        threading.Thread(target=read, args=(journal, "shared")),
        threading.Thread(target=read, args=(other, "other")),
    ]
    for t in readers:
        t.start()
    for i in range(300):
        journal.append(**verdict(i))
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    for counts in seen.values():
        assert counts and counts == sorted(counts)
    assert other.counts()["total"] == 300
    other.close()
    journal.close()


def test_prune_deletes_old_delivered_records_oldest_first_in_batches(journal: Journal) -> None:
    records = [journal.append(**verdict(i)) for i in range(100)]
    for r in records[:60]:
        journal.mark_published(r.seq)
    # Records 0-49 are older than the cut-off; 0-59 are delivered.
    cutoff = T0 + 50 * 0.1 - 0.01
    assert journal.prune(cutoff, keep_last=10**6, batch=20) == (20, 0)
    assert journal.prune(cutoff, keep_last=10**6, batch=20) == (20, 0)
    assert journal.prune(cutoff, keep_last=10**6, batch=20) == (10, 0)
    assert journal.prune(cutoff, keep_last=10**6, batch=20) == (0, 0)
    left = [r.seq for r in journal.recent(limit=1000)]
    assert sorted(left) == [r.seq for r in records[50:]]
    assert journal.backlog() == 40  # age never takes the undelivered ones

    # The count limit is a hard one: the delivered 50-59 go, then the oldest undelivered
    # 60-69, counted as such; without a broker the same happens.
    assert journal.prune(0.0, keep_last=30, batch=15) == (15, 5)
    assert journal.prune(0.0, keep_last=30, batch=15) == (5, 5)
    assert journal.prune(0.0, keep_last=30, batch=15) == (0, 0)
    assert [r.seq for r in journal.recent(limit=1000)][-1] == records[70].seq
    assert journal.backlog() == 30 and journal.counts()["total"] == 30
    assert journal.prune(0.0, keep_last=20, keep_unpublished=False) == (10, 10)
    assert journal.backlog() == 20


def test_prune_by_age_finds_old_records_wherever_they_lie(journal: Journal) -> None:
    """Pruning looked only at the oldest records by number, so a clock set a year ahead and
    put right, or old undelivered records in front, stopped age pruning for good."""
    ahead = [journal.append(**verdict(i, wall=T0 + 400 * 86400 + i)) for i in range(30)]
    stuck = [journal.append(**verdict(i)) for i in range(30)]  # old, undelivered
    old = [journal.append(**verdict(i)) for i in range(50)]
    for r in ahead + old[::2]:
        journal.mark_published(r.seq)  # every other old one delivered
    cutoff = T0 + 100
    assert journal.prune(cutoff, keep_last=10**6, batch=20) == (20, 0)
    assert journal.prune(cutoff, keep_last=10**6, batch=20) == (5, 0)
    assert journal.prune(cutoff, keep_last=10**6, batch=20) == (0, 0)
    left = {r.seq for r in journal.recent(limit=1000)}
    assert left == {r.seq for r in ahead + stuck + old[1::2]}  # the delivered old ones went


def test_one_writer_at_a_time_and_readers_alongside(tmp_path: Path) -> None:
    """Two stations on one state folder published each other's records: the second is refused,
    naming the first; `records` (a reader) still works while a station runs."""
    path = tmp_path / "journal.sqlite"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from edge.journal import Journal; "
            f"j = Journal(Path({str(path)!r}), writer=True); print('open', flush=True); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        with pytest.raises(
            JournalError, match=rf"in use by another station \(process {holder.pid}\)"
        ):
            Journal(path, writer=True)
        assert Journal(path).counts()["total"] == 0
    finally:
        holder.communicate("", timeout=30)  # it ends, and its claim with it
    Journal(path, writer=True).close()
    Journal(path, writer=True).close()  # closing gives the claim back


def test_a_file_system_without_locks_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a lock held elsewhere means another station. An NFS mount without a lock daemon
    (which cannot be made here, so flock is made to fail as it does there) is another fault."""
    import errno
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(JournalError, match=r"cannot be locked: No locks available \(put state_dir"):
        Journal(tmp_path / "journal.sqlite", writer=True)


def test_only_the_station_brings_an_older_journal_up_to_date(tmp_path: Path) -> None:
    """`records` (a reader) migrated the journal of a running older station, which could then
    not open it again after a restart."""
    path = tmp_path / "journal.sqlite"
    first = Journal(path, writer=True)
    first.append(**verdict(0))
    first.close()
    with sqlite3.connect(path) as conn:  # as version 1 left it
        conn.execute("DROP INDEX records_age")
        conn.execute("PRAGMA user_version = 1")
    reader = Journal(path)
    assert reader.counts()["total"] == 1
    reader.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    station = Journal(path, writer=True)
    station.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "records_age" in names
