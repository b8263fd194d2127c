"""The station's configuration: one TOML file, validated by pydantic; load_config(path)."""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]


class _WrongType:
    """Stands in for a value of the other TOML type: true/false given to a number, or a string
    given to a yes/no or a number. Validation then fails at that key with its own message;
    pydantic would read `threads = true` as 1 thread, `loop = "no"` as false and `port =
    "1883"` as 1883."""

    def __init__(self, value: object) -> None:
        self.value = value

    def problem(self, expected: str) -> str:
        if isinstance(self.value, str):
            return f"must be {expected}, not the text {self.value!r} (leave out the quotes)"
        return f"must be {expected}, not {str(self.value).lower()}"


_EXPECTED = {"bool_type": "true or false", "int_type": "a whole number", "float_type": "a number"}
_SCALARS = (bool, int, float)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _scalars_as_written(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields

        def wrong(key: str, value: object) -> bool:
            if key not in fields:
                return False  # an unknown key, said as such
            kind = fields[key].annotation
            types = {t for t in (kind, *get_args(kind)) if isinstance(t, type)}
            if not types & set(_SCALARS):
                return False  # text, paths, choices, lists: pydantic's own checks hold
            if isinstance(value, bool):
                return bool not in types
            if isinstance(value, str):
                return str not in types  # `device` takes a number or a text
            if isinstance(value, (int, float)):
                return not types & {int, float}  # a number for a yes/no
            return False

        return {
            key: _WrongType(value) if wrong(key, value) else value for key, value in data.items()
        }


class StationConfig(_Section):
    name: str = Field("station", min_length=1, description="Name shown in logs, stats and the page")
    budget_ms: float = Field(
        200.0,
        gt=0,
        description="Latency budget from capture to decision; verdicts over it are flagged",
    )
    state_dir: Path = Field(
        Path("/var/lib/edge-inspect"),
        description="Journal, saved images and models live here (systemd's StateDirectory)",
    )


class ModelConfig(_Section):
    path: Path = Field(description="The model file (.onnx) made by `edge-inspect train`")
    threads: int = Field(1, ge=1, le=64, description="onnxruntime intra-op threads")
    providers: list[
        Literal["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    ] = Field(
        default=["CPUExecutionProvider"],
        min_length=1,
        description="Execution providers in order of preference; CUDA/TensorRT on a Jetson",
    )


class _Camera(_Section):
    frame_timeout_s: float = Field(
        2.0,
        ge=0.1,
        le=3600,
        description="No frame for this long is a camera fault (raise it for a camera triggered "
        "by hardware, whose frames come only when a part passes)",
    )


class FolderSource(_Camera):
    kind: Literal["folder"]
    path: Path = Field(description="A folder of images (replayed in name order) or a video file")
    fps: float = Field(10.0, ge=0.01, le=1000, description="Replay rate, frames per second")
    loop: bool = Field(True, description="Start again at the end; otherwise the source ends")


class OpenCVSource(_Camera):
    kind: Literal["opencv"]
    device: int | str = Field(
        0, description="USB/V4L2 index, an RTSP/HTTP URL, or a GStreamer pipeline ending in appsink"
    )

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, device: object) -> object:
        if isinstance(device, bool) or not isinstance(device, (int, str)):
            raise ValueError(
                "must be a camera number such as 0, or a device path, URL or GStreamer "
                "pipeline in quotes"
            )
        return device

    backend: Literal["any", "v4l2", "gstreamer", "ffmpeg"] = Field(
        "any", description="OpenCV capture backend"
    )
    width: int | None = Field(None, gt=0, description="Requested frame width, px")
    height: int | None = Field(None, gt=0, description="Requested frame height, px")
    fps: float | None = Field(None, gt=0, description="Requested camera frame rate")


class Picamera2Source(_Camera):
    kind: Literal["picamera2"]
    camera_num: int = Field(0, ge=0, description="Which camera on the Pi")
    width: int = Field(1280, gt=0, description="Frame width, px")
    height: int = Field(960, gt=0, description="Frame height, px")
    exposure_us: int | None = Field(
        None, gt=0, description="Fixed exposure time; None leaves auto exposure on"
    )
    analogue_gain: float | None = Field(None, ge=1.0, description="Fixed analogue gain")
    colour_gains: tuple[float, float] | None = Field(
        None, description="Fixed white balance (red, blue gains); None leaves auto white balance on"
    )

    @field_validator("colour_gains", mode="before")
    @classmethod
    def _two_gains(cls, gains: object) -> object:
        if isinstance(gains, (list, tuple)) and (
            len(gains) != 2
            or any(isinstance(g, bool) or not isinstance(g, (int, float)) for g in gains)
        ):
            raise ValueError(f"must be two numbers, [red, blue], not {json.dumps(list(gains))}")
        return gains

    lens_position: float | None = Field(
        None,
        ge=0.0,
        description="Fixed focus in dioptres (Camera Module 3); None: the lens default",
    )


SourceConfig = Annotated[FolderSource | OpenCVSource | Picamera2Source, Field(discriminator="kind")]


class TriggerConfig(_Section):
    mode: Literal["free", "triggered"] = Field(
        "free", description="free: inspect frames continuously; triggered: one per trigger message"
    )
    rate_hz: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="In free mode, inspect at most this often; 0 inspects every frame",
    )
    max_delay_ms: float = Field(
        500.0,
        gt=0,
        le=60_000,
        description="Longest time from a trigger to its frame: a later one may show the next "
        "part, so the trigger is refused on P/error instead",
    )

    @field_validator("rate_hz")
    @classmethod
    def _rate_or_off(cls, v: float) -> float:
        if 0 < v < 0.001:
            raise ValueError("must be 0 (every frame) or at least 0.001 (one in 1000 s)")
        return v


