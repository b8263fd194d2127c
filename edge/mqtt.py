"""The station's MQTT link: status with last will, verdicts, backlog, stats, errors, commands.

Topics under the configured prefix P (README, "MQTT topics"):

    P/status      retained  online | degraded | paused | offline (the last will says offline)
    P/state       retained  JSON: status, reason, model_id, source, time
    P/verdict     QoS 1     JSON verdict, with an MQTT 5 message expiry
    P/backlog     QoS 1     JSON verdicts that could not be delivered live, oldest first, once
    P/stats       QoS 0     JSON counters and latency percentiles, every stats_interval_s
    P/error       QoS 1     JSON: a command that was refused (and its part id) and why
    P/cmd/<name>  (in)      trigger, pause, resume, reload
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge.config import MqttConfig

log = logging.getLogger(__name__)

COMMANDS = ("trigger", "pause", "resume", "reload")

OnCommand = Callable[[str, bytes], None]
OnDelivered = Callable[[int], None]


class _OnceIsEnough(logging.Filter):
    """paho logs a failed socket read at ERROR on every reconnect attempt (a port that is not
    a broker: every second); the link says what is wrong itself, once per change. Those lines
    are kept for a debug run only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("failed to receive on socket"):
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("paho").addFilter(_OnceIsEnough())


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def secure(client: mqtt.Client, cfg: MqttConfig) -> None:
    """Give a paho client the configured login and TLS settings (the station's and watch's)."""
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password())
    if cfg.tls.enabled:  # the files are read once, into the context (ConfigError if unusable)
        client.tls_set_context(cfg.tls.ssl_context())


def part_id_of(payload: bytes) -> str | None:
    """The part id a refused trigger carried, if one can be read, so the controller knows which
    part gets no verdict; None otherwise (it is only echoed, never acted on)."""
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    part = doc.get("part_id") if isinstance(doc, dict) else None
    if isinstance(part, str) and 0 < len(part) <= 128 and part.isprintable():
        return part
    return None


