"""What a frontend hands the engine: the decoded credentials and the request context.

Pure values. Frontends build them from their wire protocol; the SASL decoders
build :class:`Credentials`; rules read :class:`RequestContext`.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field


class Mechanism(enum.StrEnum):
    OAUTHBEARER = "OAUTHBEARER"
    XOAUTH2 = "XOAUTH2"
    PLAIN = "PLAIN"
    LOGIN = "LOGIN"
    # A bare bearer token handed over by HTTP (RFC 7662 introspection,
    # userinfo): not a SASL mechanism, never advertised on a SASL socket.
    BEARER = "BEARER"

    @classmethod
    def parse(cls, name: str) -> Mechanism | None:
        """A SASL mechanism name, case-insensitively (every wire we speak says so)."""
        try:
            mechanism = cls(name.upper())
        except ValueError:
            return None
        return mechanism if mechanism.is_sasl else None

    @property
    def is_sasl(self) -> bool:
        return self is not Mechanism.BEARER


SASL_MECHANISMS = tuple(m for m in Mechanism if m.is_sasl)


@dataclass(frozen=True, slots=True)
class Credentials:
    """A bearer token and what the client said alongside it.

    ``authzid`` is the OAUTHBEARER ``a=`` value, the XOAUTH2 ``user=`` value,
    the PLAIN/LOGIN/saslauthd login. ``host``/``port`` come from OAUTHBEARER.
    """

    token: str = field(repr=False)
    authzid: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def fingerprint(self) -> str:
        return token_fingerprint(self.token)

    @property
    def user_domain(self) -> str | None:
        if self.authzid and "@" in self.authzid:
            return self.authzid.rsplit("@", 1)[1].lower() or None
        return None


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Where the request came from. Every field is optional: callers send what they know."""

    frontend: str = "dovecot"
    service: str | None = None
    local_ip: str | None = None
    local_port: int | None = None
    remote_ip: str | None = None
    remote_port: int | None = None
    local_name: str | None = None  # TLS SNI
    secured: bool = False


@dataclass(frozen=True, slots=True)
class AuthRequest:
    mechanism: Mechanism
    credentials: Credentials
    context: RequestContext = field(default_factory=RequestContext)


def token_fingerprint(token: str) -> str:
    """The only form in which a token may appear in logs, replies or metrics."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:12]
