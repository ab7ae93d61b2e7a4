""":class:`ProviderRegistry` holds one :class:`OidcProvider` per configured
``[[provider]]``. Providers with a ``ca_file`` get their own HTTP client
(trusting only that CA); all others share the client passed in. Built again
on reload from the ``previous`` registry, unchanged providers keep their keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import trio

from saslauthd_oidc.config import Config, ConfigError
from saslauthd_oidc.providers.http import MAX_OUTBOUND, make_http_client
from saslauthd_oidc.providers.issuers import accepts_issuer
from saslauthd_oidc.providers.oidc import DEFAULT_FETCH_TIMEOUT, OidcProvider


def fetch_timeout_for(config: Config) -> float:
    """How long one provider request may take: inside ``request_timeout``, so that a
    slow provider is reported as such (and named) before the client's deadline."""
    return min(DEFAULT_FETCH_TIMEOUT, config.server.request_timeout * 0.8)


class ProviderRegistry:
    """All configured providers, by name and by exact issuer."""

    def __init__(
        self,
        config: Config,
        client: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.time,
        previous: ProviderRegistry | None = None,
    ) -> None:
        self._own_clients: list[httpx.AsyncClient] = []
        # One bound on requests in flight for all providers, those with their
        # own CA (and so their own client) included; kept across reloads.
        self.outbound: trio.CapacityLimiter = (
            previous.outbound if previous else trio.CapacityLimiter(MAX_OUTBOUND)
        )
        self._providers: dict[str, OidcProvider] = {}
        for index, pc in enumerate(config.providers):
            provider_client = client
            if pc.ca_file:
                provider_client = self._client_with_ca(index, pc.ca_file)
            self._providers[pc.name] = OidcProvider(
                pc,
                provider_client,
                clock=clock,
                fetch_timeout=fetch_timeout_for(config),
                limiter=self.outbound,
            )
        # Reload: a provider whose configuration did not change keeps its keys
        # (secret files are read again all the same).
        self.adopted: list[str] = []
        if previous is not None:
            for name, provider in self._providers.items():
                old = previous._providers.get(name)
                if old is not None and old.config == provider.config:
                    provider.adopt_keys(old)
                    self.adopted.append(name)

    def _client_with_ca(self, index: int, ca_file: str) -> httpx.AsyncClient:
        try:
            own = make_http_client(ca_file=ca_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"provider[{index}].ca_file", f"cannot load {ca_file}: {exc}"
            ) from None
        self._own_clients.append(own)
        return own

    def get(self, name: str) -> OidcProvider:
        """The provider called ``name``; KeyError when there is none."""
        return self._providers[name]

    def by_issuer(self, iss: str) -> list[OidcProvider]:
        """Providers whose configured issuer equals ``iss`` exactly (in config order)."""
        return [p for p in self._providers.values() if accepts_issuer(p.config, iss)]

    def __iter__(self) -> Iterator[OidcProvider]:
        return iter(self._providers.values())

    def __len__(self) -> int:
        return len(self._providers)

    async def refresh_all(self) -> dict[str, bool]:
        """Refresh every provider concurrently; name → whether fresh keys are in place."""
        results: dict[str, bool] = {}

        async def one(p: OidcProvider) -> None:
            results[p.name] = await p.refresh()

        async with trio.open_nursery() as nursery:
            for p in self._providers.values():
                nursery.start_soon(one, p)
        return results

    async def aclose(self) -> None:
        """Close the clients this registry created (not the shared one passed in)."""
        for c in self._own_clients:
            await c.aclose()
        self._own_clients.clear()
