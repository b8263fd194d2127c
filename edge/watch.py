"""What a line controller sees: every message under a station's topic prefix, one line each."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.config import MqttConfig
from edge.mqtt import secure


class BrokerUnavailable(RuntimeError):
    """The broker cannot be reached or refused us; the message names it and says why."""


def _verdict(v: dict[str, Any]) -> str:
    n = len(v["boxes"])
    out = [
        f"#{v['seq'] if v['seq'] is not None else '-'}",
        f"{v['verdict'].upper():2s}",
        f"score {v['score']:.1f}/{v['threshold']:.1f}",
        f"area {100 * v['area']:.1f}%",
        f"{n} box{'' if n == 1 else 'es'}",
        f"latency {v['capture_to_decision_ms']:.1f} ms",
    ]
    out += ["OVER BUDGET"] if v["over_budget"] else []
    out += [f"part {v['part_id']}"] if v["part_id"] else []
    return "  ".join(out)


def _stats(s: dict[str, Any]) -> str:
    return (
        f"frames {s['frames']}  verdicts {s['verdicts']}  NG {s['ng']}  "
        f"p95 {s['latency_ms_p95']:.1f} ms  overruns {s['overruns']}  "
        f"dropped {s.get('dropped', 0)}  backlog {s.get('backlog', 0)}"
    )


def _state(s: dict[str, Any]) -> str:
    line = f"{s['status']}" + (f": {s['reason']}" if s.get("reason") else "")
    for key in ("model_id", "source"):  # a state from before this release may lack them
        line += f"  {key.removesuffix('_id')} {s[key]}" if key in s else ""
    return line


_FORMATS: dict[str, Callable[[dict[str, Any]], str]] = {
    "verdict": _verdict,
    "backlog": _verdict,
    "stats": _stats,
    "state": _state,
    "error": lambda e: (
        f"{e['command']}{' ' + e['part_id'] if e.get('part_id') else ''}: {e['error']}"
    ),
}


def describe(name: str, payload: bytes) -> str:
    """One readable line for a message on P/<name>.

    >>> describe("error", b'{"command": "trigger", "error": "the station is paused"}')
    'error    trigger: the station is paused'
    """
    text = payload.decode("utf-8", "replace")
    try:
        line = _FORMATS[name](json.loads(text)) if name in _FORMATS else text
    except (ValueError, KeyError, TypeError, AttributeError):
        line = text  # not shaped as the station sends it: show it as it came
    return f"{name:8s} {line}"


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def watch(
    cfg: MqttConfig,
    as_json: bool = False,
    count: int | None = None,
    seconds: float | None = None,
    out: TextIO = sys.stdout,
) -> None:
    """Print every message under cfg.prefix until `count` verdicts or `seconds` have passed.

    >>> watch(MqttConfig(host="broker.local", prefix="line1/st3"), count=10)  # doctest: +SKIP
    """
    prefix = cfg.prefix.rstrip("/")
    done = threading.Event()
    refused: list[str] = []
    verdicts = 0
    v5 = cfg.protocol == "5"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    secure(client, cfg)

    answered = threading.Event()

    def connected(c: mqtt.Client, _u: object, _f: object, rc: Any, _p: object) -> None:
        answered.set()
        if rc.is_failure:
            refused.append(f"the MQTT broker at {cfg.host}:{cfg.port} refused us: {rc}")
            done.set()
        else:
            c.subscribe(f"{prefix}/#", qos=1)

    def disconnected(_c: mqtt.Client, _u: object, _f: object, rc: Any, _p: object) -> None:
        if not answered.is_set():  # it would be tried again and again, to the same end
            refused.append(
                f"{cfg.host}:{cfg.port} closed the connection without answering as an MQTT "
                f"broker ({rc}): check the port, whether it takes TLS ([mqtt.tls] enabled "
                "here is " + ("on" if cfg.tls.enabled else "off") + ") and mqtt.protocol"
            )
            done.set()
        elif not done.is_set():
            line = f"{_clock(time.time())}  broker   connection lost ({rc}); reconnecting"
            print(line, file=out, flush=True)

    def message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        nonlocal verdicts
        if done.is_set():
            return
        name, now = msg.topic[len(prefix) + 1 :], time.time()
        if as_json:
            try:
                payload: Any = json.loads(msg.payload)
            except ValueError:
                payload = msg.payload.decode("utf-8", "replace")  # P/status is plain text
            doc = {"topic": msg.topic, "received": now, "retained": bool(msg.retain)}
            line = json.dumps({**doc, "payload": payload})
        else:
            line = f"{_clock(now)}  {describe(name, bytes(msg.payload))}"
            line += "  (retained)" if msg.retain else ""
        print(line, file=out, flush=True)
        verdicts += name in ("verdict", "backlog")
        if count is not None and verdicts >= count:
            done.set()

    client.on_connect, client.on_disconnect = connected, disconnected
    client.on_message = message
    try:
        client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
    except OSError as exc:  # refused, no route, unknown host, TLS handshake
        raise BrokerUnavailable(
            f"cannot reach the MQTT broker at {cfg.host}:{cfg.port} ({exc.strerror or exc})"
        ) from None
    client.loop_start()
    try:
        done.wait(seconds)
    except KeyboardInterrupt:
        pass
    finally:
        done.set()
        client.disconnect()
        client.loop_stop()
    if refused:
        raise BrokerUnavailable(refused[0])
