"""The station page's HTTP API against a real station replaying parts (no browser here)."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import Broker, Certificates, write_config

from edge import httpd
from edge.access import Sessions, hash_password
from edge.config import ConfigError, parse_config
from edge.images import FORMATS
from edge.model import Model
from edge.station import Station
from edge.trainjob import Trainer

PASSWORD = "line-3 station password"


class Page:
    """A browser's view of the page API: one cookie, the CSRF token, JSON in and out."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.tls = tls  # HTTPS, trusting this context's CAs
        self.cookie = ""
        self.csrf = ""

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = (
            http.client.HTTPSConnection("127.0.0.1", self.port, timeout=30, context=self.tls)
            if self.tls
            else http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        )
        sent = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        if self.cookie:
            sent["Cookie"] = self.cookie
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        data = resp.read()
        got = {k.lower(): v for k, v in resp.getheaders()}
        conn.close()
        if "set-cookie" in got:
            self.cookie = got["set-cookie"].split(";")[0]
        return resp.status, got, data

    def get(self, path: str) -> tuple[int, Any]:
        status, headers, data = self.request("GET", path)
        assert headers["content-type"] == "application/json", (status, data[:200])
        return status, json.loads(data)

    def post(self, path: str, doc: object = None, **headers: str) -> tuple[int, Any]:
        sent = {"Content-Type": "application/json", "X-CSRF-Token": self.csrf, **headers}
        status, _, data = self.request("POST", path, json.dumps(doc or {}).encode(), sent)
        return status, json.loads(data)

    def upload(self, path: str, data: bytes, name: str = "part.png") -> tuple[int, Any]:
        sent = {"X-CSRF-Token": self.csrf, "X-File-Name": name, "Content-Type": "image/png"}
        status, _, body = self.request("POST", path, data, sent)
        return status, json.loads(body)

    def start(self) -> Page:
        status, doc = self.get("/api/session")
        assert status == 200
        self.csrf = doc["csrf"] or ""
        return self


def wait_until(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}")


StartPage = Callable[..., tuple[Station, Page]]


@pytest.fixture
def start_page(
    tmp_path: Path,
    parts_model: Path,
    replay: Path,
    run_station: Callable[[Path], Station],
) -> Iterator[StartPage]:
    """A station replaying parts, its page on a free port; returns (station, Page)."""

    def start(broker: Broker | None = None, **web: object) -> tuple[Station, Page]:
        model = tmp_path / "models" / "current.onnx"
        model.parent.mkdir(exist_ok=True)
        shutil.copy(parts_model, model)
        path = write_config(
            tmp_path, model, replay, broker, "web/test", web={"enabled": True, "port": 0, **web}
        )
        station = run_station(path)
        assert station.web is not None
        wait_until(lambda: station.web is not None and station.web.port, what="the page")
        wait_until(lambda: station.latest is not None, what="a first verdict")
        return station, Page(station.web.port)

    yield start


def _png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return bytes(data.tobytes())


def _decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


# --- configuration ---


def test_page_is_off_unless_configured_and_needs_a_password_on_the_network() -> None:
    base = '[model]\npath = "m.onnx"\n[source]\nkind = "folder"\npath = "x"\n'
    assert parse_config(base).web.enabled is False
    assert parse_config(base).web.host == "127.0.0.1"
    with pytest.raises(ConfigError) as err:
        parse_config(base + '[web]\nenabled = true\nhost = "0.0.0.0"\n', "c.toml")
    assert err.value.problems == [
        "c.toml: web: host '0.0.0.0' opens the page to the network: set password_hash "
        "(make one with `edge-inspect hash-password`)"
    ]
    with pytest.raises(ConfigError) as err:
        parse_config(base + '[web]\npassword_hash = "secret"\n', "c.toml")
    assert "not a hash made by `edge-inspect hash-password`" in err.value.problems[0]
    good = hash_password(PASSWORD)
    cfg = parse_config(
        base + f'[web]\nenabled = true\nhost = "0.0.0.0"\npassword_hash = "{good}"\n'
    )
    assert cfg.web.password_hash == good
    assert good not in repr(cfg)


# --- watching ---


