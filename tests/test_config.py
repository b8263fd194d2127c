"""Config files with mistakes: each gives one line naming the key path and the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Certificates

from edge.config import ConfigError, TLSConfig, load_config, parse_config

GOOD = '[model]\npath = "m.onnx"\n[source]\nkind = "folder"\npath = "frames"\n'


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "station.toml")
    return info.value.problems


def test_a_minimal_config_is_valid_and_defaults_are_safe() -> None:
    cfg = parse_config(GOOD)
    assert cfg.model.threads == 1 and cfg.model.providers == ["CPUExecutionProvider"]
    assert cfg.mqtt.protocol == "5" and not cfg.mqtt.tls.insecure
    assert cfg.trigger.mode == "free" and cfg.client_id == "edge-inspect-station"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD + "[station]\nbudgt_ms = 5\n", "station.budgt_ms: unknown key (misspelt?)"),
        (GOOD + "[stations]\nname = 'x'\n", "stations: unknown key"),
        ('[source]\nkind = "folder"\npath = "f"\n', "model: required key is missing"),
        (GOOD.replace('kind = "folder"', 'kind = "webcam"'), "source.kind: 'webcam' is not one of"),
        (GOOD + "[station]\nbudget_ms = -1\n", "station.budget_ms: Input should be greater than 0"),
        (
            GOOD + "[station]\nbudget_ms = 'fast'\n",
            "station.budget_ms: must be a number, not the text 'fast' (leave out the quotes)",
        ),
        (
            GOOD.replace('path = "frames"', 'path = "f"\nfps = 0'),
            "source.fps: Input should be greater",
        ),
        (GOOD + "[mqtt]\nport = 70000\n", "mqtt.port: Input should be less than or equal to 65535"),
        (
            GOOD + "[mqtt]\nprefix = 'line/+/st'\n",
            "mqtt.prefix: prefix 'line/+/st' must not hold wildcards",
        ),
        (
            GOOD + "[mqtt]\nprefix = 'line//st'\n",
            "mqtt.prefix: prefix 'line//st' must be topic levels such as factory/line1/station3",
        ),
        (GOOD + "[mqtt]\nprefix = '/'\n", "mqtt.prefix: prefix '/' must be topic levels"),
        (GOOD + "[mqtt]\nprefix = '$SYS/st'\n", "none starting with $"),
        (GOOD + "[mqtt]\npassword_file = '/p'\n", "mqtt: a password needs a username"),
        (
            GOOD + "[mqtt]\nusername = 'u'\npassword_file = '/p'\npassword_credential = 'c'\n",
            "mqtt: give password_file or password_credential, not both",
        ),
        (GOOD + "[mqtt.tls]\ncert_file = '/c'\n", "mqtt.tls: cert_file and key_file go together"),
        (GOOD + "[model]\nthreads = 2\n", "not valid TOML"),  # section given twice
        ("[model\npath = 1", "not valid TOML"),
        # a replay so slow that its frame period is infinite crashed the station (NaN times)
        (
            GOOD.replace('path = "frames"', 'path = "f"\nfps = 1e-320'),
            "source.fps: Input should be greater than or equal to 0.01",
        ),
        (
            GOOD + "[trigger]\nrate_hz = 1e-12\n",
            "trigger.rate_hz: must be 0 (every frame) or at least 0.001",
        ),
        (
            GOOD.replace('path = "frames"', 'path = "f"\nframe_timeout_s = 0'),
            "source.frame_timeout_s: Input should be greater than or equal to 0.1",
        ),
        # true/false where a number is due: pydantic alone would read true as 1 and false as 0
        (
            GOOD.replace('path = "m.onnx"', 'path = "m.onnx"\nthreads = true'),
            "model.threads: must be a whole number, not true",
        ),
        (GOOD + "[mqtt]\nport = false\n", "mqtt.port: must be a whole number, not false"),
        (GOOD + "[station]\nbudget_ms = true\n", "station.budget_ms: must be a number, not true"),
        # text where a number or yes/no is due: pydantic alone reads "no" as false
        (
            GOOD.replace('path = "frames"', 'path = "f"\nloop = "no"'),
            "source.loop: must be true or false, not the text 'no' (leave out the quotes)",
        ),
        (
            '[model]\npath = "m"\n[source]\nkind = "picamera2"\ncolour_gains = [true, false]\n',
            "source.colour_gains: must be two numbers, [red, blue], not [true, false]",
        ),
        (
            '[model]\npath = "m"\n[source]\nkind = "opencv"\nwidth = "1280"\n',
            "source.width: must be a whole number, not the text '1280' (leave out the quotes)",
        ),
        (
            GOOD.replace('path = "frames"', 'path = "f"\nloop = 0'),
            "source.loop: must be true or false, not 0",
        ),
        ('[model]\npath = "m"\n[source]\npath = "f"\n', "source.kind: required key is missing"),
        (GOOD + "[mqtt]\nprefix = ' '\n", "mqtt.prefix: prefix ' ' must be topic levels"),
        (GOOD + "[mqtt]\nprefix = 'x/ /y'\n", "mqtt.prefix: prefix 'x/ /y' must be topic levels"),
        (GOOD + "[mqtt]\nprefix = 'line1 /st'\n", "mqtt.prefix: prefix 'line1 /st' must be"),
        (
            GOOD + "[mqtt]\nport = '1883'\n",
            "mqtt.port: must be a whole number, not the text '1883' (leave out the quotes)",
        ),
        (
            '[model]\npath = "m"\n[source]\nkind = "opencv"\ndevice = true\n',
            "source.device: must be a camera number such as 0, or a device path",
        ),
        (
            '[model]\npath = "m"\n[source]\nkind = "picamera2"\ncolour_gains = [1.8]\n',
            "source.colour_gains: must be two numbers, [red, blue], not [1.8]",
        ),
        (
            GOOD + "[trigger]\nmode = 'triggered'\n[mqtt]\nenabled = false\n",
            "station.toml: trigger: mode 'triggered' waits for triggers, which come over MQTT or "
            "from the page",
        ),
        (
            GOOD + "[trigger]\nmode = 'sometimes'\n",
            "trigger.mode: Input should be 'free' or 'triggered'",
        ),
    ],
)
def test_each_mistake_is_one_line_with_its_key_path(text: str, expected: str) -> None:
    found = problems(text)
    assert any(expected in p for p in found), found
    assert all(p.startswith("station.toml: ") and "\n" not in p for p in found)


def test_every_problem_is_reported_not_just_the_first() -> None:
    text = GOOD + "[station]\nbudget_ms = 0\nnmae = 'x'\n[mqtt]\nport = 0\n"
    found = problems(text)
    assert len(found) == 3


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"binary\.toml cannot be read"):
        load_config(binary)


def test_password_comes_from_a_file_or_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = parse_config(GOOD + f"[mqtt]\nusername = 'u'\npassword_file = '{tmp_path / 'pw'}'\n")
    assert cfg.mqtt.password() == "s3cret"
    assert "s3cret" not in repr(cfg)
    cred = parse_config(GOOD + "[mqtt]\nusername = 'u'\npassword_credential = 'mqtt-password'\n")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set"):
        cred.mqtt.password()
    (tmp_path / "mqtt-password").write_text("from-systemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert cred.mqtt.password() == "from-systemd"


def test_tls_files_are_checked_as_the_station_would_use_them(
    tmp_path: Path, certificates: Certificates
) -> None:
    """check-config said "valid" for a CA file holding no certificate, which `run` refused."""
    good = TLSConfig(
        enabled=True,
        ca_file=certificates.ca,
        cert_file=certificates.server_cert,
        key_file=certificates.server_key,
    )
    good.ssl_context()
    garbage = tmp_path / "ca.crt"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=rf"ca_file {garbage}: not a CA certificate"):
        TLSConfig(enabled=True, ca_file=garbage).ssl_context()
    mismatched = TLSConfig(
        enabled=True, cert_file=certificates.server_cert, key_file=certificates.misnamed_key
    )
    with pytest.raises(ConfigError, match="no certificate and key pair"):
        mismatched.ssl_context()
    # An encrypted key would make OpenSSL ask for a passphrase on a terminal a service lacks.
    locked = tmp_path / "locked.key"
    subprocess.run(
        [
            "openssl",
            "pkey",
            "-in",
            str(certificates.server_key),
            "-out",
            str(locked),
            "-aes256",
            "-passout",
            "pass:secret",
        ],
        check=True,
        capture_output=True,
    )
    encrypted = TLSConfig(enabled=True, cert_file=certificates.server_cert, key_file=locked)
    with pytest.raises(ConfigError, match="the key is encrypted"):
        encrypted.ssl_context()


def test_run_itself_refuses_an_unusable_tls_file_with_78(tmp_path: Path) -> None:
    """systemd's RestartPreventExitStatus sees only the main process: `run` must exit 78 for
    what check-config refuses, not inspect on and retry the broker for ever."""
    garbage = tmp_path / "ca.crt"
    garbage.write_text("not a certificate\n")
    config = tmp_path / "station.toml"
    config.write_text(GOOD + f"[mqtt.tls]\nenabled = true\nca_file = '{garbage}'\n")
    r = subprocess.run(
        [sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 78 and f"ca_file {garbage}: not a CA certificate" in r.stderr


def test_the_page_certificate_is_checked_before_the_station_runs(
    tmp_path: Path, certificates: Certificates
) -> None:
    assert problems(GOOD + f"[web]\ntls_cert = '{certificates.server_cert}'\n") == [
        "station.toml: web: tls_cert and tls_key go together"
    ]
    missing = tmp_path / "page.key"
    config = tmp_path / "station.toml"
    config.write_text(
        GOOD + "[mqtt]\nenabled = false\n"
        f"[web]\nenabled = true\ntls_cert = '{certificates.server_cert}'\ntls_key = '{missing}'\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 78 and f"web.tls_key {missing}: No such file or directory" in r.stderr
    mismatched = parse_config(
        GOOD + f"[web]\ntls_cert = '{certificates.server_cert}'\n"
        f"tls_key = '{certificates.misnamed_key}'\n"
    )
    with pytest.raises(ConfigError, match=r"web\.tls_cert .*: no certificate and key pair"):
        mismatched.web.ssl_context()


def test_a_verdict_expiry_mqtt_cannot_carry_is_refused() -> None:
    # It passed check-config, then paho raised at the first verdict: a restart loop.
    assert problems(GOOD + "[mqtt]\nverdict_expiry_s = 5000000000\n") == [
        "station.toml: mqtt.verdict_expiry_s: Input should be less than or equal to 4294967295"
    ]
