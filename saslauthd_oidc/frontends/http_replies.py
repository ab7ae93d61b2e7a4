"""HTTP replies, and how a Verdict is answered to RFC 7662 introspection.

:class:`Reply` is what every route of the HTTP listener returns. A Verdict
becomes a reply under one of two contracts: RFC 7662 introspection as
Dovecot's ``passdb oauth2`` reads it (``{"active": …}``, the account as
``username``, claims that cannot upset Dovecot), here; and Stalwart's OIDC
directory, in :mod:`.stalwart`. A temporary failure is a 503 on both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from saslauthd_oidc.core.outcome import Outcome, Verdict

# Claims never copied into an introspection answer: ours to set, or ones that
# make Dovecot fail the answer (token_type must be "bearer", expires_in a uint32).
_RESERVED_CLAIMS = frozenset({"active", "username", "token_type", "expires_in"})


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    content_type: bytes = b"application/json"


def json_reply(status: int, doc: Any, *headers: tuple[bytes, bytes]) -> Reply:
    return Reply(status, json.dumps(doc, separators=(",", ":")).encode(), tuple(headers))


#: A temporary failure, on every contract.
UNAVAILABLE = json_reply(503, {"error": "temporarily_unavailable"})


def _introspection_claims(verdict: Verdict) -> dict[str, Any]:
    claims = {
        k: v
        for k, v in (verdict.claims or {}).items()
        if k not in _RESERVED_CLAIMS and isinstance(v, str | int | float | bool | list)
    }
    return {"active": True, "username": verdict.account, **claims}


def introspection_reply(verdict: Verdict) -> Reply:
    """A Verdict as Dovecot's ``passdb oauth2`` reads an RFC 7662 answer.

    A temporary failure is a 503: Dovecot treats anything but 2xx/4xx as an
    internal (temporary) failure.
    """
    if verdict.outcome is Outcome.TEMPFAIL:
        return UNAVAILABLE
    if verdict.ok:
        return json_reply(200, _introspection_claims(verdict))
    return json_reply(200, {"active": False})
