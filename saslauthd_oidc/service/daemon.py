"""Assemble and run the daemon: HTTP client, providers, engine, listeners, signals.

This is the only place that knows how the pieces fit at run time; ``cli``
calls :func:`run_daemon`, tests call it too (in-process) or run ``serve``.

The sockets come from :mod:`.listeners` (bound, or taken over from systemd),
after :mod:`.preflight` checked what would be refused. SIGHUP reloads the configuration
(:mod:`.lifecycle`): a broken file is logged and the running configuration
stays. SIGTERM/SIGINT stop accepting, let the authentications in flight
finish (within ``request_timeout``) and return. systemd is told about each
step (READY, RELOADING, STOPPING, STATUS, WATCHDOG) when it listens.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import structlog
import trio

from saslauthd_oidc.config import Config, ConfigError, load_config
from saslauthd_oidc.core.engine import Engine
from saslauthd_oidc.core.request import Mechanism
from saslauthd_oidc.core.rules import config_warnings
from saslauthd_oidc.frontends.accept import ConnectionTable
from saslauthd_oidc.frontends.dovecot import serve_dovecot_listener
from saslauthd_oidc.frontends.http import HttpFrontend, HttpLimits, serve_http
from saslauthd_oidc.frontends.http_callers import CallerAuth, load_caller_auth
from saslauthd_oidc.frontends.saslauthd import serve_saslauthd_listener
from saslauthd_oidc.providers.http import make_http_client
from saslauthd_oidc.providers.registry import ProviderRegistry
from saslauthd_oidc.providers.verification_cache import VerificationCache
from saslauthd_oidc.service import build
from saslauthd_oidc.service.lifecycle import Current, ReloadReporter, plan_reload
from saslauthd_oidc.service.limits import Caps, budget_for, caps_for, raise_nofile_limit
from saslauthd_oidc.service.listeners import (
    InheritedListener,
    Listeners,
    _name,
    http_problems,
    open_listeners,
)
from saslauthd_oidc.service.logs import configure_logging, flush_logs
from saslauthd_oidc.service.metrics import Metrics
from saslauthd_oidc.service.systemd import Notifier

if TYPE_CHECKING:
    from prometheus_client.core import Metric

log = structlog.get_logger("saslauthd_oidc.daemon")

# The engine enforces request_timeout itself (and logs and counts a timeout);
# the frontends' own deadline is a safety net just behind it.
FRONTEND_DEADLINE_MARGIN = 0.25


class Readiness:
    """Ready once every provider's keys were loaded once, or ``grace`` seconds after start."""

    def __init__(self, registry: ProviderRegistry, grace: float) -> None:
        self._registry = registry
        self._deadline = trio.current_time() + grace
        self._ready = False

    def __call__(self) -> bool:
        if not self._ready:
            self._ready = all(p.keys_loaded for p in self._registry) or (
                trio.current_time() >= self._deadline
            )
        return self._ready


# --------------------------------------------------------------------------- running


