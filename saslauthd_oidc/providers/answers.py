"""What an introspection or userinfo answer means: pure checks, no I/O.

RFC 7662 introspection answers and OIDC userinfo answers are turned into the
same :class:`VerifiedClaims` a verified JWT gives, so that every rule
condition (``aud``, ``azp``/``client_id``, ``scope``, ``iss``, claims) applies to
opaque tokens unchanged. Only the JSON boolean ``true`` counts as active.
:func:`merge_userinfo` adds userinfo claims to a verified JWT's claims
without letting userinfo override anything the token itself asserts.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

from saslauthd_oidc.core.outcome import Reason, Refusal
from saslauthd_oidc.providers.jwt import VerifiedClaims, bearer_problem, check_time_claims

# Claims that decide *whether* a token is accepted. Userinfo enrichment may add
# profile claims (email, preferred_username…) but never these.
DECISION_CLAIMS = frozenset(
    {
        "iss",
        "sub",
        "aud",
        "azp",
        "client_id",
        "scope",
        "scp",
        "exp",
        "nbf",
        "iat",
        "jti",
        "tid",
        "cnf",
        "active",
        "token_type",
        "typ",
    }
)

# Keycloak's "typ" and RFC 7662's token_type values that are not access tokens.
_NOT_ACCESS_TOKEN = frozenset({"refresh", "refresh_token", "offline", "id", "id_token"})
# RFC 9449 §8.2 (DPoP) and RFC 8705: token_type of a sender-constrained token.
_SENDER_CONSTRAINED_TYPES = frozenset({"dpop"})


def interpret_introspection(
    doc: Mapping[str, Any],
    *,
    issuer: str,
    accepts_issuer: Callable[[object], bool],
    now: float,
    leeway: float,
) -> VerifiedClaims | Refusal:
    """An RFC 7662 answer → verified claims, or why the token is refused.

    ``iss`` in the answer must be the provider's (``accepts_issuer``); when
    absent it is the provider's ``issuer``. ``exp``, ``nbf`` and ``iat`` are
    checked like a JWT's, but ``exp`` may be absent (then only the cache TTL
    bounds how long the answer is trusted).
    """
    if doc.get("active") is not True:
        return Refusal(Reason.TOKEN_INACTIVE, "introspection: token is not active")
    claims = _with_issuer(doc, issuer, accepts_issuer, "introspection")
    if isinstance(claims, Refusal):
        return claims
    for field in ("token_type", "typ"):
        kind = claims.get(field)
        if isinstance(kind, str) and kind.lower() in _NOT_ACCESS_TOKEN:
            return Refusal(
                Reason.WRONG_TOKEN_TYPE, f"introspection: {field} {kind[:32]!r} is no access token"
            )
        if isinstance(kind, str) and kind.lower() in _SENDER_CONSTRAINED_TYPES:
            return Refusal(
                Reason.SENDER_CONSTRAINED,
                f"introspection: {field} {kind[:32]!r}: SASL carries no proof of possession",
            )
    if claims.get("cnf") is not None:
        # The ID-token markers do not apply: an introspection answer is about an
        # access token; only the sender constraint (cnf) is looked at here.
        refused = bearer_problem({"cnf": claims["cnf"]}, accept_id_tokens=True)
        if refused is not None:
            return Refusal(refused.reason, f"introspection: {refused.detail}")
    if "exp" in claims:
        expires = check_time_claims(claims, now=now, leeway=leeway)
        if isinstance(expires, Refusal):
            return expires
    else:
        # A stand-in exp that no nbf/iat can follow, so only nbf/iat themselves are judged.
        stand_in = {**claims, "exp": sys.float_info.max}
        with_exp = check_time_claims(stand_in, now=now, leeway=leeway)
        if isinstance(with_exp, Refusal):
            return with_exp
        expires = math.inf
    return VerifiedClaims(claims=claims, header={}, expires_at=expires)


def interpret_userinfo(
    doc: Mapping[str, Any], *, issuer: str, accepts_issuer: Callable[[object], bool]
) -> VerifiedClaims | Refusal:
    """A userinfo answer (HTTP 200) → claims. ``sub`` must be a non-empty string.

    Userinfo proves the token is valid at the provider, not for whom it was
    issued: there is no ``aud`` to check. The answer is trusted until the cache
    TTL; it carries no ``exp``.
    """
    sub = doc.get("sub")
    if not isinstance(sub, str) or not sub:
        return Refusal(Reason.BAD_CLAIM, "userinfo answer has no sub")
    claims = _with_issuer(doc, issuer, accepts_issuer, "userinfo")
    if isinstance(claims, Refusal):
        return claims
    return VerifiedClaims(claims=claims, header={}, expires_at=math.inf)


def _with_issuer(
    doc: Mapping[str, Any], issuer: str, accepts_issuer: Callable[[object], bool], source: str
) -> dict[str, Any] | Refusal:
    """The answer's claims with ``iss`` checked, or the provider's filled in when absent."""
    claims = dict(doc)
    iss = claims.get("iss")
    if iss is None:
        claims["iss"] = issuer
    elif not accepts_issuer(iss):
        shown = iss[:120] if isinstance(iss, str) else type(iss).__name__
        return Refusal(Reason.WRONG_ISSUER, f"{source} names issuer {shown!r}")
    return claims


def merge_userinfo(
    token_claims: Mapping[str, Any], userinfo: Mapping[str, Any]
) -> dict[str, Any] | Refusal:
    """The token's claims plus userinfo's profile claims; the token wins every conflict.

    OIDC Core 5.3.2: the userinfo ``sub`` must equal the token's, or the
    answer belongs to someone else and is refused.
    """
    token_sub = token_claims.get("sub")
    if token_sub is not None and userinfo.get("sub") != token_sub:
        return Refusal(Reason.BAD_CLAIM, "userinfo sub differs from the token's sub")
    merged = dict(token_claims)
    for name, value in userinfo.items():
        if name not in DECISION_CLAIMS and name not in merged:
            merged[name] = value
    return merged
