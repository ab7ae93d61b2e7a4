"""Verified-token cache with single-flight, between the engine and the providers.

Results are keyed by (provider, SHA-256 of the token): the token itself is not
kept as a key. A positive entry lives until min(now + ``ttl``, the token's
``exp``), never past ``exp``. Only refusals that cannot turn into an
acceptance later are cached, for ``negative_ttl``; temporary failures and
refusals that a key rotation or the clock may change (unknown key, not yet
valid) are never cached. Concurrent verifications of the same new token share
one call to the provider (single-flight). Bounded: least recently used
entries go first. :meth:`VerificationCache.verify_now` is the synchronous
twin used by the engine's no-I/O fast path.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

import trio

from saslauthd_oidc.config import CacheConfig
from saslauthd_oidc.outcome import Reason
from saslauthd_oidc.providers.jwt import TokenRejected, UnverifiedToken, VerifiedClaims

Result = VerifiedClaims | TokenRejected

# Refusals that stay refusals: the same token can never become acceptable.
STABLE_REFUSALS = frozenset(
    {
        Reason.MALFORMED_TOKEN,
        Reason.UNSUPPORTED_ALGORITHM,
        Reason.BAD_SIGNATURE,
        Reason.WRONG_TOKEN_TYPE,
        Reason.WRONG_ISSUER,
        Reason.EXPIRED,
        Reason.BAD_CLAIM,
        Reason.TOKEN_INACTIVE,
        Reason.ID_TOKEN,
        Reason.SENDER_CONSTRAINED,
    }
)


def _key(provider: str, token: str) -> bytes:
    """SHA-256 over the provider (length-prefixed) and the token: one small bytes per entry."""
    name = provider.encode("utf-8", "surrogateescape")
    digest = hashlib.sha256(len(name).to_bytes(4, "big") + name)
    digest.update(token.encode("utf-8", "surrogateescape"))
    return digest.digest()


class Verifier(Protocol):
    async def verify(self, token: str, unverified: UnverifiedToken | None) -> Result: ...


def verify_now(verifier: Verifier, token: str, unverified: UnverifiedToken | None) -> Result | None:
    """The verifier's answer without I/O (its ``verify_now``), or None when it needs I/O.

    A verifier without a ``verify_now`` method always needs its async ``verify``.
    """
    now = getattr(verifier, "verify_now", None)
    if now is None:
        return None
    result: Result | None = now(token, unverified)
    return result


@dataclass(slots=True)
class _Entry:
    result: Result
    until: float
    provider: str  # whose answer it is (the key is a hash): a reload drops by provider


@dataclass(slots=True)
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    result: Result | None = None


class VerificationCache:
    def __init__(self, config: CacheConfig, *, clock: Callable[[], float] = time.time) -> None:
        self._max = config.max_entries
        self._ttl = config.ttl
        self._negative_ttl = config.negative_ttl
        self._clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._flights: dict[bytes, _Flight] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def verify(
        self, provider: str, verifier: Verifier, token: str, unverified: UnverifiedToken | None
    ) -> Result:
        if self._max <= 0:
            return await verifier.verify(token, unverified)
        key = _key(provider, token)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.until > self._clock():
                self._entries.move_to_end(key)
                self.hits += 1
                return entry.result
            del self._entries[key]
        flight = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()
            if flight.result is not None:
                self.hits += 1
                return flight.result
            # the leader was cancelled (its request timed out): verify ourselves
        self.misses += 1
        return await self._lead(key, provider, verifier, token, unverified)

    def verify_now(
        self, provider: str, verifier: Verifier, token: str, unverified: UnverifiedToken | None
    ) -> Result | None:
        """Like :meth:`verify`, synchronously: None when the answer needs I/O.

        A cached result, or the verifier's own synchronous answer (a JWT whose
        provider's keys are loaded and fresh), stored as :meth:`verify` would.
        A token whose verification is already in flight is left to that flight.
        """
        if self._max <= 0:
            return verify_now(verifier, token, unverified)
        key = _key(provider, token)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.until > self._clock():
                self._entries.move_to_end(key)
                self.hits += 1
                return entry.result
            del self._entries[key]
        if key in self._flights:
            return None
        result = verify_now(verifier, token, unverified)
        if result is not None:
            self.misses += 1
            self._store(key, provider, result)
        return result

    async def _lead(
        self,
        key: bytes,
        provider: str,
        verifier: Verifier,
        token: str,
        unverified: UnverifiedToken | None,
    ) -> Result:
        flight = _Flight()
        self._flights[key] = flight
        try:
            result = await verifier.verify(token, unverified)
            flight.result = result
            self._store(key, provider, result)
            return result
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()

    def _store(self, key: bytes, provider: str, result: Result) -> None:
        now = self._clock()
        if isinstance(result, VerifiedClaims):
            until = min(now + self._ttl, result.expires_at)
        elif result.reason in STABLE_REFUSALS:
            until = now + self._negative_ttl
        else:
            return
        if until <= now:
            return
        self._entries[key] = _Entry(result, until, sys.intern(provider))
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def drop_providers(self, names: Collection[str]) -> int:
        """Forget what providers ``names`` said (removed or reconfigured); returns how many.

        Userinfo answers (kept under ``"<provider>\\x00userinfo"``) go with their provider.
        """
        gone = set(names)
        doomed = [k for k, e in self._entries.items() if e.provider.split("\x00", 1)[0] in gone]
        for key in doomed:
            del self._entries[key]
        return len(doomed)
