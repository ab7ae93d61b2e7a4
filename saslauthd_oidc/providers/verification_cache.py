"""Verified-token cache with single-flight, between the engine and the providers.

Results are keyed by (provider, what was asked, SHA-256 of the token): the
token itself is not kept as a key. What was asked (:class:`Lookup`) is a token
verification or a userinfo call; a reload drops a provider's entries of both
kinds. A positive entry lives until min(now + ``ttl``, the token's ``exp``),
never past ``exp``. Only refusals that cannot turn into an acceptance later are
cached, for ``negative_ttl``; temporary failures and refusals that a key
rotation or the clock may change (unknown key, not yet valid) are never
cached. Concurrent verifications of the same new token share one call to the
provider (single-flight). Bounded: least recently used entries go first.

The engine asks in two steps: :meth:`VerificationCache.lookup` (synchronous:
a cached answer or None) and, when it needs the provider, :meth:`VerificationCache.fetch`
(single-flight) or :meth:`VerificationCache.store` for an answer it got
without I/O. Each entry also remembers what the token's unverified ``iss``
was (:attr:`Entry.iss`), so that a repeated token is narrowed to its
providers without being parsed again.

Entries are compact (:func:`compact`): the claims of a verified token are
kept as a tuple of values against a key layout shared by every token of the
same shape (:class:`CompactClaims`), and the JOSE header as one shared
read-only mapping per distinct header. Nothing is dropped: the engine and the
HTTP frontend read exactly the claims they would have read.
"""

from __future__ import annotations

import enum
import hashlib
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import trio

from saslauthd_oidc.config import CacheConfig
from saslauthd_oidc.core.outcome import Reason, Refusal
from saslauthd_oidc.providers.jwt import UnverifiedToken, VerifiedClaims

Result = VerifiedClaims | Refusal

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


class Lookup(enum.Enum):
    """What a cache entry answers: a token verification or a userinfo call."""

    TOKEN = b"t"
    USERINFO = b"u"


#: ``Entry.iss`` of a token that is not a JWS (opaque, JWE): nothing was peeked.
OPAQUE: Any = ("opaque",)


