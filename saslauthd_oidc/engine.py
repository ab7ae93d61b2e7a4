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

:meth:`Engine.authenticate_now` runs the very same decision synchronously
when it needs no I/O (a cached verification, or a JWT whose provider's keys
are fresh), so that frontends can answer without spawning a task; it gives
up (None) at the first verification that would have to wait.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog
import trio

from saslauthd_oidc.config import Config, RuleConfig
from saslauthd_oidc.identity import (
    IdentityError,
    check_authzid,
    render_username,
    rewrite_domain,
    template_claims,
)
from saslauthd_oidc.outcome import DiscoveryHint, Outcome, Reason, RuleTrace, Verdict
from saslauthd_oidc.providers.answers import merge_userinfo
from saslauthd_oidc.providers.cache import VerificationCache, Verifier
from saslauthd_oidc.providers.jwt import (
    TokenRejected,
    UnverifiedToken,
    VerifiedClaims,
    looks_like_jws,
    peek,
)
from saslauthd_oidc.request import AuthRequest
from saslauthd_oidc.rules import (
    account_domain_mismatch,
    claim_mismatch,
    context_mismatch,
    discovery_hint,
    ordered,
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

# server.mechanisms is what the Dovecot-protocol socket offers. The saslauthd
# socket negotiates no mechanism (its requests are PLAIN: login + token as
# password); configuring server.saslauthd_socket is its opt-in.
_UNNEGOTIATED_FRONTENDS = frozenset({"saslauthd"})


class _WouldBlock(Exception):
    """The synchronous path (:meth:`Engine.authenticate_now`) needs I/O to go on."""


class TokenVerifier(Protocol):
    """What the engine needs of a provider (``providers.oidc.OidcProvider``)."""

    async def verify(
        self, token: str, unverified: UnverifiedToken | None
    ) -> VerifiedClaims | TokenRejected: ...

    async def userinfo(self, token: str) -> VerifiedClaims | TokenRejected: ...


class _UserinfoLookup:
    """A provider's userinfo call shaped as a verifier, so the cache can hold its answers."""

    def __init__(self, provider: TokenVerifier) -> None:
        self._provider = provider

    async def verify(
        self, token: str, unverified: UnverifiedToken | None
    ) -> VerifiedClaims | TokenRejected:
        return await self._provider.userinfo(token)


class ProviderLookup(Protocol):
    def get(self, name: str) -> TokenVerifier: ...


class Engine:
    def __init__(
        self,
        config: Config,
        providers: ProviderLookup,
        *,
        clock: Callable[[], float] = time.monotonic,
        cache: VerificationCache | None = None,
    ) -> None:
        self.config = config
        self.providers = providers
        self.cache = cache if cache is not None else VerificationCache(config.cache)
        self._clock = clock
        self._rules = ordered(config.rules)
        self._mechanisms = frozenset(config.server.mechanisms)
        self._providers = {p.name: p for p in config.providers}
        self._hints = {
            id(rule): discovery_hint(rule, self._providers[rule.provider]) for rule in self._rules
        }

    async def authenticate(self, request: AuthRequest) -> Verdict:
        """Decide within ``server.request_timeout`` and log the one line for it.

        The deadline is enforced here, not only in the frontends, so that a
        timed-out authentication is logged and counted like any other.
        """
        started = self._clock()
        try:
            verdict = Verdict(reason=Reason.TIMEOUT, detail="request_timeout exceeded")
            with trio.move_on_after(self.config.server.request_timeout):
                verdict = await self.evaluate(request)
        except Exception:
            log.exception("engine error", token=request.credentials.fingerprint)
            verdict = Verdict(reason=Reason.INTERNAL_ERROR, detail="unexpected engine error")
        self._log(request, verdict, self._clock() - started)
        return verdict

    def authenticate_now(self, request: AuthRequest) -> Verdict | None:
        """:meth:`authenticate` without I/O, or None when the verdict needs I/O.

        Covers cached verifications and JWTs whose provider's keys are loaded
        and fresh: the same decision as :meth:`authenticate` (it runs the same
        code, with verifications that never suspend), logged the same way. A
        frontend answers these inline and spawns a task only for the rest.
        """
        started = self._clock()
        coro = self._evaluate(request, now=True)
        try:
            coro.send(None)
        except StopIteration as stop:
            verdict: Verdict = stop.value
        except _WouldBlock:
            return None
        except Exception:
            log.exception("engine error", token=request.credentials.fingerprint)
            verdict = Verdict(reason=Reason.INTERNAL_ERROR, detail="unexpected engine error")
        else:  # pragma: no cover - nothing on the synchronous path suspends
            coro.close()
            return None
        self._log(request, verdict, self._clock() - started)
        return verdict

    async def evaluate(self, request: AuthRequest) -> Verdict:
        """Decide without logging: ``explain`` calls this directly."""
        return await self._evaluate(request, now=False)

    async def _verify(
        self,
        cache_key: str,
        verifier: Verifier,
        token: str,
        unverified: UnverifiedToken | None,
        *,
        now: bool,
    ) -> VerifiedClaims | TokenRejected:
        if not now:
            return await self.cache.verify(cache_key, verifier, token, unverified)
        result = self.cache.verify_now(cache_key, verifier, token, unverified)
        if result is None:
            raise _WouldBlock
        return result

    async def _evaluate(self, request: AuthRequest, *, now: bool) -> Verdict:
        if (
            request.mechanism.is_sasl
            and request.context.frontend not in _UNNEGOTIATED_FRONTENDS
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

        def refuse(reason: Reason, detail: str) -> Verdict:
            return Verdict(reason=reason, detail=detail, hint=hint, trace=tuple(trace))

        token = request.credentials.token
        unverified = peek(token, max_bytes=self.config.server.max_token_bytes)
        if isinstance(unverified, TokenRejected):
            opaque = [r for r in candidates if self._providers[r.provider].validates_opaque]
            if (
                unverified.reason is Reason.TOKEN_TOO_LARGE
                or not opaque
                or looks_like_jws(token)
                or not _B64TOKEN.fullmatch(token)
            ):
                if not opaque and unverified.reason is Reason.MALFORMED_TOKEN:
                    detail = f"{unverified.detail}; no rule's provider introspects opaque tokens"
                    return refuse(unverified.reason, detail)
                return refuse(unverified.reason, unverified.detail)
            for rule in candidates:
                if rule not in opaque:
                    trace.append(
                        RuleTrace(
                            rule.name,
                            False,
                            Reason.MALFORMED_TOKEN,
                            "not a JWT, and its provider cannot introspect",
                        )
                    )
            return await self._select(request, opaque, None, hint, trace, now=now)

        iss = unverified.claims.get("iss")
        by_issuer = [r for r in candidates if self._providers[r.provider].accepts_issuer(iss)]
        # Which IdP a refused client is told about, not a trust decision: a rule that
        # fits the context AND has the token's issuer is the better guess; a fallback
        # rule is named only when nothing but fallback rules fits the context.
        only_fallbacks = candidates[0].fallback
        same_issuer = [r for r in by_issuer if only_fallbacks or not r.fallback]
        if same_issuer:
            hint = self._hints[id(same_issuer[0])]
        for rule in candidates:
            if rule not in by_issuer:
                trace.append(
                    RuleTrace(
                        rule.name, False, Reason.UNKNOWN_ISSUER, "token iss is not its issuer"
                    )
                )
        if not by_issuer:
            return refuse(Reason.UNKNOWN_ISSUER, "no rule's provider has the token's issuer")
        return await self._select(request, by_issuer, unverified, hint, trace, now=now)

    async def _select(
        self,
        request: AuthRequest,
        rules: list[RuleConfig],
        unverified: UnverifiedToken | None,
        hint: DiscoveryHint,
        trace: list[RuleTrace],
        *,
        now: bool = False,
    ) -> Verdict:
        """Verify with each rule's provider (once per provider); the first rule that holds wins."""
        results: dict[str, VerifiedClaims | TokenRejected] = {}
        refusal: tuple[Reason, str] | None = None
        temporary: tuple[Reason, str] | None = None
        for rule in rules:
            if rule.provider not in results:
                results[rule.provider] = await self._verify(
                    rule.provider,
                    self.providers.get(rule.provider),
                    request.credentials.token,
                    unverified,
                    now=now,
                )
            result = results[rule.provider]
            if isinstance(result, TokenRejected):
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
            verdict = await self._conclude(request, rule, result.claims, hint, trace, now=now)
            if verdict is not None:
                return verdict
            if refusal is None:  # the account is outside the rule's domains: next rule
                refusal = (trace[-1].reason, trace[-1].detail)
        verdict_reason = temporary or refusal
        assert verdict_reason is not None
        return Verdict(
            reason=verdict_reason[0], detail=verdict_reason[1], hint=hint, trace=tuple(trace)
        )

    async def _enrich(
        self, request: AuthRequest, rule: RuleConfig, claims: Mapping[str, Any], *, now: bool
    ) -> Mapping[str, Any] | TokenRejected:
        """Claims plus userinfo's, when the username needs claims the token lacks."""
        if not self._providers[rule.provider].userinfo:
            return claims
        if all(name in claims for name in template_claims(rule.username)):
            return claims
        answer = await self._verify(
            rule.provider + "\x00userinfo",
            _UserinfoLookup(self.providers.get(rule.provider)),
            request.credentials.token,
            None,
            now=now,
        )
        if isinstance(answer, TokenRejected):
            return TokenRejected(answer.reason, f"userinfo enrichment: {answer.detail}")
        return merge_userinfo(claims, answer.claims)

    async def _conclude(
        self,
        request: AuthRequest,
        rule: RuleConfig,
        claims: Mapping[str, Any],
        hint: DiscoveryHint,
        trace: list[RuleTrace],
        *,
        now: bool,
    ) -> Verdict | None:
        """The rule's account, or its refusal; None: not this rule after all (try the next)."""

        def refuse(reason: Reason, detail: str) -> Verdict:
            trace.append(RuleTrace(rule.name, False, reason, detail))
            return Verdict(
                reason=reason,
                rule=rule.name,
                provider=rule.provider,
                detail=detail,
                hint=hint,
                trace=tuple(trace),
            )

        enriched = await self._enrich(request, rule, claims, now=now)
        if isinstance(enriched, TokenRejected):
            return refuse(enriched.reason, enriched.detail)
        claims = enriched
        account = render_username(rule.username, claims, normalize=rule.normalize)
        if isinstance(account, str) and (rule.domain_map or rule.account_domains):
            account = rewrite_domain(account, rule.domain_map, rule.account_domains)
        problem: IdentityError | None = account if isinstance(account, IdentityError) else None
        if problem is None and rule.authzid == "match":
            assert isinstance(account, str)
            problem = check_authzid(account, request.credentials.authzid, normalize=rule.normalize)
        if problem is not None:
            return refuse(problem.reason, problem.detail)
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
            claims=dict(claims),
        )

    def _log(self, request: AuthRequest, verdict: Verdict, latency: float) -> None:
        tempfail = verdict.outcome is Outcome.TEMPFAIL
        enabled = getattr(log, "is_enabled_for", None)
        if enabled is not None and not enabled(logging.WARNING if tempfail else logging.INFO):
            return  # filtered out: do not even build the fields
        ctx = request.context
        fields: dict[str, Any] = {
            "mech": request.mechanism.value,
            "frontend": ctx.frontend,
            "service": ctx.service,
            "remote": ctx.remote_ip,
            "user": request.credentials.authzid,
            "rule": verdict.rule,
            "outcome": verdict.outcome.value,
            "reason": verdict.reason.value,
            "latency_ms": round(latency * 1000, 2),
            "token": request.credentials.fingerprint,
        }
        if verdict.ok:
            log.info("authentication", account=verdict.account, **fields)
        elif verdict.outcome is Outcome.TEMPFAIL:
            log.warning("authentication", detail=verdict.detail, **fields)
        else:
            log.info("authentication", detail=verdict.detail, **fields)
