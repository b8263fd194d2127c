"""The small HTTP layer under the station page: requests, replies, errors, safe headers.

Python's threaded http.server, one thread a request. The application gives one function,
Request -> Reply, and raises HttpError for a refusal; every reply carries the security
headers (no sniffing, no framing, a strict Content-Security-Policy) unless it overrides them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 64 * 1024
MAX_CONNECTIONS = 64  # open page connections at once; more are closed as they come
MAX_CLIENT_CONNECTIONS = 16  # ... and from one address (a browser opens about 6)
# A request's head must arrive within this, and its body within this plus a second for every
# MIN_BODY_RATE bytes: a client sending a header line (or a byte) every few seconds would
# otherwise hold its connection, and its slot, for ever.
REQUEST_DEADLINE_S = 60.0
MIN_BODY_RATE = 10_000  # bytes a second
HANDSHAKE_TIMEOUT_S = 10.0  # for the first byte, then for the TLS handshake
_PLAIN_TO_TLS = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\nThis page is served over HTTPS: put https:// before the "
    b"address.\n"
)
DEFAULT_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


class HttpError(Exception):
    """A request refused with a status and one sentence for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Reply:
    """What to send: status, body, its type, and headers added to (or replacing) the safe ones."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(doc: object, status: int = 200) -> Reply:
    return Reply(status, json.dumps(doc).encode())


@dataclass
class Request:
    """One request as the application sees it; the body is read only when asked for, up to a
    limit (HttpError 413 above it, before anything is read)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    address: str
    read_body: Callable[[int], bytes]
    session: str | None = None  # filled in by the application: the session cookie
    csrf: str | None = None  # ... and that session's valid CSRF token, if any

    def json(self) -> dict[str, Any]:
        raw = self.read_body(MAX_JSON_BYTES)
        try:
            doc = json.loads(raw or b"{}")
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise HttpError(400, "the request body is not JSON") from None
        if not isinstance(doc, dict):
            raise HttpError(400, "the request body must be a JSON object")
        return doc

    @property
    def file_name(self) -> str:
        """The uploaded file's name as the page sends it, made safe for messages."""
        name = unquote(self.headers.get("x-file-name", "upload"))
        return "".join(c for c in name if c.isprintable())[:100] or "upload"


def serve(
    host: str, port: int, handle: Callable[[Request], Reply], tls: ssl.SSLContext | None = None
) -> Server:
    """Listen on host:port (IPv4 or IPv6) and answer every request with `handle` in a
    thread of its own, over HTTPS when given a server TLS context; raises OSError if the
    address cannot be taken.

    >>> echo = lambda req: json_reply({"path": req.path})      # doctest: +SKIP
    >>> server = serve("127.0.0.1", 8080, echo)               # doctest: +SKIP
    >>> server.shutdown()                                     # doctest: +SKIP
    """
    server = (_Server6 if ":" in host else Server)((host, port), _Handler)
    server.answer = handle
    server.tls = tls
    threading.Thread(target=server.serve_forever, args=(0.25,), name="http", daemon=True).start()
    return server


