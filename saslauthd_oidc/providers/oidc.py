"""One OpenID provider: discovery, a cached JWKS, JWT verification, introspection, userinfo.

:class:`OidcProvider` keeps the last good :class:`KeySet`. It loads keys lazily
on the first ``verify`` (or by :meth:`OidcProvider.refresh`), refetches them
when older than their lifetime (the answer's ``Cache-Control: max-age``,
bounded by ``jwks_min_refresh`` and ``jwks_refresh``; ``jwks_refresh`` when the
answer says nothing), and on an unknown ``kid`` refetches at most once per
``jwks_cooldown`` seconds — single-flight, so any number of concurrent
verifications share one fetch. Fetch attempts, failed ones included, count
toward the cooldown: an unreachable provider is asked at most once per
cooldown. Signature checks run inline in the trio thread. The discovery
document is cached the same way.

Tokens that are not a JWS (opaque strings, JWE) go to RFC 7662 introspection
when ``client_id`` is configured, else to userinfo when ``userinfo_validation``
is on.
:meth:`OidcProvider.userinfo` also serves enrichment of JWTs. The answers are
read by the pure :mod:`.answers`.

URLs come only from configuration and the discovery document; never from a
token (``jku``/``x5u`` are ignored by :mod:`.jwt`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import structlog
import trio

from saslauthd_oidc.config import ConfigError, ProviderConfig, read_secret_file
from saslauthd_oidc.outcome import Reason
from saslauthd_oidc.providers.answers import interpret_introspection, interpret_userinfo
from saslauthd_oidc.providers.http import (
    DEFAULT_MAX_BYTES,
    FetchError,
    JsonAnswer,
    request_json,
)
from saslauthd_oidc.providers.jwt import (
    ASYMMETRIC_ALGORITHMS,
    HMAC_ALGORITHMS,
    MAX_KID_LENGTH,
    JwksError,
    KeySet,
    TokenRejected,
    UnverifiedToken,
    VerifiedClaims,
    verify_jwt,
)
from saslauthd_oidc.providers.keypolicy import RefusalLog

log = structlog.get_logger("saslauthd_oidc.providers")

DEFAULT_FETCH_TIMEOUT = 4.0


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
        self.name = config.name
        self._client = client
        self._limiter = limiter
        self._clock = clock
        self._fetch_timeout = fetch_timeout
        self._max_bytes = max_bytes
        self._asymmetric = frozenset(config.algorithms) & ASYMMETRIC_ALGORITHMS
        self._hmac = _hmac_keys(config, hmac_secret)
        self._jwks: KeySet | None = None
        self._refused = RefusalLog()  # keys refused in a JWKS, each logged once
        self._jwks_uri: str | None = config.jwks_uri
        self._loaded_at = -math.inf
        self._jwks_lifetime = config.jwks_refresh
        self._discovery: dict[str, Any] | None = None
        self._discovery_until = -math.inf
        self._discovery_lock = trio.Lock()
        self._client_secret = _client_secret(config, client_secret)
        self._last_attempt = -math.inf
        self._generation = 0
        self._last_ok = False
        self._lock = trio.Lock()
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
        return self._jwks_uri

    @property
    def needs_jwks(self) -> bool:
        return bool(self._asymmetric)

    @property
    def keys_loaded(self) -> bool:
        return self._jwks is not None or not self.needs_jwks

    @property
    def key_count(self) -> int:
        return len(self._jwks) if self._jwks is not None else 0

    def _keyset(self) -> KeySet | None:
        if self._jwks is None:
            return self._hmac if not self.needs_jwks else None
        return self._jwks.merged(self._hmac) if self._hmac is not None else self._jwks

    def adopt_keys(self, previous: OidcProvider) -> None:
        """Take over ``previous``'s discovery document, key set and counters (reload).

        Only for a provider whose configuration is unchanged: its keys are
        still this provider's keys, so a reload fetches nothing.
        """
        if previous.config != self.config:
            raise ValueError(f"provider {self.name}: configuration changed; keys not adopted")
        self._jwks = previous._jwks
        self._refused = previous._refused
        self._jwks_uri = previous._jwks_uri
        self._loaded_at = previous._loaded_at
        self._jwks_lifetime = previous._jwks_lifetime
        self._discovery = previous._discovery
        self._discovery_until = previous._discovery_until
        self._last_attempt = previous._last_attempt
        self._last_ok = previous._last_ok
        self.last_error = previous.last_error
        self.fetches = previous.fetches
        self.fetch_errors = previous.fetch_errors

    # ----------------------------------------------------------------- verify

    async def verify(
        self, token: str, unverified: UnverifiedToken | None
    ) -> VerifiedClaims | TokenRejected:
        """Verify a token; never raises for bad tokens.

        ``unverified`` is the peeked JWS, or None for a token that is not one
        (opaque, JWE): that goes to introspection, or else to userinfo.
        """
        if unverified is None:
            return await self._verify_opaque(token)
        if self.needs_jwks:
            await self._ensure_fresh()
        seen = self._generation
        keys = self._keyset()
        if keys is None:
            why = self.last_error or "no keys loaded yet"
            return TokenRejected(Reason.PROVIDER_UNAVAILABLE, f"provider {self.name}: {why}")
        result = self._verify_with(token, unverified, keys)
        if self._should_refetch(result, unverified) and await self._refetch(
            rediscover=False, min_interval=self.config.jwks_cooldown, seen=seen
        ):
            keys = self._keyset()
            if keys is not None:
                result = self._verify_with(token, unverified, keys)
        return result

    def verify_now(
        self, token: str, unverified: UnverifiedToken | None
    ) -> VerifiedClaims | TokenRejected | None:
        """:meth:`verify` without I/O, or None when it would fetch something.

        Answers for a JWT when the key set is loaded and fresh, unless the key
        is unknown (which may refetch the JWKS); opaque tokens always need I/O.
        """
        if unverified is None:
            return None
        if self.needs_jwks and (
            self._jwks is None or self._clock() - self._loaded_at >= self._jwks_lifetime
        ):
            return None
        keys = self._keyset()
        if keys is None:
            return None
        result = self._verify_with(token, unverified, keys)
        if self._should_refetch(result, unverified):
            return None
        return result

    def _verify_with(
        self, token: str, unverified: UnverifiedToken, keys: KeySet
    ) -> VerifiedClaims | TokenRejected:
        issuer = self.config.issuer
        tenant: str | None = None
        if self.config.multi_tenant:
            iss = unverified.claims.get("iss")
            tenant = self.config.tenant_of(iss)
            if tenant is None or not isinstance(iss, str):
                return TokenRejected(Reason.WRONG_ISSUER, "iss is not an allowed tenant's issuer")
            issuer = iss
        result = verify_jwt(
            token,
            unverified,
            keys,
            issuer=issuer,
            algorithms=self.config.algorithms,
            leeway=self.config.leeway,
            token_types=self.config.token_types,
            now=self._clock(),
        )
        if tenant is not None and isinstance(result, VerifiedClaims):
            tid = result.claims.get("tid")
            if not isinstance(tid, str) or tid.lower() != tenant.lower():
                return TokenRejected(Reason.WRONG_ISSUER, "tid claim does not match the issuer")
        return result

    # ----------------------------------------------------------------- opaque tokens

    async def _verify_opaque(self, token: str) -> VerifiedClaims | TokenRejected:
        if self.config.introspects:
            return await self.introspect(token)
        if self.config.userinfo_validation:
            return await self.userinfo(token)
        return TokenRejected(
            Reason.MALFORMED_TOKEN, f"provider {self.name}: not a JWT, and no introspection"
        )

    async def introspect(self, token: str) -> VerifiedClaims | TokenRejected:
        """RFC 7662: ask the provider whether ``token`` is active, as our configured client."""
        endpoint = await self._endpoint("introspection_endpoint")
        if isinstance(endpoint, TokenRejected):
            return endpoint
        assert self.config.client_id is not None and self._client_secret is not None
        form = {"token": token, "token_type_hint": "access_token"}
        auth: tuple[str, str] | None = None
        if self.config.introspection_auth == "client_secret_post":
            form |= {"client_id": self.config.client_id, "client_secret": self._client_secret}
        else:  # RFC 6749 2.3.1: both parts form-urlencoded before Basic
            auth = (quote(self.config.client_id, safe=""), quote(self._client_secret, safe=""))
        answer = await self._call("introspection", "POST", endpoint, data=form, auth=auth)
        if isinstance(answer, TokenRejected):
            return answer
        assert answer.doc is not None
        return interpret_introspection(
            answer.doc,
            issuer=self.config.issuer,
            accepts_issuer=self.config.accepts_issuer,
            now=self._clock(),
            leeway=self.config.leeway,
        )

    async def userinfo(self, token: str) -> VerifiedClaims | TokenRejected:
        """The userinfo answer for ``token`` (HTTP 401: the token is not valid there)."""
        endpoint = await self._endpoint("userinfo_endpoint")
        if isinstance(endpoint, TokenRejected):
            return endpoint
        answer = await self._call(
            "userinfo",
            "GET",
            endpoint,
            headers={"Authorization": f"Bearer {token}"},
            accept_status=(401, 403),
        )
        if isinstance(answer, TokenRejected):
            return answer
        if answer.doc is None:
            return TokenRejected(
                Reason.TOKEN_INACTIVE, f"userinfo: HTTP {answer.status} for this token"
            )
        return interpret_userinfo(
            answer.doc, issuer=self.config.issuer, accepts_issuer=self.config.accepts_issuer
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
            ok = isinstance(probe, TokenRejected) and probe.reason is Reason.TOKEN_INACTIVE
            detail = (
                "endpoint answers, client credentials accepted"
                if ok
                else (
                    probe.detail
                    if isinstance(probe, TokenRejected)
                    else "a made-up token is active!"
                )
            )
            checks.append(("introspection", ok, detail))
        if self.config.userinfo or self.config.userinfo_validation:
            endpoint = await self._endpoint("userinfo_endpoint")
            ok = isinstance(endpoint, str)
            checks.append(
                ("userinfo", ok, endpoint if isinstance(endpoint, str) else endpoint.detail)
            )
        return checks

    async def _endpoint(self, name: str) -> str | TokenRejected:
        """A configured endpoint, or the one the discovery document names."""
        configured = getattr(self.config, name)
        if configured:
            return str(configured)
        try:
            doc = await self._metadata()
        except _RefreshError as exc:
            self._report(exc)
            return TokenRejected(
                Reason.PROVIDER_UNAVAILABLE, f"provider {self.name}: {self.last_error}"
            )
        url = doc.get(name)
        if not isinstance(url, str) or not self._url_allowed(url):
            return TokenRejected(
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
    ) -> JsonAnswer | TokenRejected:
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
            if (
                exc.kind == "http_status"
                and stage == "introspection"
                and ("401" in detail or "403" in detail)
            ):
                detail += " (our client_id/client_secret_file were refused)"
            log.warning(
                "provider request failed",
                provider=self.name,
                stage=stage,
                kind=exc.kind,
                detail=f"{_origin(url)}: {detail}",
            )
            reason = Reason.TIMEOUT if exc.kind == "timeout" else Reason.PROVIDER_UNAVAILABLE
            return TokenRejected(reason, f"provider {self.name}: {stage} failed ({exc.kind})")

    def _should_refetch(
        self, result: VerifiedClaims | TokenRejected, unverified: UnverifiedToken
    ) -> bool:
        """Only an unknown key for an asymmetric alg with a sane kid is worth a refetch."""
        if not isinstance(result, TokenRejected) or result.reason is not Reason.UNKNOWN_KEY:
            return False
        kid, alg = unverified.header.get("kid"), unverified.header.get("alg")
        kid_ok = kid is None or (isinstance(kid, str) and 0 < len(kid) <= MAX_KID_LENGTH)
        return kid_ok and alg in self._asymmetric

    async def _ensure_fresh(self) -> None:
        stale = self._clock() - self._loaded_at >= self._jwks_lifetime
        if self._jwks is None or stale:
            await self._refetch(
                rediscover=True, min_interval=self.config.jwks_cooldown, seen=self._generation
            )

    # ----------------------------------------------------------------- refresh

    async def refresh(self) -> bool:
        """Discovery (unless ``jwks_uri`` is configured) and JWKS now. Never raises.

        Returns True when a fresh key set is in place.
        """
        if not self.needs_jwks:
            return True
        self._discovery_until = -math.inf  # an explicit refresh rereads discovery too
        return await self._refetch(rediscover=True, min_interval=0.0, seen=self._generation)

    async def _refetch(self, *, rediscover: bool, min_interval: float, seen: int) -> bool:
        """Single-flight fetch; True when keys newer than generation ``seen`` are in place."""
        async with self._lock:
            if self._generation != seen:  # someone fetched while we waited
                return self._last_ok
            now = self._clock()
            if now - self._last_attempt < min_interval:
                return False
            self._last_attempt = now
            ok = await self._fetch(rediscover=rediscover)
            self._generation += 1
            self._last_ok = ok
            return ok

    async def _fetch(self, *, rediscover: bool) -> bool:
        self.fetches += 1
        try:
            with trio.fail_after(self._fetch_timeout):
                uri, keys, lifetime = await self._fetch_keys(rediscover=rediscover)
        except trio.TooSlowError:
            return self._failed(_RefreshError("fetch", "timeout", f"over {self._fetch_timeout:g}s"))
        except _RefreshError as exc:
            return self._failed(exc)
        self._jwks = keys
        self._loaded_at = self._clock()
        self._jwks_lifetime = self._bounded_lifetime(lifetime)
        self.last_error = None
        for refused in self._refused.new(keys.skipped):
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
            keeping_cached_keys=self._jwks is not None,
        )

    def _bounded_lifetime(self, max_age: float | None) -> float:
        if max_age is None:
            return self.config.jwks_refresh
        return min(max(max_age, self.config.jwks_min_refresh), self.config.jwks_refresh)

    async def _fetch_keys(self, *, rediscover: bool) -> tuple[str, KeySet, float | None]:
        uri = self.config.jwks_uri or self._jwks_uri
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
        async with self._discovery_lock:
            now = self._clock()
            if self._discovery is not None and not force and now < self._discovery_until:
                return self._discovery
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
            self._discovery = doc
            self._discovery_until = now + self._bounded_lifetime(answer.max_age)
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
        self._jwks_uri = uri
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
