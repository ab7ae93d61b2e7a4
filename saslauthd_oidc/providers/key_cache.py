"""One provider's signing keys and what it knows about fetching them.

:class:`OidcProvider` fetches (discovery, then the JWKS) and verifies; what
those fetches leave behind lives here, in one object: the key set and its
lifetime, the discovery document, the retry backoff, the kids a fetch did not
find, and the locks and generation that keep concurrent requests to one fetch.
A reload that keeps a provider's configuration hands this object over whole to
the new provider (:meth:`OidcProvider.adopt_keys`), so it fetches nothing and a
fetch still running for the old one lands in the same place — as Dovecot's
lib-oauth2 keeps its key cache (``oauth2-key-cache.c``) apart from the requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import trio

from saslauthd_oidc.providers.jwt import KeySet
from saslauthd_oidc.providers.keypolicy import RefusalLog


@dataclass(eq=False, slots=True)
class KeyCache:
    """Mutable state shared by every provider object that adopts it."""

    #: The JWKS URL in use: configured, or learnt from discovery (None before).
    jwks_uri: str | None
    #: How long the current key set is fresh (seconds; the IdP's max-age, bounded).
    jwks_lifetime: float
    jwks: KeySet | None = None
    loaded_at: float = -math.inf
    discovery: dict[str, Any] | None = None
    discovery_until: float = -math.inf
    last_attempt: float = -math.inf
    last_kid_attempt: float = -math.inf  # the last fetch caused by an unknown kid
    # Kids still unknown after a fetch made because of them: a well-behaved IdP
    # publishes a key before signing with it, so these are no rotation.
    missing_kids: set[str | None] = field(default_factory=set)
    failures: int = 0  # consecutive failed fetches (the retry backoff)
    keys_asked_at: float = -math.inf  # when the fetch that gave the current keys began
    generation: int = 0  # counts fetches, so a waiter sees that someone fetched
    last_ok: bool = False
    #: Keys refused in a JWKS (key policy), each logged once, not at every fetch.
    refused: RefusalLog = field(default_factory=RefusalLog)
    fetch_lock: trio.Lock = field(default_factory=trio.Lock)
    discovery_lock: trio.Lock = field(default_factory=trio.Lock)