@dataclass
class _Runtime:
    """What a reload replaces and a stop drains."""

    config: Config
    load: Callable[[], Config] | None
    client: httpx.AsyncClient
    registry: ProviderRegistry
    cache: VerificationCache
    metrics: Metrics
    current: Current
    listeners: Listeners
    notifier: Notifier
    make_http_app: Callable[[Config, CallerAuth], HttpFrontend]
    nursery: trio.Nursery
    stop_http: trio.Event = field(default_factory=trio.Event)
    reports: ReloadReporter = field(default_factory=lambda: ReloadReporter(None))
    problems: list[str] = field(default_factory=list)  # shown in the systemd status

    @property
    def deadline(self) -> float:
        return self.config.server.request_timeout + FRONTEND_DEADLINE_MARGIN

    def status(self) -> str:
        text = (
            f"serving {len(self.config.rules)} rules, {len(self.config.providers)} providers "
            f"from {self.config.source}"
        )
        return "; ".join([text, *self.problems])

    async def reload(self) -> bool:
        """Load the config again and swap it in; on any error keep the running one."""
        self.notifier.reloading()
        if self.load is None:
            log.warning("reload_failed", error="the configuration was not read from a file")
            self.notifier.ready(status=self.status())
            self.reports.report(False, None, "the configuration was not read from a file")
            return False
        log.info("reloading", config=self.config.source)
        try:
            new = await trio.to_thread.run_sync(self.load)
            plan = plan_reload(self.config, new)
            caller_auth = load_caller_auth(plan.config.http) if self.listeners.http else None
            registry = ProviderRegistry(plan.config, self.client, previous=self.registry)
        except ConfigError as exc:
            log.error(
                "reload_failed",
                key=exc.key or None,
                error=exc.message,
                detail="still serving the previous configuration",
            )
            self.notifier.ready(status=f"reload failed ({exc}); " + self.status())
            self.reports.report(False, exc.key or None, exc.message)
            return False
        self.problems = [
            str(p)
            for p in http_problems(
                plan.config,
                http_passed=bool(self.listeners.http) and "http" in self.listeners.passed,
            )
        ]
        for problem in self.problems:
            log.error("config", error=problem)
        engine = Engine(plan.config, registry, cache=self.cache, observe=self.metrics.observe)
        dropped = self.cache.drop_providers(plan.removed_providers + plan.changed_providers)
        if plan.logging_changed:
            configure_logging(plan.config.logging)
        http_app = None
        if caller_auth is not None:
            http_app = self.make_http_app(plan.config, caller_auth)
        self.current.swap(engine, http_app)
        self.metrics.track_providers(registry)
        old, self.registry, self.config = self.registry, registry, plan.config
        self.nursery.start_soon(self._retire, old)
        for name in (*plan.added_providers, *plan.changed_providers):
            self.nursery.start_soon(registry.get(name).refresh)
        for warning in config_warnings(plan.config):
            log.warning("config", warning=warning)
        if plan.restart_keys:
            log.warning(
                "reload_needs_restart",
                keys=list(plan.restart_keys),
                detail="these settings keep their running values until a restart",
            )
        log.info(
            "reloaded",
            config=plan.config.source,
            providers=[p.name for p in plan.config.providers],
            rules=[r.name for r in plan.config.rules],
            added_providers=list(plan.added_providers),
            changed_providers=list(plan.changed_providers),
            removed_providers=list(plan.removed_providers),
            cache_entries_dropped=dropped,
        )
        self.notifier.ready(status=self.status())
        self.reports.report(True, None, self.status())
        return True

    async def _retire(self, registry: ProviderRegistry) -> None:
        """Close a replaced registry's own clients once its last requests are over."""
        try:
            await trio.sleep(self.deadline)
        finally:
            with trio.CancelScope(shield=True):
                await registry.aclose()

    async def stop(self, reason: str) -> None:
        """Stop accepting, let what is in flight finish (bounded), then end the daemon."""
        log.info("stopping", signal=reason)
        self.notifier.stopping(status="stopping: finishing authentications in flight")
        self.listeners.stop_accepting()
        self.stop_http.set()
        # Until every request in flight is decided and its reply written (the
        # frontends report each reply they owe), bounded by the deadline.
        left = await self.current.drain(self.deadline)
        if left:
            log.warning("stopping_with_requests_in_flight", count=left)
        self.nursery.cancel_scope.cancel()


