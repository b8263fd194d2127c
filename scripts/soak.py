"""Soak: run the whole station for minutes through broker restarts and check nothing is lost.

    python scripts/soak.py                      # 10 minutes at 20 frames/s, broker restarted twice
    python scripts/soak.py --minutes 2 --restarts 1
    python scripts/soak.py --viewers 2          # with the station page on and watched

Not part of the test run (it takes its minutes). It starts a Mosquitto that keeps sessions
across restarts, a line-controller subscriber with a persistent session, and `edge-inspect
run` replaying synthetic parts in free-run. It stops the broker `--restarts` times for
`--outage-s` seconds, samples the station's RSS and open file descriptors every 10 s, then
stops the station with SIGTERM and checks: the journal holds one record per inspected frame,
live verdicts plus backlog equal the journal (no record missing, none twice), and neither
memory nor file descriptors grew after the warm-up minute. With --viewers N the page is on and
N clients watch its Live tab throughout. Exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_service import PageViewers, free_port, prepare


class Broker:
    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.conf = work / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser root\n"
            f"persistence true\npersistence_location {work}/\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def sample(pid: int) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of a process."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--fps", type=float, default=20)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--outage-s", type=float, default=20)
    parser.add_argument("--viewers", type=int, default=0, help="clients watching the page")
    args = parser.parse_args()
    web_port = free_port()
    work = Path(tempfile.mkdtemp(prefix="edge-soak-"))
    model, replay = prepare(work, None)
    broker = Broker(work)
    broker.start()
    config = work / "config.toml"
    config.write_text(
        f'[station]\nname = "soak"\nbudget_ms = 100\nstate_dir = "{work / "state"}"\n'
        f'[model]\npath = "{model}"\n'
        f'[source]\nkind = "folder"\npath = "{replay}"\nfps = {args.fps}\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nprefix = "soak"\n'
        f"stats_interval_s = 10\nreconnect_min_s = 1\nreconnect_max_s = 5\n"
        f"[storage]\nquota_mb = 50\nsave_ok_every = 100\n"
        f"[web]\nenabled = {str(args.viewers > 0).lower()}\nport = {web_port}\n"
    )
    got: dict[str, list[int]] = {"verdict": [], "backlog": []}
    stats: list[dict[str, object]] = []
    lock = threading.Lock()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        kind = msg.topic.rsplit("/", 1)[1]
        with lock:
            if kind in got:
                got[kind].append(json.loads(msg.payload)["seq"])
            elif kind == "stats":
                stats.append(json.loads(msg.payload))

    sub = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="soak-controller", protocol=mqtt.MQTTv5
    )
    sub.on_message = on_message
    sub.on_connect = lambda c, *_: c.subscribe("soak/#", qos=1)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    sub.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
    sub.loop_start()
    station = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    page = PageViewers(web_port, args.viewers)
    total = args.minutes * 60
    restarts = [total * (i + 1) / (args.restarts + 1) for i in range(args.restarts)]
    samples: list[tuple[float, float, int]] = []
    t0 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < total:
        if restarts and elapsed >= restarts[0]:
            restarts.pop(0)
            print(f"{elapsed:6.0f} s  broker stopped for {args.outage_s:g} s", file=sys.stderr)
            broker.stop()
            time.sleep(args.outage_s)
            broker.start()
        rss, fds = sample(station.pid)
        samples.append((elapsed, rss, fds))
        print(f"{elapsed:6.0f} s  rss {rss:6.1f} MB  fds {fds}", file=sys.stderr)
        time.sleep(10)
    page.stop()
    station.send_signal(signal.SIGTERM)
    _, err = station.communicate(timeout=60)
    time.sleep(3)
    sub.disconnect()
    sub.loop_stop()
    broker.stop()

    db = sqlite3.connect(work / "state" / "journal.sqlite")
    journal = [row[0] for row in db.execute("SELECT seq FROM records ORDER BY seq")]
    unpublished = db.execute("SELECT COUNT(*) FROM records WHERE published = 0").fetchone()[0]
    frames = int(stats[-1]["frames"]) if stats else -1  # type: ignore[call-overload]
    delivered = got["verdict"] + got["backlog"]
    # Growth, not noise: the first samples after the warm-up minute against the last ones
    # (a socket mid-reconnect or a JPEG being written is one transient descriptor).
    warm = [s for s in samples if s[0] >= 60] or samples
    first, last = warm[:3], warm[-3:]
    rss_start, rss_end = max(s[1] for s in first), min(s[1] for s in last)
    fd_start, fd_end = max(s[2] for s in first), min(s[2] for s in last)
    rss_growth = (rss_end - rss_start) / rss_start
    fd_growth = fd_end - fd_start
    checks = {
        "station exited 0": station.returncode == 0,
        "journal records == frames inspected": len(journal) == frames,
        "every record delivered (live + backlog == journal)": sorted(delivered) == journal,
        "no record delivered twice": len(delivered) == len(set(delivered)),
        "journal has nothing unpublished": unpublished == 0,
        "RSS growth after warm-up <= 10 %": rss_growth <= 0.10,
        "no file-descriptor growth": fd_growth <= 0,
    }
    if args.viewers:
        # The Live tab gets a few pictures a second, outages or not.
        checks["every viewer saw >= 2 live pictures/s"] = all(
            len(frames) >= 2 * total for frames in page.frames
        )
    print(
        f"\nsoak: {args.minutes:g} min at {args.fps:g} frames/s, broker restarted "
        f"{args.restarts}x for {args.outage_s:g} s"
    )
    print("| figure | value |\n|---|---|")
    print(f"| frames inspected (last stats) | {frames} |")
    print(f"| journal records | {len(journal)} |")
    print(f"| live verdicts / backlog | {len(got['verdict'])} / {len(got['backlog'])} |")
    print(
        f"| RSS after warm-up -> end | {rss_start:.1f} -> {rss_end:.1f} MB "
        f"({100 * rss_growth:+.1f} %) |"
    )
    print(f"| open fds after warm-up -> end | {fd_start} -> {fd_end} |")
    if args.viewers:
        rates = ", ".join(f"{len(frames) / total:.1f}" for frames in page.frames)
        print(f"| page viewers / live pictures a second each | {args.viewers} / {rates} |")
    for name, ok in checks.items():
        print(f"| {name} | {'yes' if ok else 'NO'} |")
    if not all(checks.values()):
        print(err[-3000:], file=sys.stderr)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
