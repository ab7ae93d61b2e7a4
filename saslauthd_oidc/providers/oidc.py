"""One OpenID provider: discovery, a cached JWKS, and JWT verification against it.

:class:`OidcProvider` keeps the last good :class:`KeySet`. It loads keys lazily
on the first ``verify`` (or by :meth:`OidcProvider.refresh`), refetches them
when older than ``jwks_refresh``, and on an unknown ``kid`` refetches at most
once per ``jwks_cooldown`` seconds — single-flight, so any number of
concurrent verifications share one fetch. Fetch attempts, failed ones
included, count toward the cooldown: an unreachable provider is asked at most
once per cooldown. Signature checks run inline in the trio thread.

URLs come only from configuration and the discovery document; never from a
token (``jku``/``x5u`` are ignored by :mod:`.jwt`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import httpx
import structlog
import trio

from saslauthd_oidc.config import ConfigError, ProviderConfig, read_secret_file
from saslauthd_oidc.outcome import Reason
from saslauthd_oidc.providers.http import DEFAULT_MAX_BYTES, FetchError, fetch_json
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
    ) -> None:
        self.config = config
        self.name = config.name
        self._client = client
        self._clock = clock
        self._fetch_timeout = fetch_timeout
        self._max_bytes = max_bytes
        self._asymmetric = frozenset(config.algorithms) & ASYMMETRIC_ALGORITHMS
        self._hmac = _hmac_keys(config, hmac_secret)
        self._jwks: KeySet | None = None
        self._jwks_uri: str | None = config.jwks_uri
        self._loaded_at = -math.inf
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

    # ----------------------------------------------------------------- verify

    async def verify(
        self, token: str, unverified: UnverifiedToken
    ) -> VerifiedClaims | TokenRejected:
        """Verify a peeked token with this provider's keys; never raises for bad tokens."""
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

    def _verify_with(
        self, token: str, unverified: UnverifiedToken, keys: KeySet
    ) -> VerifiedClaims | TokenRejected:
        return verify_jwt(
            token,
            unverified,
            keys,
            issuer=self.config.issuer,
            algorithms=self.config.algorithms,
            leeway=self.config.leeway,
            token_types=self.config.token_types,
            now=self._clock(),
        )

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
        stale = self._clock() - self._loaded_at >= self.config.jwks_refresh
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
                uri, keys = await self._fetch_keys(rediscover=rediscover)
        except trio.TooSlowError:
            return self._failed(_RefreshError("fetch", "timeout", f"over {self._fetch_timeout:g}s"))
        except _RefreshError as exc:
            return self._failed(exc)
        self._jwks = keys
        self._loaded_at = self._clock()
        self.last_error = None
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
        self.last_error = f"{exc.stage} failed ({exc.kind}): {exc.detail}"
        log.warning(
            "provider keys fetch failed",
            provider=self.name,
            stage=exc.stage,
            kind=exc.kind,
            detail=exc.detail,
            keeping_cached_keys=self._jwks is not None,
        )
        return False

    async def _fetch_keys(self, *, rediscover: bool) -> tuple[str, KeySet]:
        uri = self.config.jwks_uri or self._jwks_uri
        if not self.config.jwks_uri and (rediscover or uri is None):
            uri = await self._discover()
        assert uri is not None
        doc = await self._get("jwks", uri)
        try:
            keys = KeySet.from_jwks(doc, self._asymmetric)
        except JwksError as exc:
            raise _RefreshError("jwks", "bad_jwks", str(exc)) from None
        if len(keys) == 0:
            skipped = "; ".join(keys.skipped)[:300] or "empty key list"
            raise _RefreshError("jwks", "no_usable_keys", skipped)
        return uri, keys

    async def _discover(self) -> str:
        doc = await self._get("discovery", self.discovery_url)
        issuer = doc.get("issuer")
        if issuer != self.config.issuer:
            shown = issuer[:200] if isinstance(issuer, str) else type(issuer).__name__
            raise _RefreshError(
                "discovery",
                "issuer_mismatch",
                f"document says issuer {shown!r}, configured {self.config.issuer!r}",
            )
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str) or not self._url_allowed(uri):
            shown = uri[:200] if isinstance(uri, str) else type(uri).__name__
            raise _RefreshError("discovery", "bad_jwks_uri", f"jwks_uri {shown!r} refused")
        self._jwks_uri = uri
        return uri

    def _url_allowed(self, url: str) -> bool:
        if url.startswith("https://"):
            return True
        return self.config.allow_http and url.startswith("http://")

    async def _get(self, stage: str, url: str) -> dict[str, Any]:
        try:
            return await fetch_json(
                self._client, url, max_bytes=self._max_bytes, timeout=self._fetch_timeout
            )
        except FetchError as exc:
            raise _RefreshError(stage, exc.kind, f"{url}: {exc.detail}") from None

    def __repr__(self) -> str:
        return f"OidcProvider({self.name!r}, issuer={self.config.issuer!r})"


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
