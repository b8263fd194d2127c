"""A broker outage: the station keeps inspecting and loses no record; nothing live arrives late."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from conftest import Broker, Subscriber, write_config

from edge.config import load_config
from edge.journal import Journal
from edge.station import Station

OUTAGE_S = 30
EXPIRY_S = 10


def test_broker_outage_loses_nothing_and_delivers_the_backlog_once_in_order(
    tmp_path: Path, parts_model: Path, parts: Path
) -> None:
    replay = tmp_path / "replay"
    replay.mkdir()
    for i, p in enumerate(sorted((parts / "test").glob("*/*.png"))):
        shutil.copy(p, replay / f"{i:03d}.png")
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker", persistent=True)
    broker.start()
    # The controller keeps a persistent session, so the broker queues for it across restarts.
    sub = Subscriber(broker, "out/#", session="line-controller")
    config = write_config(
        tmp_path,
        parts_model,
        replay,
        broker,
        "out",
        source={"fps": 10},
        mqtt={"verdict_expiry_s": EXPIRY_S, "reconnect_min_s": 0.5, "reconnect_max_s": 2},
    )
    station = Station(load_config(config))
    thread = threading.Thread(target=station.run, daemon=True)
    thread.start()
    try:
        sub.wait_for("verdict", lambda m: len(sub.on("verdict")) >= 10)
        broker.stop()
        down = time.time()
        time.sleep(OUTAGE_S)
        assert thread.is_alive(), "the station must keep running without a broker"
        during = station.stats.verdicts
        broker.start()
        up = time.time()
        sub.wait_for("status", lambda m: m.payload == b"online" and m.received > up)
        # Keep inspecting live for a while after the broker is back, then stop cleanly.
        sub.wait_for("verdict", lambda m: m.received > up + 3, timeout=30)
        deadline = time.monotonic() + 30
        while station.journal.counts()["unpublished"] and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        station.stop()
        thread.join(15)
        sub.wait_for("status", lambda m: m.payload == b"offline", timeout=10)
        sub.close()
        broker.stop()

    assert during > OUTAGE_S * 10 * 0.5, "inspection went on during the outage"
    journal = Journal(tmp_path / "state" / "journal.sqlite")
    records = journal.recent(limit=100_000)
    assert journal.counts()["unpublished"] == 0
    live = [m.json() for m in sub.on("verdict")]
    backlog = [m.json() for m in sub.on("backlog")]
    made_offline = {r.seq for r in records if down <= r.wall <= up}
    assert made_offline, "records were made while the broker was away"
    assert made_offline <= {b["seq"] for b in backlog}, "every record of the outage is on backlog"
    # Once: live and backlog together hold every record, none twice; backlog is in order.
    seqs = [v["seq"] for v in live] + [b["seq"] for b in backlog]
    assert sorted(seqs) == sorted(r.seq for r in records)
    assert len(seqs) == len(set(seqs))
    assert [b["seq"] for b in backlog] == sorted(b["seq"] for b in backlog)
    # Nothing arrived late on the live topic: every live verdict was received within its expiry.
    late = [m for m in sub.on("verdict") if m.received - m.json()["wall"] > EXPIRY_S]
    assert late == []
    assert all(not (down <= v["wall"] <= up) for v in live)