def token_digest(token: str) -> bytes:
    """SHA-256 of the token: computed once per request, the root of every cache key."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def cache_key(provider: str, lookup: Lookup, digest: bytes) -> bytes:
    """One small bytes per entry: the token's digest, the kind, then the provider.

    The digest has a fixed length and comes first, so no two (provider, kind)
    pairs can produce the same key.
    """
    return digest + key_suffix(provider, lookup)


def key_suffix(provider: str, lookup: Lookup) -> bytes:
    """What :func:`cache_key` appends to the digest (callers on the hot path keep it)."""
    return lookup.value + provider.encode("utf-8", "surrogateescape")


def _key(provider: str, token: str, lookup: Lookup = Lookup.TOKEN) -> bytes:
    return cache_key(provider, lookup, token_digest(token))


# Bounds on the shared layouts: an IdP that mints every token with its own
# claim names or header cannot grow these; its entries are just not compacted.
MAX_SHAPES = 256
MAX_HEADERS = 256
_shapes: dict[tuple[str, ...], dict[str, int]] = {}
_headers: dict[tuple[tuple[str, Any], ...], Mapping[str, Any]] = {}


class CompactClaims(Mapping[str, Any]):
    """Read-only claims: the values, and a name -> position layout shared by tokens alike."""

    __slots__ = ("_index", "_values")

    def __init__(self, index: dict[str, int], values: tuple[Any, ...]) -> None:
        self._index = index
        self._values = values

    def __getitem__(self, name: str) -> Any:
        return self._values[self._index[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def get(self, name: str, default: Any = None) -> Any:
        position = self._index.get(name)
        return default if position is None else self._values[position]

    def as_dict(self) -> dict[str, Any]:
        """A plain dict of the claims (what ``dict(claims)`` gives, at C speed)."""
        return dict(zip(self._index, self._values, strict=True))

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"CompactClaims({dict(self)!r})"


def _compact_claims(claims: Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(claims, CompactClaims):
        return claims
    names = tuple(claims)
    index = _shapes.get(names)
    if index is None:
        if len(_shapes) >= MAX_SHAPES:
            return MappingProxyType(dict(claims))
        index = _shapes[names] = {sys.intern(n): i for i, n in enumerate(names)}
    return CompactClaims(index, tuple(claims.values()))


def _shared_header(header: Mapping[str, Any]) -> Mapping[str, Any]:
    try:
        key = tuple(header.items())
        shared = _headers.get(key)
    except TypeError:  # a value that cannot be hashed (a nested object)
        return MappingProxyType(dict(header))
    if shared is None:
        shared = MappingProxyType(dict(header))
        if len(_headers) < MAX_HEADERS:
            _headers[key] = shared
    return shared


def compact(result: Result) -> Result:
    """What a cache entry keeps of ``result``: the same claims and header, in less memory."""
    if isinstance(result, Refusal):
        return result
    return VerifiedClaims(
        _compact_claims(result.claims), _shared_header(result.header), result.expires_at
    )


class Verifier(Protocol):
    async def verify(self, token: str, unverified: UnverifiedToken | None) -> Result: ...


@dataclass(slots=True)
class Entry:
    result: Result
    until: float
    provider: str  # whose answer it is (the key is a hash): a reload drops by provider
    #: The token's unverified ``iss`` claim as :func:`~.jwt.peek` read it, or
    #: :data:`OPAQUE`: lets a repeated token skip parsing.
    iss: Any = None


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
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._flights: dict[bytes, _Flight] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self._max > 0

    def lookup(self, key: bytes) -> Entry | None:
        """The live entry under ``key`` (counted as a hit), or None; never any I/O."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.until > self._clock():
            self._entries.move_to_end(key)
            self.hits += 1
            return entry
        del self._entries[key]
        return None

    def in_flight(self, key: bytes) -> bool:
        """Whether a :meth:`fetch` for ``key`` is under way (then wait for it, do not redo it)."""
        return key in self._flights

    async def fetch(
        self, key: bytes, provider: str, call: Callable[[], Awaitable[Result]], iss: Any = None
    ) -> Result:
        """The cached answer, the answer of a fetch already under way, or ``call()``'s (stored)."""
        if self._max <= 0:
            return await call()
        entry = self.lookup(key)
        if entry is not None:
            return entry.result
        flight = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()
            if flight.result is not None:
                self.hits += 1
                return flight.result
            # the leader was cancelled (its request timed out): verify ourselves
        self.misses += 1
        flight = _Flight()
        self._flights[key] = flight
        try:
            result = await call()
            flight.result = result
            self._put(key, provider, result, iss)
            return result
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()

    def store(self, key: bytes, provider: str, result: Result, iss: Any = None) -> None:
        """Keep an answer the engine got without I/O (counted as a miss), as :meth:`fetch` would."""
        if self._max <= 0:
            return
        self.misses += 1
        self._put(key, provider, result, iss)

    async def verify(
        self, provider: str, verifier: Verifier, token: str, unverified: UnverifiedToken | None
    ) -> Result:
        """``verifier.verify`` through the cache (what :meth:`fetch` does for a token)."""
        return await self.fetch(
            _key(provider, token), provider, lambda: verifier.verify(token, unverified)
        )

    def _put(self, key: bytes, provider: str, result: Result, iss: Any) -> None:
        now = self._clock()
        if isinstance(result, VerifiedClaims):
            until = min(now + self._ttl, result.expires_at)
        elif result.reason in STABLE_REFUSALS:
            until = now + self._negative_ttl
        else:
            return
        if until <= now:
            return
        self._entries[key] = Entry(compact(result), until, sys.intern(provider), iss)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def drop_providers(self, names: Collection[str]) -> int:
        """Forget what providers ``names`` said (removed or reconfigured); returns how many.

        Their userinfo answers go with them.
        """
        gone = set(names)
        doomed = [k for k, e in self._entries.items() if e.provider in gone]
        for key in doomed:
            del self._entries[key]
        return len(doomed)