def test_live_picture_shows_new_frames_with_their_verdict(start_page: StartPage) -> None:
    station, page = start_page()
    status, headers, first = page.request("GET", "/api/live.jpg")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    assert headers["x-verdict"] in ("ok", "ng")
    assert float(headers["x-threshold"]) == pytest.approx(station.model.threshold, rel=1e-3)
    picture = _decode(first)
    frame = station.latest.frame.image if station.latest else None
    assert frame is not None and picture.shape[1] == frame.shape[1]  # 160 px: not shrunk
    assert picture.shape[0] > frame.shape[0]  # the verdict strip on top
    time.sleep(0.6)
    _, later, _ = page.request("GET", "/api/live.jpg")
    assert int(later["x-frame"]) > int(headers["x-frame"])
    # The page is locked down: no sniffing, no framing, scripts from the station only.
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert "script-src 'self'" in headers["content-security-policy"]


def test_status_strip_reports_state_model_speed_and_broker(
    start_page: StartPage, broker: Broker
) -> None:
    station, page = start_page(broker=broker)
    page.start()
    wait_until(lambda: page.get("/api/status")[1]["broker"]["connected"], what="broker")
    time.sleep(0.5)
    status, doc = page.get("/api/status")
    assert status == 200
    assert doc["status"] == "online"
    assert doc["model"]["id"] == station.model.id
    assert doc["fps"] > 5  # replayed at 20 frames/s
    assert 0 < doc["latency_ms_p50"] <= doc["latency_ms_p95"]
    assert doc["overruns"] == 0
    assert doc["broker"] == {
        "enabled": True,
        "connected": True,
        "address": f"{broker.host}:{broker.port}",
    }
    assert doc["training"] == {"state": "idle"} and doc["candidate"] is False
    broker.stop()
    wait_until(lambda: not page.get("/api/status")[1]["broker"]["connected"], what="offline")


def test_history_lists_the_journal_and_opens_saved_frames(start_page: StartPage) -> None:
    station, page = start_page()
    wait_until(lambda: station.journal.counts()["total"] >= 20, what="20 verdicts")
    status, doc = page.get("/api/records?limit=10")
    assert status == 200
    seqs = [r["seq"] for r in doc["records"]]
    assert seqs == sorted(seqs, reverse=True) and len(seqs) == 10
    status, ng = page.get("/api/records?ng=1&limit=500")
    assert ng["records"] and all(r["verdict"] == "ng" for r in ng["records"])
    older = page.get(f"/api/records?limit=5&before={seqs[-1]}")[1]["records"]
    assert [r["seq"] for r in older] == list(range(seqs[-1] - 1, seqs[-1] - 6, -1))
    saved = next(r for r in ng["records"] if r["has_frame"])
    status, one = page.get(f"/api/records/{saved['seq']}")
    assert one["verdict"] == "ng" and one["score"] == saved["score"]
    for which in ("frame", "overlay"):
        status, headers, data = page.request("GET", f"/api/records/{saved['seq']}/{which}.jpg")
        assert status == 200 and headers["content-type"] == "image/jpeg"
        assert _decode(data).shape[1] == 160
    # Not the newest: its frame may be saved a moment after the record is written.
    unsaved = next(r for r in doc["records"][1:] if not r["has_frame"])
    status, err = page.get(f"/api/records/{unsaved['seq']}/frame.jpg")
    assert status == 404 and "was not saved" in err["error"]
    assert page.get("/api/records/99999999")[0] == 404
    assert page.get("/api/records/99999999999999999999999")[1] == {
        "error": "record 99999999999999999999999 is not between 0 and 4611686018427387904"
    }
    assert page.get("/api/records?limit=many")[1] == {"error": "limit 'many' is not a whole number"}


# --- the dataset ---


