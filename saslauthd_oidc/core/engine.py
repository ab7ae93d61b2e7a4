"""The engine: one ``AuthRequest`` in, one ``Verdict`` out, for every frontend.

It strings the pure pieces together — rule selection (``rules``), token
verification (``providers``), identity mapping (``identity``) — and writes the
one log line per authentication. It knows no wire protocol: frontends turn the
Verdict into their own reply.

A JWS is narrowed to the rules whose provider has its (unverified) issuer and
verified once per provider. Any other token (opaque, JWE) goes, in rule
order, to the providers of the context-fitting rules that can introspect (or,
as a last resort, call userinfo), until one accepts it. When a rule's username
needs claims the token lacks and its provider has ``userinfo = true``, the
userinfo answer fills them in (cached like verifications).

The decision is one synchronous step, :meth:`Engine.step`: it returns a
:class:`~saslauthd_oidc.core.outcome.Verdict`, or a :class:`Verification` — the one
piece of I/O it needs first (a provider verifying the token, or a userinfo
call). The caller performs it (:meth:`Engine.perform`, through the cache's
single-flight) and runs the step again with the answer. Whatever can be
answered without I/O is answered inside the step: a cached answer (a repeated
token is not even parsed again: its cache entry remembers its issuer), or a
provider's synchronous ``verify_now`` (a JWT whose keys are loaded and fresh).

Frontends use :meth:`Engine.start` (the step, logged and counted when it
decides: no task, no timer) and :meth:`Engine.finish` (the I/O, under
``server.request_timeout`` and one catch-all, then logged and counted);
:meth:`Engine.authenticate` is the two together.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
import trio

from saslauthd_oidc.config import Config, RuleConfig
from saslauthd_oidc.core.identity import (
    account_claims,
    check_authzid,
    map_account,
    template_claims,
)
from saslauthd_oidc.core.outcome import DiscoveryHint, Outcome, Reason, Refusal, RuleTrace, Verdict
from saslauthd_oidc.core.request import AuthRequest
from saslauthd_oidc.core.rules import (
    account_domain_mismatch,
    claim_mismatch,
    condition_claims,
    context_mismatch,
    discovery_hint,
    ordered,
)
from saslauthd_oidc.providers.answers import merge_userinfo
from saslauthd_oidc.providers.issuers import accepts_issuer
from saslauthd_oidc.providers.jwt import UnverifiedToken, VerifiedClaims, looks_like_jws, peek
from saslauthd_oidc.providers.verification_cache import (
    OPAQUE,
    CompactClaims,
    Lookup,
    VerificationCache,
    key_suffix,
    token_digest,
)

log = structlog.get_logger("saslauthd_oidc.auth")

# How far a rule got through the claim checks. When every rule refuses, the
# refusal of the rule that got furthest is the one meant for this client
# (its audience matched, its scope did not) and is the one reported.
_DEPTH = {
    Reason.WRONG_AUDIENCE: 1,
    Reason.BAD_CLAIM: 1,
    Reason.UNTRUSTED_AUTHORIZED_PARTY: 2,
    Reason.INSUFFICIENT_SCOPE: 3,
    Reason.CLAIM_MISMATCH: 4,
}


# RFC 6750 b64token: what a bearer token may look like before we send it to an IdP.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


Result = VerifiedClaims | Refusal

#: What every frontend calls: one request in, one verdict out.
Authenticator = Callable[[AuthRequest], Awaitable[Verdict]]

#: Told about every verdict the engine reaches, with its latency (the metrics).
Observer = Callable[[AuthRequest, Verdict, float], None]


#: Claims a Verdict carries whenever the token has them, whatever the rules read:
#: what the HTTP answers give (``/introspect``: RFC 7662's members that describe
#: the token's holder and grant, and the OIDC standard identity claims; Stalwart
#: reads ``name``), and ``http.introspect_claims``. Per-token bookkeeping
#: (``jti``, ``iat``, ``nbf``) is not kept unless listed there.
EXPOSED_CLAIMS = frozenset(
    {
        "iss",
        "sub",  # also: a userinfo answer must name the token's subject (merge_userinfo)
        "aud",
        "exp",
        "client_id",
        "scope",
        "name",
        "given_name",
        "family_name",
        "preferred_username",
        "email",
        "email_verified",
    }
)


def kept_claims(config: Config) -> dict[str, frozenset[str]]:
    """Per provider, the verified claims anything reads: its rules, the account, the answers."""
    exposed = EXPOSED_CLAIMS | set(config.http.introspect_claims)
    kept = {p.name: set(exposed) for p in config.providers}
    for rule in config.rules:
        kept[rule.provider] |= condition_claims(rule) | account_claims(rule)
    return {name: frozenset(names) for name, names in kept.items()}


class TokenVerifier(Protocol):
    """What the engine needs of a provider (``providers.oidc.OidcProvider``).

    ``verify_now`` is the same verification without I/O, or None when it
    would have to fetch something (keys not loaded or stale, an unknown
    ``kid``, an opaque token); the engine then asks for ``verify``.
    """

    def verify_now(self, token: str, unverified: UnverifiedToken | None) -> Result | None: ...

    async def verify(self, token: str, unverified: UnverifiedToken | None) -> Result: ...

    async def userinfo(self, token: str) -> Result: ...


class ProviderLookup(Protocol):
    def get(self, name: str) -> TokenVerifier: ...


@dataclass(frozen=True, slots=True)
class Verification:
    """The I/O a decision waits for: ask ``provider`` (``lookup``: verify or userinfo)."""

    provider: str
    lookup: Lookup
    key: bytes  # the cache key: what the answer is filed under
    token: str = ""
    unverified: UnverifiedToken | None = None
    iss: Any = OPAQUE  # remembered with the answer (see providers.cache.Entry.iss)


@dataclass(slots=True)
class Pending:
    """An authentication that needs I/O: hand it to :meth:`Engine.finish`."""

    request: AuthRequest
    need: Verification
    started: float
    digest: bytes
    answers: dict[bytes, Result]
    #: The engine that started it (a reload may have put another in service
    #: since): it finishes there. None: never to be answered (stopping).
    engine: Engine | None = None


def unanswered(request: AuthRequest) -> Pending:
    """A Pending that no engine will answer (a request that arrives while stopping)."""
    return Pending(request, Verification("", Lookup.TOKEN, b""), 0.0, b"", {})


class _Unparsed:
    """The token is known from the cache and was not parsed again (parse when needed)."""


_UNPARSED = _Unparsed()


@dataclass(slots=True)
class _Decision:
    """One run of :meth:`Engine.step`: what every part of it reads."""

    request: AuthRequest
    token: str
    digest: bytes
    known: dict[bytes, Result]  # answers at hand, by cache key
    trace: list[RuleTrace]
    #: The cache was asked for every candidate's token entry in this step and
    #: had none (so :meth:`Engine._answer` need not ask it again).
    missed: bool = False


_NO_HIT: Any = object()


def _refused(
    trace: list[RuleTrace], rule: RuleConfig, refusal: Refusal, hint: DiscoveryHint
) -> Verdict:
    """The verdict of a rule that holds for the token but refuses its account."""
    trace.append(RuleTrace(rule.name, False, refusal.reason, refusal.detail))
    return Verdict(
        reason=refusal.reason,
        rule=rule.name,
        provider=rule.provider,
        detail=refusal.detail,
        hint=hint,
        trace=tuple(trace),
    )


class Authenticates(Protocol):
    """The engine as frontends see it (the Engine, or ``lifecycle.Current`` in front of it)."""

    def start(self, request: AuthRequest) -> Verdict | Pending: ...

    async def finish(self, pending: Pending) -> Verdict: ...

    async def authenticate(self, request: AuthRequest) -> Verdict: ...


class Engine:
    def __init__(
        self,
        config: Config,
        providers: ProviderLookup,
        *,
        clock: Callable[[], float] = time.monotonic,
        cache: VerificationCache | None = None,
        observe: Observer | None = None,
    ) -> None:
        self.config = config
        self.providers = providers
        self.cache = cache if cache is not None else VerificationCache(config.cache)
        self._clock = clock
        self._observe = observe
        self._timeout = config.server.request_timeout
        self._max_token_bytes = config.server.max_token_bytes
        self._rules = ordered(config.rules)
        self._mechanisms = frozenset(config.server.mechanisms)
        self._providers = {p.name: p for p in config.providers}
        # Cache keys are the token's digest + these (providers.cache.cache_key).
        self._token_suffix = {p.name: key_suffix(p.name, Lookup.TOKEN) for p in config.providers}
        self._userinfo_suffix = {
            p.name: key_suffix(p.name, Lookup.USERINFO) for p in config.providers
        }
        self._hints = {
            id(rule): discovery_hint(rule, self._providers[rule.provider]) for rule in self._rules
        }
        # Entries keep what this configuration reads (a shared cache drops a
        # provider's entries when that changes).
        self.cache.keep(kept_claims(config))

    # ------------------------------------------------------------ frontends' API

    def start(self, request: AuthRequest) -> Verdict | Pending:
        """The verdict when it needs no I/O (logged and counted), else a :class:`Pending`."""
        started = self._clock()
        digest = token_digest(request.credentials.token)
        try:
            step = self.step(request, digest)
        except Exception:
            verdict = self._crashed(request)
        else:
            if isinstance(step, Verification):
                return Pending(request, step, started, digest, {}, self)
            verdict = step
        self._done(request, verdict, started, digest)
        return verdict

    async def finish(self, pending: Pending) -> Verdict:
        """Perform what ``pending`` waits for and decide, within ``server.request_timeout``.

        The deadline and the catch-all are here, once for every frontend, so
        that a timed-out or crashed authentication is logged and counted like
        any other.
        """
        request = pending.request
        verdict = Verdict(reason=Reason.TIMEOUT, detail="request_timeout exceeded")
        try:
            with trio.move_on_after(self._timeout):
                verdict = await self._resolve(
                    request, pending.digest, pending.need, pending.answers
                )
        except Exception:
            verdict = self._crashed(request)
        self._done(request, verdict, pending.started, pending.digest)
        return verdict

    async def authenticate(self, request: AuthRequest) -> Verdict:
        """:meth:`start`, then :meth:`finish` when it needs I/O."""
        step = self.start(request)
        if isinstance(step, Pending):
            return await self.finish(step)
        return step

    async def evaluate(self, request: AuthRequest) -> Verdict:
        """Decide without logging, counting or a deadline: ``explain`` calls this directly."""
        digest = token_digest(request.credentials.token)
        answers: dict[bytes, Result] = {}
        step = self.step(request, digest, answers)
        if isinstance(step, Verification):
            return await self._resolve(request, digest, step, answers)
        return step

    # ---------------------------------------------------------------- the step

    async def perform(self, need: Verification) -> Result:
        """The I/O a step asked for, through the cache (single-flight, stored)."""
        provider = self.providers.get(need.provider)
        if need.lookup is Lookup.USERINFO:
            return await self.cache.fetch(
                need.key, need.provider, lambda: provider.userinfo(need.token), OPAQUE
            )
        return await self.cache.fetch(
            need.key, need.provider, lambda: provider.verify(need.token, need.unverified), need.iss
        )

    async def _resolve(
        self, request: AuthRequest, digest: bytes, need: Verification, answers: dict[bytes, Result]
    ) -> Verdict:
        while True:
            answers[need.key] = await self.perform(need)
            step = self.step(request, digest, answers)
            if not isinstance(step, Verification):
                return step
            need = step

    def step(
        self,
        request: AuthRequest,
        digest: bytes,
        answers: Mapping[bytes, Result] | None = None,
    ) -> Verdict | Verification:
        """Decide with what is known without I/O, or name the one verification still needed.

        ``digest`` is :func:`~saslauthd_oidc.providers.verification_cache.token_digest` of
        the request's token; ``answers`` are what earlier :meth:`perform`
        calls returned, by their :attr:`Verification.key`. Pure but for the
        cache (read, and filled with answers got without I/O).
        """
        if (
            # server.mechanisms is what we offer; a request that negotiated no
            # mechanism (saslauthd: login + token as password) is not held to it.
            request.mechanism.is_sasl
            and request.negotiated
            and request.mechanism.value not in self._mechanisms
        ):
            return Verdict(
                reason=Reason.UNSUPPORTED_MECHANISM,
                detail=f"{request.mechanism} is not enabled (server.mechanisms)",
            )
        trace: list[RuleTrace] = []
        candidates: list[RuleConfig] = []
        for rule in self._rules:
            mismatch = context_mismatch(rule, request)
            if mismatch is None:
                candidates.append(rule)
            else:
                trace.append(RuleTrace(rule.name, False, mismatch.reason, mismatch.detail))
        if not candidates:
            return Verdict(
                reason=Reason.NO_RULE_FOR_CONTEXT,
                detail="no rule fits this request's context",
                trace=tuple(trace),
            )
        hint = self._hints[id(candidates[0])]
        token = request.credentials.token
        d = _Decision(request, token, digest, dict(answers) if answers else {}, trace)
        iss = self._cached_issuer(candidates, d)
        unverified: UnverifiedToken | _Unparsed
        if iss is _NO_HIT:
            peeked = peek(token, max_bytes=self._max_token_bytes)
            if isinstance(peeked, Refusal):
                return self._opaque(d, candidates, peeked, hint)
            unverified = peeked
            iss = peeked.claims.get("iss")
        else:
            unverified = _UNPARSED  # a repeated JWS: its issuer is all we need of it
        by_issuer: list[RuleConfig] = []
        for rule in candidates:
            if accepts_issuer(self._providers[rule.provider], iss):
                by_issuer.append(rule)
            else:
                trace.append(
                    RuleTrace(
                        rule.name, False, Reason.UNKNOWN_ISSUER, "token iss is not its issuer"
                    )
                )
        # Which IdP a refused client is told about, not a trust decision: a rule that
        # fits the context AND has the token's issuer is the better guess; a fallback
        # rule is named only when nothing but fallback rules fits the context.
        only_fallbacks = candidates[0].fallback
        for rule in by_issuer:
            if only_fallbacks or not rule.fallback:
                hint = self._hints[id(rule)]
                break
        if not by_issuer:
            return Verdict(
                reason=Reason.UNKNOWN_ISSUER,
                detail="no rule's provider has the token's issuer",
                hint=hint,
                trace=tuple(trace),
            )
        return self._select(d, by_issuer, unverified, iss, hint)

    def _cached_issuer(self, candidates: list[RuleConfig], d: _Decision) -> Any:
        """The ``iss`` a cache entry of a candidate's provider remembers, else ``_NO_HIT``."""
        if not self.cache.enabled:
            return _NO_HIT
        for rule in candidates:
            key = d.digest + self._token_suffix[rule.provider]
            if key in d.known:
                continue
            entry = self.cache.lookup(key)
            if entry is not None:
                d.known[key] = entry.result
                return _NO_HIT if entry.iss is OPAQUE else entry.iss
        d.missed = True
        return _NO_HIT

    def _opaque(
        self,
        d: _Decision,
        candidates: list[RuleConfig],
        unverified: Refusal,
        hint: DiscoveryHint,
    ) -> Verdict | Verification:
        """A token that is not a JWS: the providers that introspect, in rule order."""
        token = d.token
        opaque = [r for r in candidates if self._providers[r.provider].validates_opaque]
        if (
            unverified.reason is Reason.TOKEN_TOO_LARGE
            or not opaque
            or looks_like_jws(token)
            or not _B64TOKEN.fullmatch(token)
        ):
            detail = unverified.detail
            if not opaque and unverified.reason is Reason.MALFORMED_TOKEN:
                detail = f"{unverified.detail}; no rule's provider introspects opaque tokens"
            return Verdict(reason=unverified.reason, detail=detail, hint=hint, trace=tuple(d.trace))
        for rule in candidates:
            if not self._providers[rule.provider].validates_opaque:
                d.trace.append(
                    RuleTrace(
                        rule.name,
                        False,
                        Reason.MALFORMED_TOKEN,
                        "not a JWT, and its provider cannot introspect",
                    )
                )
        return self._select(d, opaque, None, OPAQUE, hint)

    def _answer(
        self,
        d: _Decision,
        provider: str,
        lookup: Lookup,
        unverified: UnverifiedToken | _Unparsed | None,
        iss: Any,
    ) -> Result | Verification:
        """What ``provider`` says, when it is known without I/O; else the Verification to do."""
        suffixes = self._token_suffix if lookup is Lookup.TOKEN else self._userinfo_suffix
        key = d.digest + suffixes[provider]
        answer = d.known.get(key)
        if answer is not None:
            return answer
        if lookup is Lookup.USERINFO or not d.missed:
            # (d.missed: this token entry was looked up in this step, and absent.)
            entry = self.cache.lookup(key)
            if entry is not None:
                return entry.result
        if isinstance(unverified, _Unparsed):  # the cache knew it, but not this provider's answer
            unverified = self._reparse(d.token)
        if lookup is Lookup.USERINFO or self.cache.in_flight(key):
            # userinfo is always a call; a flight under way is waited for
            return Verification(provider, lookup, key, d.token, unverified, iss)
        result = self.providers.get(provider).verify_now(d.token, unverified)
        if result is None:
            return Verification(provider, lookup, key, d.token, unverified, iss)
        return self.cache.store(key, provider, result, iss)

    def _select(
        self,
        d: _Decision,
        rules: list[RuleConfig],
        unverified: UnverifiedToken | _Unparsed | None,
        iss: Any,
        hint: DiscoveryHint,
    ) -> Verdict | Verification:
        """Verify with each rule's provider (once per provider); the first rule that holds wins."""
        trace = d.trace
        results: dict[str, Result] = {}
        refusal: tuple[Reason, str] | None = None
        temporary: tuple[Reason, str] | None = None
        for rule in rules:
            result = results.get(rule.provider)
            if result is None:
                answer = self._answer(d, rule.provider, Lookup.TOKEN, unverified, iss)
                if isinstance(answer, Verification):
                    return answer
                results[rule.provider] = result = answer
            if isinstance(result, Refusal):
                trace.append(RuleTrace(rule.name, False, result.reason, result.detail))
                if result.reason.outcome is Outcome.TEMPFAIL:
                    temporary = temporary or (result.reason, f"{rule.provider}: {result.detail}")
                elif refusal is None:
                    refusal = (result.reason, result.detail)
                continue
            mismatch = claim_mismatch(rule, result.claims)
            if mismatch is not None:
                trace.append(RuleTrace(rule.name, False, mismatch.reason, mismatch.detail))
                if refusal is None or _DEPTH.get(mismatch.reason, 0) > _DEPTH.get(refusal[0], 0):
                    refusal = (mismatch.reason, mismatch.detail)
                continue
            verdict = self._conclude(d, rule, result.claims, hint)
            if verdict is not None:
                return verdict
            if refusal is None:  # the account is outside the rule's domains: next rule
                refusal = (trace[-1].reason, trace[-1].detail)
        verdict_reason = temporary or refusal
        assert verdict_reason is not None
        return Verdict(
            reason=verdict_reason[0], detail=verdict_reason[1], hint=hint, trace=tuple(trace)
        )

    def _reparse(self, token: str) -> UnverifiedToken | None:
        """Parse a token the cache knew after all (another provider has no answer yet)."""
        peeked = peek(token, max_bytes=self._max_token_bytes)
        # It parsed when its entry was made, and parsing is deterministic.
        return peeked if isinstance(peeked, UnverifiedToken) else None

    def _enrich(
        self, d: _Decision, rule: RuleConfig, claims: Mapping[str, Any]
    ) -> Mapping[str, Any] | Refusal | Verification:
        """Claims plus userinfo's, when the username needs claims the token lacks."""
        if not self._providers[rule.provider].userinfo:
            return claims
        if all(name in claims for name in template_claims(rule.username)):
            return claims
        answer = self._answer(d, rule.provider, Lookup.USERINFO, None, OPAQUE)
        if isinstance(answer, Verification):
            return answer
        if isinstance(answer, Refusal):
            return Refusal(answer.reason, f"userinfo enrichment: {answer.detail}")
        return merge_userinfo(claims, answer.claims)

    def _conclude(
        self, d: _Decision, rule: RuleConfig, claims: Mapping[str, Any], hint: DiscoveryHint
    ) -> Verdict | Verification | None:
        """The rule's account, or its refusal; None: not this rule after all (try the next)."""
        request, trace = d.request, d.trace
        enriched = self._enrich(d, rule, claims)
        if isinstance(enriched, Verification):
            return enriched
        if isinstance(enriched, Refusal):
            return _refused(trace, rule, enriched, hint)
        claims = enriched
        account = map_account(
            rule,
            self._providers[rule.provider],
            claims,
            named_user=bool(request.credentials.authzid),
        )
        problem: Refusal | None = account if isinstance(account, Refusal) else None
        if problem is None and rule.authzid == "match":
            assert isinstance(account, str)
            problem = check_authzid(account, request.credentials.authzid, normalize=rule.normalize)
        if problem is not None:
            return _refused(trace, rule, problem, hint)
        assert isinstance(account, str)
        outside = account_domain_mismatch(rule, request, account)
        if outside is not None:
            trace.append(RuleTrace(rule.name, False, outside.reason, outside.detail))
            return None
        trace.append(RuleTrace(rule.name, True, Reason.OK, f"account {account!r}"))
        return Verdict(
            reason=Reason.OK,
            account=account,
            rule=rule.name,
            provider=rule.provider,
            trace=tuple(trace),
            claims=claims.as_dict() if isinstance(claims, CompactClaims) else dict(claims),
        )

    # ------------------------------------------------------------- the verdict

    def _crashed(self, request: AuthRequest) -> Verdict:
        log.exception("engine error", token=request.credentials.fingerprint)
        return Verdict(reason=Reason.INTERNAL_ERROR, detail="unexpected engine error")

    def _done(self, request: AuthRequest, verdict: Verdict, started: float, digest: bytes) -> None:
        """The one place a verdict is counted and logged."""
        latency = self._clock() - started
        if self._observe is not None:
            self._observe(request, verdict, latency)
        self._log(request, verdict, latency, digest)

    def _log(self, request: AuthRequest, verdict: Verdict, latency: float, digest: bytes) -> None:
        """The one line per authentication: built only when its level is on, in one call."""
        outcome = verdict.reason.outcome
        tempfail = outcome is Outcome.TEMPFAIL
        enabled = getattr(log, "is_enabled_for", None)
        if enabled is not None and not enabled(logging.WARNING if tempfail else logging.INFO):
            return  # filtered out: do not even build the fields
        ctx = request.context
        if outcome is Outcome.OK:
            emit, what, value = log.info, "account", verdict.account
        else:
            emit, what, value = (log.warning if tempfail else log.info), "detail", verdict.detail
        emit(
            "authentication",
            **{what: value},
            mech=request.mechanism.value,
            frontend=ctx.frontend,
            service=ctx.service,
            remote=ctx.remote_ip,
            user=request.credentials.authzid,
            rule=verdict.rule,
            outcome=outcome.value,
            reason=verdict.reason.value,
            latency_ms=round(latency * 1000, 2),
            token=digest.hex()[:12],  # token_fingerprint(), from the digest at hand
        )
