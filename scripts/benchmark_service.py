"""Replay frames through the whole station into a real broker; report end-to-end latency.

    python scripts/benchmark_service.py                   # synthetic 640x480 parts, default model
    python scripts/benchmark_service.py --data ../shared/datasets/aliens --seconds 60
    python scripts/benchmark_service.py --viewers 0,2     # without, then with the page watched

For each rate it starts a private Mosquitto, runs `edge-inspect run` as its own process (folder
source, free-run, one inference thread) and subscribes to the verdicts as a line controller
would. End-to-end latency is the moment the subscriber receives a verdict minus the frame's
capture time in the verdict (both on this machine's clock): it includes image decoding,
inference, the journal write and the trip through the broker. "max" replays far faster than the
station can inspect, so the newest frame always wins and the verdict rate is the throughput.
Peak RSS is the station process's VmHWM. With --viewers N the station page is on and N
clients watch it as the page does: the live picture every 250 ms plus the status each second;
"page fps" is how many new live pictures a viewer got a second.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).parent))
import make_demo_data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    sys.exit("benchmark_service: mosquitto did not start")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prepare(work: Path, data: Path | None) -> tuple[Path, Path]:
    """Train the default model on data/train (synthetic 640x480 parts when data is None) and
    put data/test's images, good and bad mixed, in a replay folder: (model, replay)."""
    if data is None:
        counts = {"train/normal": 20, "test/normal": 30, "test/anomaly": 10}
        data = make_demo_data.write_dataset(work / "data", "part", counts, 640, 480)
    replay = work / "replay"
    replay.mkdir()
    for i, p in enumerate(sorted((data / "test").glob("*/*"))):
        shutil.copy(p, replay / f"{i:05d}{p.suffix}")
    model = work / "model.onnx"
    subprocess.run(
        [sys.executable, "-m", "edge.cli", "train", str(data / "train"), "-o", str(model)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return model, replay


def watch_page(port: int, stop: threading.Event, frames: list[str]) -> None:
    """Poll the page as a browser on the Live tab does; note each new frame number."""
    next_status = 0.0
    while not stop.is_set():
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/live.jpg", headers={"Host": f"127.0.0.1:{port}"})
            resp = conn.getresponse()
            resp.read()
            frame = resp.getheader("X-Frame")
            if frame and (not frames or frames[-1] != frame):
                frames.append(frame)
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/api/status", headers={"Host": f"127.0.0.1:{port}"})
                conn.getresponse().read()
            conn.close()
        except OSError:
            pass  # not listening yet
        stop.wait(0.25)


class PageViewers:
    """`n` clients watching the page's Live tab (watch_page), each in a thread of its own;
    `frames[i]` are the new frame numbers viewer i was sent."""

    def __init__(self, port: int, n: int) -> None:
        self.frames: list[list[str]] = [[] for _ in range(n)]
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=watch_page, args=(port, self._stop, f)) for f in self.frames
        ]
        for t in self._threads:
            t.start()

    def clear(self) -> None:
        for f in self.frames:
            f.clear()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def run_rate(
    model: Path, replay: Path, fps: float, seconds: float, work: Path, viewers: int = 0
) -> dict[str, float]:
    broker, port = start_broker(work)
    state = work / f"state-{fps:g}-{viewers}"
    config = work / f"config-{fps:g}-{viewers}.toml"
    web_port = free_port()
    config.write_text(
        f'[station]\nname = "bench"\nbudget_ms = 100\nstate_dir = "{state}"\n'
        f'[model]\npath = "{model}"\nthreads = 1\n'
        f'[source]\nkind = "folder"\npath = "{replay}"\nfps = {fps}\nloop = true\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nprefix = "bench"\nstats_interval_s = 5\n'
        f"[storage]\nquota_mb = 200\nsave_ok_every = 0\n"
        f"[web]\nenabled = {str(viewers > 0).lower()}\nport = {web_port}\n"
    )
    received: list[tuple[float, dict[str, object]]] = []
    lock = threading.Lock()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        with lock:
            received.append((now, json.loads(msg.payload)))

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe("bench/verdict", qos=1)
    sub.loop_start()
    station = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    page = PageViewers(web_port, viewers)
    try:
        # Warm-up: the first verdicts include model loading and cache warm-up; skip 3 s.
        deadline = time.time() + 60
        while not received and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(3)
        with lock:
            received.clear()
        page.clear()
        t0 = time.time()
        time.sleep(seconds)
        with lock:
            window = list(received)
        page_frames = [len(frames) for frames in page.frames]
        elapsed = time.time() - t0
        rss = peak_rss_mb(station.pid)
    finally:
        page.stop()
        station.terminate()
        _, err = station.communicate(timeout=30)
        sub.disconnect()
        sub.loop_stop()
        broker.terminate()
        broker.wait(10)
    if not window:
        sys.exit(f"benchmark_service: no verdicts at {fps} fps\n{err}")
    e2e = np.array([(now - float(p["wall"])) * 1000 for now, p in window])  # type: ignore[arg-type]
    decide = np.array([float(p["capture_to_decision_ms"]) for _, p in window])  # type: ignore[arg-type]
    infer = np.array([float(p["inference_ms"]) for _, p in window])  # type: ignore[arg-type]
    return {
        "fps_in": fps,
        "verdicts_per_s": len(window) / elapsed,
        "e2e_p50": float(np.percentile(e2e, 50)),
        "e2e_p95": float(np.percentile(e2e, 95)),
        "e2e_p99": float(np.percentile(e2e, 99)),
        "e2e_max": float(e2e.max()),
        "decide_p50": float(np.percentile(decide, 50)),
        "infer_p50": float(np.percentile(infer, 50)),
        "over_budget": float(sum(bool(p["over_budget"]) for _, p in window)),
        "rss_mb": rss,
        "verdicts": float(len(window)),
        "page_fps": float(np.mean(page_frames)) / elapsed if viewers else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, help="data set with train/ and test/ (default: synthetic)"
    )
    parser.add_argument(
        "--rates", default="10,20,max", help="replay rates, fps (default 10,20,max)"
    )
    parser.add_argument("--seconds", type=float, default=30, help="measuring time per rate")
    parser.add_argument(
        "--viewers", default="0", help="page viewers to run each rate with, e.g. 0,2 (default 0)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, replay = prepare(work, args.data)
        rows = []
        for rate in args.rates.split(","):
            for viewers in map(int, args.viewers.split(",")):
                fps = 1000.0 if rate == "max" else float(rate)
                print(
                    f"measuring at {rate} fps, {viewers} page viewers, for {args.seconds:g} s ...",
                    file=sys.stderr,
                )
                result = run_rate(model, replay, fps, args.seconds, work, viewers)
                rows.append((rate, viewers, result))
    print(f"data: {args.data or 'synthetic parts 640x480'}, one inference thread\n")
    print(
        "| replay fps | page viewers | verdicts/s | e2e p50 ms | p95 | p99 | max | decide p50 "
        "| infer p50 | over budget | peak RSS MB | page fps |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rate, viewers, r in rows:
        page = f"{r['page_fps']:.1f}" if viewers else "-"
        print(
            f"| {rate} | {viewers} | {r['verdicts_per_s']:.1f} | {r['e2e_p50']:.1f} "
            f"| {r['e2e_p95']:.1f} | {r['e2e_p99']:.1f} | {r['e2e_max']:.1f} "
            f"| {r['decide_p50']:.1f} | {r['infer_p50']:.1f} "
            f"| {r['over_budget']:.0f}/{r['verdicts']:.0f} | {r['rss_mb']:.0f} | {page} |"
        )


if __name__ == "__main__":
    main()
