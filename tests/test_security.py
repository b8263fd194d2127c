"""The station on a locked-down broker: TLS verification, login, secrets kept out of logs, tokens.

Every test starts its own Mosquitto that takes only TLS connections with a user name and
password, with certificates from a throw-away CA made by openssl (conftest.make_certificates).
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Certificates, TLSBroker, TLSSubscriber, write_config

from edge.config import ConfigError, load_config, parse_config
from edge.station import Station

PASSWORD_NAME = "mqtt-password"


@pytest.fixture
def tls_subscribe(tls_broker: TLSBroker) -> Iterator[Callable[[str], TLSSubscriber]]:
    """Line controllers on the TLS broker: they verify it with the test CA and log in."""
    subs: list[TLSSubscriber] = []

    def make(topic: str) -> TLSSubscriber:
        s = TLSSubscriber(tls_broker, topic)
        subs.append(s)
        return s

    yield make
    for s in subs:
        s.close()


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every record of every logger, paho's included, down to DEBUG."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="paho")
    return caplog


def tls_config(
    tmp_path: Path,
    model: Path,
    replay: Path,
    broker: TLSBroker,
    prefix: str,
    *,
    password: str | None = None,
    username: str | None = None,
    ca: Path | None = None,
    system_cas: bool = False,
    insecure: bool = False,
    credential: bool = False,
    **sections: dict[str, object],
) -> Path:
    """A station config for `broker`: TLS, and the password in a file (never in the config).

    credential=True hands the password over as a systemd credential; the caller points
    $CREDENTIALS_DIRECTORY at tmp_path/credentials.
    """
    password = broker.password if password is None else password
    secrets = tmp_path / ("credentials" if credential else "secrets")
    secrets.mkdir(exist_ok=True)
    (secrets / PASSWORD_NAME).write_text(password + "\n")
    (secrets / PASSWORD_NAME).chmod(0o600)
    login: dict[str, object] = {"username": username or broker.username}
    if credential:
        login["password_credential"] = PASSWORD_NAME
    else:
        login["password_file"] = str(secrets / PASSWORD_NAME)
    mqtt = {**login, **sections.pop("mqtt", {})}
    tls: dict[str, object] = {
        "enabled": True,
        "ca_file": None if system_cas else str(ca or broker.certs.ca),
        "insecure": insecure,
    }
    return write_config(
        tmp_path,
        model,
        replay,
        broker,
        prefix,
        mqtt=mqtt,
        **{"mqtt.tls": tls},
        **sections,
    )


def assert_secret_nowhere(secret: str, caplog: pytest.LogCaptureFixture, *places: Any) -> None:
    """The secret is in no log record (message, arguments, exception) and no repr or str."""
    assert caplog.records, "nothing was logged: the check would prove nothing"
    for record in caplog.records:
        text = f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
        assert secret not in text, f"{record.name} logged the secret: {record.getMessage()}"
    assert secret not in caplog.text
    for place in places:
        assert secret not in repr(place) and secret not in str(place), type(place).__name__


def logged_in(broker: TLSBroker, client_id: str) -> bool:
    """Whether the broker's log shows `client_id` connected with the broker's user name."""
    return any(
        f" as {client_id} (" in line and f"u'{broker.username}'" in line
        for line in broker.log.read_text().splitlines()
    )


def wait_until(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("via", ["password_file", "password_credential"])
def test_station_logs_in_over_tls_and_the_password_shows_nowhere(
    tmp_path: Path,
    parts_model: Path,
    replay: Path,
    tls_broker: TLSBroker,
    via: str,
    monkeypatch: pytest.MonkeyPatch,
    all_logs: pytest.LogCaptureFixture,
    tls_subscribe: Callable[[str], TLSSubscriber],
    run_station: Callable[[Path], Station],
) -> None:
    credential = via == "password_credential"
    if credential:
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "credentials"))
    sub = tls_subscribe("sec/#")
    config = tls_config(tmp_path, parts_model, replay, tls_broker, "sec", credential=credential)
    assert tls_broker.password not in config.read_text()
    station = run_station(config)
    assert sub.wait_for("status", timeout=10).payload == b"online"
    verdict = sub.wait_for("verdict", timeout=10).json()
    assert verdict["verdict"] in ("ok", "ng") and verdict["model_id"] == station.model.id
    station.stop()
    sub.wait_for("status", lambda m: m.payload == b"offline", timeout=10)

    cfg = station.cfg
    assert station.link is not None and station.link.connects >= 1
    assert_secret_nowhere(
        tls_broker.password,
        all_logs,
        cfg,
        cfg.mqtt,
        cfg.mqtt.tls,
        cfg.model_dump(),
        cfg.model_dump_json(),
        station.link,
    )
    assert tls_broker.password not in tls_broker.log.read_text()
    assert logged_in(tls_broker, cfg.client_id)


@pytest.mark.parametrize(
    ("trust", "expected"),
    [
        ("another CA", "self-signed certificate in certificate chain"),
        ("system CAs", "self-signed certificate in certificate chain"),
        ("another host", "IP address mismatch"),
    ],
)
def test_an_untrusted_broker_certificate_is_refused_and_reported(
    tmp_path: Path,
    parts_model: Path,
    replay: Path,
    certificates: Certificates,
    trust: str,
    expected: str,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = TLSBroker(workdir, certificates, misnamed=trust == "another host")
    broker.start()
    try:
        sub = TLSSubscriber(broker, "#") if trust != "another host" else None
        config = tls_config(
            tmp_path,
            parts_model,
            replay,
            broker,
            "untrusted",
            ca=certificates.rogue_ca if trust == "another CA" else None,
            system_cas=trust == "system CAs",
        )
        station = Station(load_config(config))
        _run_until_refused(station)
        if sub is not None:
            assert sub.on("status") == [], "the station never reported to this broker"
            sub.close()
    finally:
        broker.stop()
    assert station.link is not None and station.link.connects == 0
    why = station.link.last_error or ""
    assert "certificate verify failed" in why and expected in why, why
    assert "127.0.0.1" in why
    assert any(why in r.getMessage() for r in all_logs.records if r.levelno >= logging.WARNING)
    assert not logged_in(broker, station.cfg.client_id), "no login before a trusted handshake"
    assert_secret_nowhere(broker.password, all_logs)


def test_with_tls_insecure_any_broker_certificate_is_accepted(
    tmp_path: Path,
    parts_model: Path,
    replay: Path,
    tls_broker: TLSBroker,
    tls_subscribe: Callable[[str], TLSSubscriber],
    run_station: Callable[[Path], Station],
) -> None:
    sub = tls_subscribe("insecure/#")
    rogue = tls_broker.certs.rogue_ca
    config = tls_config(
        tmp_path, parts_model, replay, tls_broker, "insecure", ca=rogue, insecure=True
    )
    station = run_station(config)
    assert sub.wait_for("status", timeout=10).payload == b"online"
    sub.wait_for("verdict", timeout=10)
    # ... and it logged in: with insecure, the password goes to whoever holds the address.
    assert logged_in(tls_broker, station.cfg.client_id)


@pytest.mark.parametrize("login", ["wrong password", "wrong user"])
def test_a_wrong_login_is_refused_and_reported(
    tmp_path: Path,
    parts_model: Path,
    replay: Path,
    tls_broker: TLSBroker,
    login: str,
    all_logs: pytest.LogCaptureFixture,
    tls_subscribe: Callable[[str], TLSSubscriber],
) -> None:
    sub = tls_subscribe("#")
    wrong = "not-" + tls_broker.password
    config = tls_config(
        tmp_path,
        parts_model,
        replay,
        tls_broker,
        "login",
        password=wrong if login == "wrong password" else None,
        username="intruder" if login == "wrong user" else None,
    )
    station = Station(load_config(config))
    _run_until_refused(station)
    assert station.link is not None and station.link.connects == 0
    assert sub.on("status") == []
    assert "refused the connection: Not authorized" in (station.link.last_error or "")
    errors = [r for r in all_logs.records if r.levelno >= logging.ERROR]
    assert any("Not authorized" in r.getMessage() for r in errors), all_logs.text
    assert_secret_nowhere(wrong, all_logs, station.cfg, station.cfg.mqtt)
    assert_secret_nowhere(tls_broker.password, all_logs)


def test_without_a_login_the_broker_refuses_the_station(
    tmp_path: Path,
    parts_model: Path,
    replay: Path,
    tls_broker: TLSBroker,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    config = write_config(
        tmp_path,
        parts_model,
        replay,
        tls_broker,
        "anon",
        **{"mqtt.tls": {"enabled": True, "ca_file": str(tls_broker.certs.ca)}},
    )
    station = Station(load_config(config))
    _run_until_refused(station)
    assert station.link is not None and station.link.connects == 0
    assert "Not authorized" in (station.link.last_error or "")


def test_commands_need_the_right_token(
    tmp_path: Path,
    parts_model: Path,
    replay: Path,
    tls_broker: TLSBroker,
    all_logs: pytest.LogCaptureFixture,
    tls_subscribe: Callable[[str], TLSSubscriber],
    run_station: Callable[[Path], Station],
) -> None:
    token = "t0ken-4f1c9e2a7b"
    sub = tls_subscribe("tok/#")
    config = tls_config(
        tmp_path,
        parts_model,
        replay,
        tls_broker,
        "tok",
        trigger={"mode": "triggered"},
        mqtt={"command_token": token},
    )
    station = run_station(config)
    sub.wait_for("status", lambda m: m.payload == b"online", timeout=10)
    refused: list[tuple[str, dict[str, object]]] = [
        ("trigger", {"part_id": "A-1"}),
        ("trigger", {"part_id": "A-2", "token": "t0ken-4f1c9e2a7"}),  # one character short
        ("trigger", {"part_id": "A-3", "token": token.upper()}),
        ("pause", {}),
        ("pause", {"token": ""}),
        ("reload", {"token": None}),
    ]

    def send(name: str, doc: dict[str, object]) -> Any:
        answered = len(sub.on("error"))
        sub.publish(f"tok/cmd/{name}", json.dumps(doc))
        assert wait_until(lambda: len(sub.on("error")) > answered, 5), f"no answer to {name}"
        return sub.on("error")[-1].json()

    # One at a time, as a line controller would (a burst over TLS is the test below).
    errors = [send(name, doc) for name, doc in refused]
    assert [e["command"] for e in errors] == [name for name, _ in refused]
    assert all(e["error"] == "missing or wrong token" for e in errors), errors
    time.sleep(0.3)
    assert sub.on("verdict") == [] and not station.paused and station.status == "online"

    sub.publish("tok/cmd/trigger", json.dumps({"part_id": "B-7", "token": token}))
    assert sub.wait_for("verdict", timeout=10).json()["part_id"] == "B-7"
    sub.publish("tok/cmd/pause", json.dumps({"token": token}))
    sub.wait_for("status", lambda m: m.payload == b"paused", timeout=10)
    assert station.paused

    for m in sub.messages:
        if "/cmd/" not in m.topic:  # what the station published
            assert token.encode() not in m.payload, f"{m.topic} carries the token"
    assert_secret_nowhere(token, all_logs)
    assert_secret_nowhere(tls_broker.password, all_logs)


# --- gaps found here; each marker goes when its product change lands ---


CONFIG = '[model]\npath = "m.onnx"\n[source]\nkind = "folder"\npath = "x"\n[mqtt]\n'


def test_the_command_token_is_not_in_the_config_repr() -> None:
    cfg = parse_config(CONFIG + 'command_token = "t0ken-4f1c9e2a7b"\n')
    for place in (cfg, cfg.mqtt):
        assert "t0ken-4f1c9e2a7b" not in repr(place) and "t0ken-4f1c9e2a7b" not in str(place)


def test_an_empty_command_token_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="command_token"):
        parse_config(CONFIG + 'command_token = ""\n')


def test_a_burst_of_commands_over_tls_keeps_the_connection(
    tmp_path: Path,
    parts_model: Path,
    replay: Path,
    tls_broker: TLSBroker,
    tls_subscribe: Callable[[str], TLSSubscriber],
    run_station: Callable[[Path], Station],
) -> None:
    sub = tls_subscribe("burst/#")
    config = tls_config(
        tmp_path, parts_model, replay, tls_broker, "burst", trigger={"mode": "triggered"}
    )
    station = run_station(config)
    sub.wait_for("status", lambda m: m.payload == b"online", timeout=10)
    n = 300
    infos = [sub.client.publish("burst/cmd/shutdown", b"{}", qos=1) for _ in range(n)]
    for info in infos:
        info.wait_for_publish(5)
    link = station.link
    assert link is not None
    wait_until(lambda: len(sub.on("error")) >= n or not link.connected.is_set(), 10)
    assert link.connected.is_set() and link.connects == 1, "the station lost its connection"
    assert wait_until(lambda: len(sub.on("error")) >= n, 5), len(sub.on("error"))


# --- helpers ---


def _run_until_refused(station: Station) -> None:
    """Run a station that should not get through until the link says why, then stop it."""
    thread = threading.Thread(target=station.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: station.link is not None and bool(station.link.last_error), 8)
        time.sleep(0.3)  # time enough for a status to arrive, had it connected after all
    finally:
        station.stop()
        thread.join(10)
    assert not thread.is_alive(), "the station did not stop"


def test_a_password_file_missing_at_a_reconnect_is_retried_not_fatal(
    tmp_path: Path,
    parts_model: Path,
    replay: Path,
    tls_broker: TLSBroker,
    all_logs: pytest.LogCaptureFixture,
    tls_subscribe: Callable[[str], TLSSubscriber],
    run_station: Callable[[Path], Station],
) -> None:
    """A password or CA being replaced (not in one rename) when the broker restarts: the
    link thread used to die, and the station inspected on without ever reconnecting."""
    config = tls_config(
        tmp_path,
        parts_model,
        replay,
        tls_broker,
        "rotate",
        mqtt={"reconnect_min_s": 0.2, "reconnect_max_s": 0.5},
    )
    password = tmp_path / "secrets" / PASSWORD_NAME
    station = run_station(config)
    assert station.link is not None
    assert wait_until(station.link.connected.is_set, 20)
    password.rename(password.with_name("being-replaced"))
    tls_broker.stop()
    tls_broker.start()
    assert wait_until(lambda: "password file" in (station.link.last_error or ""), 20)
    assert station.link._thread is not None and station.link._thread.is_alive()
    warned = [r.getMessage() for r in all_logs.records if r.levelno >= logging.WARNING]
    assert any(f"mqtt password file {password}" in m for m in warned), warned
    password.with_name("being-replaced").rename(password)
    sub = tls_subscribe("rotate/#")
    sub.wait_for("status", lambda m: m.payload == b"online", timeout=20)
    assert station.link.connects == 2


def test_a_port_that_is_not_an_mqtt_broker_is_named(
    tmp_path: Path,
    parts_model: Path,
    replay: Path,
    all_logs: pytest.LogCaptureFixture,
    run_station: Callable[[Path], Station],
) -> None:
    """A web server on the broker's port (or TLS on one side only): paho said nothing at the
    default level, or only 'Received malformed packet'. It starts after the station, as at
    boot, so the station has seen 'Connection refused' first."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]

    def answer_as_http(server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    config = write_config(
        tmp_path,
        parts_model,
        replay,
        None,
        "web",
        mqtt={"enabled": True, "host": "127.0.0.1", "port": port, "reconnect_min_s": 0.2},
    )
    station = run_station(config)
    assert station.link is not None
    assert wait_until(lambda: "refused" in (station.link.last_error or ""), 20)
    with socket.create_server(("127.0.0.1", port)) as server:
        threading.Thread(target=answer_as_http, args=(server,), daemon=True).start()
        assert wait_until(
            lambda: "did not answer as an MQTT broker" in (station.link.last_error or ""), 20
        )
    warned = [r.getMessage() for r in all_logs.records if r.levelno >= logging.WARNING]
    named = [m for m in warned if f"127.0.0.1:{port} did not answer as an MQTT broker" in m]
    assert len(named) == 1, warned  # once, not on every retry
    assert "without TLS (mqtt.tls)" in named[0]


def test_paho_s_socket_errors_do_not_repeat_in_the_log(
    tmp_path: Path,
    parts_model: Path,
    replay: Path,
    caplog: pytest.LogCaptureFixture,
    run_station: Callable[[Path], Station],
) -> None:
    """At the service's level, paho's 'failed to receive on socket' came at ERROR once a
    second beside the station's own single line."""
    caplog.set_level(logging.INFO)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def hang_up() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                conn.recv(1024)
                # a reset, as a service that is not a broker gives: paho's "[Errno 104]"
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

        threading.Thread(target=hang_up, daemon=True).start()
        config = write_config(
            tmp_path,
            parts_model,
            replay,
            None,
            "quiet",
            mqtt={"enabled": True, "host": "127.0.0.1", "port": port, "reconnect_min_s": 0.2},
        )
        station = run_station(config)
        assert station.link is not None
        assert wait_until(lambda: station.link is not None and station.link.last_error, 20)
        time.sleep(2)  # several retries
    paho = [r for r in caplog.records if r.name == "paho" and r.levelno >= logging.ERROR]
    assert paho == []
    ours = [r for r in caplog.records if "did not answer as an MQTT broker" in r.getMessage()]
    assert len(ours) == 1
