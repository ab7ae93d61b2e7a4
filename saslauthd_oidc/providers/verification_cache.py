"""Verified-token cache with single-flight, between the engine and the providers.

Results are keyed by (provider, what was asked, SHA-256 of the token): the
token itself is not kept as a key. What was asked (:class:`Lookup`) is a token
verification or a userinfo call; a reload drops a provider's entries of both
kinds. A positive entry lives until min(now + ``ttl``, the token's ``exp``),
rounded down to a whole second: never past ``exp``. Only refusals that cannot
turn into an acceptance later are cached, for ``negative_ttl``; temporary
failures and refusals that a key rotation or the clock may change (unknown
key, not yet valid) are never cached. Concurrent verifications of the same new
token share one call to the provider (single-flight). Bounded: least recently
used entries go first.

The engine asks in two steps: :meth:`VerificationCache.lookup` (synchronous:
a cached answer or None) and, when it needs the provider, :meth:`VerificationCache.fetch`
(single-flight) or :meth:`VerificationCache.store` for an answer it got
without I/O. Each entry also remembers what the token's unverified ``iss``
was (:attr:`Entry.iss`), so that a repeated token is narrowed to its
providers without being parsed again.

Entries are compact (:func:`compact`): a verified token keeps only the claims
its provider's rules and the HTTP answers read (:meth:`VerificationCache.keep`,
given by the engine once per configuration), as a tuple of values against a
name layout shared by every token of the same shape (:class:`CompactClaims`);
tokens with the same kept claims (one user's tokens) share one claims object,
and no JOSE header is kept (nothing reads it after verification). The answer
the engine gets is the compacted one whether it came from the cache or the
provider, so a decision or an HTTP answer never depends on a cache hit. When
a new configuration changes the claims kept for a provider, that provider's
entries are dropped.
"""

from __future__ import annotations

import enum
import hashlib
import math
import operator
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


DIGEST_SIZE = 32  # SHA-256: the first bytes of every cache key


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
# claim names cannot grow these; its entries are just not compacted.
MAX_SHAPES = 256
_shapes: dict[tuple[str, ...], dict[str, int]] = {}
# Claims (and results) shared by tokens whose kept claims are equal: one user's
# tokens. Bounded by starting afresh when full; entries keep what they share.
MAX_SHARED = 4096
_shared_claims: dict[tuple[tuple[str, ...], tuple[Any, ...], tuple[type, ...]], CompactClaims] = {}
# Keyed by id() of a claims object that the value itself keeps alive.
_shared_results: dict[tuple[int, float], VerifiedClaims] = {}
_NO_HEADER: Mapping[str, Any] = MappingProxyType({})

#: The claim names a provider's entries keep; None: every claim.
Kept = frozenset[str] | None


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


# Per (kept names, a token's claim names in order): the names an entry keeps,
# their layout, and a getter of their values. Derived from the two, so it is
# started afresh when full.
_Layout = tuple[tuple[str, ...], dict[str, int], Callable[[Mapping[str, Any]], tuple[Any, ...]]]
_layouts: dict[tuple[Kept, tuple[str, ...]], _Layout] = {}


