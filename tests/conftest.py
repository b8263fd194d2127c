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
import queue
import random
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
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

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

    def __init__(self, workdir: Path, extra_conf: str = "", persistent: bool = False) -> None:
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        # persistent: sessions and queued messages survive a restart, as on a real line broker.
        # `user root` keeps a broker started by root able to write its files in workdir.
        keep = f"persistence true\npersistence_location {workdir}/\n" if persistent else ""
        self.conf.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous true\nuser root\n"
            f"{keep or 'persistence false'}\nlog_dest file {self.log}\nlog_type all\n{extra_conf}"
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
    """A free port below the kernel's range for outgoing connections. A broker port inside
    it can be taken while the broker is down: a client reconnecting to it may be given that
    very port as its own and connect to itself, and the broker cannot start again there."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(min(20000, low - 1000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class DelayProxy:
    """A TCP relay on a free loopback port that holds everything `delay_s` each way, in order:
    a broker far away (a cloud or cellular link), which is slow but answers."""

    def __init__(self, target: tuple[str, int], delay_s: float) -> None:
        self.target, self.delay_s = target, delay_s
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._relay(client, upstream)
            self._relay(upstream, client)

    def _relay(self, src: socket.socket, dst: socket.socket) -> None:
        chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def read() -> None:
            data = b"x"
            while data:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                chunks.put((time.monotonic() + self.delay_s, data))

        def write() -> None:
            while True:
                due, data = chunks.get()
                time.sleep(max(0.0, due - time.monotonic()))
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        self.server.close()


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

    def __init__(self, broker: Broker, topic: str, session: str = "") -> None:
        """session: a client id whose session (and queued QoS 1 messages) the broker keeps."""
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=session, protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.reconnect_delay_set(1, 1)
        props = None
        if session:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, clean_start=not session, properties=props)
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


# --- a broker that wants TLS and a password, for the security tests ---

_OPENSSL_CONF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1,DNS:localhost
[misnamed]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = DNS:elsewhere.invalid
"""


@dataclass(frozen=True)
class Certificates:
    """A throw-away CA, broker certificates it signed, and a CA that signed nothing here."""

    ca: Path
    server_cert: Path  # for 127.0.0.1 and localhost
    server_key: Path
    misnamed_cert: Path  # signed by `ca`, but for elsewhere.invalid only
    misnamed_key: Path
    rogue_ca: Path


def make_certificates(folder: Path) -> Certificates:
    """Write a test PKI (P-256 keys, valid for 2 days) with the openssl command line."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is not installed (apt-get install openssl)")
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "openssl.cnf"
    conf.write_text(_OPENSSL_CONF)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    serial = itertools.count(1000)

    def run(*args: str | Path) -> None:
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True)

    def ca(name: str) -> Path:
        crt = folder / f"{name}.crt"
        run("req", "-config", conf, "-x509", *key, "-keyout", folder / f"{name}.key", "-out", crt,
            "-days", "2", "-subj", f"/CN=edge-inspect {name}", "-extensions", "ca")  # fmt: skip
        return crt

    def server(name: str, ca_name: str, extensions: str) -> tuple[Path, Path]:
        crt, key_file, csr = (folder / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
        run("req", "-config", conf, "-new", *key, "-keyout", key_file, "-out", csr,
            "-subj", "/CN=localhost")  # fmt: skip
        run("x509", "-req", "-in", csr, "-CA", folder / f"{ca_name}.crt",
            "-CAkey", folder / f"{ca_name}.key", "-set_serial", str(next(serial)), "-days", "2",
            "-extfile", conf, "-extensions", extensions, "-out", crt)  # fmt: skip
        return crt, key_file

    the_ca = ca("test-ca")
    rogue = ca("rogue-ca")
    server_cert, server_key = server("server", "test-ca", "server")
    misnamed_cert, misnamed_key = server("misnamed", "test-ca", "misnamed")
    return Certificates(the_ca, server_cert, server_key, misnamed_cert, misnamed_key, rogue)


class TLSBroker(Broker):
    """A Mosquitto that takes only TLS connections that log in with `username` and `password`."""

    username = "station3"
    password = "c0rrect-h0rse-battery-staple"

    def __init__(self, workdir: Path, certs: Certificates, misnamed: bool = False) -> None:
        import os

        super().__init__(workdir)
        self.certs = certs
        passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        self.password_file = workdir / "mosquitto.passwd"
        subprocess.run(
            [passwd, "-b", "-c", str(self.password_file), self.username, self.password],
            check=True,
            capture_output=True,
        )
        cert, key = (
            (certs.misnamed_cert, certs.misnamed_key)
            if misnamed
            else (certs.server_cert, certs.server_key)
        )
        # Started as root, mosquitto drops to the `mosquitto` user before it reads the password
        # file and keys, and that user cannot enter pytest's private tmp_path: stay root here.
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"listener {self.port} {self.host}\ncafile {certs.ca}\ncertfile {cert}\n"
            f"keyfile {key}\nallow_anonymous false\npassword_file {self.password_file}\n"
            f"persistence false\nlog_dest file {self.log}\nlog_type all\n{user}"
        )


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    """This test's own throw-away CA and broker certificates, in tmp_path/pki."""
    return make_certificates(tmp_path / "pki")


