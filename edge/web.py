"""The station page: live view, history, dataset, training and trial detection over HTTP.

A small threaded server from the standard library runs beside the inspection loop. It never
calls into the loop: it reads what the loop last published (`Station.latest`, its stats and
journal) and asks for model swaps through `Station.reload`, the same checked path MQTT uses.
Pictures for the page are drawn here, in the server's threads, at most `live_fps` a second.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import cv2

from edge.access import Sessions
from edge.config import ConfigError, is_loopback
from edge.dataset import Dataset, DatasetError, check_label
from edge.httpd import HttpError, Reply, Request, Server, cookie, json_reply, serve
from edge.images import ImageError, decode_image
from edge.journal import Record
from edge.model import Model, ModelError, give_back_memory
from edge.overlay import draw_preview
from edge.train import MIN_NORMAL
from edge.trainjob import Trainer, TrainerBusy, TrainerError

if TYPE_CHECKING:
    import numpy as np

    from edge.station import Latest, Station

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "webui"
_STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
COOKIE = "edge_inspect_session"
CSRF_HEADER = "X-CSRF-Token"
PREVIEW_SIDE = 800  # longer side of live pictures and trial overlays, px
SHOWN_FRAMES = 4  # live frames held for "add this frame" (1 s at 4 pictures a second)
# The evaluation reports are written by report.py with their styles inline.
_REPORT_CSP = (
    "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'self'"
)
# Overlays are JPEG; a report made by an earlier version has PNG ones.
_REPORT_FILE = re.compile(
    r"^(candidate|running)/(report\.html|overlays/[A-Za-z0-9._-]+\.(?:jpg|png))$"
)


Handler = Callable[[Request, re.Match[str]], Reply]


class Web:
    """The page's server for one station.

    >>> web = Web(station); web.start(); print(web.url)    # doctest: +SKIP
    http://127.0.0.1:8080/
    """

    def __init__(self, station: Station) -> None:
        self.station = station
        self.cfg = station.cfg.web
        state = station.cfg.station.state_dir
        self.dataset = Dataset(state / "dataset", round(self.cfg.dataset_max_mb * 1e6))
        self.trainer = Trainer(self.dataset.root, state / "training")
        self.sessions = Sessions(self.cfg.password_hash, self.cfg.session_hours * 3600)
        self.local_only = is_loopback(self.cfg.host)
        self._server: Server | None = None
        self._live_lock = threading.Lock()
        self._previous: tuple[tuple[int, int], str] | None = None  # (mtime, size), model id
        self._live: tuple[Latest, float, bytes] | None = None  # what was shown, when, JPEG
        # The frames recently sent to the page, so "add this frame" finds the one on screen
        # even when a newer picture is already on its way to the browser.
        self._shown: deque[Latest] = deque(maxlen=SHOWN_FRAMES)
        self._candidate: tuple[tuple[int, int, str], Model] | None = None
        self._routes: list[tuple[str, re.Pattern[str], Handler, bool]] = []
        get, post = "GET", "POST"
        for method, pattern, handler, auth in [
            (get, r"/", self._index, False),
            (get, r"/static/(app\.js|style\.css)", self._static, False),
            (get, r"/api/session", self._session, False),
            (post, r"/api/login", self._login, False),
            (post, r"/api/logout", self._logout, False),
            (get, r"/api/status", self._status, True),
            (get, r"/api/live\.jpg", self._live_jpeg, True),
            (get, r"/api/records", self._records, True),
            (get, r"/api/records/(\d+)", self._record, True),
            (get, r"/api/records/(\d+)/(frame|overlay)\.jpg", self._record_picture, True),
            (get, r"/api/dataset", self._dataset, True),
            (get, r"/api/dataset/image/(.+)", self._dataset_image, True),
            (post, r"/api/dataset/capture", self._capture, True),
            (post, r"/api/dataset/record", self._from_record, True),
            (post, r"/api/dataset/upload", self._upload, True),
            (post, r"/api/dataset/move", self._move, True),
            (post, r"/api/dataset/delete", self._delete, True),
            (get, r"/api/training", self._training, True),
            (post, r"/api/training/start", self._train, True),
            (post, r"/api/training/cancel", self._cancel, True),
            (post, r"/api/training/activate", self._activate, True),
            (post, r"/api/training/discard", self._discard, True),
            (get, r"/api/training/files/(.+)", self._training_file, True),
            (post, r"/api/model/rollback", self._rollback, True),
            (post, r"/api/station/(pause|resume|trigger)", self._station_command, True),
            (post, r"/api/trial", self._trial, True),
        ]:
            self._routes.append((method, re.compile(f"^{pattern}$"), handler, auth))

    # --- running ---

    def start(self) -> bool:
        """Listen and serve in a thread; False (and an error in the log) if the port is taken."""
        try:
            tls = self.cfg.ssl_context()  # `run` checked it; a file changed since is said here
        except ConfigError as exc:
            log.error("the page cannot start: %s; inspecting without it", exc)
            return False
        try:
            server = serve(self.cfg.host, self.cfg.port, self.handle, tls)
        except OSError as exc:
            log.error(
                "the page cannot listen on %s:%d (%s); inspecting without it",
                self.cfg.host,
                self.cfg.port,
                exc.strerror or exc,
            )
            return False
        self._server = server
        log.info("station page at %s", self.url)
        if tls is None and not is_loopback(self.cfg.host):
            log.warning(
                "the page is open to the network over plain HTTP: its password crosses the "
                "network in clear; give it a certificate ([web] tls_cert and tls_key)"
            )
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.trainer.stop()

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else 0

    @property
    def url(self) -> str:
        host = self.cfg.host if ":" not in self.cfg.host else f"[{self.cfg.host}]"
        scheme = "https" if self.cfg.tls_cert else "http"
        return f"{scheme}://{host}:{self.port}/"

    # --- one request ---

    def handle(self, req: Request) -> Reply:
        """Check where the request comes from and who sends it, then route it."""
        self._check_host(req)
        sid = cookie(req.headers.get("cookie", ""), COOKIE)
        req.session = sid
        req.csrf = self.sessions.csrf_for(sid)
        if req.method == "POST":
            self._check_same_site(req)
        for method, pattern, handler, auth in self._routes:
            m = pattern.match(req.path)
            if m is None:
                continue
            if method != req.method:
                continue
            if auth and req.csrf is None:
                raise HttpError(401, "log in first")
            if req.method == "POST" and auth and req.headers.get(CSRF_HEADER.lower()) != req.csrf:
                raise HttpError(403, "the request has no valid CSRF token; reload the page")
            return handler(req, m)
        if any(p.match(req.path) for _, p, _, _ in self._routes):
            raise HttpError(405, f"{req.method} is not allowed on {req.path}")
        raise HttpError(404, f"there is no {req.path[:100]} here")

    def _check_host(self, req: Request) -> None:
        """On localhost, answer only to local host names: a web site cannot rebind its own
        name to 127.0.0.1 and then read the page from the operator's browser."""
        if not self.local_only:
            return
        host = req.headers.get("host", "")
        try:
            name = urlsplit(f"//{host}").hostname or ""  # "[::1]:8080" -> "::1"
        except ValueError:
            name = ""
        if not is_loopback(name):
            raise HttpError(403, f"this page answers only to localhost, not to {host[:100]!r}")

    def _check_same_site(self, req: Request) -> None:
        origin = req.headers.get("origin")
        host = req.headers.get("host", "")
        if origin is not None and urlsplit(origin).netloc != host:
            raise HttpError(403, "a request from another site was refused")
        if req.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            raise HttpError(403, "a request from another site was refused")

    # --- pages and login ---

    def _index(self, req: Request, m: re.Match[str]) -> Reply:
        return self._file("index.html")

    def _static(self, req: Request, m: re.Match[str]) -> Reply:
        return self._file(m[1])

    def _file(self, name: str) -> Reply:
        return Reply(200, (STATIC / name).read_bytes(), _STATIC_TYPES[name])

    def _session(self, req: Request, m: re.Match[str]) -> Reply:
        return json_reply(
            {
                "login_required": self.sessions.required,
                "logged_in": req.csrf is not None,
                "csrf": req.csrf,
                "station": self.station.cfg.station.name,
            }
        )

    def _login(self, req: Request, m: re.Match[str]) -> Reply:
        if not self.sessions.required:
            raise HttpError(400, "this page has no password (it is open on localhost only)")
        password = req.json().get("password")
        if not isinstance(password, str):
            raise HttpError(400, 'give the password as {"password": "..."}')
        try:
            sid = self.sessions.login(password, req.address)
        except PermissionError as exc:
            raise HttpError(429, str(exc)) from None
        except ValueError as exc:
            raise HttpError(403, str(exc)) from None
        set_cookie = (
            f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; "
            f"Max-Age={int(self.sessions.lifetime_s)}"
        )
        if self.cfg.tls_cert:  # the browser never sends it over plain HTTP
            set_cookie += "; Secure"
        return Reply(
            200,
            json.dumps({"csrf": self.sessions.csrf_for(sid)}).encode(),
            headers={"Set-Cookie": set_cookie},
        )

    def _logout(self, req: Request, m: re.Match[str]) -> Reply:
        self.sessions.logout(req.session)
        return Reply(
            200, b"{}", headers={"Set-Cookie": f"{COOKIE}=; Path=/; Max-Age=0; SameSite=Strict"}
        )

    # --- watching ---

    def _previous_id(self) -> str | None:
        """The id of the model a roll-back would bring back (None if there is none), so that
        the button can name it; hashed again only when the file changes."""
        try:
            st = self.station.previous_model.stat()
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        if self._previous is None or self._previous[0] != key:
            digest = hashlib.sha256(self.station.previous_model.read_bytes()).hexdigest()
            self._previous = (key, digest[:12])
        return self._previous[1]

    def _status(self, req: Request, m: re.Match[str]) -> Reply:
        st = self.station
        model = st.model
        link = st.link
        event = st.model_event
        return json_reply(
            {
                "station": st.cfg.station.name,
                "status": st.status,
                "reason": st.reason,
                "paused": st.paused,
                "mode": st.cfg.trigger.mode,
                "source": st.source.name,
                "dropped": st.source.dropped,
                "budget_ms": st.cfg.station.budget_ms,
                **st.stats.as_dict(),
                "backlog": st.journal.backlog() if link else None,
                "broker": {
                    "enabled": link is not None,
                    "connected": bool(link and link.connected.is_set()),
                    "address": f"{st.cfg.mqtt.host}:{st.cfg.mqtt.port}",
                },
                "model": _model_doc(model),
                "previous_model": self._previous_id(),
                "model_event": event
                and {"wall": event.wall, "taken": event.taken, "text": event.text},
                "training": self.trainer.state(),
                "candidate": self.trainer.candidate_model is not None,
            }
        )

    def _live_jpeg(self, req: Request, m: re.Match[str]) -> Reply:
        """The newest inspected frame with its heatmap; re-drawn at most live_fps a second."""
        latest = self.station.latest
        if latest is None:
            return Reply(204)
        with self._live_lock:
            shown = self._live
            fresh = shown is None or (
                shown[0] is not latest and time.monotonic() - shown[1] >= 1 / self.cfg.live_fps
            )
            if fresh:
                picture = draw_preview(latest.frame.image, latest.detection, PREVIEW_SIDE)
                self._live = shown = (latest, time.monotonic(), _jpeg(picture, 80))
                self._shown.append(latest)
        assert shown is not None
        seen, _, jpg = shown
        det = seen.detection
        return Reply(
            200,
            jpg,
            "image/jpeg",
            {
                "X-Frame": str(seen.frame.seq),
                "X-Record": str(seen.seq or ""),
                "X-Verdict": det.verdict,
                "X-Score": f"{det.score:.4f}",
                "X-Threshold": f"{det.threshold:.4f}",
                "X-Captured": f"{seen.frame.wall:.3f}",
            },
        )

    def _station_command(self, req: Request, m: re.Match[str]) -> Reply:
        """Pause, resume or trigger the station, through the same queue as MQTT commands."""
        if m[1] == "trigger" and self.station.cfg.trigger.mode != "triggered":
            raise HttpError(409, 'the station is in free-run mode; set trigger.mode = "triggered"')
        if m[1] == "trigger" and self.station.paused:
            raise HttpError(409, "the station is paused: resume it first")
        self.station.command(m[1], "page" if m[1] == "trigger" else None)
        return json_reply({}, 202)

    def _records(self, req: Request, m: re.Match[str]) -> Reply:
        limit = _int(req.query.get("limit", "50"), "limit", 1, 500)
        before = req.query.get("before")
        recs = self.station.journal.recent(
            limit=limit,
            ng_only=req.query.get("ng") == "1",
            before_seq=_int(before, "before", 0, 2**62) if before else None,
        )
        return json_reply({"records": [_record_doc(r) for r in recs]})

    def _record(self, req: Request, m: re.Match[str]) -> Reply:
        seq = _int(m[1], "record", 0, 2**62)
        rec = self.station.journal.get(seq)
        if rec is None:
            raise HttpError(404, f"there is no record {seq}")
        return json_reply(_record_doc(rec))

    def _record_picture(self, req: Request, m: re.Match[str]) -> Reply:
        path = self._saved_picture(_int(m[1], "record", 0, 2**62), m[2])
        return Reply(200, path.read_bytes(), "image/jpeg")

    def _saved_picture(self, seq: int, which: str) -> Path:
        rec = self.station.journal.get(seq)
        if rec is None:
            raise HttpError(404, f"there is no record {seq}")
        rel = rec.frame_path if which == "frame" else rec.overlay_path
        if not rel:
            raise HttpError(404, f"the {which} of record {seq} was not saved or has been deleted")
        state = self.station.cfg.station.state_dir.resolve()
        path = (state / rel).resolve()
        if not path.is_relative_to(state / "frames") or not path.is_file():
            raise HttpError(404, f"the {which} of record {seq} is no longer on disk")
        return path

    # --- the dataset ---

    def _dataset(self, req: Request, m: re.Match[str]) -> Reply:
        return json_reply(
            {
                "items": [i.as_dict() for i in self.dataset.items()],
                "counts": self.dataset.counts(),
                "min_normal": MIN_NORMAL,
            }
        )

    def _dataset_image(self, req: Request, m: re.Match[str]) -> Reply:
        try:
            if req.query.get("thumb") == "1":
                return Reply(200, self.dataset.thumbnail(m[1]), "image/jpeg")
            path = self.dataset.path(m[1])
        except DatasetError as exc:
            raise HttpError(404, str(exc)) from None
        return Reply(200, path.read_bytes(), "image/png")

    def _capture(self, req: Request, m: re.Match[str]) -> Reply:
        """Add a frame to the dataset: the one the page shows ({"frame": its X-Frame number})
        or, without a number, the newest inspected one."""
        doc = req.json()
        label = _label(doc.get("label"))
        wanted = _field(doc, "frame", int, "a frame number, such as 17")
        if wanted is None:
            chosen = self.station.latest
        else:
            with self._live_lock:
                chosen = next((s for s in self._shown if s.frame.seq == wanted), None)
            if chosen is None:
                raise HttpError(409, f"frame {wanted} is no longer held; capture again")
        if chosen is None:
            raise HttpError(409, "no frame has been inspected yet")
        try:
            item = self.dataset.add(chosen.frame.image, label, "cap")
        except DatasetError as exc:
            raise HttpError(409, str(exc)) from None
        return json_reply(item.as_dict(), 201)

    def _from_record(self, req: Request, m: re.Match[str]) -> Reply:
        doc = req.json()
        label = _label(doc.get("label"))
        seq = _field(doc, "seq", int, "a record number, such as 123")
        if seq is None:
            raise HttpError(400, 'give the record number as {"seq": 123, ...}')
        path = self._saved_picture(seq, "frame")
        try:
            item = self.dataset.add_file(path, label, f"rec{seq}")
        except ImageError as exc:
            raise HttpError(422, str(exc)) from None
        except DatasetError as exc:
            raise HttpError(409, str(exc)) from None
        return json_reply(item.as_dict(), 201)

    def _upload(self, req: Request, m: re.Match[str]) -> Reply:
        label = _label(req.query.get("label"))
        image = self._uploaded_image(req)
        try:
            item = self.dataset.add(image, label, "up")
        except DatasetError as exc:
            raise HttpError(409, f"upload {req.file_name}: {exc}") from None
        return json_reply(item.as_dict(), 201)

    def _move(self, req: Request, m: re.Match[str]) -> Reply:
        doc = req.json()
        item_id = _field(doc, "id", str, _ITEM_EXAMPLE) or ""
        label = _field(doc, "label", str, '"normal" or "anomaly"')
        split = _field(doc, "split", str, '"train" or "test"')
        try:
            item = self.dataset.move(item_id, label or None, split or None)
        except DatasetError as exc:
            raise HttpError(404 if "does not exist" in str(exc) else 400, str(exc)) from None
        return json_reply(item.as_dict())

    def _delete(self, req: Request, m: re.Match[str]) -> Reply:
        try:
            self.dataset.delete(_field(req.json(), "id", str, _ITEM_EXAMPLE) or "")
        except DatasetError as exc:
            raise HttpError(404 if "does not exist" in str(exc) else 400, str(exc)) from None
        return json_reply({})

    # --- training and models ---

    def _training(self, req: Request, m: re.Match[str]) -> Reply:
        # The state first: "done" is set after the candidate is in place, so a page that reads
        # "done" always finds its summary (read the other way round, a run that ended in
        # between came out "done" without one).
        state = self.trainer.state()
        summary = self.trainer.summary()
        candidate = self.trainer.candidate_model
        return json_reply(
            {
                **state,
                "summary": summary,
                "candidate_id": summary["model_id"] if summary else None,
                "candidate": candidate is not None,
                "running_id": self.station.model.id,
            }
        )

    def _train(self, req: Request, m: re.Match[str]) -> Reply:
        have = self.dataset.counts()["train/normal"]
        if have < MIN_NORMAL:
            raise HttpError(
                409,
                f"the dataset has {have} good images for training; it needs at least {MIN_NORMAL}",
            )
        try:
            self.trainer.start(self.station.cfg.model.path)
        except TrainerBusy as exc:
            raise HttpError(409, str(exc)) from None
        except TrainerError as exc:
            raise HttpError(500, str(exc)) from None
        return json_reply(self.trainer.state(), 202)

    def _cancel(self, req: Request, m: re.Match[str]) -> Reply:
        if not self.trainer.cancel():
            raise HttpError(409, "no model is being trained")
        return json_reply({}, 202)

    def _activate(self, req: Request, m: re.Match[str]) -> Reply:
        wanted = _field(req.json(), "id", str, "the candidate's model id, as /api/training gives")
        candidate = self.trainer.candidate_model
        if candidate is None:
            raise HttpError(409, "there is no trained candidate model to use")
        summary = self.trainer.summary()
        if wanted and (summary is None or wanted != summary["model_id"]):
            raise HttpError(
                409,
                "the new model has changed since this page showed it (another training?); "
                "look at its results again",
            )
        if hashlib.sha256(candidate.read_bytes()).hexdigest() == self.station.model.sha256:
            raise HttpError(409, "the candidate is the model in use already")
        return self._install(candidate, "candidate activated on the page")

    def _rollback(self, req: Request, m: re.Match[str]) -> Reply:
        previous = self.station.previous_model
        if not previous.is_file():
            raise HttpError(409, "there is no previous model to go back to")
        return self._install(previous, "rolled back on the page")

    def _install(self, path: Path, why: str) -> Reply:
        if not self.station.reload(why, install=path):
            raise HttpError(409, "a model is being loaded already; try again in a moment")
        return json_reply({"loading": str(path.name)}, 202)

    def _discard(self, req: Request, m: re.Match[str]) -> Reply:
        if self.trainer.state()["state"] == "running":
            raise HttpError(409, "a model is being trained; cancel it first")
        if not self.trainer.discard():
            raise HttpError(409, "there is no candidate model to discard")
        return json_reply({})

    def _training_file(self, req: Request, m: re.Match[str]) -> Reply:
        if not _REPORT_FILE.match(m[1]):
            raise HttpError(404, f"there is no {m[1][:100]} in the training results")
        path = self.trainer.candidate_dir / m[1]
        if not path.is_file():
            raise HttpError(404, f"there is no {m[1]} in the training results")
        if path.suffix in (".jpg", ".png"):
            kind = "image/jpeg" if path.suffix == ".jpg" else "image/png"
            return Reply(200, path.read_bytes(), kind)
        return Reply(
            200,
            path.read_bytes(),
            "text/html; charset=utf-8",
            {"Content-Security-Policy": _REPORT_CSP, "X-Frame-Options": "SAMEORIGIN"},
        )

    # --- trial detection ---

    def _trial(self, req: Request, m: re.Match[str]) -> Reply:
        """Run the running model (or the candidate) on one uploaded image."""
        which = req.query.get("model", "running")
        if which not in ("running", "candidate"):
            raise HttpError(400, f"model {which[:40]!r} is not 'running' or 'candidate'")
        model = self.station.model if which == "running" else self._candidate_model()
        image = self._uploaded_image(req, model)
        detection = model.detect(image)
        preview = draw_preview(image, detection, PREVIEW_SIDE)
        overlay = "data:image/jpeg;base64," + base64.b64encode(_jpeg(preview, 85)).decode()
        return json_reply(
            {"file": req.file_name, "model_id": model.id, **detection.as_dict(), "overlay": overlay}
        )

    def _candidate_model(self) -> Model:
        path = self.trainer.candidate_model
        if path is None:
            raise HttpError(409, "there is no trained candidate model to try")
        st = path.stat()
        sig = (st.st_mtime_ns, st.st_size, str(path))
        if self._candidate is None or self._candidate[0] != sig:
            self._candidate = None  # the one tried before goes first, and its memory with it
            give_back_memory()
            try:
                self._candidate = (sig, Model(path, threads=1))
            except ModelError as exc:
                raise HttpError(409, str(exc)) from None
        return self._candidate[1]

    def _uploaded_image(self, req: Request, model: Model | None = None) -> np.ndarray:
        """The request body decoded as an image, checked like any image file, and checked to
        fit the model (the camera's size), so that it can be judged or trained on."""
        limit = int(self.cfg.max_upload_mb * 1e6)
        data = req.read_body(limit)
        if not data:
            raise HttpError(400, f"upload {req.file_name} is empty")
        try:
            image = decode_image(data, req.file_name, max_bytes=limit)
            (model or self.station.model).check_frame(image)
        except ImageError as exc:
            raise HttpError(422, str(exc)) from None
        except ValueError as exc:
            raise HttpError(422, f"upload {req.file_name}: {exc}") from None
        return image