def _no_passphrase() -> bytes:
    raise ValueError(
        "the key is encrypted; give a key without a passphrase, readable only by the service"
    )


def _check_readable(files: dict[str, Path | None]) -> None:
    """ConfigError naming the first of these files (by key path) that cannot be read."""
    for key, path in files.items():
        if path is None:
            continue
        try:
            path.read_bytes()
        except OSError as exc:
            raise ConfigError([f"{key} {path}: {exc.strerror or exc}"]) from None


def _load_pair(context: ssl.SSLContext, cert: Path, key: Path, where: str) -> None:
    """Load a certificate and its key, never with a passphrase prompt (a service has no one
    to answer it); ConfigError naming `where` (the cert's key path) if they are no pair."""
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError([f"{where} {cert}: no certificate and key pair ({exc})"]) from None


class TLSConfig(_Section):
    enabled: bool = Field(False, description="Connect with TLS")
    ca_file: Path | None = Field(
        None, description="CA certificate(s) to verify the broker; None: system CAs"
    )
    cert_file: Path | None = Field(
        None, description="Client certificate, for brokers that ask for one"
    )
    key_file: Path | None = Field(None, description="Client key for cert_file")
    insecure: bool = Field(
        False, description="Accept a broker certificate that cannot be verified (testing only)"
    )

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context the link connects with; ConfigError naming a certificate or key
        file that cannot be read or used. Only the configured CA is trusted when one is given
        (the system's CAs otherwise)."""
        _check_readable(
            {f"mqtt.tls.{k}": getattr(self, k) for k in ("ca_file", "cert_file", "key_file")}
        )
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                [f"mqtt.tls.ca_file {self.ca_file}: not a CA certificate ({exc})"]
            ) from None
        if self.cert_file and self.key_file:
            _load_pair(context, self.cert_file, self.key_file, "mqtt.tls.cert_file")
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


