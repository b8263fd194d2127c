"""`edge-inspect watch` against a real Mosquitto: what a line controller sees, one line each."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import Broker, Subscriber, TLSBroker

from edge.journal import Record
from edge.watch import describe

NG = Record(
    seq=17,
    wall=1_795_000_000.125,
    part_id="A-12",
    verdict="ng",
    score=41.23,
    threshold=37.0,
    area=0.031,
    boxes=[{"x": 40, "y": 22, "w": 18, "h": 9, "score": 41.23}],
    capture_to_decision_ms=18.43,
    inference_ms=12.1,
    over_budget=False,
    model_id="eff1a1ac97a8",
    frame_seq=17,
    frame_path=None,
    overlay_path=None,
    published=False,
)


def _watch(*args: str) -> subprocess.Popen[str]:
    # --seconds bounds every run, so a test that fails cannot hang on readline().
    return subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "watch", "--seconds", "30", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _publish_retained(pub: Subscriber, topic: str, payload: str) -> None:
    pub.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)


def test_watch_prints_status_and_verdicts_as_the_controller_sees_them(
    tmp_path: Path, broker: Broker, subscribe: Callable[[str], Subscriber]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[model]\npath = "m.onnx"\n[source]\nkind = "folder"\npath = "replay"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nprefix = "line1/st3"\n'
    )
    pub = subscribe("nothing/here")
    _publish_retained(pub, "line1/st3/status", "online")
    proc = _watch("--config", str(config), "--count", "1")
    assert proc.stdout is not None
    status = proc.stdout.readline()  # the retained status arrives first: watch has subscribed
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}  status   online  \(retained\)\n", status)
    pub.publish("line1/st3/verdict", json.dumps(NG.payload()))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.endswith(
        "  verdict  #17  NG  score 41.2/37.0  area 3.1%  1 box  latency 18.4 ms  part A-12\n"
    )


def test_watch_json_prints_one_object_per_message(
    broker: Broker, subscribe: Callable[[str], Subscriber]
) -> None:
    pub = subscribe("nothing/here")
    _publish_retained(pub, "js/status", "paused")
    proc = _watch("--json", "--host", broker.host, "--port", str(broker.port), "--prefix", "js")
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    assert first["topic"] == "js/status" and first["payload"] == "paused" and first["retained"]
    stats = {"frames": 9, "verdicts": 9, "ng": 2, "latency_ms_p95": 21.0, "overruns": 0}
    pub.publish("js/stats", json.dumps(stats))
    second = json.loads(proc.stdout.readline())
    assert second["topic"] == "js/stats" and second["payload"] == stats
    proc.terminate()
    proc.communicate(timeout=10)


def test_describe_keeps_odd_payloads_readable() -> None:
    stats = {"frames": 120, "verdicts": 118, "ng": 12, "latency_ms_p95": 18.44, "overruns": 1}
    assert describe("stats", json.dumps(stats).encode()) == (
        "stats    frames 120  verdicts 118  NG 12  p95 18.4 ms  overruns 1  dropped 0  backlog 0"
    )
    state = {"status": "degraded", "reason": "camera gone", "model_id": "m1", "source": "cam"}
    assert describe("state", json.dumps(state).encode()) == (
        "state    degraded: camera gone  model m1  source cam"
    )
    stopped = {"status": "offline", "reason": "stopped", "time": 1795000000.5}
    assert describe("state", json.dumps(stopped).encode()) == "state    offline: stopped"
    over = {**NG.payload(), "over_budget": True, "part_id": None, "boxes": []}
    assert "0 boxes  latency 18.4 ms  OVER BUDGET" in describe("backlog", json.dumps(over).encode())
    assert describe("verdict", b"{not json") == "verdict  {not json"
    assert describe("cmd/trigger", b'{"part_id": "B-7"}') == 'cmd/trigger {"part_id": "B-7"}'


def test_watch_without_a_broker_says_so_and_exits_69(broker: Broker) -> None:
    broker.stop()  # nothing listens on its port now
    proc = _watch("--host", broker.host, "--port", str(broker.port))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 69
    assert out == ""
    assert err.strip().splitlines() == [
        f"edge-inspect: cannot reach the MQTT broker at {broker.host}:{broker.port} "
        "(Connection refused)"
    ]


def test_watch_on_a_tls_port_without_tls_says_so_instead_of_retrying(
    tls_broker: TLSBroker,
) -> None:
    # The broker drops a plain MQTT connection on its TLS port before any answer; watch used
    # to print "connection lost; reconnecting" every second until --seconds ran out.
    proc = _watch("--host", tls_broker.host, "--port", str(tls_broker.port))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 69 and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith(
        f"edge-inspect: {tls_broker.host}:{tls_broker.port} closed the connection without "
        "answering as an MQTT broker"
    )
    assert "[mqtt.tls] enabled here is off" in line