def test_dataset_capture_relabel_move_delete(start_page: StartPage) -> None:
    station, page = start_page()
    page.start()
    status, item = page.post("/api/dataset/capture", {"label": "normal"})
    assert status == 201 and item["split"] == "train" and item["label"] == "normal"
    assert (station.cfg.station.state_dir / "dataset" / item["id"]).is_file()
    # The frame the page showed, by its number, even after newer ones were sent.
    _, shown, _ = page.request("GET", "/api/live.jpg")
    time.sleep(0.5)
    _, newer, _ = page.request("GET", "/api/live.jpg")
    assert int(newer["x-frame"]) > int(shown["x-frame"])
    status, again = page.post(
        "/api/dataset/capture", {"label": "anomaly", "frame": int(shown["x-frame"])}
    )
    assert status in (201, 409)  # 409: the same picture came round again in the replay
    if status == 409:
        assert "in the dataset already" in again["error"]
    status, err = page.post("/api/dataset/capture", {"label": "normal", "frame": 10**9})
    assert status == 409 and err["error"] == f"frame {10**9} is no longer held; capture again"
    assert page.post("/api/dataset/capture", {"label": "good"})[1] == {
        "error": "label must be one of normal, anomaly"
    }

    status, moved = page.post("/api/dataset/move", {"id": item["id"], "label": "anomaly"})
    assert status == 200 and moved["id"] == item["id"].replace("/normal/", "/anomaly/")
    status, moved = page.post("/api/dataset/move", {"id": moved["id"], "split": "test"})
    assert moved["split"] == "test"
    status, headers, thumb = page.request("GET", f"/api/dataset/image/{moved['id']}?thumb=1")
    assert status == 200 and headers["content-type"] == "image/jpeg" and _decode(thumb).size
    listing = page.get("/api/dataset")[1]
    assert moved["id"] in [i["id"] for i in listing["items"]]
    assert listing["counts"]["test/anomaly"] >= 1

    # Fields of the wrong type are named, never a 500 or a guess (true is not record 1).
    wrong = [
        ("capture", {"label": "normal", "frame": [1]}, '"frame" must be a frame number'),
        ("capture", {"label": "normal", "frame": -5}, '"frame" must be a frame number'),
        ("record", {"label": "normal", "seq": True}, '"seq" must be a record number'),
        ("record", {"label": "normal", "seq": 2**63}, '"seq" must be a record number'),
        ("record", {"label": "normal", "seq": 1.5}, '"seq" must be a record number'),
        ("move", {"id": moved["id"], "split": 5}, '"split" must be "train" or "test"'),
        ("move", {"id": 7, "label": "normal"}, '"id" must be a dataset item id'),
        ("delete", {"id": {"a": 1}}, '"id" must be a dataset item id'),
    ]
    for action, doc, why in wrong:
        status, err = page.post(f"/api/dataset/{action}", doc)
        assert status == 400 and err["error"].startswith(why), (action, doc, err)

    for bad in ("../../../etc/passwd", "train/normal/../../x.png", "train/normal/.hidden.png"):
        status, err = page.post("/api/dataset/delete", {"id": bad})
        assert status == 400 and "is not a valid item name" in err["error"]
    assert page.post("/api/dataset/delete", {"id": moved["id"]}) == (200, {})
    status, err = page.post("/api/dataset/delete", {"id": moved["id"]})
    assert status == 404 and err["error"] == f"dataset item {moved['id']} does not exist"


def test_saved_frame_from_history_goes_into_the_dataset(start_page: StartPage) -> None:
    station, page = start_page()
    page.start()
    rec = wait_until(
        lambda: next((r for r in station.journal.recent(100) if r.frame_path), None),
        what="a saved frame",
    )
    status, item = page.post("/api/dataset/record", {"seq": rec.seq, "label": "anomaly"})
    assert (
        status == 201 and item["label"] == "anomaly" and item["name"].startswith(f"rec{rec.seq}-")
    )
    status, _err = page.post("/api/dataset/record", {"seq": "7", "label": "anomaly"})
    assert status == 400