class Server(ThreadingHTTPServer):
    """Caps open connections, in all and per client address: a client that holds many open
    (sending a header line now and then) would otherwise use up the process's file
    descriptors, and with them the camera's and the journal's."""

    daemon_threads = True  # a slow client does not hold up the station's exit
    answer: Callable[[Request], Reply]  # the application
    tls: ssl.SSLContext | None = None

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()
        self._refused_at = 0.0

    def process_request(self, request: Any, client_address: Any) -> None:
        who = client_address[0]
        with self._lock:
            full = (
                self._open.total() >= MAX_CONNECTIONS or self._open[who] >= MAX_CLIENT_CONNECTIONS
            )
            if not full:
                self._open[who] += 1
        if full:
            if time.monotonic() - self._refused_at > 60:
                self._refused_at = time.monotonic()
                log.warning("page: too many open connections; %s was refused", who)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._closed(who)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed(client_address[0])

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Answer one connection, in its own thread: the TLS handshake happens here, so a
        client that never completes one holds up only itself, not the accept loop."""
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            first = request.recv(1, socket.MSG_PEEK)
            if first and first != b"\x16":  # not a TLS handshake: plain HTTP, most likely
                request.sendall(_PLAIN_TO_TLS)
                return
            secure = self.tls.wrap_socket(request, server_side=True)
        except OSError as exc:  # ssl.SSLError is one: a scanner, a client that gave up
            log.debug("page %s: no TLS connection: %s", client_address[0], exc)
            return
        try:
            super().finish_request(secure, client_address)
        finally:
            secure.close()

    def _closed(self, who: str) -> None:
        with self._lock:
            self._open[who] -= 1
            if self._open[who] <= 0:
                del self._open[who]

    def get_request(self) -> tuple[Any, Any]:
        try:
            return super().get_request()
        except OSError:
            time.sleep(0.1)  # out of file descriptors, say: wait rather than spin on accept
            raise


class _Server6(Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_version = "edge-inspect"
    sys_version = ""
    timeout = 30  # a client that stops sending loses its thread after this

    def setup(self) -> None:
        super().setup()
        self._deadline: threading.Timer | None = None
        self._arm(REQUEST_DEADLINE_S)

    def _arm(self, seconds: float | None) -> None:
        """End the connection unless what is being read arrives within `seconds` (None: stop
        the clock, as when the request is in and the application works on it)."""
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        if seconds is not None:
            self._deadline = threading.Timer(seconds, self._too_slow)
            self._deadline.daemon = True
            self._deadline.start()

    def _too_slow(self) -> None:
        with contextlib.suppress(OSError):  # its reads see the end of the stream
            self.connection.shutdown(socket.SHUT_RDWR)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self._arm(None)  # the head is in
        return ok

    def finish(self) -> None:
        self._arm(None)
        super().finish()

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    server: Server

    def _answer(self, method: str) -> None:
        url = urlsplit(self.path)
        req = Request(
            method=method,
            path=url.path,
            query={k: v[0] for k, v in parse_qs(url.query).items()},
            headers={k.lower(): v for k, v in self.headers.items()},
            address=self.client_address[0],
            read_body=self._read_body,
        )
        try:
            reply = self.server.answer(req)
        except HttpError as exc:
            reply = json_reply({"error": exc.message}, exc.status)
        except (TimeoutError, ConnectionError) as exc:  # the client stalled or went: not ours
            log.debug("request %s %s: the client's connection failed: %s", method, url.path, exc)
            self.close_connection = True
            return
        except OSError as exc:  # a file the station cannot write (owner, disk): said, no traceback
            what = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
            if isinstance(exc, PermissionError):
                what += " (files in the state folder must belong to the station's user)"
            log.warning("request %s %s failed: %s", method, url.path, what)
            reply = json_reply({"error": f"the station cannot do this: {what}"}, 500)
        except Exception:
            log.exception("request %s %s failed", method, url.path)
            reply = json_reply({"error": "the station failed to answer; see its log"}, 500)
        self._send(reply)

    def _read_body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            if self.headers.get("Transfer-Encoding"):
                raise HttpError(411, "send the body with a Content-Length")
            return b""
        length = length.strip()
        size = int(length) if length.isascii() and length.isdigit() else -1  # not "+5", "1_0"
        if size < 0:
            self.close_connection = True
            raise HttpError(400, "Content-Length is not a number of bytes")
        if size > limit:
            self.close_connection = True  # the unread body must not be taken as a request
            raise HttpError(
                413, f"the upload has {size} bytes, more than the limit of {limit} bytes"
            )
        self._arm(REQUEST_DEADLINE_S + size / MIN_BODY_RATE)
        try:
            body = self.rfile.read(size)
        finally:
            self._arm(None)
        if len(body) < size:  # too slow, or the client gave up: nothing half-received is used
            self.close_connection = True
            raise HttpError(400, f"the request body ended after {len(body)} of {size} bytes")
        return body

    def _send(self, reply: Reply) -> None:
        try:
            self.send_response(reply.status)
            headers = {
                "Content-Type": reply.content_type,
                "Content-Length": str(len(reply.body)),
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer",
                "Content-Security-Policy": DEFAULT_CSP,
                **reply.headers,
            }
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away (a newer picture was asked for, say)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("page %s: " + format, self.client_address[0], *args)


def cookie(header: str, name: str) -> str | None:
    """The value of cookie `name` in a Cookie header, or None."""
    try:
        morsel = SimpleCookie(header).get(name)
    except CookieError:
        return None
    return morsel.value if morsel else None