def _getter(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    if len(names) >= 2:
        get: Callable[[Mapping[str, Any]], tuple[Any, ...]] = operator.itemgetter(*names)
        return get  # a C getter of a tuple (itemgetter of one name gives a bare value)
    return lambda claims: tuple([claims[n] for n in names])


def _compact_claims(claims: Mapping[str, Any], kept: Kept) -> Mapping[str, Any]:
    if isinstance(claims, CompactClaims) and kept is None:
        return claims
    order = tuple(claims)
    layout = _layouts.get((kept, order))
    if layout is None:
        names = order if kept is None else tuple(n for n in order if n in kept)
        index = _shapes.get(names)
        if index is None:
            if len(_shapes) >= MAX_SHAPES:
                return MappingProxyType({n: claims[n] for n in names})
            index = _shapes[names] = {sys.intern(n): i for i, n in enumerate(names)}
        if len(_layouts) >= MAX_SHARED:
            _layouts.clear()
        layout = _layouts[(kept, order)] = (names, index, _getter(names))
    names, index, get = layout
    values = get(claims)
    # With the types: 1 == True == 1.0 as dict keys, but email_verified = 1 is not true.
    key = (names, values, tuple(map(type, values)))
    try:
        shared = _shared_claims.get(key)
    except TypeError:  # a value that cannot be hashed (a list, an object): not shared
        return CompactClaims(index, _interned(names, values))
    if shared is None:
        if len(_shared_claims) >= MAX_SHARED:
            _shared_claims.clear()
        values = _interned(names, values)
        shared = _shared_claims[(names, values, key[2])] = CompactClaims(index, values)
    return shared


# Short string values are interned: iss, aud, scope, client_id, the user's sub
# and email repeat from token to token, and an entry may live for minutes.
# Only when a claims object is made (rare: one per user's set of values).
_INTERN_MAX = 128
_UNIQUE_VALUES = frozenset({"jti"})


def _interned(names: tuple[str, ...], values: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        [
            sys.intern(v)
            if type(v) is str and len(v) <= _INTERN_MAX and n not in _UNIQUE_VALUES
            else v
            for n, v in zip(names, values, strict=True)
        ]
    )


def compact(result: Result, kept: Kept = None) -> Result:
    """What a cache entry keeps of ``result``: the ``kept`` claims (None: all), no header."""
    if isinstance(result, Refusal):
        return result
    claims = _compact_claims(result.claims, kept)
    key = (id(claims), result.expires_at)
    shared = _shared_results.get(key)
    if shared is None or shared.claims is not claims:
        shared = VerifiedClaims(claims, _NO_HEADER, result.expires_at)
        if isinstance(claims, CompactClaims):
            if len(_shared_results) >= MAX_SHARED:
                _shared_results.clear()
            _shared_results[key] = shared
    return shared


class Verifier(Protocol):
    async def verify(self, token: str, unverified: UnverifiedToken | None) -> Result: ...


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached answer; whose it is (provider, kind) is in its key, not here.

    Read-only and shared: the entries of one user's tokens that end in the
    same second are one object (``until`` is whole seconds, rounded down).
    """

    result: Result
    until: float
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
        self._kept: dict[str, frozenset[str]] = {}
        # Entries alike, by (id(result), until, id(iss)); each value keeps those alive.
        self._alike: dict[tuple[int, float, int], Entry] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self._max > 0

    def keep(self, claims: Mapping[str, frozenset[str]]) -> int:
        """Keep only ``claims[provider]`` of each provider's verified tokens (others: all).

        A provider whose set changes loses its entries (an entry may lack a
        claim that is needed now); returns how many were dropped.
        """
        changed = [
            name for name in {*self._kept, *claims} if self._kept.get(name) != claims.get(name)
        ]
        self._kept = {
            name: frozenset(sys.intern(n) for n in names) for name, names in claims.items()
        }
        return self.drop_providers(changed) if changed else 0

    def compact(self, provider: str, result: Result) -> Result:
        """``result`` as an entry of ``provider`` keeps it (what the engine decides on)."""
        return compact(result, self._kept.get(provider))

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
            return self.compact(provider, await call())
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
            result = self.compact(provider, await call())
            flight.result = result
            self._put(key, result, iss)
            return result
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()

    def store(self, key: bytes, provider: str, result: Result, iss: Any = None) -> Result:
        """Keep an answer the engine got without I/O (a miss), as :meth:`fetch` would.

        Returns it compacted, as :meth:`fetch` returns its answers.
        """
        result = self.compact(provider, result)
        if self._max > 0:
            self.misses += 1
            self._put(key, result, iss)
        return result

    async def verify(
        self, provider: str, verifier: Verifier, token: str, unverified: UnverifiedToken | None
    ) -> Result:
        """``verifier.verify`` through the cache (what :meth:`fetch` does for a token)."""
        return await self.fetch(
            _key(provider, token), provider, lambda: verifier.verify(token, unverified)
        )

    def _put(self, key: bytes, result: Result, iss: Any) -> None:
        now = self._clock()
        if isinstance(result, VerifiedClaims):
            until = min(now + self._ttl, result.expires_at)
        elif result.reason in STABLE_REFUSALS:
            until = now + self._negative_ttl
        else:
            return
        until = float(math.floor(until))  # never later than exp; lets entries be shared
        if until <= now:
            return
        if type(iss) is str:
            # The peeked iss is a fresh string per token: one object for them
            # all keeps an entry small and lets entries alike be one.
            iss = sys.intern(iss)
        alike = (id(result), until, id(iss))
        entry = self._alike.get(alike)
        if entry is None or entry.result is not result or entry.iss is not iss:
            if len(self._alike) >= MAX_SHARED:
                self._alike.clear()
            entry = self._alike[alike] = Entry(result, until, iss)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
        self._alike.clear()

    def drop_providers(self, names: Collection[str]) -> int:
        """Forget what providers ``names`` said (removed or reconfigured); returns how many.

        Their userinfo answers go with them.
        """
        gone = {key_suffix(name, lookup) for name in names for lookup in Lookup}
        doomed = [k for k in self._entries if k[DIGEST_SIZE:] in gone]
        for key in doomed:
            del self._entries[key]
        return len(doomed)
