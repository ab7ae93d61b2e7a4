"""Stalwart's OIDC directory, as the HTTP listener plays it under ``http.stalwart_path``.

Stalwart (v0.16) validates a bearer token by asking an "OIDC directory": it
reads the directory's discovery document, then calls its userinfo (or
introspection) endpoint with the token and takes the account from the answer.
This module owns that contract: the paths under the facade, the discovery
document naming ``http.stalwart_issuer``, the empty key set, the context a
Stalwart request carries (none: Stalwart says nothing of the mail client's
connection), and how a Verdict is answered — userinfo fields, or a 401 with a
``WWW-Authenticate`` challenge, or a 503 for a temporary failure.

Routing and the engine call stay in :mod:`.http`; this module is values in,
values out.
"""

from __future__ import annotations

from typing import Any

from saslauthd_oidc.core.outcome import Outcome, Verdict
from saslauthd_oidc.core.request import RequestContext
from saslauthd_oidc.frontends.http_replies import UNAVAILABLE, Reply, json_reply

#: The facade's paths, below ``http.stalwart_path``.
INTROSPECT_PATH = "/introspect"
USERINFO_PATH = "/userinfo"
DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/jwks"

#: Stalwart tells nothing about the mail client's connection.
CONTEXT = RequestContext(frontend="http")

_REFUSED = json_reply(
    401, {"error": "invalid_token"}, (b"www-authenticate", b'Bearer error="invalid_token"')
)


def stalwart_discovery(issuer: str) -> dict[str, Any]:
    """The facade's discovery document, with the fields Stalwart v0.16 requires."""
    return {
        "issuer": issuer,
        "userinfo_endpoint": issuer + USERINFO_PATH,
        "introspection_endpoint": issuer + INTROSPECT_PATH,
        "jwks_uri": issuer + JWKS_PATH,
        # Required by Stalwart's parser; this facade issues no tokens (they 404).
        "authorization_endpoint": issuer + "/authorize",
        "token_endpoint": issuer + "/token",
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "email", "profile"],
        "claims_supported": ["sub", "email", "preferred_username", "name"],
    }


def document(rest: str, issuer: str) -> Reply | None:
    """The answer to ``GET {stalwart_path}{rest}`` for a document, or None if there is none."""
    if rest == DISCOVERY_PATH:
        return json_reply(200, stalwart_discovery(issuer.rstrip("/")))
    if rest == JWKS_PATH:
        return json_reply(200, {"keys": []})  # tokens are checked by asking, not by keys
    return None


def userinfo_fields(verdict: Verdict) -> dict[str, Any]:
    """What Stalwart reads from a userinfo answer: the account under every name it tries."""
    account = verdict.account or ""
    claims = verdict.claims or {}
    doc: dict[str, Any] = {"sub": account, "preferred_username": account, "username": account}
    if "@" in account:
        doc["email"] = account
    name = claims.get("name")
    if isinstance(name, str):
        doc["name"] = name
    return doc


def verdict_reply(verdict: Verdict) -> Reply:
    """A Verdict as Stalwart reads it, on userinfo and introspection alike.

    A temporary failure is a 503: Stalwart takes any answer but 401 as an error,
    not as a refused token.
    """
    if verdict.outcome is Outcome.TEMPFAIL:
        return UNAVAILABLE
    if verdict.ok:
        return json_reply(200, userinfo_fields(verdict))
    return _REFUSED
