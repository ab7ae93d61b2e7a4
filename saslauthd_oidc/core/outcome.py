"""What an authentication came to: the closed set of reason codes and the Verdict.

Every layer speaks in these values. The engine returns a :class:`Verdict`; each
frontend maps it to its own wire reply in exactly one place; logs, metrics and
``explain`` print the :class:`Reason` value; a step that refuses returns a
:class:`Refusal`. Nothing here knows any wire
protocol or does any I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final


class Outcome(enum.StrEnum):
    OK = "ok"
    FAIL = "fail"
    TEMPFAIL = "tempfail"


class Reason(enum.StrEnum):
    """Why an authentication ended as it did. Closed: add members, never strings."""

    OK = "ok"

    # The request itself was unusable (wire or SASL level).
    MALFORMED_REQUEST = "malformed_request"
    INVALID_BASE64 = "invalid_base64"
    MALFORMED_SASL = "malformed_sasl"
    UNSUPPORTED_MECHANISM = "unsupported_mechanism"
    CHANNEL_BINDING_UNSUPPORTED = "channel_binding_unsupported"
    MISSING_TOKEN = "missing_token"
    MISSING_AUTHZID = "missing_authzid"
    # The client gave the exchange up (OAUTHBEARER's lone %x01 where no failure
    # challenge was sent; the mail server answers its client itself).
    CANCELLED = "cancelled"

    # The token was refused.
    MALFORMED_TOKEN = "malformed_token"
    TOKEN_TOO_LARGE = "token_too_large"
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    WRONG_TOKEN_TYPE = "wrong_token_type"
    UNKNOWN_ISSUER = "unknown_issuer"
    WRONG_ISSUER = "wrong_issuer"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    ISSUED_IN_FUTURE = "issued_in_future"
    BAD_CLAIM = "bad_claim"
    TOKEN_INACTIVE = "token_inactive"
    # An ID token (nonce, at_hash/c_hash/s_hash, Keycloak typ "ID") is not an access token.
    ID_TOKEN = "id_token"
    # A sender-constrained token (cnf: DPoP jkt, mTLS x5t#S256): SASL carries no proof.
    SENDER_CONSTRAINED = "sender_constrained"

    # The token was valid but no rule accepts it for this request.
    NO_RULE_FOR_CONTEXT = "no_rule_for_context"
    WRONG_AUDIENCE = "wrong_audience"
    UNTRUSTED_AUTHORIZED_PARTY = "untrusted_authorized_party"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    CLAIM_MISMATCH = "claim_mismatch"
    HOST_MISMATCH = "host_mismatch"

    # The token was accepted but names no usable account.
    IDENTITY_UNMAPPABLE = "identity_unmappable"
    INVALID_ACCOUNT = "invalid_account"
    AUTHZID_MISMATCH = "authzid_mismatch"
    # The account's domain is not one the rule is trusted for (account_domains,
    # domains, or a domain another provider's rule claims).
    UNTRUSTED_ACCOUNT_DOMAIN = "untrusted_account_domain"
    # The username needs an e-mail the IdP does not vouch for (email_verified is
    # not true; a multi-tenant issuer's email), and the rule does not trust it.
    UNVERIFIED_EMAIL = "unverified_email"

    # Nobody's fault but ours or the provider's: try again later.
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    TIMEOUT = "timeout"
    INTERNAL_ERROR = "internal_error"
    OVERLOADED = "overloaded"  # too many requests in flight on one connection
    # The token names a key the provider's last key set lacks, and a refetch is
    # due but not yet allowed (jwks_cooldown): maybe a key rotation, retry soon.
    KEY_REFRESH_PENDING = "key_refresh_pending"

    @property
    def outcome(self) -> Outcome:
        if self is Reason.OK:
            return Outcome.OK
        if self in _TEMPORARY:
            return Outcome.TEMPFAIL
        return Outcome.FAIL


_TEMPORARY = frozenset(
    {
        Reason.PROVIDER_UNAVAILABLE,
        Reason.TIMEOUT,
        Reason.INTERNAL_ERROR,
        Reason.OVERLOADED,
        Reason.KEY_REFRESH_PENDING,
    }
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a step refused what it was given, as a value (never an exception): a
    client message that does not decode, a token that does not verify, an account
    that cannot be mapped, a rule whose conditions do not hold. The one refusal type
    of every layer; decisions look at ``reason`` (closed), never at ``detail``, which
    is operator text and never holds a token, a secret or a key."""

    reason: Reason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DiscoveryHint:
    """What a refused client is told about where to get a better token (RFC 7628 §3.2.2)."""

    openid_configuration: str | None = None
    scope: str | None = None


@dataclass(frozen=True, slots=True, init=False)
class RuleTrace:
    """One rule's verdict on one request, for ``explain`` and debug logs."""

    rule: str
    matched: bool
    reason: Reason
    detail: str

    def __init__(self, rule: str, matched: bool, reason: Reason, detail: str = "") -> None:
        _trace_rule(self, rule)
        _trace_matched(self, matched)
        _trace_reason(self, reason)
        _trace_detail(self, detail)


#: The hint of a verdict that has none: one shared, immutable instance.
NO_HINT: Final = DiscoveryHint()


@dataclass(frozen=True, slots=True, init=False)
class Verdict:
    """The engine's answer. ``detail`` is for operators (logs, explain), never for clients.

    Neither ``detail`` nor any other field may hold a token or a secret.
    """

    reason: Reason
    account: str | None
    rule: str | None
    provider: str | None
    detail: str
    hint: DiscoveryHint
    trace: tuple[RuleTrace, ...]
    claims: dict[str, object] | None

    def __init__(  # noqa: PLR0917 - the dataclass signature it replaces
        self,
        reason: Reason,
        account: str | None = None,
        rule: str | None = None,
        provider: str | None = None,
        detail: str = "",
        hint: DiscoveryHint = NO_HINT,
        trace: tuple[RuleTrace, ...] = (),
        claims: dict[str, object] | None = None,
    ) -> None:
        _verdict_reason(self, reason)
        _verdict_account(self, account)
        _verdict_rule(self, rule)
        _verdict_provider(self, provider)
        _verdict_detail(self, detail)
        _verdict_hint(self, hint)
        _verdict_trace(self, trace)
        _verdict_claims(self, claims)

    @property
    def outcome(self) -> Outcome:
        return self.reason.outcome

    @property
    def ok(self) -> bool:
        return self.reason is Reason.OK


# A frozen dataclass's generated __init__ sets each field through
# object.__setattr__. These two classes are built on every request, so their
# __init__ sets the slots through the slot descriptors instead (about twice as
# fast); eq, hash, repr, fields() and the frozen __setattr__ stay dataclass's.
def _setter(cls: type, name: str) -> Callable[[Any, Any], None]:
    setter: Callable[[Any, Any], None] = cls.__dict__[name].__set__
    return setter


_trace_rule, _trace_matched, _trace_reason, _trace_detail = (
    _setter(RuleTrace, name) for name in ("rule", "matched", "reason", "detail")
)
(
    _verdict_reason,
    _verdict_account,
    _verdict_rule,
    _verdict_provider,
    _verdict_detail,
    _verdict_hint,
    _verdict_trace,
    _verdict_claims,
) = (
    _setter(Verdict, name)
    for name in ("reason", "account", "rule", "provider", "detail", "hint", "trace", "claims")
)
