"""SMTP AUTH credentials: a file of argon2id password hashes.

Format, one user per line (``#`` starts a comment)::

    orders-app:$argon2id$v=19$m=65536,t=3,p=4$...

``mxgate passwd NAME`` prints such a line. In Kubernetes the file comes from a Secret mounted read-only.

Verifying an argon2id hash costs tens of milliseconds of CPU on purpose, so it runs in a worker thread
(never on the event loop that serves every other SMTP session), and a successful verification is
remembered for ``cache_seconds`` under a keyed digest of the password, so an application that opens a
connection per message does not pay it every time. Unknown users are verified against a dummy hash so
the answer takes as long as for a known user (no user enumeration by timing).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from mxgate.errors import ConfigError

_HASHER = PasswordHasher()


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


@dataclass(frozen=True, slots=True)
class Credentials:
    users: dict[str, str]  # login -> argon2 hash

    @classmethod
    def load(cls, path: Path) -> Credentials:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read credentials file: {exc.strerror}") from exc
        users: dict[str, str] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            login, sep, hashed = line.partition(":")
            if not sep or not login or not hashed.startswith("$argon2"):
                raise ConfigError(f"{path}:{lineno}: expected 'user:$argon2id$...' (make one with `mxgate passwd`)")
            try:
                extract_parameters(hashed)
            except InvalidHashError:
                # A mangled hash (or the placeholder above, pasted as is) would load, then fail every login.
                raise ConfigError(f"{path}:{lineno}: the hash for {login!r} is not an argon2 hash") from None
            if login in users:
                raise ConfigError(f"{path}:{lineno}: user {login!r} appears twice")
            users[login] = hashed
        return cls(users)


class Authenticator:
    """Checks login/password pairs off the event loop, with a short-lived cache of successes."""

    def __init__(self, credentials: Credentials, *, cache_seconds: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.credentials = credentials
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._key = secrets.token_bytes(32)  # per process: cached digests are useless outside it
        self._ok: dict[tuple[str, bytes], float] = {}
        self._dummy = _HASHER.hash(secrets.token_hex(16))

    async def verify(self, login: str, password: str) -> bool:
        digest = hmac.new(self._key, password.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        cached = self._ok.get((login, digest))
        now = self.clock()
        if cached is not None and cached > now:
            return True
        hashed = self.credentials.users.get(login)
        ok = await asyncio.to_thread(_check, hashed or self._dummy, password)
        ok = ok and hashed is not None
        if ok:
            if len(self._ok) > 10_000:  # bounds memory
                self._ok.clear()
            self._ok[(login, digest)] = now + self.cache_seconds
        return ok


def _check(hashed: str, password: str) -> bool:
    try:
        return _HASHER.verify(hashed, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
