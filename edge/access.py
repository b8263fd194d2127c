"""Who may use the station page: the password hash, login sessions and their CSRF tokens.

The password is stored only as a scrypt hash ("scrypt$N$r$p$salt$hash", base64 parts), made by
`edge-inspect hash-password`. A login gives a random session id in an HttpOnly, SameSite=Strict
cookie, and a CSRF token the page sends back in a header with every change it asks for.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from math import ceil

# scrypt at N=2^14, r=8: 16 MiB and some tens of ms a try here, a few hundred on a Pi.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
# Failed logins from one address are slowed down: 2, 4, 8 ... s, at most a minute.
LOCKOUT_MAX_S = 60.0


def hash_password(password: str) -> str:
    """A storable hash of `password`; ValueError if the password is too short or too long."""
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise ValueError(f"the password must have {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    parts = [str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)]
    return "scrypt$" + "$".join(parts)


def check_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """Parse a stored hash; ValueError saying what is wrong with it."""
    parts = stored.split("$")
    try:
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5])
        if n < 2**10 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or len(digest) < 16:
            raise ValueError
    except ValueError:
        raise ValueError(
            "password_hash is not a hash made by `edge-inspect hash-password`"
        ) from None
    return n, r, p, salt, digest


def verify_password(password: str, stored: str) -> bool:
    n, r, p, salt, digest = check_hash(stored)
    if len(password) > MAX_PASSWORD:
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(digest)), digest)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int = 32) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=length, maxmem=256 * n * r
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class Session:
    csrf: str
    expires: float


class Sessions:
    """Logins held in memory (a restart logs everyone out) and the throttle on failed ones.

    Without a password hash (the page is on localhost only) there is one implicit session
    whose CSRF token is still required for every change.
    """

    def __init__(self, password_hash: str | None, lifetime_s: float) -> None:
        self.password_hash = password_hash
        self.lifetime_s = lifetime_s
        self.local_csrf = secrets.token_urlsafe(32)
        self._sessions: dict[str, Session] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # address -> (count, locked until)
        self._lock = threading.Lock()
        self._checking = threading.Lock()

    @property
    def required(self) -> bool:
        return self.password_hash is not None

    def login(self, password: str, address: str) -> str:
        """Check a password; return a new session id. ValueError for a wrong password,
        PermissionError while the address is locked out after earlier wrong ones."""
        assert self.password_hash is not None
        # One password check at a time: a burst of guesses cannot all pass the lock-out test
        # before the first is counted, and only one scrypt's memory (16 MiB) is ever in use.
        with self._checking:
            with self._lock:
                count, until = self._failures.get(address, (0, 0.0))
            wait = until - time.monotonic()
            if wait > 0:
                raise PermissionError(f"too many wrong passwords; try again in {ceil(wait)} s")
            if not verify_password(password, self.password_hash):
                with self._lock:
                    count += 1
                    self._failures[address] = (
                        count,
                        time.monotonic() + min(2.0**count, LOCKOUT_MAX_S),
                    )
                raise ValueError("wrong password")
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._failures.pop(address, None)
            now = time.monotonic()
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
            self._sessions[sid] = Session(secrets.token_urlsafe(32), now + self.lifetime_s)
        return sid

    def logout(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    def csrf_for(self, sid: str | None) -> str | None:
        """The CSRF token of a valid session (or the local one), None when not logged in."""
        if not self.required:
            return self.local_csrf
        with self._lock:
            session = self._sessions.get(sid or "")
            if session is None or session.expires < time.monotonic():
                return None
            return session.csrf
