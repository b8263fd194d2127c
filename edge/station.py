"""The inspection loop: newest frame -> model -> decision -> journal -> MQTT, within a budget."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.config import Config
from edge.detection import Detection
from edge.files import write_atomically
from edge.journal import Journal, JournalError, Record
from edge.model import Model, ModelError, give_back_memory
from edge.mqtt import COMMANDS, Link, part_id_of
from edge.overlay import OVERLAY_SIDE, draw_preview
from edge.sources import Frame, FrameSource, SourceEnded, SourceError, SourceTimeout, open_source
from edge.storage import FrameStore
from edge.systemd import Notifier

if TYPE_CHECKING:
    from edge.web import Web

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 4096
# A failing camera is retried after 0.5, 1, 2, 4, 8, 10, 10 ... s and reopened every 3rd failure;
# the longest wait stays well inside systemd's WatchdogSec, which is for a loop that hangs.
SOURCE_RETRY_MIN_S = 0.5
SOURCE_RETRY_MAX_S = 10.0
SOURCE_REOPEN_AFTER = 3
JOURNAL_ROOM_BYTES = 8 * 1024 * 1024  # saved frames deleted at once when the journal is full
LATENCY_WINDOW = 1000  # verdicts the stats percentiles are taken over
FPS_WINDOW_S = 5.0  # the inspection rate is counted over this many seconds
MODEL_POLL_S = 1.0  # how often the model file is looked at for a new version
PRUNE_EVERY_S = 10.0  # old journal records are deleted a batch at a time, this often
OVER_LOG_EVERY_S = 60.0  # at most one "over the budget" log line this often
LOSS_LOG_EVERY_S = 600.0  # at most one "deleted undelivered verdicts" log line this often
BACKLOG_WINDOW = 10  # backlog records awaiting the broker's acknowledgement at most


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    token: str | None = Field(None, max_length=256)


class TriggerCommand(_Command):
    part_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[\x20-\x7e]+$")


def parse_command(name: str, payload: bytes, token: str | None) -> _Command:
    """Validate a command payload; raise ValueError with one sentence saying what is wrong."""
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name[:64]!r}; commands are {', '.join(COMMANDS)}")
    if len(payload) > MAX_COMMAND_BYTES:
        raise ValueError(
            f"payload of {len(payload)} bytes is over the {MAX_COMMAND_BYTES}-byte limit"
        )
    try:
        doc = json.loads(payload.decode("utf-8")) if payload.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("payload is not UTF-8 JSON") from None
    except RecursionError:  # "[[[[...": deep enough to exhaust the parser
        raise ValueError("payload is nested too deeply") from None
    if not isinstance(doc, dict):
        raise ValueError('payload must be a JSON object, e.g. {"part_id": "A123"}')
    # The token first: without it, a sender learns nothing more about the payload's rules.
    if token is not None:
        given = doc.get("token")
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), token.encode()):
            raise ValueError("missing or wrong token")
    kind = TriggerCommand if name == "trigger" else _Command
    try:
        return kind.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        # Keys come from the sender: quoted and cut short, so they cannot forge log lines.
        where = ".".join(str(p) for p in err["loc"])[:64] or "payload"
        if err["type"] == "extra_forbidden":
            raise ValueError(
                f"unknown key {where!r}; {name} takes {', '.join(kind.model_fields)}"
            ) from None
        raise ValueError(f"{where!r}: {err['msg']}") from None


def _takes_what_runs(new: Model, running: Model) -> bool:
    """The new model takes every image size the running one does: it takes any size, or the
    same one. (Before a first frame nothing else shows which size the camera gives.)"""
    return new.meta.image_hw is None or new.meta.image_hw == running.meta.image_hw


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    frames: int = 0
    verdicts: int = 0
    ng: int = 0
    overruns: int = 0
    source_errors: int = 0
    backlog_deleted: int = 0  # undelivered records the journal's count limit took
    latencies_ms: list[float] = field(default_factory=list)
    decided: deque[float] = field(default_factory=lambda: deque(maxlen=1000))

    def add(self, latency_ms: float, ng: bool, over: bool) -> None:
        self.verdicts += 1
        self.ng += ng
        self.overruns += over
        self.latencies_ms.append(latency_ms)
        del self.latencies_ms[:-LATENCY_WINDOW]
        self.decided.append(time.monotonic())

    def fps(self) -> float:
        """Verdicts a second over the last few seconds."""
        since = time.monotonic() - FPS_WINDOW_S
        recent = [t for t in list(self.decided) if t >= since]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)

    def as_dict(self) -> dict[str, Any]:
        lat = np.array(self.latencies_ms or [0.0])
        return {
            "fps": round(self.fps(), 2),
            "frames": self.frames,
            "verdicts": self.verdicts,
            "ng": self.ng,
            "overruns": self.overruns,
            "source_errors": self.source_errors,
            "backlog_deleted": self.backlog_deleted,
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
            "latency_ms_p95": round(float(np.percentile(lat, 95)), 2),
            "latency_ms_max": round(float(lat.max()), 2),
            "uptime_s": round(time.monotonic() - self.started, 1),
        }


@dataclass(frozen=True)
class Latest:
    """The last inspected frame and what the model said of it (for the page)."""

    frame: Frame
    detection: Detection
    seq: int | None  # the journal's record number, None if the journal failed


@dataclass(frozen=True)
class ModelEvent:
    """The last model change or refusal, for the page: when, whether taken, and what happened."""

    wall: float
    taken: bool
    text: str


class Station:
    """One inspection station: runs until stop() or SIGTERM.

    >>> Station(load_config(Path("/etc/edge-inspect/config.toml"))).run()  # doctest: +SKIP
    """

    def __init__(self, cfg: Config, source: FrameSource | None = None) -> None:
        self.cfg = cfg
        state = cfg.station.state_dir
        self.store = FrameStore(
            state / "frames", int(cfg.storage.quota_mb * 1e6), cfg.storage.jpeg_quality
        )
        self.model = Model(
            cfg.model.path, threads=cfg.model.threads, providers=list(cfg.model.providers)
        )
        self.source = source or open_source(cfg.source)
        self.notifier = Notifier()
        self.stats = Stats()
        # (name, payload, time.monotonic() it arrived): a trigger's frame must come after it
        self.commands: queue.Queue[tuple[str, bytes, float]] = queue.Queue(maxsize=100)
        self.paused = False
        self.status = "online"
        self.reason = ""
        self._stop = threading.Event()
        self._last_frame: Frame | None = None
        self._ok_count = 0
        self._source_failures = 0
        self._open_error = ""  # why the source last failed to open, until it opens
        self._fault = ""  # why the source last failed
        self._delivered_at = 0.0  # time.monotonic() of the last frame, or of the source's open
        self.max_delay_s = cfg.trigger.max_delay_ms / 1000
        self._over_quiet_until = 0.0  # over-budget verdicts are logged once a minute at most
        self._over_unlogged = 0
        self._loss_quiet_until = 0.0
        self._journal_failed = False
        self._paths_failing = False
        self._told: tuple[str, str, str] | None = None  # status, reason, model last published
        self._loader: threading.Thread | None = None
        self._loader_lock = threading.Lock()
        self.latest: Latest | None = None
        self.model_event: ModelEvent | None = None
        # Checked models (with the file's mtime and size when read), or why one failed.
        self._candidates: queue.Queue[tuple[Model, tuple[int, int]] | str] = queue.Queue()
        st = cfg.model.path.stat()
        self._model_sig = self._seen_sig = (st.st_mtime_ns, st.st_size)
        self.journal = Journal(state / "journal.sqlite", writer=True)
        self.link: Link | None = None
        self.web: Web | None = None
        try:
            if cfg.mqtt.enabled:
                self.link = Link(
                    cfg.mqtt, cfg.client_id, self._command_arrived, self.journal.mark_published
                )
            if cfg.web.enabled:
                from edge.web import Web

                self.web = Web(self)
        except BaseException:
            self.journal.close()  # and with it the claim on the state folder
            raise

    # --- called from other threads ---

    def _command_arrived(self, name: str, payload: bytes) -> None:
        if len(payload) > MAX_COMMAND_BYTES:  # refused here: a flood of them is never held
            why = f"payload of {len(payload)} bytes is over the {MAX_COMMAND_BYTES}-byte limit"
            self._refuse(name[:64], why)
            return
        try:
            self.commands.put_nowait((name, payload, time.monotonic()))
        except queue.Full:
            self._refuse(
                name[:64], "too many commands waiting; this one was dropped", part_id_of(payload)
            )

    def command(self, name: str, part_id: str | None = None) -> None:
        """Queue a command as if it came over MQTT (from the page): pause, resume, trigger,
        reload. It goes through the same checks, token included."""
        doc: dict[str, str] = {}
        if self.cfg.mqtt.command_token:
            doc["token"] = self.cfg.mqtt.command_token
        if part_id is not None:
            doc["part_id"] = part_id
        self._command_arrived(name, json.dumps(doc).encode())

    def stop(self) -> None:
        self._stop.set()

    # --- the loop ---

    def run(self) -> int:
        """Inspect until stopped; returns the process exit code (0 after a clean stop)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        if self.link:
            self.link.start()
        if self.web:
            self.web.start()
        self._open_source(first=True)
        if not self._source_failures:
            self._set_status("online", "")
        # READY carries the status: a camera that failed to open is not "inspecting".
        if self.status == "degraded":
            self.notifier.ready(f"degraded: {self.reason}")
        else:
            self.notifier.ready(f"inspecting with model {self.model.id}")
        log.info(
            "station %s ready: model %s, source %s",
            self.cfg.station.name,
            self.model.id,
            self.source.name,
        )
        next_stats = time.monotonic() + self.cfg.mqtt.stats_interval_s
        next_watch = time.monotonic() + MODEL_POLL_S
        next_prune = time.monotonic()
        period = 1.0 / self.cfg.trigger.rate_hz if self.cfg.trigger.rate_hz else 0.0
        next_frame = time.monotonic()
        try:
            while not self._stop.is_set():
                self.notifier.ping()
                trigger = self._handle_commands()
                self._swap_model()
                now = time.monotonic()
                if now >= next_watch:
                    next_watch = now + MODEL_POLL_S
                    self._watch_model_file()
                if now >= next_stats:
                    next_stats += self.cfg.mqtt.stats_interval_s
                    self._publish_stats()
                if now >= next_prune:
                    next_prune = now + PRUNE_EVERY_S
                    self._prune_journal()
                self._flush_backlog()
                if self.paused:
                    continue
                if self.cfg.trigger.mode == "triggered":
                    if trigger is None:
                        continue
                    cmd, arrived = trigger
                    self._inspect(after=arrived, part_id=cmd.part_id)
                else:
                    if period:
                        wait = next_frame - time.monotonic()
                        if wait > 0:
                            self._stop.wait(min(wait, 0.5))
                            continue
                        next_frame = max(next_frame + period, time.monotonic())
                    self._inspect(after=None, part_id=None)
        except SourceEnded:
            log.info("source %s ended", self.source.name)
            self._refuse_waiting(f"{self.source.name} has no more frames")
        finally:
            self.notifier.stopping()
            self._refuse_waiting("the station is stopping")
            self.source.close()
            self._publish_stats()
            if self.web:
                self.web.stop()
            if self.link:
                self.link.stop()
            self.journal.close()
        return 0

    def _refuse_waiting(self, why: str) -> None:
        """Answer the triggers still queued, so that no part waits for a verdict that will
        never come (other commands have nothing left to act on)."""
        while True:
            try:
                name, payload, _ = self.commands.get_nowait()
            except queue.Empty:
                return
            if name == "trigger":
                self._no_verdict(part_id_of(payload), why)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: finishing the frame in hand", signum)
        self._stop.set()

    def _handle_commands(self) -> tuple[TriggerCommand, float] | None:
        """Apply waiting commands; return a trigger, with when it arrived, if one came. Waits
        briefly when idle."""
        idle = self.paused or self.cfg.trigger.mode == "triggered"
        try:
            name, payload, arrived = (
                self.commands.get(timeout=0.2) if idle else self.commands.get_nowait()
            )
        except queue.Empty:
            return None
        try:
            cmd = parse_command(name, payload, self.cfg.mqtt.command_token)
        except ValueError as exc:
            self._refuse(name[:64], str(exc), part_id_of(payload))
            return None
        if name == "pause":
            self.paused = True
            self._set_status("paused", "paused by command")
        elif name == "resume":
            self.paused = False
            if self._source_failures:  # the camera has not delivered since it failed
                self._set_status("degraded", self._open_error or self._fault)
            else:
                self._set_status("online", "")
        elif name == "reload":
            self.reload()
        elif name == "trigger":
            assert isinstance(cmd, TriggerCommand)
            if self.cfg.trigger.mode != "triggered":
                why = 'the station is in free-run mode; set trigger.mode = "triggered"'
                self._refuse("trigger", why, cmd.part_id)
            elif self.paused:
                self._refuse("trigger", "the station is paused", cmd.part_id)
            else:
                return cmd, arrived
        return None

    def _refuse(self, command: str, why: str, part_id: str | None = None) -> None:
        if self.link:
            self.link.publish_error(command, why, part_id)

    def _no_verdict(self, part_id: str | None, why: str) -> None:
        """Tell the line controller that this part's trigger gets no verdict, and why."""
        self._refuse("trigger", f"no verdict for part {part_id or '(none)'}: {why}", part_id)

    @property
    def previous_model(self) -> Path:
        """Where reload(install=...) keeps the model file it replaced, for a roll-back."""
        path = self.cfg.model.path
        return path.with_name(f"{path.stem}.previous{path.suffix}")

    def reload(self, why: str = "reload command", install: Path | None = None) -> bool:
        """Load the model file again in the background; it replaces the running model between
        two frames only if it loads, is ours, takes the camera's frames and runs on the last
        one. Otherwise the old model keeps running and the reason goes out on P/error.

        With `install` (a model trained on the page, say) that file is checked the same way
        and, if it passes, copied over the model file (the old one kept as previous_model)
        before it is swapped in. Returns False if a model is being loaded already.
        """
        with self._loader_lock:
            if self._loader is not None and self._loader.is_alive():
                self._refuse("reload", "a model is already being loaded")
                return False
            last = self._last_frame
            reference = last.image.copy() if last is not None else None
            self._loader = threading.Thread(
                target=self._load_candidate,
                args=(reference, why, install),
                name="model-loader",
                daemon=True,
            )
            self._loader.start()
            return True

    def _load_candidate(self, reference: np.ndarray | None, why: str, install: Path | None) -> None:
        path = self.cfg.model.path
        try:
            # The file's signature before it is read: one written meanwhile is loaded later.
            st = None if install else path.stat()
            if install is None and self._same_as_running(path):
                # Loading it again would cost a session's memory for nothing (40 MB seen).
                raise ModelError(f"model file {path} holds the running model already")
            model = Model(
                install or path,
                threads=self.cfg.model.threads,
                providers=list(self.cfg.model.providers),
            )
            if reference is not None:
                model.run(reference)
            elif not _takes_what_runs(model, self.model):
                # No frame yet (a triggered station before its first trigger): nothing shows
                # which size the camera gives, so the running model's size stays.
                raise ModelError(
                    f"the new model takes {model.meta.image_size} images and the running one "
                    f"{self.model.meta.image_size}; no camera frame has come yet to show which "
                    "is right"
                )
            if install is not None:
                data = install.read_bytes()
                if hashlib.sha256(data).hexdigest() != model.sha256:
                    raise ModelError(f"model {install} changed while it was being checked")
                if model.sha256 == self.model.sha256:
                    # Installing it would make the previous model a copy of it: the model that
                    # was really running before would be lost for a roll-back.
                    raise ModelError(f"model {model.id} is the one running already")
                if path.is_file():
                    write_atomically(self.previous_model, path.read_bytes())
                write_atomically(path, data)
                model.path = path
                st = path.stat()
            assert st is not None
            self._candidates.put((model, (st.st_mtime_ns, st.st_size)))
        except (ModelError, ValueError, OSError) as exc:
            self._candidates.put(
                f"new model not taken ({why}): {exc}; still running {self.model.id}"
            )

    def _same_as_running(self, path: Path) -> bool:
        return hashlib.sha256(path.read_bytes()).hexdigest() == self.model.sha256

    def _swap_model(self) -> None:
        """Between frames: take a model the loader has checked, or report why it failed."""
        try:
            candidate = self._candidates.get_nowait()
        except queue.Empty:
            return
        if isinstance(candidate, str):
            log.warning("%s", candidate)
            self.model_event = ModelEvent(time.time(), False, candidate)
            self._refuse("reload", candidate)
            return
        model, sig = candidate
        old, self.model = self.model, model
        self._model_sig = self._seen_sig = sig  # the file watcher need not load it again
        log.info("model %s replaced by %s (sha256 %s)", old.id, model.id, model.sha256)
        self.model_event = ModelEvent(
            time.time(), True, f"model {model.id} replaced {old.id} between two frames"
        )
        del old
        give_back_memory()
        self._set_status(self.status, self.reason)

    def _watch_model_file(self) -> None:
        """Reload when the model file changed and has stayed the same for one poll (so a file
        that is still being written is not taken)."""
        if self._loader is not None and self._loader.is_alive():
            return  # it may be installing a model there right now
        try:
            st = self.cfg.model.path.stat()
        except OSError:
            return
        sig = (st.st_mtime_ns, st.st_size)
        if sig != self._model_sig and sig == self._seen_sig:
            self._model_sig = sig  # tried once per change, whether it loads or not
            try:
                same = self._same_as_running(self.cfg.model.path)
            except OSError:
                same = False  # the loader says why it cannot be read
            if same:  # copied over itself, or touched: not worth a word to the line
                log.info("model file rewritten with the running model %s", self.model.id)
            else:
                self.reload("model file changed")
        self._seen_sig = sig

    def _set_status(self, status: str, reason: str) -> None:
        """Publish a change of status, reason or model; the same again (a fault that lasts,
        seen on every frame) is not sent again."""
        if (status, reason) != (self.status, self.reason):
            # A fault goes to the journal at the default level: it is what an engineer needs.
            level = logging.WARNING if status == "degraded" else logging.INFO
            log.log(level, "status %s%s", status, f": {reason}" if reason else "")
        self.status, self.reason = status, reason
        told = (status, reason, self.model.sha256)
        if told == self._told:
            return
        self._told = told
        if self.link:
            self.link.set_status(
                status,
                reason,
                model_id=self.model.id,
                model_sha256=self.model.sha256,
                source=self.source.name,
            )
        self.notifier.status(f"{status}{': ' + reason if reason else ''}")

    def _publish_stats(self) -> None:
        doc = {
            "station": self.cfg.station.name,
            **self.stats.as_dict(),
            "dropped": self.source.dropped,
            "model_id": self.model.id,
            "status": self.status,
            "backlog": self.journal.backlog(),
            "broker_connects": self.link.connects if self.link else 0,
        }
        if self.link:
            self.link.publish_stats(doc)

    def _prune_journal(self) -> None:
        """Keep the journal within storage.journal_days and journal_max_records. Without a
        broker nothing is ever delivered, so then age and count alone decide; with one, the
        count limit still takes the oldest undelivered records, and says so."""
        storage = self.cfg.storage
        try:
            gone, undelivered = self.journal.prune(
                time.time() - storage.journal_days * 86400,
                storage.journal_max_records,
                keep_unpublished=self.link is not None,
            )
        except JournalError as exc:
            log.warning("%s", exc)
            return
        if gone:
            log.debug("deleted %d old journal records", gone)
        if undelivered and self.link is not None:
            self.stats.backlog_deleted += undelivered
            if time.monotonic() >= self._loss_quiet_until:
                self._loss_quiet_until = time.monotonic() + LOSS_LOG_EVERY_S
                log.warning(
                    "the broker has not taken verdicts for so long that the journal is at "
                    "storage.journal_max_records (%d): the oldest undelivered ones are being "
                    "deleted (%d since the station started)",
                    storage.journal_max_records,
                    self.stats.backlog_deleted,
                )

    def _flush_backlog(self) -> None:
        """Send the oldest undelivered records, BACKLOG_WINDOW at a time: more filled paho's
        queue (a thousand deep), and live verdicts then waited behind them for seconds on a
        link slower than the station."""
        link = self.link
        if link is None or not link.connected.is_set():
            return
        link.retry_marks()
        room = BACKLOG_WINDOW - link.backlog_in_flight()
        if room <= 0:
            return
        inflight = link.inflight_seqs()
        for rec in self.journal.unpublished(limit=room + len(inflight)):
            if rec.seq in inflight:
                continue
            if room <= 0 or not link.publish_backlog(rec.payload(), rec.seq):
                break
            room -= 1

    def _source_failed(self, exc: SourceError) -> None:
        """Report the camera fault, back off, and reopen the source after repeated failures."""
        self.stats.source_errors += 1
        self._source_failures += 1
        self._fault = str(exc)
        self._set_status("degraded", str(exc))
        delay = min(SOURCE_RETRY_MIN_S * 2 ** (self._source_failures - 1), SOURCE_RETRY_MAX_S)
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0 and not self._stop.is_set():
            self.notifier.ping()  # the loop is alive, only the camera is not
            # Commands still work; a trigger is answered now, not after the back-off with a
            # picture of whatever is under the camera by then.
            trigger = self._handle_commands()
            if trigger is not None:
                self._no_verdict(trigger[0].part_id, str(exc))
            self._stop.wait(min(left, 0.1))
        if self._source_failures % SOURCE_REOPEN_AFTER == 0 and not self._stop.is_set():
            log.warning(
                "reopening source %s after %d failures", self.source.name, self._source_failures
            )
            self.source.close()
            self._open_source(first=False)

    def _open_source(self, first: bool) -> None:
        try:
            self.source.open()
            self._open_error = ""
            self._delivered_at = time.monotonic()  # a frame may take frame_timeout_s to come
        except SourceError as exc:
            self._open_error = str(exc)
            if first:
                self._source_failed(exc)
            elif not self.paused:  # paused stays paused; resume says the fault
                self._set_status("degraded", str(exc))

    def _read(self, after: float | None, wait_s: float) -> Frame:
        """source.read, in slices of at most a second with a watchdog ping between them: a
        camera triggered by hardware may wait for its next part longer than WatchdogSec."""
        end = time.monotonic() + wait_s
        while True:
            try:
                slice_s = max(0.0, min(end - time.monotonic(), 1.0))
                return self.source.read(after=after, timeout_s=slice_s)
            except SourceTimeout:
                if time.monotonic() >= end or self._stop.is_set():
                    raise SourceTimeout(
                        f"{self.source.name} gave no frame within {wait_s:.3g} s"
                    ) from None
                self.notifier.ping()

    def _inspect(self, after: float | None, part_id: str | None) -> None:
        """Inspect the newest frame, or for a trigger (after: when it arrived) the first one
        exposed after it, if that comes within trigger.max_delay_ms; refuse the trigger if not."""
        wait_s = self.cfg.source.frame_timeout_s
        if after is not None:  # a frame after the trigger's deadline would be refused anyway
            wait_s = min(wait_s, max(0.0, after + self.max_delay_s - time.monotonic()))
        try:
            frame = self._read(after, wait_s)
            self._last_frame = frame  # a new model is tried on it, even if this one refuses it
            self._delivered_at = time.monotonic()
            try:
                self.model.check_frame(frame.image)
            except ValueError as exc:  # the camera was set up for another model, say
                raise SourceError(f"{self.source.name}: {exc}") from None
        except SourceEnded as exc:
            if after is not None:  # the trigger in hand; those still queued are answered later
                self._no_verdict(part_id, str(exc))
            raise
        except SourceError as exc:
            if self._stop.is_set():  # the wait was cut short to stop: not a camera fault
                return
            timeout_s = self.cfg.source.frame_timeout_s
            # When the camera last showed life: its newest frame, which in triggered mode
            # nobody may have asked for in a while, else the last frame read.
            newest = self.source.newest_at()
            alive = self._delivered_at if newest is None else max(newest, self._delivered_at)
            if (
                isinstance(exc, SourceTimeout)
                and wait_s < timeout_s
                and time.monotonic() - alive < timeout_s
            ):
                # Only this trigger's deadline passed, and the camera made frames lately: it
                # is not known to be at fault. (Silent for frame_timeout_s, it is.)
                why = "no frame came within trigger.max_delay_ms of the trigger"
                self._no_verdict(part_id, why)
                return
            if isinstance(exc, SourceTimeout) and wait_s < timeout_s:
                # A trigger's short wait ended it, but what is wrong is the long silence. (The
                # same words each time: a changing figure made every retry a new status.)
                exc = SourceTimeout(
                    f"{self.source.name} has made no frame for over {timeout_s:g} s "
                    "(source.frame_timeout_s)"
                )
            # After a failed reopen, "not open" would hide why: report the reason it failed.
            fault = SourceError(self._open_error) if self._open_error else exc
            if after is not None:  # the controller waits for this part's verdict: say why not
                self._no_verdict(part_id, str(fault))
            self._source_failed(fault)
            return
        if self._source_failures:
            log.info("source %s delivers again", self.source.name)
            self._source_failures = 0
            self._set_status("online", "")
        if after is not None and (late := frame.captured - after) > self.max_delay_s:
            # The trigger waited behind others, or the camera was slow: this picture may show
            # the next part, so no verdict is better than one for the wrong part.
            why = f"the first frame after the trigger came {1000 * late:.0f} ms after it"
            self._no_verdict(part_id, f"{why}, over trigger.max_delay_ms")
            return
        self.stats.frames += 1
        t0 = time.monotonic()
        detection = self.model.detect(frame.image)
        decided = time.monotonic()
        latency_ms = (decided - frame.captured) * 1000
        over = latency_ms > self.cfg.station.budget_ms
        if over:
            self._over_unlogged += 1
            if decided >= self._over_quiet_until:  # a throttled Pi must not flood the journal
                log.warning(
                    "verdict for frame %d took %.1f ms, over the %.0f ms budget (%d over it "
                    "since the last such line)",
                    frame.seq,
                    latency_ms,
                    self.cfg.station.budget_ms,
                    self._over_unlogged,
                )
                self._over_quiet_until, self._over_unlogged = decided + OVER_LOG_EVERY_S, 0
        fields: dict[str, Any] = dict(
            wall=frame.wall,
            part_id=part_id,
            verdict=detection.verdict,
            score=detection.score,
            threshold=detection.threshold,
            area=detection.area,
            boxes=[b.as_dict() for b in detection.boxes],
            capture_to_decision_ms=latency_ms,
            inference_ms=(decided - t0) * 1000,
            over_budget=over,
            model_id=self.model.id,
            frame_seq=frame.seq,
            frame_path=None,
            overlay_path=None,
        )
        record: Record | None = None
        try:
            record = self._append(fields)
            if self._journal_failed:
                self._journal_failed = False
                self._set_status("online", "")
        except JournalError as exc:
            self._journal_failed = True
            self._set_status("degraded", str(exc))
        self.stats.add(latency_ms, detection.is_anomalous, over)
        self.latest = Latest(frame, detection, record.seq if record is not None else None)
        if self.link:
            if record is not None:
                self.link.publish_verdict(record.payload(), record.seq)
            else:  # no journal: the line is still told, without a record number
                iso = datetime.fromtimestamp(frame.wall, timezone.utc).isoformat(
                    timespec="milliseconds"
                )
                self.link.publish_verdict({"seq": None, "time": iso, **fields}, -1)
        self._save(frame, detection, record)

    def _append(self, fields: dict[str, Any]) -> Record:
        """Journal a verdict; on a full disk, saved frames give way first (the oldest)."""
        try:
            return self.journal.append(**fields)
        except JournalError as exc:
            if not exc.disk_full or not self.store.free(JOURNAL_ROOM_BYTES):
                raise
        log.warning("disk full: the oldest saved frames were deleted to keep the journal going")
        record = self.journal.append(**fields)
        # The record is in: a failure to note the deleted frames must not make it look lost
        # (its verdict would go out without its number, then again on the backlog).
        with contextlib.suppress(JournalError):
            self._forget_evicted()
        return record

    def _forget_evicted(self) -> None:
        for gone in self.store.evicted():
            self.journal.forget_path(gone)

    def _save(self, frame: Frame, detection: Detection, record: Record | None) -> None:
        keep = False
        if detection.is_anomalous:
            keep = self.cfg.storage.save_ng
        elif self.cfg.storage.save_ok_every:
            self._ok_count += 1
            keep = (self._ok_count - 1) % self.cfg.storage.save_ok_every == 0  # 1st, N+1th, ...
        if not keep or record is None:
            return
        name = f"{record.seq:08d}-{detection.verdict}"
        overlay = draw_preview(frame.image, detection, OVERLAY_SIDE)
        paths = self.store.save(name, frame.image, overlay)
        try:
            self._forget_evicted()
            if paths[0] is not None:
                self.journal.set_paths(record.seq, *paths)
            self._paths_failing = False
        except JournalError as exc:
            # The verdict is journalled and out; only where its picture lies is not noted. Not
            # a status change: on a full disk it comes and goes with every frame.
            if not self._paths_failing:
                log.warning("saved frames may be missing from the journal: %s", exc)
            self._paths_failing = True