class MqttConfig(_Section):
    enabled: bool = Field(True, description="Publish to a broker; off keeps only the local journal")
    host: str = Field("localhost", min_length=1, description="Broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is usual with TLS)")
    prefix: str = Field(
        "edge-inspect/station", description="Topic prefix, e.g. factory/line1/station3"
    )
    client_id: str = Field("", description="MQTT client id; empty: edge-inspect-<station name>")
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT version; 5 gives verdicts a message expiry"
    )
    username: str | None = Field(None, description="Broker user name")
    password_file: Path | None = Field(
        None, description="File holding the password (never put the password in this file)"
    )
    password_credential: str | None = Field(
        None,
        description="systemd credential name holding the password ($CREDENTIALS_DIRECTORY/<name>)",
    )
    tls: TLSConfig = Field(default_factory=TLSConfig)  # type: ignore[arg-type]
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive")
    verdict_expiry_s: int = Field(
        30,
        ge=1,
        le=2**32 - 1,  # MQTT 5's limit: paho raises on more, at the first verdict
        description="Verdicts the broker cannot deliver within this time of receiving them are "
        "dropped by it",
    )
    live_ack_s: float = Field(
        1.0,
        ge=0.1,
        le=60,
        description="A live verdict the broker has not acknowledged in this long means it has "
        "stopped taking them: new ones go to the backlog. Raise it above the round trip of a "
        "broker far away",
    )
    stats_interval_s: float = Field(60.0, gt=0, description="How often to publish stats")
    reconnect_min_s: float = Field(1.0, gt=0, description="First reconnect delay")
    reconnect_max_s: float = Field(30.0, gt=0, description="Longest reconnect delay (back-off cap)")
    max_queued: int = Field(
        1000, ge=10, description="Messages paho may hold while the broker is away (bounds memory)"
    )
    command_token: str | None = Field(
        None,
        min_length=8,
        repr=False,
        description='If set, every command must carry it as "token" (a shared secret, 8+ chars)',
    )

    @model_validator(mode="after")
    def _rules(self) -> MqttConfig:
        if self.password_file and self.password_credential:
            raise ValueError("give password_file or password_credential, not both")
        if (self.password_file or self.password_credential) and not self.username:
            raise ValueError("a password needs a username")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must not be less than reconnect_min_s")
        return self

    @field_validator("prefix")
    @classmethod
    def _no_wildcards(cls, prefix: str) -> str:
        if "+" in prefix or "#" in prefix:
            raise ValueError(f"prefix {prefix!r} must not hold wildcards")
        # An empty level (the station would publish to "/status") or a "$" topic (the broker's
        # own, $SYS) is never what was meant.
        levels = prefix.rstrip("/").split("/")
        blank = not prefix.strip("/ ") or any(not c.isprintable() for c in prefix)
        spaced = any(level != level.strip() or not level for level in levels[1:]) or (
            levels[0] != levels[0].strip()
        )
        if blank or spaced or prefix.startswith("$"):
            raise ValueError(
                f"prefix {prefix!r} must be topic levels such as factory/line1/station3, "
                "none empty or edged with spaces, none starting with $, in printable characters"
            )
        return prefix

    def password(self) -> str | None:
        """Read the password from its file or systemd credential; None when there is none."""
        if self.password_file:
            path = self.password_file
        elif self.password_credential:
            creds = os.environ.get("CREDENTIALS_DIRECTORY")
            if not creds:
                raise ConfigError(
                    [
                        f"mqtt.password_credential: $CREDENTIALS_DIRECTORY is not set "
                        f"(add LoadCredential={self.password_credential}:... to the unit)"
                    ]
                )
            path = Path(creds) / self.password_credential
        else:
            return None
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ConfigError([f"mqtt password file {path}: {exc.strerror}"]) from None


class StorageConfig(_Section):
    quota_mb: float = Field(500.0, gt=0, description="Disk quota for saved frames; oldest go first")
    save_ng: bool = Field(True, description="Save every NG frame and its heatmap overlay")
    save_ok_every: int = Field(
        100,
        ge=0,
        description="Save one OK frame in this many (0: none), to keep a sample of good parts",
    )
    jpeg_quality: int = Field(90, ge=50, le=100, description="JPEG quality of saved frames")
    journal_days: float = Field(
        90.0, gt=0, description="Journal records older than this are deleted (once delivered)"
    )
    journal_max_records: int = Field(
        2_000_000,
        ge=1000,
        description="At most this many journal records (85 bytes an OK one, about 250 an NG "
        "one); the oldest go, "
        "undelivered ones too (a broker gone that long would otherwise fill the disk)",
    )


