"""Prometheus metrics: one registry per daemon, filled in one place.

The engine calls :meth:`Metrics.observe` with every verdict it reaches (the
same place that writes the log line), for every frontend. On that hot path
it only adds to plain integers in a dict keyed by the label values: no
``labels()`` lookup, no lock, no histogram object; the Prometheus families
are built from those integers at scrape time. Provider requests (discovery,
keys, introspection, userinfo) and cache hits are read at scrape time from the
counters the providers and the verification cache already keep.
prometheus_client itself is imported at the first scrape, not at start-up: a
daemon nobody scrapes never loads it. Labels are
bounded by construction: outcome and reason are closed enums, rule names come
from the config, mechanism is an enum, frontend a fixed set of names. Never a
user or a token.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from saslauthd_oidc.core.outcome import Reason, Verdict
from saslauthd_oidc.core.request import AuthRequest, Mechanism

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

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


class Collects(Protocol):
    """What a registry scrapes (a ``prometheus_client`` collector, by its shape)."""

    def collect(self) -> Iterable[Metric]: ...


class _Latency:
    """One frontend's latency histogram as plain numbers (Prometheus ``le`` buckets)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0


class Metrics:
    """The daemon's metrics; ``render()`` gives the text exposition for ``GET /metrics``."""

    def __init__(
        self, providers: Iterable[ProviderStats] = (), cache: CacheStats | None = None
    ) -> None:
        self._registry: CollectorRegistry | None = None
        #: (reason, rule, mechanism, frontend) -> authentications; the outcome follows the reason.
        self._auths: dict[tuple[Reason, str | None, Mechanism, str], int] = {}
        self._latency: dict[str, _Latency] = {}
        self._state = _StateCollector(list(providers), cache)
        self._collectors: list[Collects] = [_AuthCollector(self), self._state]

    def register(self, collector: Collects) -> None:
        """Scrape ``collector`` too (its ``collect`` runs at scrape time only)."""
        self._collectors.append(collector)
        if self._registry is not None:
            self._registry.register(collector)

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry, built (and prometheus_client imported) when first needed."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry  # noqa: PLC0415

            self._registry = CollectorRegistry()
            for collector in self._collectors:
                self._registry.register(collector)
        return self._registry

    def track_providers(self, providers: Iterable[ProviderStats]) -> None:
        """Read these providers from now on (the daemon's providers after a reload)."""
        self._state.providers = list(providers)

    def observe(self, request: AuthRequest, verdict: Verdict, seconds: float) -> None:
        """Count one verdict and its latency (the engine's observer)."""
        frontend = request.context.frontend
        key = (verdict.reason, verdict.rule, request.mechanism, frontend)
        auths = self._auths
        auths[key] = auths.get(key, 0) + 1
        latency = self._latency.get(frontend)
        if latency is None:
            latency = self._latency[frontend] = _Latency()
        latency.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        latency.total += seconds

    def render(self) -> tuple[bytes, str]:
        from prometheus_client.exposition import (  # noqa: PLC0415
            CONTENT_TYPE_LATEST,
            generate_latest,
        )

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _AuthCollector:
    """The authentication counters and latency histograms, built at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (  # noqa: PLC0415
            CounterMetricFamily,
            HistogramMetricFamily,
        )

        auths = CounterMetricFamily(
            "saslauthd_oidc_authentications",
            "Authentications by outcome, reason, rule, mechanism and frontend",
            labels=["outcome", "reason", "rule", "mechanism", "frontend"],
        )
        for (reason, rule, mechanism, frontend), count in list(self._metrics._auths.items()):
            auths.add_metric(
                [reason.outcome.value, reason.value, rule or "", mechanism.value, frontend], count
            )
        yield auths
        latency = HistogramMetricFamily(
            "saslauthd_oidc_authentication_duration_seconds",
            "Time from request to verdict, provider round trips included",
            labels=["frontend"],
        )
        bounds = [str(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        for frontend, hist in list(self._metrics._latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, hist.counts, strict=True):
                cumulative += count
                buckets.append((bound, float(cumulative)))
            latency.add_metric([frontend], buckets, hist.total)
        yield latency


class _StateCollector:
    def __init__(self, providers: list[ProviderStats], cache: CacheStats | None) -> None:
        self.providers = providers
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: PLC0415

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