def _jpeg(picture: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise HttpError(500, "the picture cannot be encoded")
    return bytes(data.tobytes())


def _int(text: str, name: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise HttpError(400, f"{name} {text[:20]!r} is not a whole number") from None
    if not low <= value <= high:
        raise HttpError(400, f"{name} {value} is not between {low} and {high}")
    return value


_ITEM_EXAMPLE = 'a dataset item id, such as "train/normal/cap-1.png"'


def _field(doc: dict[str, Any], key: str, kind: type, example: str) -> Any:
    """doc[key] if it is of that kind, None if it is absent or null; HttpError 400 otherwise.
    Numbers must be whole, not true/false, and fit SQLite's 64-bit integers."""
    value = doc.get(key)
    if value is None:
        return None
    whole = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63
    if not isinstance(value, kind) or (kind is int and not whole):
        raise HttpError(400, f'"{key}" must be {example}')
    return value


def _label(value: object) -> str:
    try:
        return check_label(value)
    except DatasetError as exc:
        raise HttpError(400, str(exc)) from None


def _model_doc(model: Model) -> dict[str, object]:
    meta = model.meta
    return {
        "id": model.id,
        "threshold": meta.threshold,
        "created": meta.created,
        "calibration": meta.calibration,
        "image_size": meta.image_size,
        "roi": meta.roi,
        "train_normal_count": meta.train_normal_count,
        "train_anomaly_count": meta.train_anomaly_count,
    }


def _record_doc(rec: Record) -> dict[str, object]:
    doc = rec.payload()
    doc["has_frame"] = rec.frame_path is not None
    doc["has_overlay"] = rec.overlay_path is not None
    return doc