@pytest.fixture
def tls_broker(tmp_path: Path, certificates: Certificates) -> Iterator[TLSBroker]:
    """A real Mosquitto on a free port: TLS only, no anonymous clients, one user and password."""
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.fail("mosquitto is not installed (apt-get install mosquitto; .ci/run does it)")
    workdir = tmp_path / "tls-broker"
    workdir.mkdir()
    b = TLSBroker(workdir, certificates)
    b.start()
    yield b
    b.stop()


class TLSSubscriber(Subscriber):
    """A line controller's client on the TLS broker: verifies the broker and logs in."""

    def __init__(self, broker: TLSBroker, topic: str) -> None:
        self.messages = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(broker.certs.ca))
        self.client.username_pw_set(broker.username, broker.password)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.reconnect_delay_set(1, 1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()


# --- a station of a test's own, for tests outside test_station.py ---


def write_config(
    tmp: Path,
    model: Path,
    replay: Path,
    broker: Broker | None,
    prefix: str,
    **sections: dict[str, object],
) -> Path:
    """A config file for a station replaying `replay` and publishing under `prefix` (or, with
    no broker, keeping its journal only).

    Each keyword is a section whose keys override the defaults: mqtt={"keepalive_s": 5}.
    """
    base: dict[str, dict[str, object]] = {
        "station": {"name": "test", "budget_ms": 500, "state_dir": str(tmp / "state")},
        "model": {"path": str(model)},
        "source": {"kind": "folder", "path": str(replay), "fps": 20},
        "trigger": {"mode": "free"},
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "prefix": prefix,
            "stats_interval_s": 0.5,
            "reconnect_min_s": 1,
            "reconnect_max_s": 2,
        }
        if broker
        else {"enabled": False},
        "storage": {"quota_mb": 5, "save_ok_every": 5},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None]
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def replay(tmp_path: Path, parts: Path) -> Path:
    """Good and defective parts in one folder, as a camera would see them pass."""
    folder = tmp_path / "replay"
    folder.mkdir()
    goods = sorted((parts / "test" / "normal").iterdir())
    bads = sorted((parts / "test" / "anomaly").iterdir())
    for i, (g, b) in enumerate(zip(goods, bads, strict=False)):
        shutil.copy(g, folder / f"{i:03d}a-{g.name}")
        shutil.copy(b, folder / f"{i:03d}b-{b.name}")
    return folder


@pytest.fixture
def run_station() -> Iterator[Callable[[Path], Any]]:
    """Start a Station in a thread; it is stopped (cleanly) at the end of the test."""
    from edge.config import load_config
    from edge.station import Station

    started: list[tuple[Station, threading.Thread]] = []

    def start(config: Path) -> Station:
        station = Station(load_config(config))
        thread = threading.Thread(target=station.run, daemon=True)
        thread.start()
        started.append((station, thread))
        return station

    yield start
    for station, thread in started:
        station.stop()
        thread.join(10)
        assert not thread.is_alive(), "the station did not stop"