class Link:
    """The station's MQTT connection, kept up with reconnect back-off by a thread of its own.

    Each connection gets a fresh paho client. paho re-sends the QoS 1 messages a client still
    holds when it reconnects, which would deliver live verdicts minutes late after an
    outage; a client that is thrown away with its connection cannot. A verdict that was not
    acknowledged stays unpublished in the journal and goes out once on P/backlog instead.
    `on_delivered(seq)` is called (from the network thread) when the broker acknowledged the
    message carrying that journal record.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        on_command: OnCommand,
        on_delivered: OnDelivered,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.prefix = cfg.prefix.rstrip("/")
        self._on_command = on_command
        self._on_delivered = on_delivered
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # paho message id -> journal seq, this connection
        self._live: dict[int, float] = {}  # message id -> when sent, of live verdicts in flight
        self._acked_early: dict[int, bool] = {}  # message id -> delivered, before registration
        self._untracked: set[int] = set()  # message ids of status, state, stats and errors
        # Delivered, but the journal could not mark them so (a full disk): never sent again.
        self._unmarked: set[int] = set()
        self._status = b"online"
        self._state: dict[str, Any] = {}
        self.connected = threading.Event()
        self.connects = 0
        self.last_error: str | None = None
        self._stopping = threading.Event()
        self._refused = False
        self._v5 = cfg.protocol == "5"
        self._thread: threading.Thread | None = None
        self.client = self._new_client()

    def _new_client(self) -> mqtt.Client:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            reconnect_on_failure=False,  # our thread reconnects, with a new client
        )
        c.enable_logger(logging.getLogger("paho"))
        # An exception in a callback would end paho's thread without a disconnect callback,
        # and the link would never reconnect: log it instead.
        c.suppress_exceptions = True
        c.max_queued_messages_set(self.cfg.max_queued)
        c.will_set(self.topic("status"), b"offline", qos=1, retain=True)
        secure(c, self.cfg)
        c.on_connect = self._connected
        c.on_disconnect = self._disconnected
        c.on_publish = self._published
        c.on_message = self._message
        return c

    def topic(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    # --- lifecycle ---

    def start(self) -> None:
        """Connect in the background and keep reconnecting, with back-off, until stop()."""
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delay = self.cfg.reconnect_min_s
        where = f"{self.cfg.host}:{self.cfg.port}"
        client: mqtt.Client | None = self.client
        while not self._stopping.is_set():
            self._refused = False  # set by _connected when the broker answers "no"
            try:
                if client is None:  # the password or a certificate is read again: it may fail
                    client = self._new_client()
                    with self._lock:
                        self.client = client
                client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
            except (OSError, ValueError) as exc:  # ValueError: a ConfigError, say
                error = (
                    f"cannot reach broker {where}: {exc}"
                    if client is not None
                    else f"cannot connect to broker {where}: {exc}"
                )
                if error != self.last_error:
                    log.warning(
                        "%s; retrying every %g-%g s",
                        error,
                        self.cfg.reconnect_min_s,
                        self.cfg.reconnect_max_s,
                    )
                self.last_error = error
            else:
                # paho's own thread does all socket I/O (a publish from the station's thread
                # only queues); two threads writing one TLS socket corrupt the stream.
                ended = threading.Event()
                client.user_data_set(ended)
                client.loop_start()
                ended.wait()  # set by _disconnected, for this connection only
                client.loop_stop()
                if self.connects and self.last_error is None:
                    delay = self.cfg.reconnect_min_s  # it was up: start the back-off afresh
            if self._stopping.wait(delay):
                break
            delay = min(delay * 2, self.cfg.reconnect_max_s)
            with self._lock:
                self._inflight.clear()  # unacknowledged records go out on the backlog
                self._acked_early.clear()
                self._live.clear()
                self._untracked.clear()
            client = None

    def stop(self, timeout_s: float = 3.0) -> None:
        """Publish offline, wait for it to be delivered (bounded), disconnect."""
        if self.connected.is_set():
            info = self._publish_untracked(self.client, "status", b"offline", 1, retain=True)
            # The last state's details (model, source) stay: which model was running.
            kept = {k: v for k, v in self._state.items() if k not in ("status", "reason", "time")}
            self._publish_state("offline", "stopped", **kept)
            try:
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline status not confirmed: %s", exc)
            confirmed = info.is_published()
        else:
            confirmed = True  # the broker's last will said offline when the link was lost
        self._stopping.set()  # what follows is our own disconnect, not a lost broker
        # paho 2.2 logs "Client is not connected" at ERROR after a clean disconnect; nothing
        # is wrong by then, so it must not show.
        self.client.disable_logger()
        if confirmed:
            self.client.disconnect()
        elif self._v5:
            # Offline is stuck behind a slow link: ask the broker for the last will instead,
            # or a clean disconnect would leave the station "online" for good.
            with_will = ReasonCode(PacketTypes.DISCONNECT, identifier=4)
            self.client.disconnect(reasoncode=with_will)
        else:  # MQTT 3.1.1 has no such request: a connection that breaks gets the last will
            sock = self.client.socket()
            if isinstance(sock, socket.socket):  # an ssl.SSLSocket is one too
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self.client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout_s + 2)

    # --- paho callbacks (the network thread) ---

    def _connected(self, client: mqtt.Client, _u: object, _f: object, rc: Any, _p: object) -> None:
        if rc.is_failure:
            self._refused = True
            error = f"broker {self.cfg.host}:{self.cfg.port} refused the connection: {rc}"
            if error != self.last_error:  # once per change, not on every retry
                log.error("%s", error)
            self.last_error = error
            client.disable_logger()  # paho's "not connected" after this disconnect is expected
            client.disconnect()
            return
        if self._stopping.is_set():  # stop() came while this connection was being made
            client.disconnect()
            return
        self.connects += 1
        self.last_error = None
        log.info("connected to %s:%s", self.cfg.host, self.cfg.port)
        # cmd/# rather than cmd/+: a command sent one level too deep is refused, not unheard.
        # MQTT 5 keeps retained commands away (and marks the message that clears one).
        if self._v5:
            keep_away = SubscribeOptions.RETAIN_DO_NOT_SEND
            options = SubscribeOptions(qos=1, retainAsPublished=True, retainHandling=keep_away)
            client.subscribe(self.topic("cmd/#"), options=options)
        else:
            client.subscribe(self.topic("cmd/#"), qos=1)
        # Retained state is published again on every connect, so it is right after a broker restart.
        self._publish_untracked(client, "status", self._status, 1, retain=True)
        if self._state:  # empty until the station's first set_status, which publishes it
            self._publish_untracked(client, "state", _dumps(self._state), 1, retain=True)
        self.connected.set()

    def _disconnected(self, _c: mqtt.Client, ended: Any, _f: object, rc: Any, _p: object) -> None:
        where = f"{self.cfg.host}:{self.cfg.port}"
        if self.connected.is_set() and not self._stopping.is_set():
            log.warning("lost the broker %s (%s); reconnecting", where, rc)
        elif not self._stopping.is_set() and not self._refused:
            if self.connects:
                # It answered before, at this address and with these settings: not a mistake
                # in the config but a broker that is hung or overloaded.
                error = (
                    f"{where} took the connection but gave no MQTT answer ({rc}); the broker "
                    "may be hung or overloaded"
                )
            else:
                # The socket opened but no MQTT answer came: a web server on that port, say,
                # or TLS on one side only. paho alone says little ("Received malformed packet").
                tls = "with" if self.cfg.tls.enabled else "without"
                error = (
                    f"{where} did not answer as an MQTT broker ({rc}); check the host and "
                    f"port, and that the broker expects a connection {tls} TLS (mqtt.tls)"
                )
            if error != self.last_error:
                log.warning("%s; retrying", error)
            self.last_error = error
        self.connected.clear()
        if isinstance(ended, threading.Event):
            ended.set()

    def _publish_untracked(
        self, client: mqtt.Client, name: str, payload: bytes, qos: int, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        """Publish what is not a journal record (status, state, stats, errors), so that its
        acknowledgement is not kept as an early one: a record given the same message id after
        paho's ids wrap round (65,535 messages) would then pass as delivered at once."""
        info = client.publish(self.topic(name), payload, qos=qos, retain=retain)
        with self._lock:
            if self._acked_early.pop(info.mid, None) is None:
                self._untracked.add(info.mid)
        return info

    def _published(self, _c: mqtt.Client, _u: object, mid: int, rc: Any, _p: object) -> None:
        # paho calls this holding its own lock, which publish() also takes: never call paho
        # from here, and never hold self._lock around a paho call elsewhere.
        with self._lock:
            if mid in self._untracked:
                self._untracked.discard(mid)
                return
            seq = self._inflight.get(mid)
            if seq is None:  # acknowledged before _send() could register it
                self._acked_early[mid] = not rc.is_failure
                return
            # Delivered before it leaves _inflight, so the backlog flush (which skips
            # in-flight records) never sees it as neither in flight nor delivered.
            if not rc.is_failure:
                self._deliver(seq)
            del self._inflight[mid]
            self._live.pop(mid, None)

    def _deliver(self, seq: int) -> None:
        try:
            self._on_delivered(seq)
        except Exception as exc:  # the journal may be full: remembered, marked later
            if not self._unmarked:
                log.warning("could not mark record %d delivered: %s", seq, exc)
            self._unmarked.add(seq)

    def retry_marks(self) -> None:
        """Mark the records delivered that the journal could not mark when they were."""
        with self._lock:
            pending = sorted(self._unmarked)
        for seq in pending:
            try:
                self._on_delivered(seq)
            except Exception:
                return  # still failing: try again on a later call
            with self._lock:
                self._unmarked.discard(seq)

    def _message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        name = msg.topic[len(self.prefix) + len("/cmd/") :]
        if msg.retain:
            # A retained trigger or pause would act again at every reconnect and every start.
            if msg.payload:  # an empty one is its clearing: nothing to say
                self.publish_error(
                    name[:64],
                    "retained commands are ignored; clear it with an empty retained message",
                    part_id_of(bytes(msg.payload)),
                )
            return
        self._on_command(name, bytes(msg.payload))

    # --- publishing (the station's thread) ---

    def _send(self, topic: str, doc: dict[str, Any], seq: int, expiry_s: int | None) -> bool:
        props = None
        if self._v5 and expiry_s:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = expiry_s
        info = self.client.publish(self.topic(topic), _dumps(doc), qos=1, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        with self._lock:
            acked = self._acked_early.pop(info.mid, None)
            if acked is None:
                self._inflight[info.mid] = seq
                if topic == "verdict":
                    self._live[info.mid] = time.monotonic()
            elif acked:
                self._deliver(seq)
        return True

    def inflight_seqs(self) -> set[int]:
        """Records not to send on the backlog: in flight, or delivered but not marked so."""
        with self._lock:
            return set(self._inflight.values()) | self._unmarked

    def publish_verdict(self, doc: dict[str, Any], seq: int) -> bool:
        """Publish a live verdict if connected and the broker keeps up; False means it stays in
        the journal's backlog.

        A broker that hangs without closing the connection takes messages into the socket
        and paho's queue and delivers them, as live verdicts, when it wakes: seconds or
        minutes late, and its message expiry only counts from then. So while a live verdict
        has waited longer than `live_ack_s` for its acknowledgement, new ones go to the
        backlog instead. (A fixed time: one learnt from the broker's recent answers learnt a
        hang's delays as usual, and missed the next hang.)
        """
        if not self.connected.is_set():
            return False
        with self._lock:
            oldest = min(self._live.values(), default=None)
        if oldest is not None and time.monotonic() - oldest > self.cfg.live_ack_s:
            return False
        return self._send("verdict", doc, seq, self.cfg.verdict_expiry_s)

    def backlog_in_flight(self) -> int:
        """Backlog records sent and not yet acknowledged."""
        with self._lock:
            return len(self._inflight) - len(self._live)

    def publish_backlog(self, doc: dict[str, Any], seq: int) -> bool:
        if not self.connected.is_set():
            return False
        return self._send("backlog", doc, seq, None)

    def set_status(self, status: str, reason: str, **details: Any) -> None:
        """Change the retained status and state; sent now if connected, else on reconnect."""
        self._status = status.encode()
        self._publish_state(status, reason, **details)
        if self.connected.is_set():
            self._publish_untracked(self.client, "status", self._status, 1, retain=True)

    def _publish_state(self, status: str, reason: str, **details: Any) -> None:
        self._state = {"status": status, "reason": reason, "time": time.time(), **details}
        if self.connected.is_set():
            self._publish_untracked(self.client, "state", _dumps(self._state), 1, retain=True)

    def publish_stats(self, doc: dict[str, Any]) -> None:
        if self.connected.is_set():
            self._publish_untracked(self.client, "stats", _dumps(doc), 0)

    def publish_error(self, command: str, error: str, part_id: str | None = None) -> None:
        log.warning("command %s refused: %s", command, error)
        if self.connected.is_set():
            doc = {"command": command, "part_id": part_id, "error": error, "time": time.time()}
            self._publish_untracked(self.client, "error", _dumps(doc), 1)
