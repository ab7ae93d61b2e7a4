"""What a frontend hands the engine: the decoded credentials and the request context.

Pure values. Frontends build them from their wire protocol; the SASL decoders
build :class:`Credentials`; rules read :class:`RequestContext`.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from saslauthd_oidc.config import Config, RuleConfig


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


@dataclass(frozen=True, slots=True, init=False)
class Credentials:
    """A bearer token and what the client said alongside it.

    ``authzid`` is the OAUTHBEARER ``a=`` value, the XOAUTH2 ``user=`` value,
    the PLAIN/LOGIN/saslauthd login. ``host``/``port`` come from OAUTHBEARER.
    """

    token: str = field(repr=False)
    authzid: str | None
    host: str | None
    port: int | None

    def __init__(
        self,
        token: str,
        authzid: str | None = None,
        host: str | None = None,
        port: int | None = None,
    ) -> None:
        _credentials_token(self, token)
        _credentials_authzid(self, authzid)
        _credentials_host(self, host)
        _credentials_port(self, port)

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


#: The context of a request built without one: one shared, immutable instance.
NO_CONTEXT: Final = RequestContext()


@dataclass(frozen=True, slots=True, init=False)
class AuthRequest:
    """One authentication to decide. ``negotiated`` says whether the client chose
    ``mechanism`` from those we offered (server.mechanisms, on the Dovecot-protocol
    socket); a saslauthd request negotiates none: it carries a login and the token
    as a password, and configuring the saslauthd socket is its opt-in."""

    mechanism: Mechanism
    credentials: Credentials
    context: RequestContext
    negotiated: bool

    def __init__(
        self,
        mechanism: Mechanism,
        credentials: Credentials,
        context: RequestContext = NO_CONTEXT,
        negotiated: bool = True,
    ) -> None:
        _request_mechanism(self, mechanism)
        _request_credentials(self, credentials)
        _request_context(self, context)
        _request_negotiated(self, negotiated)


# A frozen dataclass's generated __init__ sets each field through
# object.__setattr__. Every request builds these two, so their __init__ sets the
# slots through the slot descriptors instead (about twice as fast); eq, hash,
# repr, fields() and the frozen __setattr__ stay dataclass's.
def _setter(cls: type, name: str) -> Callable[[Any, Any], None]:
    setter: Callable[[Any, Any], None] = cls.__dict__[name].__set__
    return setter


_credentials_token, _credentials_authzid, _credentials_host, _credentials_port = (
    _setter(Credentials, name) for name in ("token", "authzid", "host", "port")
)
_request_mechanism, _request_credentials, _request_context, _request_negotiated = (
    _setter(AuthRequest, name) for name in ("mechanism", "credentials", "context", "negotiated")
)


def token_fingerprint(token: str) -> str:
    """The only form in which a token may appear in logs, replies or metrics."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:12]


# --------------------------------------------------------------------------- who says what

# Rule context conditions that a frontend's requests can never satisfy, because
# its callers never send the fact (README "Who controls each request fact").
# The Dovecot socket's callers can send all of them (Postfix and Exim send no
# lport: there the client's OAUTHBEARER port= is all there is).
_NEVER_SENT: Mapping[str, tuple[str, Mapping[str, str]]] = {
    "saslauthd": (
        "the saslauthd socket (Cyrus SASL)",
        {
            "hosts": "no host name",
            "ports": "no port",
            "require_secured": "no TLS flag",
        },
    ),
    "introspect": (
        "Dovecot's /introspect",
        {
            "hosts": "no host name",
            "require_secured": "no TLS flag",
        },
    ),
    "stalwart": (
        "Stalwart",
        {
            "services": "no service",
            "hosts": "no host name",
            "ports": "no port",
            "remote_networks": "no client address",
            "require_secured": "no TLS flag",
        },
    ),
}


def _serves(rule: RuleConfig, mechanism: Mechanism) -> bool:
    return not rule.mechanisms or mechanism.value in rule.mechanisms


def unreachable_condition_warnings(cfg: Config) -> list[str]:
    """Rules whose context conditions can never hold on an enabled frontend.

    Such a rule never serves that frontend's requests; said once per rule,
    naming each frontend and the fact its callers do not send. A rule that
    excludes the frontend by ``mechanisms`` is not reported.
    """
    http = bool(cfg.server.http_listen or cfg.server.http_socket)
    enabled = {
        "saslauthd": (bool(cfg.server.saslauthd_socket), Mechanism.PLAIN),
        "introspect": (http, Mechanism.BEARER),
        "stalwart": (http and bool(cfg.http.stalwart_issuer), Mechanism.BEARER),
    }
    warnings: list[str] = []
    for i, rule in enumerate(cfg.rules):
        problems: list[str] = []
        for frontend, (on, mechanism) in enabled.items():
            if not on or not _serves(rule, mechanism):
                continue
            label, never = _NEVER_SENT[frontend]
            missing = [
                f"{condition} ({fact})"
                for condition, fact in never.items()
                if getattr(rule, condition)
            ]
            if missing:
                problems.append(f"{label}: {', '.join(missing)}")
        if problems:
            warnings.append(
                f"rule[{i}] ({rule.name}) never serves "
                + "; ".join(problems)
                + ": those requests do not carry these facts (a rule whose mechanisms "
                'leave out "BEARER" is kept off HTTP, one without "PLAIN" off saslauthd)'
            )
    return warnings
