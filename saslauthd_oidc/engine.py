"""The engine: one ``AuthRequest`` in, one ``Verdict`` out, for every frontend.

It strings the pure pieces together — rule selection (``rules``), token
verification (``providers``), identity mapping (``identity``) — and writes the
one log line per authentication. It knows no wire protocol: frontends turn the
Verdict into their own reply.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog

from saslauthd_oidc.config import Config, RuleConfig
from saslauthd_oidc.identity import IdentityError, check_authzid, render_username, rewrite_domain
from saslauthd_oidc.outcome import DiscoveryHint, Outcome, Reason, RuleTrace, Verdict
from saslauthd_oidc.providers.cache import VerificationCache
from saslauthd_oidc.providers.jwt import TokenRejected, UnverifiedToken, VerifiedClaims, peek
from saslauthd_oidc.request import AuthRequest
from saslauthd_oidc.rules import claim_mismatch, context_mismatch, discovery_hint, ordered

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


class TokenVerifier(Protocol):
    """What the engine needs of a provider (``providers.oidc.OidcProvider``)."""

    async def verify(
        self, token: str, unverified: UnverifiedToken
    ) -> VerifiedClaims | TokenRejected: ...


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

    async def authenticate(self, request: AuthRequest) -> Verdict:
        started = self._clock()
        try:
            verdict = await self.evaluate(request)
        except Exception:
            log.exception("engine error", token=request.credentials.fingerprint)
            verdict = Verdict(reason=Reason.INTERNAL_ERROR, detail="unexpected engine error")
        self._log(request, verdict, self._clock() - started)
        return verdict

    async def evaluate(self, request: AuthRequest) -> Verdict:
        """Decide without logging: ``explain`` calls this directly."""
        if request.mechanism.is_sasl and request.mechanism.value not in self._mechanisms:
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
        hint = discovery_hint(candidates[0], self._providers[candidates[0].provider])

        def refuse(reason: Reason, detail: str) -> Verdict:
            return Verdict(reason=reason, detail=detail, hint=hint, trace=tuple(trace))

        unverified = peek(request.credentials.token, max_bytes=self.config.server.max_token_bytes)
        if isinstance(unverified, TokenRejected):
            return refuse(unverified.reason, unverified.detail)
        iss = unverified.claims.get("iss")
        by_issuer = [r for r in candidates if self._providers[r.provider].issuer == iss]
        # Which IdP a refused client is told about, not a trust decision: a rule that
        # fits the context AND has the token's issuer is the better guess; a fallback
        # rule is named only when nothing but fallback rules fits the context.
        only_fallbacks = candidates[0].fallback
        same_issuer = [r for r in by_issuer if only_fallbacks or not r.fallback]
        if same_issuer:
            hint = discovery_hint(same_issuer[0], self._providers[same_issuer[0].provider])
        for rule in candidates:
            if rule not in by_issuer:
                trace.append(
                    RuleTrace(
                        rule.name, False, Reason.UNKNOWN_ISSUER, "token iss is not its issuer"
                    )
                )
        if not by_issuer:
            return refuse(Reason.UNKNOWN_ISSUER, "no rule's provider has the token's issuer")

        results: dict[str, VerifiedClaims | TokenRejected] = {}
        refusal: tuple[Reason, str] | None = None
        temporary: tuple[Reason, str] | None = None
        for rule in by_issuer:
            if rule.provider not in results:
                results[rule.provider] = await self.cache.verify(
                    rule.provider,
                    self.providers.get(rule.provider),
                    request.credentials.token,
                    unverified,
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
            return self._conclude(request, rule, result.claims, hint, trace)
        if temporary is not None:
            return refuse(*temporary)
        assert refusal is not None
        return refuse(*refusal)

    def _conclude(
        self,
        request: AuthRequest,
        rule: RuleConfig,
        claims: Mapping[str, Any],
        hint: DiscoveryHint,
        trace: list[RuleTrace],
    ) -> Verdict:
        account = render_username(rule.username, claims, normalize=rule.normalize)
        if isinstance(account, str) and (rule.domain_map or rule.account_domains):
            account = rewrite_domain(account, rule.domain_map, rule.account_domains)
        problem: IdentityError | None = account if isinstance(account, IdentityError) else None
        if problem is None and rule.authzid == "match":
            assert isinstance(account, str)
            problem = check_authzid(account, request.credentials.authzid, normalize=rule.normalize)
        if problem is not None:
            trace.append(RuleTrace(rule.name, False, problem.reason, problem.detail))
            return Verdict(
                reason=problem.reason,
                rule=rule.name,
                provider=rule.provider,
                detail=problem.detail,
                hint=hint,
                trace=tuple(trace),
            )
        assert isinstance(account, str)
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
