"""Prometheus metrics: one registry per daemon, filled in one place.

:meth:`Metrics.instrument` wraps the engine's ``authenticate`` for every
frontend, so counting happens once, outside the engine. Provider requests
(discovery, keys, introspection, userinfo)
and cache hits are read at scrape time from the counters the providers and
the verification cache already keep. Labels are bounded by construction:
outcome and reason are closed enums, rule names come from the config,
mechanism is an enum, frontend a fixed set of names. Never a user or a token.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from saslauthd_oidc.outcome import Verdict
from saslauthd_oidc.request import AuthRequest

Authenticator = Callable[[AuthRequest], Awaitable[Verdict]]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ProviderStats(Protocol):
    """What the collector reads of a provider (``providers.oidc.OidcProvider``)."""

    @property
    def name(self) -> str: ...
    @property
    def fetches(self) -> int: ...
    @property
    def fetch_errors(self) -> int: ...
    @property
    def keys_loaded(self) -> bool: ...


class CacheStats(Protocol):
    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...
    def __len__(self) -> int: ...


class Metrics:
    """The daemon's metrics; ``render()`` gives the text exposition for ``GET /metrics``."""

    def __init__(
        self,
        providers: Iterable[ProviderStats] = (),
        cache: CacheStats | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        self.authentications = Counter(
            "saslauthd_oidc_authentications",
            "Authentications by outcome, reason, rule, mechanism and frontend",
            ["outcome", "reason", "rule", "mechanism", "frontend"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "saslauthd_oidc_authentication_duration_seconds",
            "Time from request to verdict, provider round trips included",
            ["frontend"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._state = _StateCollector(list(providers), cache)
        self.registry.register(self._state)

    def track_providers(self, providers: Iterable[ProviderStats]) -> None:
        """Read these providers from now on (the daemon's providers after a reload)."""
        self._state.providers = list(providers)

    def observe(self, request: AuthRequest, verdict: Verdict, seconds: float) -> None:
        frontend = request.context.frontend
        self.authentications.labels(
            outcome=verdict.outcome.value,
            reason=verdict.reason.value,
            rule=verdict.rule or "",
            mechanism=request.mechanism.value,
            frontend=frontend,
        ).inc()
        self.latency.labels(frontend=frontend).observe(seconds)

    def instrument(self, authenticate: Authenticator) -> Authenticator:
        """``authenticate`` that also counts and times every verdict."""

        async def instrumented(request: AuthRequest) -> Verdict:
            started = self._clock()
            verdict = await authenticate(request)
            self.observe(request, verdict, self._clock() - started)
            return verdict

        return instrumented

    def instrument_now(
        self, authenticate_now: Callable[[AuthRequest], Verdict | None]
    ) -> Callable[[AuthRequest], Verdict | None]:
        """The no-I/O fast path, counted and timed like :meth:`instrument` when it decides."""

        def instrumented(request: AuthRequest) -> Verdict | None:
            started = self._clock()
            verdict = authenticate_now(request)
            if verdict is not None:
                self.observe(request, verdict, self._clock() - started)
            return verdict

        return instrumented

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StateCollector(Collector):
    def __init__(self, providers: list[ProviderStats], cache: CacheStats | None) -> None:
        self.providers = providers
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        fetches = CounterMetricFamily(
            "saslauthd_oidc_provider_fetches",
            "Key-set refreshes (discovery + JWKS) attempted, per provider",
            labels=["provider"],
        )
        errors = CounterMetricFamily(
            "saslauthd_oidc_provider_fetch_errors",
            "Key-set refreshes that failed, per provider",
            labels=["provider"],
        )
        loaded = GaugeMetricFamily(
            "saslauthd_oidc_provider_keys_loaded",
            "1 when the provider's keys are in place",
            labels=["provider"],
        )
        for p in self.providers:
            fetches.add_metric([p.name], p.fetches)
            errors.add_metric([p.name], p.fetch_errors)
            loaded.add_metric([p.name], 1.0 if p.keys_loaded else 0.0)
        yield fetches
        yield errors
        yield loaded
        if self._cache is not None:
            lookups = CounterMetricFamily(
                "saslauthd_oidc_cache_lookups",
                "Verified-token cache lookups by result",
                labels=["result"],
            )
            lookups.add_metric(["hit"], self._cache.hits)
            lookups.add_metric(["miss"], self._cache.misses)
            yield lookups
            yield GaugeMetricFamily(
                "saslauthd_oidc_cache_entries",
                "Entries in the verified-token cache",
                value=len(self._cache),
            )