class WebConfig(_Section):
    enabled: bool = Field(False, description="Serve the station page")
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address to listen on; 127.0.0.1 keeps the page on the device, 0.0.0.0 opens "
        "it to the network (then a password is required)",
    )
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0: any free port, for tests)")
    password_hash: str | None = Field(
        None,
        repr=False,
        description="Hash of the page password, made by `edge-inspect hash-password`",
    )
    session_hours: float = Field(12.0, gt=0, le=24 * 30, description="How long a login lasts")
    max_upload_mb: float = Field(
        20.0, gt=0, le=200, description="Largest image the page accepts for upload"
    )
    live_fps: float = Field(
        4.0, gt=0, le=15, description="Most live pictures a second the page is sent"
    )
    dataset_max_mb: float = Field(
        1000.0,
        gt=0,
        description="Most disk space the page's dataset may take; adding beyond it is refused",
    )

    tls_cert: Path | None = Field(
        None,
        description="Certificate (PEM, chain after it) to serve the page over HTTPS; with tls_key",
    )
    tls_key: Path | None = Field(
        None, description="Private key of tls_cert (PEM, no passphrase, readable by the service)"
    )

    @model_validator(mode="after")
    def _pair(self) -> WebConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server TLS context for the page (None: plain HTTP); ConfigError naming a
        certificate or key file that cannot be read or used."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        _check_readable({"web.tls_cert": self.tls_cert, "web.tls_key": self.tls_key})
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_pair(context, self.tls_cert, self.tls_key, "web.tls_cert")
        return context

    @model_validator(mode="after")
    def _access(self) -> WebConfig:
        from edge.access import check_hash

        if self.password_hash is not None:
            check_hash(self.password_hash)
        elif self.enabled and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} opens the page to the network: set password_hash "
                "(make one with `edge-inspect hash-password`)"
            )
        return self


def is_loopback(host: str) -> bool:
    """True for an address or name of this machine only: 127.x.y.z, ::1, localhost.

    Only literal addresses count: a name such as 127.0.0.1.example.com is a name anyone can
    point at 127.0.0.1 (DNS rebinding), so it is not this machine.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Config(_Section):
    station: StationConfig = Field(default_factory=StationConfig)  # type: ignore[arg-type]
    model: ModelConfig
    source: SourceConfig
    trigger: TriggerConfig = Field(default_factory=TriggerConfig)  # type: ignore[arg-type]
    mqtt: MqttConfig = Field(default_factory=MqttConfig)  # type: ignore[arg-type]
    storage: StorageConfig = Field(default_factory=StorageConfig)  # type: ignore[arg-type]
    web: WebConfig = Field(default_factory=WebConfig)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _can_be_triggered(self) -> Config:
        if self.trigger.mode == "triggered" and not (self.mqtt.enabled or self.web.enabled):
            raise ValueError(
                "trigger: mode 'triggered' waits for triggers, which come over MQTT or from "
                "the page: turn on [mqtt] or [web], or use mode 'free'"
            )
        return self

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edge-inspect-{self.station.name}"


class ConfigError(ValueError):
    """A configuration that cannot be used: one line per problem, each with its key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _problems(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        # Drop the union member tag pydantic adds for discriminated unions (source.folder.fps).
        loc = [
            str(p)
            for p in err["loc"]
            if not (err["loc"][:1] == ("source",) and p in ("folder", "opencv", "picamera2"))
        ]
        key = ".".join(loc)  # empty for a rule across sections, whose message names them
        msg = err["msg"]
        if isinstance(err.get("input"), _WrongType) and err["type"] in _EXPECTED:
            msg = err["input"].problem(_EXPECTED[err["type"]])
        elif err["type"] == "union_tag_not_found":  # [source] without a kind
            key += ".kind"
            msg = "required key is missing (folder, opencv or picamera2)"
        elif err["type"] == "union_tag_invalid":  # [source] kind
            ctx = err.get("ctx", {})
            key += f".{ctx.get('discriminator', 'kind').strip(chr(39))}"
            msg = f"{ctx.get('tag')!r} is not one of {ctx.get('expected_tags')}"
        elif err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append(f"{key}: {msg}" if key else msg)
    return out


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse TOML text into a Config, or raise ConfigError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML ({exc})"]) from None
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([f"{source}: {p}" for p in _problems(exc)]) from None


def load_config(path: Path) -> Config:
    """Read and validate a config file.

    >>> load_config(Path("deploy/config.example.toml")).station.budget_ms  # doctest: +SKIP
    200.0
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config file {path} does not exist"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"config file {path} cannot be read ({exc})"]) from None
    return parse_config(text, str(path))
