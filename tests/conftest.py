"""Shared fixtures: small synthetic image data sets drawn by scripts/make_demo_data.py.

All are 160x120 BGR PNGs in train/normal (20 images), train/anomaly (6), test/normal (8) and
test/anomaly (8), except `textures`, which has no train/anomaly: it covers training without
labelled defects. `parts` and `textures` are drawn once per session and shared: read them,
never write into them. `dataset` is a test's own data set (metal parts unless parametrized
indirectly with "texture"); `make_dataset` draws any other variant.
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import make_demo_data  # from scripts/, put on sys.path by pytest's `pythonpath` setting
import paho.mqtt.client as mqtt
import pytest

TEST_COUNTS: dict[str, int] = {
    "train/normal": 20,
    "train/anomaly": 6,
    "test/normal": 8,
    "test/anomaly": 8,
}
TEST_SIZE = (160, 120)  # width, height: small so that tests stay fast

MakeDataset = Callable[..., Path]


@pytest.fixture(scope="session")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Metal parts, shared by the whole session (so that session fixtures can train on it)."""
    out = tmp_path_factory.mktemp("parts") / "data"
    return make_demo_data.write_dataset(out, "part", TEST_COUNTS, *TEST_SIZE)


@pytest.fixture(scope="session")
def textures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Woven texture with scratches, shared by the whole session; no train/anomaly folder."""
    out = tmp_path_factory.mktemp("textures") / "data"
    counts = {**TEST_COUNTS, "train/anomaly": 0}
    return make_demo_data.write_dataset(out, "texture", counts, *TEST_SIZE)


@pytest.fixture(scope="session")
def parts_model(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained once on `parts` with the default options; read it, never write it."""
    from edge.train import train

    out = tmp_path_factory.mktemp("models") / "parts.onnx"
    train(parts / "train", out)
    return out


@pytest.fixture
def make_dataset(tmp_path: Path) -> MakeDataset:
    """Return a function that writes a new data set under this test's tmp_path and returns its root.

    Arguments are those of make_demo_data.write_dataset, with test-sized defaults.
    """
    number = itertools.count()

    def make(
        kind: str = "part",
        counts: Mapping[str, int] = TEST_COUNTS,
        width: int = TEST_SIZE[0],
        height: int = TEST_SIZE[1],
        seed: int = 0,
    ) -> Path:
        out = tmp_path / f"{kind}-{next(number)}"
        return make_demo_data.write_dataset(out, kind, counts, width, height, seed)

    return make


@pytest.fixture
def dataset(request: pytest.FixtureRequest, make_dataset: MakeDataset) -> Path:
    """This test's own data set: metal parts, or the woven texture when parametrized so.

    @pytest.mark.parametrize("dataset", ["part", "texture"], indirect=True)
    """
    return make_dataset(getattr(request, "param", "part"))


# --- a real Mosquitto broker and a subscriber, for the station's tests ---


class Broker:
    """A Mosquitto process on a free loopback port; stop() and start() keep the port."""

    def __init__(self, workdir: Path, extra_conf: str = "") -> None:
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.conf.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
            f"log_dest file {self.log}\nlog_type all\n{extra_conf}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A real Mosquitto broker of this test's own, on a free port."""
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.fail("mosquitto is not installed (apt-get install mosquitto; .ci/run does it)")
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    received: float  # time.time()

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """A paho client that records everything under a topic filter, as a line controller would."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.reconnect_delay_set(1, 1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(
                Message(msg.topic, bytes(msg.payload), bool(msg.retain), time.time())
            )
            self._cond.notify_all()

    def on(self, suffix: str) -> list[Message]:
        with self._cond:
            return [m for m in self.messages if m.topic.endswith("/" + suffix)]

    def wait_for(
        self, suffix: str, pred: Callable[[Message], bool] = lambda m: True, timeout: float = 15
    ) -> Message:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if m.topic.endswith("/" + suffix) and pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = sorted({m.topic for m in self.messages})
                    raise AssertionError(
                        f"no matching message on */{suffix} in {timeout} s; seen {seen}"
                    )
                self._cond.wait(left)

    def publish(self, topic: str, payload: bytes | str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscribe(broker: Broker) -> Iterator[Callable[[str], Subscriber]]:
    subs: list[Subscriber] = []

    def make(topic: str) -> Subscriber:
        s = Subscriber(broker, topic)
        subs.append(s)
        return s

    yield make
    for s in subs:
        s.close()
