"""What an authentication came to: the closed set of reason codes and the Verdict.

Every layer speaks in these values. The engine returns a :class:`Verdict`; each
frontend maps it to its own wire reply in exactly one place; logs, metrics and
``explain`` print the :class:`Reason` value. Nothing here knows any wire
protocol or does any I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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

    # Nobody's fault but ours or the provider's: try again later.
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    TIMEOUT = "timeout"
    INTERNAL_ERROR = "internal_error"
    OVERLOADED = "overloaded"  # too many requests in flight on one connection

    @property
    def outcome(self) -> Outcome:
        if self is Reason.OK:
            return Outcome.OK
        if self in _TEMPORARY:
            return Outcome.TEMPFAIL
        return Outcome.FAIL


_TEMPORARY = frozenset(
    {Reason.PROVIDER_UNAVAILABLE, Reason.TIMEOUT, Reason.INTERNAL_ERROR, Reason.OVERLOADED}
)


@dataclass(frozen=True, slots=True)
class DiscoveryHint:
    """What a refused client is told about where to get a better token (RFC 7628 §3.2.2)."""

    openid_configuration: str | None = None
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class RuleTrace:
    """One rule's verdict on one request, for ``explain`` and debug logs."""

    rule: str
    matched: bool
    reason: Reason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The engine's answer. ``detail`` is for operators (logs, explain), never for clients.

    Neither ``detail`` nor any other field may hold a token or a secret.
    """

    reason: Reason
    account: str | None = None
    rule: str | None = None
    provider: str | None = None
    detail: str = ""
    hint: DiscoveryHint = field(default_factory=DiscoveryHint)
    trace: tuple[RuleTrace, ...] = ()
    claims: dict[str, object] | None = None

    @property
    def outcome(self) -> Outcome:
        return self.reason.outcome

    @property
    def ok(self) -> bool:
        return self.reason is Reason.OK
