"""How a Verdict is answered over HTTP: the one place where it becomes a reply.

Two contracts: RFC 7662 introspection as Dovecot's ``passdb oauth2`` reads it
(``{"active": …}``, the account as ``username``, claims that cannot upset
Dovecot), and Stalwart's OIDC directory (userinfo fields, or a 401 with a
``WWW-Authenticate`` challenge). A temporary failure is a 503 on both.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from saslauthd_oidc.core.outcome import Outcome, Verdict

# Claims never copied into an introspection answer: ours to set, or ones that
# make Dovecot fail the answer (token_type must be "bearer", expires_in a uint32).
_RESERVED_CLAIMS = frozenset({"active", "username", "token_type", "expires_in"})


class Surface(enum.Enum):
    """Which contract a token arrived under; decides how a Verdict is answered."""

    INTROSPECT = "introspect"  # RFC 7662 / Dovecot
    STALWART = "stalwart"  # Stalwart OIDC directory (introspect and userinfo)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    content_type: bytes = b"application/json"


def json_reply(status: int, doc: Any, *headers: tuple[bytes, bytes]) -> Reply:
    return Reply(status, json.dumps(doc, separators=(",", ":")).encode(), tuple(headers))


_UNAVAILABLE = json_reply(503, {"error": "temporarily_unavailable"})


def _introspection_claims(verdict: Verdict) -> dict[str, Any]:
    claims = {
        k: v
        for k, v in (verdict.claims or {}).items()
        if k not in _RESERVED_CLAIMS and isinstance(v, str | int | float | bool | list)
    }
    return {"active": True, "username": verdict.account, **claims}


def _stalwart_fields(verdict: Verdict) -> dict[str, Any]:
    account = verdict.account or ""
    claims = verdict.claims or {}
    doc: dict[str, Any] = {"sub": account, "preferred_username": account, "username": account}
    if "@" in account:
        doc["email"] = account
    name = claims.get("name")
    if isinstance(name, str):
        doc["name"] = name
    return doc


def verdict_reply(surface: Surface, verdict: Verdict) -> Reply:
    """The one place where a Verdict becomes an HTTP answer.

    A temporary failure is 503 on every surface: Dovecot treats anything but
    2xx/4xx as an internal (temporary) failure, Stalwart any non-401 as an error.
    """
    if verdict.outcome is Outcome.TEMPFAIL:
        return _UNAVAILABLE
    if surface is Surface.INTROSPECT:
        if verdict.ok:
            return json_reply(200, _introspection_claims(verdict))
        return json_reply(200, {"active": False})
    if verdict.ok:
        return json_reply(200, _stalwart_fields(verdict))
    return json_reply(
        401, {"error": "invalid_token"}, (b"www-authenticate", b'Bearer error="invalid_token"')
    )