def test_uploads_are_checked_like_any_image(start_page: StartPage, parts: Path) -> None:
    station, page = start_page(max_upload_mb=0.2)
    page.start()
    good = (parts / "train" / "normal").iterdir().__next__().read_bytes()
    status, item = page.upload("/api/dataset/upload?label=normal", good)
    assert status == 201 and item["label"] == "normal"
    status, err = page.upload("/api/dataset/upload?label=normal", good)
    assert status == 409 and "in the dataset already" in err["error"]

    cases = [
        (
            b"not an image at all",
            "notes.png",
            422,
            f"image notes.png is not a readable image file ({FORMATS})",
        ),
        (b"", "empty.png", 400, "upload empty.png is empty"),
        (
            _png(np.zeros((200, 300, 3), np.uint8)),
            "big.png",
            422,
            "upload big.png: frame is 300x200 but model current.onnx was trained on 160x120 images",
        ),
        (good[: len(good) // 2], "cut.png", 422, "image cut.png is truncated"),
        (
            _png(np.zeros((120, 160, 3), np.uint16)),
            "deep.png",
            422,
            "image deep.png is 16-bit; edge-inspect takes 8-bit images",
        ),
    ]
    for data, name, code, message in cases:
        status, err = page.upload("/api/dataset/upload?label=normal", data, name)
        assert (status, err["error"][: len(message)]) == (code, message)
    status, err = page.upload("/api/dataset/upload?label=normal", b"x" * 300_000, "huge.png")
    assert status == 413
    assert err["error"] == "the upload has 300000 bytes, more than the limit of 200000 bytes"
    status, err = page.upload("/api/dataset/upload?label=maybe", good)
    assert status == 400
    # Nothing half-written: only the one good upload is there.
    assert [
        p.name for p in (station.cfg.station.state_dir / "dataset").rglob("*") if p.is_file()
    ] == [item["name"]]


def test_the_dataset_stays_within_its_disk_limit(start_page: StartPage, parts: Path) -> None:
    station, page = start_page(dataset_max_mb=0.1)
    page.start()
    added, refused = [], None
    for path in sorted((parts / "train" / "normal").iterdir()):
        status, doc = page.upload("/api/dataset/upload?label=normal", path.read_bytes())
        if status != 201:
            refused = (status, doc["error"])
            break
        added.append(doc)
    assert added and refused is not None, "100 kB must take a few parts, not all 20"
    assert refused[0] == 409
    assert "over its limit of 0.1 MB ([web] dataset_max_mb); delete images first" in refused[1]
    files = [p for p in (station.cfg.station.state_dir / "dataset").rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == sorted(d["name"] for d in added)
    assert sum(p.stat().st_size for p in files) <= 100_000
    # Room again after a delete.
    assert page.post("/api/dataset/delete", {"id": added[0]["id"]}) == (200, {})
    status, _ = page.upload("/api/dataset/upload?label=normal", path.read_bytes())
    assert status == 201


# --- trial detection ---


def test_trial_detection_judges_uploaded_images(start_page: StartPage, parts: Path) -> None:
    station, page = start_page()
    page.start()
    good = sorted((parts / "test" / "normal").iterdir())[0]
    bad = sorted((parts / "test" / "anomaly").iterdir())[0]
    verdicts = {}
    for path in (good, bad):
        status, doc = page.upload("/api/trial", path.read_bytes(), path.name)
        assert status == 200 and doc["file"] == path.name and doc["model_id"] == station.model.id
        verdicts[path] = doc["verdict"]
        head, _, b64 = doc["overlay"].partition(",")
        assert head == "data:image/jpeg;base64"
        assert _decode(base64.b64decode(b64)).shape[1] == 160
    assert verdicts == {good: "ok", bad: "ng"}
    status, err = page.upload("/api/trial?model=candidate", good.read_bytes())
    assert status == 409 and err["error"] == "there is no trained candidate model to try"


# --- access ---


def test_changes_need_the_csrf_token_and_the_same_site(start_page: StartPage) -> None:
    station, page = start_page()
    page.start()
    token = page.csrf
    page.csrf = ""
    status, err = page.post("/api/dataset/capture", {"label": "normal"})
    assert status == 403 and "CSRF" in err["error"]
    page.csrf = token
    status, err = page.post(
        "/api/dataset/capture", {"label": "normal"}, Origin="https://evil.example"
    )
    assert (status, err["error"]) == (403, "a request from another site was refused")
    status, err = page.post("/api/training/start", **{"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    # DNS rebinding: a foreign name pointed at 127.0.0.1 gets nothing, not even reads, even
    # one that looks like a loopback address.
    for host in ("evil.example:80", "127.0.0.1.evil.example", "127.evil.example:8080"):
        status, _, body = page.request("GET", "/api/status", headers={"Host": host})
        assert status == 403 and b"answers only to localhost" in body, host
    for host in ("127.0.0.1:8080", "127.0.0.2", "[::1]:8080", "localhost"):
        assert page.request("GET", "/api/status", headers={"Host": host})[0] == 200, host
    assert not (station.cfg.station.state_dir / "dataset").exists()
    status, _, body = page.request("GET", "/api/nothing")
    assert status == 404
    status, _, body = page.request("POST", "/api/status", b"{}", {"X-CSRF-Token": token})
    assert status == 405


def _raw(port: int, data: bytes, source: str = "127.0.0.1") -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    conn.sendall(data)
    return conn


def test_bad_bodies_and_connection_floods_are_refused(start_page: StartPage) -> None:
    _station, page = start_page()
    page.start()
    # A negative length would read until the client hangs up, past every body limit.
    head = (
        f"POST /api/dataset/capture HTTP/1.1\r\nHost: 127.0.0.1:{page.port}\r\n"
        f"X-CSRF-Token: {page.csrf}\r\nContent-Length: -1\r\n\r\n"
    )
    with _raw(page.port, head.encode() + b"x" * 10_000) as conn:
        assert conn.recv(200).startswith(b"HTTP/1.0 400")
    nested = b"[" * 60_000
    status, _, body = page.request(
        "POST", "/api/dataset/capture", nested, {"X-CSRF-Token": page.csrf}
    )
    assert (status, json.loads(body)["error"]) == (400, "the request body is not JSON")
    # Connections held open with half a request: one address gets 16 at most, and the page
    # still answers everyone else; closing them frees the address again.
    idle = [_raw(page.port, b"GET /api/status HTTP/1.1\r\n") for _ in range(16)]
    with pytest.raises(ConnectionError):  # the 17th is closed unanswered
        page.request("GET", "/api/status")
    with _raw(
        page.port,
        f"GET /api/status HTTP/1.0\r\nHost: 127.0.0.1:{page.port}\r\n\r\n".encode(),
        "127.0.0.2",
    ) as other:
        assert other.recv(200).startswith(b"HTTP/1.0 200")
    for conn in idle:
        conn.close()
    wait_until(lambda: _status_or_none(page) == 200, what="the page again")


def test_a_request_that_never_finishes_loses_its_connection(
    start_page: StartPage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header line every few seconds kept a connection (and its slot) open for ever: four
    addresses could lock the operator out of the page without a login."""
    monkeypatch.setattr(httpd, "REQUEST_DEADLINE_S", 1.0)
    _station, page = start_page()
    start = time.monotonic()
    with _raw(page.port, b"GET /api/status HTTP/1.1\r\n") as conn:
        closed = False
        while not closed and time.monotonic() - start < 10:
            try:
                conn.sendall(b"X-Slow: 1\r\n")
                conn.settimeout(0.3)
                closed = conn.recv(100) == b""
            except TimeoutError:
                pass
            except OSError:
                closed = True
    assert closed and time.monotonic() - start < 5
    # The same for a body sent a byte at a time: it has its deadline, by its length.
    monkeypatch.setattr(httpd, "MIN_BODY_RATE", 10**9)
    page.start()
    head = (
        f"POST /api/dataset/capture HTTP/1.0\r\nHost: 127.0.0.1:{page.port}\r\n"
        f"X-CSRF-Token: {page.csrf}\r\nContent-Length: 1000\r\n\r\n"
    )
    start = time.monotonic()
    with _raw(page.port, head.encode()) as conn:
        answer = b""
        while not answer and time.monotonic() - start < 10:
            try:
                conn.sendall(b" ")
                conn.settimeout(0.3)
                answer = conn.recv(200) or b"closed"
            except TimeoutError:
                pass
            except OSError:
                answer = b"closed"
    assert answer and time.monotonic() - start < 5
    for length in ("+2", "0_2", "0x2"):  # int() would take the first two
        head = (
            f"POST /api/dataset/capture HTTP/1.0\r\nHost: 127.0.0.1:{page.port}\r\n"
            f"X-CSRF-Token: {page.csrf}\r\nContent-Length: {length}\r\n\r\n"
        )
        with _raw(page.port, head.encode() + b"{}") as conn:
            assert conn.recv(200).startswith(b"HTTP/1.0 400"), length


def _status_or_none(page: Page) -> int | None:
    try:
        return page.request("GET", "/api/status")[0]
    except ConnectionError:
        return None


def test_password_login_sessions_and_lockout(start_page: StartPage) -> None:
    _station, page = start_page(password_hash=hash_password(PASSWORD), session_hours=1)
    status, doc = page.get("/api/session")
    assert doc["login_required"] is True and doc["logged_in"] is False and doc["csrf"] is None
    assert page.get("/api/status")[0] == 401
    assert page.request("GET", "/api/live.jpg")[0] == 401
    status, _index, _ = page.request("GET", "/")
    assert status == 200  # the page itself holds no data; it shows the login form

    status, err = page.post("/api/login", {"password": "guess"})
    assert (status, err["error"]) == (403, "wrong password")
    status, err = page.post("/api/login", {"password": PASSWORD})
    assert status == 429 and err["error"].startswith("too many wrong passwords")
    time.sleep(2.1)
    status, _, _body = page.request(
        "POST", "/api/login", json.dumps({"password": PASSWORD}).encode()
    )
    assert status == 200 and page.cookie.startswith("edge_inspect_session=")
    _, _, raw = page.request("GET", "/api/session")
    page.csrf = json.loads(raw)["csrf"]
    assert page.get("/api/status")[0] == 200
    assert page.post("/api/dataset/capture", {"label": "normal"})[0] == 201
    cookie = page.cookie
    assert page.post("/api/logout")[0] == 200
    page.cookie = cookie  # an old cookie is no good after logging out
    assert page.get("/api/status")[0] == 401


def test_a_page_open_to_the_network_without_tls_is_warned_of(
    start_page: StartPage, caplog: pytest.LogCaptureFixture
) -> None:
    start_page(host="0.0.0.0", password_hash=hash_password(PASSWORD))
    warned = [r for r in caplog.records if "over plain HTTP" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"


def test_the_page_over_https(start_page: StartPage, certificates: Certificates) -> None:
    """A page opened to the plant network sends its password and session cookie over TLS
    when given a certificate; a client that never finishes a handshake holds up no one."""
    station, plain = start_page(
        password_hash=hash_password(PASSWORD),
        tls_cert=str(certificates.server_cert),
        tls_key=str(certificates.server_key),
    )
    assert station.web is not None and station.web.url.startswith("https://127.0.0.1:")
    silent = socket.create_connection(("127.0.0.1", plain.port))  # connects, sends nothing
    page = Page(plain.port, ssl.create_default_context(cafile=certificates.ca))
    start = time.monotonic()
    status, headers, _ = page.request(
        "POST", "/api/login", json.dumps({"password": PASSWORD}).encode()
    )
    assert time.monotonic() - start < httpd.HANDSHAKE_TIMEOUT_S / 2  # not behind the silent one
    assert status == 200 and "; Secure" in headers["set-cookie"]
    assert page.get("/api/status")[0] == 200
    silent.close()

    # Plain HTTP to the HTTPS port is told what to do, not left with a reset connection.
    with socket.create_connection(("127.0.0.1", plain.port), timeout=10) as raw:
        raw.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{plain.port}\r\n\r\n".encode())
        answer = raw.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 400") and b"put https:// before the address" in answer
    # A client that does not trust the station's certificate gets nothing from it.
    with pytest.raises(ssl.SSLCertVerificationError):
        Page(plain.port, ssl.create_default_context()).request("GET", "/api/session")


def test_a_burst_of_wrong_passwords_gets_one_check() -> None:
    """Guesses sent at once must not all be checked before the first failure locks them out."""
    sessions = Sessions(hash_password(PASSWORD), 3600)
    outcomes: list[str] = []

    def guess() -> None:
        try:
            sessions.login("guess", "10.0.0.9")
        except (ValueError, PermissionError) as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=guess) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["PermissionError"] * 11 + ["ValueError"]


def test_station_inspects_on_when_the_page_port_is_taken(
    tmp_path: Path, parts_model: Path, replay: Path, run_station: Callable[[Path], Station]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = write_config(
            tmp_path,
            parts_model,
            replay,
            None,
            "web/taken",
            web={"enabled": True, "port": taken.getsockname()[1]},
        )
        station = run_station(path)
        wait_until(lambda: station.stats.verdicts > 5, what="verdicts")
        assert station.web is not None and station.web.port == 0


# --- training and swapping models ---


def _fill_dataset(page: Page, parts: Path) -> None:
    for label, folder in (("normal", "train/normal"), ("anomaly", "train/anomaly")):
        for path in sorted((parts / folder).iterdir()):
            status, doc = page.upload(f"/api/dataset/upload?label={label}", path.read_bytes())
            assert status == 201, doc


def test_train_evaluate_activate_and_roll_back(start_page: StartPage, parts: Path) -> None:
    station, page = start_page()
    page.start()
    first = station.model.id
    status, err = page.post("/api/training/start")
    assert (status, err["error"]) == (
        409,
        "the dataset has 0 good images for training; it needs at least 10",
    )
    _fill_dataset(page, parts)
    counts = page.get("/api/dataset")[1]["counts"]
    assert counts["test/normal"] == 4 and counts["train/normal"] == 16  # one in five held back
    assert counts["test/anomaly"] == 1 and counts["train/anomaly"] == 5

    assert page.post("/api/training/start")[0] == 202
    assert page.post("/api/training/start")[1] == {"error": "a model is being trained already"}
    seen = set()

    def finished() -> Any:
        doc = page.get("/api/training")[1]
        seen.add(doc.get("stage"))
        return doc if doc["state"] in ("done", "failed") else None

    doc = wait_until(finished, 120, "training")
    assert doc["state"] == "done", doc
    assert "features" in seen or "calibration" in seen  # progress was shown on the way
    summary = doc["summary"]
    assert summary["meta"]["train_normal_count"] == 16
    assert summary["meta"]["train_anomaly_count"] == 5
    assert summary["test_images"] == 5
    cand, run = summary["evaluation"]["candidate"], summary["evaluation"]["running"]
    assert cand["model_id"] == doc["candidate_id"] != first and run["model_id"] == first
    assert cand["metrics"]["accuracy"] >= 0.8
    assert set(cand["images"]) == set(run["images"])
    overlay = next(iter(cand["images"].values()))["overlay"]
    status, _, data = page.request("GET", f"/api/training/files/{overlay}")
    assert status == 200 and _decode(data).size
    status, _, report = page.request("GET", "/api/training/files/candidate/report.html")
    assert status == 200 and b"<h1>Evaluation" in report
    assert page.request("GET", "/api/training/files/../../config.toml")[0] == 404

    status, tried = page.upload(
        "/api/trial?model=candidate", sorted((parts / "test" / "anomaly").iterdir())[1].read_bytes()
    )
    assert status == 200 and tried["model_id"] == doc["candidate_id"]

    model_file = station.cfg.model.path
    # A page that shows another candidate (a second tab trained meanwhile) activates nothing.
    status, err = page.post("/api/training/activate", {"id": "0123456789ab"})
    assert status == 409 and "has changed since this page showed it" in err["error"]
    assert page.post("/api/training/activate", {"id": doc["candidate_id"]})[0] == 202
    wait_until(lambda: station.model.id == doc["candidate_id"], 30, "the swap")
    assert (
        model_file.read_bytes() == (station.web.trainer.candidate_dir / "model.onnx").read_bytes()
    )
    status_doc = page.get("/api/status")[1]
    assert status_doc["model"]["id"] == doc["candidate_id"]
    assert status_doc["previous_model"] == first  # the roll-back button names it
    assert status_doc["model_event"]["taken"] is True
    n = station.stats.verdicts
    wait_until(lambda: station.stats.verdicts > n + 5, what="inspection after the swap")
    assert station.journal.recent(1)[0].model_id == doc["candidate_id"]
    # Activated again (from a second tab): the model kept for a roll-back must stay the first.
    status, err = page.post("/api/training/activate")
    assert (status, err["error"]) == (409, "the candidate is the model in use already")
    station.reload("test", install=station.web.trainer.candidate_dir / "model.onnx")
    wait_until(lambda: "is the one running already" in station.model_event.text, 30, "refusal")
    assert Model(station.previous_model).id == first

    assert page.post("/api/model/rollback")[0] == 202
    wait_until(lambda: station.model.id == first, 30, "the roll-back")
    assert page.post("/api/training/discard")[0] == 200
    assert page.get("/api/training")[1]["summary"] is None


def test_training_failure_is_reported_and_leaves_no_candidate(
    start_page: StartPage, parts: Path
) -> None:
    station, page = start_page()
    page.start()
    _fill_dataset(page, parts)
    broken = station.cfg.station.state_dir / "dataset" / "train" / "normal" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    assert page.post("/api/training/start")[0] == 202
    doc = wait_until(
        lambda: (d := page.get("/api/training")[1])["state"] != "running" and d, 60, "training"
    )
    assert doc["state"] == "failed"
    assert doc["error"].startswith(f"image {broken}")
    assert doc["summary"] is None and not doc["candidate"]
    assert page.post("/api/training/activate")[1] == {
        "error": "there is no trained candidate model to use"
    }
    leftovers = list((station.cfg.station.state_dir / "training").iterdir())
    assert leftovers == []


def test_training_can_be_cancelled(start_page: StartPage, parts: Path) -> None:
    station, page = start_page()
    page.start()
    _fill_dataset(page, parts)
    assert page.post("/api/training/cancel")[1] == {"error": "no model is being trained"}
    assert page.post("/api/training/start")[0] == 202
    assert page.post("/api/training/cancel")[0] == 202
    doc = wait_until(
        lambda: (d := page.get("/api/training")[1])["state"] != "running" and d, 60, "the end"
    )
    assert doc["state"] == "idle" and doc["error"] == "training cancelled"
    assert not doc["candidate"]
    assert list((station.cfg.station.state_dir / "training").iterdir()) == []


def test_a_training_folder_that_cannot_be_made_is_named(start_page: StartPage, parts: Path) -> None:
    station, page = start_page()
    page.start()
    _fill_dataset(page, parts)
    work = station.cfg.station.state_dir / "training"
    work.write_text("a file where the folder should be")
    status, err = page.post("/api/training/start")
    assert status == 500 and err["error"].startswith(f"training folder {work} cannot be made")
    assert page.get("/api/training")[1]["state"] == "idle"


def test_a_station_stopped_during_training_leaves_no_run_behind(
    start_page: StartPage, parts: Path
) -> None:
    station, page = start_page()
    page.start()
    _fill_dataset(page, parts)
    work = station.cfg.station.state_dir / "training"
    assert page.post("/api/training/start")[0] == 202
    wait_until(lambda: list(work.glob(".run-*/*")), 60, "the run to write")
    assert station.web is not None
    station.web.stop()  # as when systemd stops the station
    assert list(work.glob(".*")) == []  # a run that finished first may have left its candidate
    # Killed outright, a station leaves its run folder: the next start clears it and says so.
    (work / ".run-1-2").mkdir()
    (work / ".run-1-2" / "model.onnx").write_bytes(b"half a model")
    trainer = Trainer(station.web.dataset.root, work)
    assert list(work.glob(".*")) == []
    assert trainer.state() == {
        "state": "idle",
        "error": "the last training did not finish: the station stopped during it",
    }


def test_pause_resume_and_trigger_from_the_page(start_page: StartPage) -> None:
    station, page = start_page()
    page.start()
    assert page.post("/api/station/trigger") == (
        409,
        {"error": 'the station is in free-run mode; set trigger.mode = "triggered"'},
    )
    assert page.post("/api/station/pause")[0] == 202
    wait_until(lambda: page.get("/api/status")[1]["paused"], what="paused")
    assert page.get("/api/status")[1]["status"] == "paused"
    n = station.stats.verdicts
    time.sleep(0.5)
    assert station.stats.verdicts == n
    assert page.post("/api/station/resume")[0] == 202
    wait_until(lambda: station.stats.verdicts > n + 3, what="inspection again")


def test_trigger_from_the_page_passes_the_command_token(
    tmp_path: Path, parts_model: Path, replay: Path, run_station: Callable[[Path], Station]
) -> None:
    config = write_config(
        tmp_path,
        parts_model,
        replay,
        None,
        "web/trigger",
        trigger={"mode": "triggered"},
        mqtt={"command_token": "a shared secret"},
        web={"enabled": True, "port": 0},
    )
    station = run_station(config)
    wait_until(lambda: station.web is not None and station.web.port, what="the page")
    assert station.web is not None
    page = Page(station.web.port).start()
    time.sleep(0.5)
    assert station.stats.verdicts == 0  # triggered: nothing without a trigger
    assert page.post("/api/station/trigger")[0] == 202
    wait_until(lambda: station.stats.verdicts == 1, what="the triggered verdict")
    assert station.journal.recent(1)[0].part_id == "page"
    # Paused, a trigger would be dropped on MQTT only, where the page does not look: refused.
    assert page.post("/api/station/pause")[0] == 202
    wait_until(lambda: station.paused, what="paused")
    assert page.post("/api/station/trigger") == (
        409,
        {"error": "the station is paused: resume it first"},
    )


def test_a_dataset_folder_the_station_cannot_write_is_named(
    start_page: StartPage, caplog: pytest.LogCaptureFixture
) -> None:
    # Here a file stands where the folder should be; on a device it is most often a folder
    # copied in by root (root passes any permission check, so this test cannot use that).
    station, page = start_page()
    page.start()
    folder = station.cfg.station.state_dir / "dataset" / "train" / "normal"
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("not a folder")
    status, err = page.post("/api/dataset/capture", {"label": "normal"})
    assert status == 500
    assert err["error"].startswith("the station cannot do this: ") and str(folder) in err["error"]
    assert "Traceback" not in caplog.text and str(folder) in caplog.text
    assert station.web is not None and page.get("/api/status")[0] == 200