async def run_daemon(
    config: Config,
    *,
    task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED,
    handle_signals: bool = True,
    passed_fds: Mapping[str, Sequence[int]] | None = None,
    notifier: Notifier | None = None,
    load: Callable[[], Config] | None = None,
    auth_listener: InheritedListener | None = None,
    report_dir: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation). Reports the first Engine once listening.

    ``passed_fds`` are systemd's sockets by name
    (:func:`saslauthd_oidc.service.systemd.take_listen_fds`).
    ``load`` reads the configuration again on SIGHUP (default: the file it came from).
    ``auth_listener`` listens on an auth socket opened by someone else (a
    worker's, inherited from the parent of ``server.workers``, which owns and
    removes the socket). ``report_dir`` receives the answer to each reload
    (:class:`~saslauthd_oidc.service.lifecycle.ReloadReporter`; systemd's
    ``$RUNTIME_DIRECTORY``).
    """
    mechanisms = [Mechanism(m) for m in config.server.mechanisms]
    notifier = notifier or Notifier({})
    if load is None and Path(config.source).is_file():
        load = partial(load_config, config.source)
    # Sockets are opened before any nursery, so that their ConfigErrors reach
    # the caller as themselves rather than wrapped in an exception group.
    caller_auth = None
    http_passed = bool((passed_fds or {}).get("http"))
    problems = http_problems(config, http_passed=http_passed)
    for problem in problems:
        # Not fatal: the auth and saslauthd sockets must not go down with it.
        log.error("config", key=problem.key, error=problem.message)
    if config.server.http_listen or config.server.http_socket or http_passed:
        caller_auth = load_caller_auth(config.http)
    listeners = open_listeners(config, passed_fds, auth=auth_listener)
    caps, nofile = descriptor_caps(config, listeners)
    # One cap (and its counts for /metrics) per listener; all HTTP sockets share one.
    tables: dict[str, ConnectionTable] = {}
    if listeners.auth is not None:
        tables["auth"] = ConnectionTable(_name(listeners.auth), caps.auth)
    if listeners.saslauthd is not None:
        tables["saslauthd"] = ConnectionTable(_name(listeners.saslauthd), caps.saslauthd)
    if listeners.http:
        tables["http"] = ConnectionTable("http", caps.http)
    deadline = config.server.request_timeout + FRONTEND_DEADLINE_MARGIN
    try:
        async with make_http_client() as client:
            registry = ProviderRegistry(config, client)
            cache = VerificationCache(config.cache)
            metrics = Metrics(registry, cache)
            engine = Engine(config, registry, cache=cache, observe=metrics.observe)
            metrics.register(ConnectionCollector(tables, nofile))
            current = Current(engine)
            authenticate = current.authenticate
            readiness = Readiness(registry, config.http.readyz_grace)

            def make_http_app(cfg: Config, auth: CallerAuth) -> HttpFrontend:
                return HttpFrontend(
                    cfg,
                    authenticate,
                    auth,
                    metrics=metrics,
                    ready=readiness,
                    request_timeout=deadline,
                )

            async with trio.open_nursery() as nursery:
                runtime = _Runtime(
                    config=config,
                    load=load,
                    client=client,
                    registry=registry,
                    cache=engine.cache,
                    metrics=metrics,
                    current=current,
                    listeners=listeners,
                    notifier=notifier,
                    make_http_app=make_http_app,
                    nursery=nursery,
                    reports=ReloadReporter(report_dir),
                    problems=[str(p) for p in problems],
                )
                nursery.start_soon(registry.refresh_all)
                if listeners.http:
                    if caller_auth is None:
                        caller_auth = load_caller_auth(config.http)
                    current.http_app = make_http_app(config, caller_auth)
                    binds = await nursery.start(
                        partial(
                            serve_http,
                            current.http,
                            listeners.http,
                            shutdown_trigger=runtime.stop_http.wait,
                            graceful_timeout=deadline,
                            limits=HttpLimits.from_config(config, caps.http),
                            table=tables["http"],
                        )
                    )
                    log.info("listening", http=binds)
                if listeners.auth is not None:
                    await nursery.start(
                        partial(
                            serve_dovecot_listener,
                            listeners.auth,
                            current,
                            mechanisms=mechanisms,
                            tempfail_disconnect=config.server.tempfail == "disconnect",
                            request_timeout=deadline,
                            max_connections=caps.auth,
                            table=tables["auth"],
                            line_timeout=config.server.line_timeout,
                            replies=current,
                        )
                    )
                    log.info("listening", socket=_name(listeners.auth), protocol="dovecot")
                if listeners.saslauthd is not None:
                    await nursery.start(
                        partial(
                            serve_saslauthd_listener,
                            listeners.saslauthd,
                            authenticate,
                            request_timeout=deadline,
                            max_connections=caps.saslauthd,
                            table=tables["saslauthd"],
                            max_password_bytes=config.server.max_token_bytes,
                            replies=current,
                        )
                    )
                    log.info("listening", socket=_name(listeners.saslauthd), protocol="saslauthd")
                if handle_signals:
                    nursery.start_soon(_handle_signals, runtime)
                if notifier.watchdog:
                    nursery.start_soon(_watchdog, notifier, notifier.watchdog)
                log.info(
                    "started",
                    config=config.source,
                    providers=[p.name for p in config.providers],
                    rules=[r.name for r in config.rules],
                    socket_activation=listeners.passed or None,
                    build=build.describe(),
                )
                notifier.ready(status=runtime.status())
                runtime.reports.started()
                task_status.started(engine)
            await runtime.registry.aclose()
    finally:
        listeners.close()
        notifier.close()
        flush_logs()  # what a round held when it ended by an exception, before the traceback
    log.info("stopped")


def descriptor_caps(config: Config, listeners: Listeners) -> tuple[Caps, int]:
    """Raise RLIMIT_NOFILE where allowed; the caps its budget allows (logged), and the limit."""
    before, limit, error = raise_nofile_limit()
    if error is not None:
        log.warning(
            "nofile_limit",
            soft=before,
            error=error,
            detail="could not raise the descriptor limit; set LimitNOFILE= in the unit",
        )
    http = bool(listeners.http)
    budget = budget_for(
        config,
        limit,
        auth=listeners.auth is not None,
        saslauthd=listeners.saslauthd is not None,
        http=http,
    )
    caps = caps_for(config, budget)
    for key, configured, used in caps.lowered:
        log.warning(
            "connection_cap_lowered",
            key=key,
            configured=configured,
            used=used,
            nofile=limit,
            detail="the descriptor limit cannot hold this many; raise LimitNOFILE=",
        )
    log.info(
        "descriptor_budget",
        raised_from=before if limit != before else None,
        **budget.describe(),
        max_connections_auth=caps.auth,
        max_connections_saslauthd=caps.saslauthd or None,
        max_connections_http=caps.http if http else None,
    )
    return caps, limit


class ConnectionCollector:
    """``/metrics``: connections held, their caps and evictions per listener; the fd limit."""

    def __init__(self, tables: Mapping[str, ConnectionTable], nofile: int) -> None:
        self._tables = dict(tables)
        self._nofile = nofile

    def collect(self) -> Iterator[Metric]:
        # At scrape time only (service.metrics): prometheus_client is not loaded at start-up.
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: PLC0415

        held = GaugeMetricFamily(
            "saslauthd_oidc_connections", "Connections held, by listener", labels=["listener"]
        )
        cap = GaugeMetricFamily(
            "saslauthd_oidc_connections_max",
            "Connection cap in force (within the descriptor budget), by listener",
            labels=["listener"],
        )
        evicted = CounterMetricFamily(
            "saslauthd_oidc_connections_evicted",
            "Connections closed to make room at the cap (longest idle of the busiest peer)",
            labels=["listener"],
        )
        for name, table in self._tables.items():
            held.add_metric([name], len(table))
            cap.add_metric([name], table.max_connections)
            evicted.add_metric([name], table.evicted)
        yield held
        yield cap
        yield evicted
        yield GaugeMetricFamily(
            "saslauthd_oidc_descriptor_limit",
            "RLIMIT_NOFILE in force (after raising it toward the hard limit)",
            value=self._nofile,
        )


async def _handle_signals(runtime: _Runtime) -> None:
    """SIGHUP reloads; SIGTERM/SIGINT stop gracefully. One at a time, in order."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                await runtime.reload()
            else:
                await runtime.stop(signal.Signals(signum).name)
                return


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 at half of WatchdogSec=, as long as the event loop runs."""
    while True:
        notifier.ping()
        await trio.sleep(interval)
