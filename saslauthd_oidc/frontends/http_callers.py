"""Who may call the HTTP introspection endpoints (``http.auth``).

Basic users from ``http.users_file`` (``name:password`` lines), a shared Bearer
secret from ``http.secret_file``, or anyone (``auth = "open"``, loopback only).
Passwords and the secret are kept only as SHA-256 digests and compared in
constant time, and an unknown user name costs what a known one does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

from saslauthd_oidc.config import ConfigError, HttpConfig
from saslauthd_oidc.secret_files import read_secret_file


@dataclass(frozen=True, slots=True)
class CallerAuth:
    """Who may call the introspection endpoints: Basic users, a shared Bearer secret, or anyone."""

    open: bool = False
    users: Mapping[str, bytes] = field(default_factory=dict)  # name -> SHA-256 of the password
    secret: bytes | None = None  # SHA-256 of the shared secret

    def allows(self, authorization: str | None) -> bool:
        if self.open:
            return True
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "basic" and self.users:
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return False
            name, sep, password = decoded.partition(":")
            # Hash and compare for unknown names too (against a digest no password
            # has), so that a valid user name takes no longer to refuse than any other.
            expected = self.users.get(name)
            matches = _same(password, _UNKNOWN_USER_DIGEST if expected is None else expected)
            return bool(sep) and expected is not None and matches
        if scheme.lower() == "bearer" and self.secret is not None:
            return _same(value, self.secret)
        return False


# Compared against for a user name that is not in http.users_file: no password's
# SHA-256 is all ones (as unlikely as any preimage), and the comparison costs the same.
_UNKNOWN_USER_DIGEST = b"\xff" * hashlib.sha256().digest_size


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _same(given: str, expected_digest: bytes) -> bool:
    return hmac.compare_digest(_digest(given), expected_digest)


def load_caller_auth(cfg: HttpConfig) -> CallerAuth:
    """Read ``http.users_file`` / ``http.secret_file``; ConfigError names the key."""
    if cfg.auth == "open":
        return CallerAuth(open=True)
    users: dict[str, bytes] = {}
    if cfg.users_file:
        text = read_secret_file("http.users_file", cfg.users_file)
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, password = line.partition(":")
            if not sep or not name or not password:
                raise ConfigError(
                    "http.users_file", f"{cfg.users_file} line {number}: expected name:password"
                )
            users[name] = _digest(password)
    secret = (
        _digest(read_secret_file("http.secret_file", cfg.secret_file)) if cfg.secret_file else None
    )
    return CallerAuth(users=users, secret=secret)
