"""One OpenID provider: discovery, a cached JWKS, JWT verification, introspection, userinfo.

:class:`OidcProvider` keeps the last good :class:`KeySet`. It loads keys lazily
on the first ``verify`` (or by :meth:`OidcProvider.refresh`), refetches them
when older than their lifetime (the answer's ``Cache-Control: max-age``,
bounded by ``jwks_min_refresh`` and ``jwks_refresh``; ``jwks_refresh`` when the
answer says nothing), and on an unknown ``kid`` refetches at most once per
``jwks_cooldown`` seconds — single-flight, so any number of concurrent
verifications share one fetch. After a *failed* fetch the next attempt may
come after ``jwks_retry`` seconds, doubling with each further failure up to
``jwks_cooldown``, so that an IdP back from an outage is used again within
seconds. Signature checks run inline in the trio thread. The discovery
document is cached the same way.

A key rotation is not a forgery: a token naming a kid the key set lacks is
refused as ``unknown_key`` only when a key set fetched after the request
came in, or after the token was issued (its unverified ``iat``, within
``leeway``), lacks it too. While a refetch is due but the cooldown forbids
it, the request waits for it when that fits in the request's deadline, and
otherwise gets the temporary ``key_refresh_pending``; when the fetch fails,
``provider_unavailable``.

``force_introspection`` (Dovecot's name) introspects JWTs too, once their
signature holds, so that a token revoked at the IdP stops logging in; such
answers, and those for opaque tokens, are trusted for
``introspection_cache_ttl`` at most.

Tokens that are not a JWS (opaque strings, JWE) go to RFC 7662 introspection
when ``client_id`` is configured, else to userinfo when ``userinfo_validation``
is on.
:meth:`OidcProvider.userinfo` also serves enrichment of JWTs. The answers are
read by the pure :mod:`.answers`.

URLs come only from configuration and the discovery document; never from a
token (``jku``/``x5u`` are ignored by :mod:`.jwt`).
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import structlog
import trio

from saslauthd_oidc.config import ConfigError, ProviderConfig
from saslauthd_oidc.core.outcome import Reason, Refusal
from saslauthd_oidc.providers.answers import interpret_introspection, interpret_userinfo
from saslauthd_oidc.providers.http import (
    DEFAULT_MAX_BYTES,
    FetchError,
    JsonAnswer,
    request_json,
)
from saslauthd_oidc.providers.issuers import accepts_issuer, tenant_of
from saslauthd_oidc.providers.jwt import (
    ASYMMETRIC_ALGORITHMS,
    HMAC_ALGORITHMS,
    MAX_KID_LENGTH,
    JwksError,
    KeySet,
    UnverifiedToken,
    VerifiedClaims,
    verify_jwt,
)
from saslauthd_oidc.providers.key_cache import KeyCache
from saslauthd_oidc.secret_files import read_secret_file

log = structlog.get_logger("saslauthd_oidc.providers")

DEFAULT_FETCH_TIMEOUT = 4.0
# A request that waits for a due key refetch keeps this much of its deadline.
_WAIT_MARGIN = 0.5
# Bound on the exponent of the failed-fetch backoff (jwks_retry * 2**n).
_MAX_BACKOFF_STEPS = 16
# Kids a refetch made for them did not find, remembered until the next key set.
_MAX_MISSING_KIDS = 1024


class _Refetch(enum.Enum):
    FRESH = "fresh"  # keys newer than the caller's are in place
    FAILED = "failed"  # a fetch was made (or waited for) and failed
    TOO_SOON = "too_soon"  # no fetch allowed yet (cooldown / retry backoff)


class _RefreshError(Exception):
    def __init__(self, stage: str, kind: str, detail: str) -> None:
        super().__init__(f"{stage}: {kind}: {detail}")
        self.stage, self.kind, self.detail = stage, kind, detail


class OidcProvider:
    """Keys and verification for one configured provider (issuer)."""

    def __init__(
        self,
        config: ProviderConfig,
        client: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.time,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        hmac_secret: str | bytes | None = None,
        client_secret: str | None = None,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self.config = config
        self._accepts_issuer = partial(accepts_issuer, config)
        self.name = config.name
        self._client = client
        self._limiter = limiter
        self._clock = clock
        self._fetch_timeout = fetch_timeout
        self._max_bytes = max_bytes
        self._asymmetric = frozenset(config.algorithms) & ASYMMETRIC_ALGORITHMS
        self._hmac = _hmac_keys(config, hmac_secret)
        self._keys = KeyCache(jwks_uri=config.jwks_uri, jwks_lifetime=config.jwks_refresh)
        self._client_secret = _client_secret(config, client_secret)
        self.last_error: str | None = None
        # Read by the metrics collector: key-set refreshes attempted / failed.
        self.fetches = 0
        self.fetch_errors = 0

    # ----------------------------------------------------------------- state

    @property
    def discovery_url(self) -> str:
        return self.config.effective_discovery_url

    @property
    def jwks_uri(self) -> str | None:
        """The JWKS URL in use: configured, or learnt from discovery (None before)."""
        return self._keys.jwks_uri

    @property
    def needs_jwks(self) -> bool:
        return bool(self._asymmetric)

    @property
    def keys_loaded(self) -> bool:
        return self._keys.jwks is not None or not self.needs_jwks

    @property
    def key_count(self) -> int:
        return len(self._keys.jwks) if self._keys.jwks is not None else 0

    def _keyset(self) -> KeySet | None:
        if self._keys.jwks is None:
            return self._hmac if not self.needs_jwks else None
        return self._keys.jwks.merged(self._hmac) if self._hmac is not None else self._keys.jwks

    def adopt_keys(self, previous: OidcProvider) -> None:
        """Take over ``previous``'s key cache, whole, and its counters (reload).

        Only for a provider whose configuration is unchanged: its keys are
        still this provider's keys, so a reload fetches nothing; both objects
        then share one :class:`~saslauthd_oidc.providers.key_cache.KeyCache`
        (its locks too), so requests still in flight on the old one and new
        ones never fetch twice.
        """
        if previous.config != self.config:
            raise ValueError(f"provider {self.name}: configuration changed; keys not adopted")
        self._keys = previous._keys  # handed over whole: one key cache, two providers
        self.last_error = previous.last_error
        self.fetches = previous.fetches
        self.fetch_errors = previous.fetch_errors

    # ----------------------------------------------------------------- verify

    async def verify(
        self, token: str, unverified: UnverifiedToken | None
    ) -> VerifiedClaims | Refusal:
        """Verify a token; never raises for bad tokens.

        ``unverified`` is the peeked JWS, or None for a token that is not one
        (opaque, JWE): that goes to introspection, or else to userinfo.
        """
        if unverified is None:
            return await self._verify_opaque(token)
        if self.needs_jwks:
            await self._ensure_fresh()
        seen = self._keys.generation
        keys = self._keyset()
        if keys is None:
            why = self.last_error or "no keys loaded yet"
            return Refusal(Reason.PROVIDER_UNAVAILABLE, f"provider {self.name}: {why}")
        result = self._verify_with(token, unverified, keys)
        if isinstance(result, Refusal) and self._should_refetch(result, unverified):
            result = await self._after_unknown_key(token, unverified, result, seen)
        if isinstance(result, VerifiedClaims) and self.config.force_introspection:
            result = await self._confirm_active(token, result)
        return result

    async def _after_unknown_key(
        self, token: str, unverified: UnverifiedToken, unknown: Refusal, seen: int
    ) -> VerifiedClaims | Refusal:
        """An unknown kid: refetch, wait for a due refetch, or say why not (see module doc)."""
        cooldown = self.config.jwks_cooldown
        kid = unverified.header.get("kid")
        if kid in self._keys.missing_kids and self._clock() < self._next_fetch_at(
            cooldown, kid_miss=True
        ):
            return unknown  # a fetch made for this very kid did not find it, lately
        outcome = await self._refetch(
            rediscover=False, min_interval=cooldown, seen=seen, kid_miss=True
        )
        if outcome is _Refetch.TOO_SOON and self._refetch_due(unverified):
            wait = self._next_fetch_at(cooldown, kid_miss=True) - self._clock()
            if self._can_wait(wait):
                await trio.sleep(wait)
                outcome = await self._refetch(
                    rediscover=False,
                    min_interval=cooldown,
                    seen=self._keys.generation,
                    kid_miss=True,
                )
            if outcome is _Refetch.TOO_SOON:
                return Refusal(
                    Reason.KEY_REFRESH_PENDING,
                    f"provider {self.name}: {unknown.detail}, and the keys were fetched "
                    f"before the token was issued; refetching within {cooldown:g}s "
                    "(jwks_cooldown): maybe a key rotation, retry",
                )
        if outcome is _Refetch.FAILED:
            return Refusal(
                Reason.PROVIDER_UNAVAILABLE,
                f"provider {self.name}: {unknown.detail}, and refetching the keys failed: "
                f"{self.last_error}",
            )
        if outcome is _Refetch.FRESH:
            keys = self._keyset()
            if keys is not None:
                result = self._verify_with(token, unverified, keys)
                if (
                    isinstance(result, Refusal)
                    and result.reason is Reason.UNKNOWN_KEY
                    and len(self._keys.missing_kids) < _MAX_MISSING_KIDS
                ):
                    self._keys.missing_kids.add(kid)
                return result
        return unknown

    def _can_wait(self, wait: float) -> bool:
        """Whether a request may sleep ``wait`` seconds for a fetch and still have
        time for it within its deadline (and never longer than one fetch may take)."""
        remaining = trio.current_effective_deadline() - trio.current_time()
        return 0 < wait <= min(self._fetch_timeout, remaining - _WAIT_MARGIN)

    def _refetch_due(self, unverified: UnverifiedToken) -> bool:
        """Whether the token may be newer than our keys (by its *unverified* iat).

        Only chooses between a temporary and a permanent refusal, never to accept.
        A token issued (within ``leeway``) after the fetch that gave our keys
        began may use a key published since: a refetch is due.
        """
        iat = unverified.claims.get("iat")
        if isinstance(iat, bool) or not isinstance(iat, int | float) or not math.isfinite(iat):
            return True
        return iat > self._keys.keys_asked_at - self.config.leeway

    async def _confirm_active(
        self, token: str, verified: VerifiedClaims
    ) -> VerifiedClaims | Refusal:
        """force_introspection: a JWT whose signature holds must still be active at the IdP.

        The decision uses the JWT's own (signed) claims; the answer only says
        whether the token is still active, and must be about the same subject.
        """
        answer = await self.introspect(token)
        if isinstance(answer, Refusal):
            return answer
        sub, answered = verified.claims.get("sub"), answer.claims.get("sub")
        if answered is not None and sub is not None and answered != sub:
            return Refusal(Reason.BAD_CLAIM, "introspection: sub differs from the token's sub")
        return VerifiedClaims(
            claims=verified.claims,
            header=verified.header,
            expires_at=min(verified.expires_at, answer.expires_at),
        )

    def verify_now(
        self, token: str, unverified: UnverifiedToken | None
    ) -> VerifiedClaims | Refusal | None:
        """:meth:`verify` without I/O, or None when it would fetch something.

        Answers for a JWT when the key set is loaded and fresh, unless the key
        is unknown (which may refetch the JWKS); opaque tokens always need I/O.
        """
        if unverified is None or self.config.force_introspection:
            return None
        cache = self._keys
        jwks = cache.jwks
        keys: KeySet | None
        if self._asymmetric:  # needs_jwks
            if jwks is None or self._clock() - cache.loaded_at >= cache.jwks_lifetime:
                return None
            keys = jwks if self._hmac is None else jwks.merged(self._hmac)
        else:
            keys = self._keyset()
        if keys is None:
            return None
        result = self._verify_with(token, unverified, keys)
        if type(result) is Refusal and self._should_refetch(result, unverified):
            return None
        return result

    def _verify_with(
        self, token: str, unverified: UnverifiedToken, keys: KeySet
    ) -> VerifiedClaims | Refusal:
        config = self.config
        issuer = config.issuer
        tenant: str | None = None
        if config.multi_tenant:
            iss = unverified.claims.get("iss")
            tenant = tenant_of(config, iss)
            if tenant is None or not isinstance(iss, str):
                return Refusal(Reason.WRONG_ISSUER, "iss is not an allowed tenant's issuer")
            issuer = iss
        result = verify_jwt(
            token,
            unverified,
            keys,
            issuer=issuer,
            algorithms=config.algorithms,
            leeway=config.leeway,
            token_types=config.token_types,
            now=self._clock(),
            accept_id_tokens=config.accept_id_tokens,
        )
        if tenant is not None and isinstance(result, VerifiedClaims):
            tid = result.claims.get("tid")
            if not isinstance(tid, str) or tid.lower() != tenant.lower():
                return Refusal(Reason.WRONG_ISSUER, "tid claim does not match the issuer")
        return result

    # ----------------------------------------------------------------- opaque tokens

    async def _verify_opaque(self, token: str) -> VerifiedClaims | Refusal:
        if self.config.introspects:
            return await self.introspect(token)
        if self.config.userinfo_validation:
            return await self.userinfo(token)
        return Refusal(
            Reason.MALFORMED_TOKEN, f"provider {self.name}: not a JWT, and no introspection"
        )

    async def introspect(self, token: str) -> VerifiedClaims | Refusal:
        """RFC 7662: ask the provider whether ``token`` is active, as our configured client."""
        endpoint = await self._endpoint("introspection_endpoint")
        if isinstance(endpoint, Refusal):
            return endpoint
        assert self.config.client_id is not None and self._client_secret is not None
        form = {"token": token, "token_type_hint": "access_token"}
        auth: tuple[str, str] | None = None
        if self.config.introspection_auth == "client_secret_post":
            form |= {"client_id": self.config.client_id, "client_secret": self._client_secret}
        else:  # RFC 6749 2.3.1: both parts form-urlencoded before Basic
            auth = (quote(self.config.client_id, safe=""), quote(self._client_secret, safe=""))
        answer = await self._call("introspection", "POST", endpoint, data=form, auth=auth)
        if isinstance(answer, Refusal):
            return answer
        assert answer.doc is not None
        now = self._clock()
        result = interpret_introspection(
            answer.doc,
            issuer=self.config.issuer,
            accepts_issuer=self._accepts_issuer,
            now=now,
            leeway=self.config.leeway,
        )
        ttl = self.config.effective_introspection_ttl
        if ttl is not None and isinstance(result, VerifiedClaims):
            # Revocation latency: the answer is trusted this long at most.
            result = VerifiedClaims(result.claims, result.header, min(result.expires_at, now + ttl))
        return result

    async def userinfo(self, token: str) -> VerifiedClaims | Refusal:
        """The userinfo answer for ``token`` (HTTP 401: the token is not valid there)."""
        endpoint = await self._endpoint("userinfo_endpoint")
        if isinstance(endpoint, Refusal):
            return endpoint
        answer = await self._call(
            "userinfo",
            "GET",
            endpoint,
            headers={"Authorization": f"Bearer {token}"},
            accept_status=(401, 403),
        )
        if isinstance(answer, Refusal):
            return answer
        if answer.doc is None:
            return Refusal(Reason.TOKEN_INACTIVE, f"userinfo: HTTP {answer.status} for this token")
        return interpret_userinfo(
            answer.doc, issuer=self.config.issuer, accepts_issuer=self._accepts_issuer
        )

    async def self_check(self) -> list[tuple[str, bool, str]]:
        """What ``check-config --online`` reports: (what, works, detail) per capability.

        Introspection is probed with a made-up token: an ``active: false``
        answer proves the endpoint and our client credentials work.
        """
        checks: list[tuple[str, bool, str]] = []
        if self.needs_jwks:
            ok = await self.refresh()
            detail = f"{self.key_count} keys from {self.jwks_uri}" if ok else str(self.last_error)
            checks.append(("keys", ok, detail))
        if self.config.introspects:
            probe = await self.introspect("saslauthd-oidc-check-config-" + "0" * 16)
            ok = isinstance(probe, Refusal) and probe.reason is Reason.TOKEN_INACTIVE
            detail = (
                "endpoint answers, client credentials accepted"
                if ok
                else (probe.detail if isinstance(probe, Refusal) else "a made-up token is active!")
            )
            checks.append(("introspection", ok, detail))
        if self.config.userinfo or self.config.userinfo_validation:
            endpoint = await self._endpoint("userinfo_endpoint")
            ok = isinstance(endpoint, str)
            checks.append(
                ("userinfo", ok, endpoint if isinstance(endpoint, str) else endpoint.detail)
            )
        return checks

    async def _endpoint(self, name: str) -> str | Refusal:
        """A configured endpoint, or the one the discovery document names."""
        configured = getattr(self.config, name)
        if configured:
            return str(configured)
        try:
            doc = await self._metadata()
        except _RefreshError as exc:
            self._report(exc)
            return Refusal(Reason.PROVIDER_UNAVAILABLE, f"provider {self.name}: {self.last_error}")
        url = doc.get(name)
        if not isinstance(url, str) or not self._url_allowed(url):
            return Refusal(
                Reason.PROVIDER_UNAVAILABLE,
                f"provider {self.name}: discovery document has no usable {name}",
            )
        return url

    async def _call(
        self,
        stage: str,
        method: Any,
        url: str,
        *,
        data: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        headers: dict[str, str] | None = None,
        accept_status: tuple[int, ...] = (),
    ) -> JsonAnswer | Refusal:
        """One bounded request for a token; failures are temporary and logged, never raised."""
        self.fetches += 1
        try:
            return await request_json(
                self._client,
                method,
                url,
                data=data,
                auth=auth,
                headers=headers,
                accept_status=accept_status,
                max_bytes=self._max_bytes,
                timeout=self._fetch_timeout,
                limiter=self._limiter,
            )
        except FetchError as exc:
            self.fetch_errors += 1
            detail = exc.detail
            if stage == "introspection" and exc.status in (401, 403):
                detail += " (our client_id/client_secret_file were refused)"
            log.warning(
                "provider request failed",
                provider=self.name,
                stage=stage,
                kind=exc.kind,
                detail=f"{_origin(url)}: {detail}",
            )
            reason = Reason.TIMEOUT if exc.kind == "timeout" else Reason.PROVIDER_UNAVAILABLE
            return Refusal(reason, f"provider {self.name}: {stage} failed ({exc.kind})")

    def _should_refetch(
        self, result: VerifiedClaims | Refusal, unverified: UnverifiedToken
    ) -> bool:
        """Only an unknown key for an asymmetric alg with a sane kid is worth a refetch."""
        if not isinstance(result, Refusal) or result.reason is not Reason.UNKNOWN_KEY:
            return False
        kid, alg = unverified.header.get("kid"), unverified.header.get("alg")
        kid_ok = kid is None or (isinstance(kid, str) and 0 < len(kid) <= MAX_KID_LENGTH)
        if kid is None and self._keys.jwks is not None:
            # No kid and several keys fit: ambiguous, whatever a refetch brings.
            fitting = sum(1 for _, a in self._keys.jwks.keys if a == alg)
            kid_ok = fitting == 0
        return kid_ok and alg in self._asymmetric

    async def _ensure_fresh(self) -> None:
        stale = self._clock() - self._keys.loaded_at >= self._keys.jwks_lifetime
        if self._keys.jwks is None or stale:
            cooldown = self.config.jwks_cooldown
            outcome = await self._refetch(
                rediscover=True, min_interval=cooldown, seen=self._keys.generation
            )
            if outcome is _Refetch.TOO_SOON and self._keys.jwks is None:
                # No keys at all (an outage at start): the next retry may be close.
                wait = self._next_fetch_at(cooldown) - self._clock()
                if self._can_wait(wait):
                    await trio.sleep(wait)
                    await self._refetch(
                        rediscover=True, min_interval=cooldown, seen=self._keys.generation
                    )

    # ----------------------------------------------------------------- refresh

    async def refresh(self) -> bool:
        """Discovery (unless ``jwks_uri`` is configured) and JWKS now. Never raises.

        Returns True when a fresh key set is in place.
        """
        if not self.needs_jwks:
            return True
        self._keys.discovery_until = -math.inf  # an explicit refresh rereads discovery too
        outcome = await self._refetch(rediscover=True, min_interval=0.0, seen=self._keys.generation)
        return outcome is _Refetch.FRESH

    def _next_fetch_at(self, min_interval: float, *, kid_miss: bool = False) -> float:
        """When the next fetch may start.

        After failed fetches: ``jwks_retry`` after the last attempt, doubling
        with each failure, never later than ``min_interval``. Otherwise
        ``min_interval`` after the last attempt of the same kind: routine loads
        (missing or stale keys) and unknown-kid refetches keep separate clocks,
        so a key rotated in just after a routine load is fetched at once, and
        unknown kids still cause at most one fetch per ``jwks_cooldown``.
        """
        if self._keys.failures:
            steps = min(self._keys.failures - 1, _MAX_BACKOFF_STEPS)
            backoff: float = self.config.jwks_retry * 2.0**steps
            return self._keys.last_attempt + min(min_interval, backoff)
        return (self._keys.last_kid_attempt if kid_miss else self._keys.last_attempt) + min_interval

    async def _refetch(
        self, *, rediscover: bool, min_interval: float, seen: int, kid_miss: bool = False
    ) -> _Refetch:
        """Single-flight fetch of the keys, unless generation ``seen`` is already stale."""
        async with self._keys.fetch_lock:
            if self._keys.generation != seen:  # someone fetched while we waited
                return _Refetch.FRESH if self._keys.last_ok else _Refetch.FAILED
            now = self._clock()
            if now < self._next_fetch_at(min_interval, kid_miss=kid_miss):
                return _Refetch.TOO_SOON
            self._keys.last_attempt = now
            if kid_miss:
                self._keys.last_kid_attempt = now
            ok = await self._fetch(rediscover=rediscover)
            self._keys.generation += 1
            self._keys.last_ok = ok
            if ok:
                self._keys.failures = 0
                self._keys.keys_asked_at = now
            else:
                self._keys.failures += 1
            return _Refetch.FRESH if ok else _Refetch.FAILED

    async def _fetch(self, *, rediscover: bool) -> bool:
        self.fetches += 1
        try:
            with trio.fail_after(self._fetch_timeout):
                uri, keys, lifetime = await self._fetch_keys(rediscover=rediscover)
        except trio.TooSlowError:
            return self._failed(_RefreshError("fetch", "timeout", f"over {self._fetch_timeout:g}s"))
        except _RefreshError as exc:
            return self._failed(exc)
        self._keys.jwks = keys
        self._keys.missing_kids = set()
        self._keys.loaded_at = self._clock()
        self._keys.jwks_lifetime = self._bounded_lifetime(lifetime)
        self.last_error = None
        for refused in self._keys.refused.new(keys.skipped):
            log.warning("jwks key refused", provider=self.name, key=refused)
        log.info(
            "jwks loaded",
            provider=self.name,
            jwks_uri=uri,
            keys=len(keys),
            skipped=list(keys.skipped),
        )
        return True

    def _failed(self, exc: _RefreshError) -> bool:
        self.fetch_errors += 1
        self._report(exc)
        return False

    def _report(self, exc: _RefreshError) -> None:
        self.last_error = f"{exc.stage} failed ({exc.kind}): {exc.detail}"
        log.warning(
            "provider metadata fetch failed",
            provider=self.name,
            stage=exc.stage,
            kind=exc.kind,
            detail=exc.detail,
            keeping_cached_keys=self._keys.jwks is not None,
        )

    def _bounded_lifetime(self, max_age: float | None) -> float:
        if max_age is None:
            return self.config.jwks_refresh
        return min(max(max_age, self.config.jwks_min_refresh), self.config.jwks_refresh)

    async def _fetch_keys(self, *, rediscover: bool) -> tuple[str, KeySet, float | None]:
        uri = self.config.jwks_uri or self._keys.jwks_uri
        if not self.config.jwks_uri and (rediscover or uri is None):
            uri = await self._discover()
        assert uri is not None
        answer = await self._get("jwks", uri)
        doc = answer.doc
        try:
            keys = KeySet.from_jwks(doc, self._asymmetric)
        except JwksError as exc:
            raise _RefreshError("jwks", "bad_jwks", str(exc)) from None
        if len(keys) == 0:
            skipped = "; ".join(keys.skipped)[:300] or "empty key list"
            raise _RefreshError("jwks", "no_usable_keys", skipped)
        return uri, keys, answer.max_age

    async def _metadata(self, *, force: bool = False) -> dict[str, Any]:
        """The discovery document, cached for its lifetime (single-flight)."""
        async with self._keys.discovery_lock:
            now = self._clock()
            if self._keys.discovery is not None and not force and now < self._keys.discovery_until:
                return self._keys.discovery
            answer = await self._get("discovery", self.discovery_url)
            doc = answer.doc
            assert doc is not None
            issuer = doc.get("issuer")
            if issuer != self.config.issuer:
                shown = issuer[:200] if isinstance(issuer, str) else type(issuer).__name__
                raise _RefreshError(
                    "discovery",
                    "issuer_mismatch",
                    f"document says issuer {shown!r}, configured {self.config.issuer!r}",
                )
            self._keys.discovery = doc
            self._keys.discovery_until = now + self._bounded_lifetime(answer.max_age)
            return doc

    async def _discover(self) -> str:
        doc = await self._metadata()
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str) or not self._url_allowed(uri):
            shown = uri[:200] if isinstance(uri, str) else type(uri).__name__
            raise _RefreshError(
                "discovery",
                "bad_jwks_uri",
                f"jwks_uri {shown!r} refused (https on the issuer's host, or one in "
                "endpoint_hosts)",
            )
        self._keys.jwks_uri = uri
        return uri

    def _url_allowed(self, url: str) -> bool:
        """https (http only with allow_http), on a host this provider may use."""
        if not (
            url.startswith("https://") or (self.config.allow_http and url.startswith("http://"))
        ):
            return False
        try:
            host = (urlsplit(url).hostname or "").lower()
        except ValueError:
            return False
        return host in self.config.metadata_hosts

    async def _get(self, stage: str, url: str) -> JsonAnswer:
        try:
            return await request_json(
                self._client,
                "GET",
                url,
                max_bytes=self._max_bytes,
                timeout=self._fetch_timeout,
                limiter=self._limiter,
            )
        except FetchError as exc:
            raise _RefreshError(stage, exc.kind, f"{url}: {exc.detail}") from None

    def __repr__(self) -> str:
        return f"OidcProvider({self.name!r}, issuer={self.config.issuer!r})"


def _origin(url: str) -> str:
    """Scheme, host and path of ``url``: enough to name it in a log, no query string."""
    return url.split("?", 1)[0][:200]


def _client_secret(config: ProviderConfig, secret: str | None) -> str | None:
    if not config.introspects:
        return None
    if secret is not None:
        return secret
    assert config.client_secret_file is not None
    return read_secret_file(f"provider {config.name}.client_secret_file", config.client_secret_file)


def _hmac_keys(config: ProviderConfig, secret: str | bytes | None) -> KeySet | None:
    """The configured shared secret as a key set, when an HS* algorithm is allowed."""
    algs = [a for a in config.algorithms if a in HMAC_ALGORITHMS]
    if not algs:
        return None
    key = f"provider {config.name}.hmac_secret_file"
    if secret is None:
        if not config.hmac_secret_file:
            return None
        secret = read_secret_file(key, config.hmac_secret_file)
    try:
        return KeySet.with_hmac_secret(secret, algs)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None
