"""Assemble and run the daemon: HTTP client, providers, engine, listeners, signals.

This is the only place that knows how the pieces fit at run time; ``cli``
calls :func:`run_daemon`, tests call it too (in-process) or run ``serve``.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import signal
import socket
import stat
from functools import partial
from pathlib import Path

import structlog
import trio

from saslauthd_oidc.config import Config, ConfigError
from saslauthd_oidc.engine import Engine
from saslauthd_oidc.frontends.dovecot import serve_dovecot_listener
from saslauthd_oidc.frontends.http import HttpFrontend, load_caller_auth, serve_http
from saslauthd_oidc.frontends.saslauthd import serve_saslauthd_listener
from saslauthd_oidc.metrics import Metrics
from saslauthd_oidc.providers import ProviderRegistry
from saslauthd_oidc.providers.http import make_http_client
from saslauthd_oidc.request import Mechanism

log = structlog.get_logger("saslauthd_oidc.daemon")

# The engine enforces request_timeout itself (and logs and counts a timeout);
# the frontends' own deadline is a safety net just behind it.
FRONTEND_DEADLINE_MARGIN = 0.25


def socket_in_use(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def open_unix_listener(
    path: str,
    mode: int,
    group: str | None,
    *,
    backlog: int = 512,
    key: str = "server.auth_socket",
) -> trio.SocketListener:
    """Bind a Unix stream socket with the configured mode and group.

    A stale socket file is replaced; one that answers belongs to another
    running daemon and is an error, as is a path that is not a socket.
    ``key`` names the setting in errors (its ``_group`` key for the group).
    """
    raw = open_unix_socket(path, mode, group, backlog=backlog, key=key)
    return trio.SocketListener(trio.socket.from_stdlib_socket(raw))


def open_unix_socket(
    path: str, mode: int, group: str | None, *, backlog: int = 512, key: str = "server.auth_socket"
) -> socket.socket:
    """:func:`open_unix_listener` as a plain listening socket; errors name ``key``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        st = p.lstat()
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(key, f"{path} exists and is not a socket")
        if socket_in_use(path):
            raise ConfigError(key, f"{path} is in use by another process")
        p.unlink()
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"{key}_group", f"no such group {group!r}") from None
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # nobody can connect before the chmod below
    try:
        raw.bind(path)
    except OSError as exc:
        raw.close()
        if exc.errno == errno.EACCES:
            raise ConfigError(key, f"permission denied creating {path}") from None
        raise
    finally:
        os.umask(old_umask)
    if gid != -1:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    raw.listen(backlog)
    return raw


def open_http_sockets(config: Config, *, backlog: int = 512) -> list[socket.socket]:
    """Bind ``server.http_listen`` addresses and ``server.http_socket``; listening, non-blocking."""
    sockets: list[socket.socket] = []
    try:
        for host, port in config.server.http_listen:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ConfigError(
                    "server.http_listen", f"cannot listen on {host}:{port}: {exc.strerror}"
                ) from None
            sock.listen(backlog)
        if config.server.http_socket:
            sockets.append(
                open_unix_socket(
                    config.server.http_socket,
                    config.server.http_socket_mode,
                    config.server.http_socket_group,
                    backlog=backlog,
                    key="server.http_socket",
                )
            )
    except BaseException:
        for s in sockets:
            s.close()
        raise
    for s in sockets:
        s.setblocking(False)
    return sockets


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


async def run_daemon(
    config: Config,
    *,
    task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED,
    handle_signals: bool = True,
) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation). Reports the Engine once listening."""
    mechanisms = [Mechanism(m) for m in config.server.mechanisms]
    # Sockets are opened before any nursery, so that their ConfigErrors reach
    # the caller as themselves rather than wrapped in an exception group.
    listener = None
    http_sockets: list[socket.socket] = []
    caller_auth = None
    if config.server.http_listen or config.server.http_socket:
        caller_auth = load_caller_auth(config.http)
    if config.server.auth_socket:
        listener = open_unix_listener(
            config.server.auth_socket,
            config.server.auth_socket_mode,
            config.server.auth_socket_group,
        )
    saslauthd_listener = None
    if config.server.saslauthd_socket:
        try:
            saslauthd_listener = open_unix_listener(
                config.server.saslauthd_socket,
                config.server.saslauthd_socket_mode,
                config.server.saslauthd_socket_group,
                key="server.saslauthd_socket",
            )
        except BaseException:
            if listener is not None and config.server.auth_socket:
                listener.socket.close()
                with contextlib.suppress(OSError):
                    os.unlink(config.server.auth_socket)
            raise
    try:
        http_sockets = open_http_sockets(config)
        async with make_http_client() as client:
            registry = ProviderRegistry(config, client)
            engine = Engine(config, registry)
            metrics = Metrics(registry, engine.cache)
            authenticate = metrics.instrument(engine.authenticate)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(registry.refresh_all)
                if http_sockets:
                    assert caller_auth is not None
                    app = HttpFrontend(
                        config,
                        authenticate,
                        caller_auth,
                        metrics=metrics,
                        ready=Readiness(registry, config.http.readyz_grace),
                        request_timeout=config.server.request_timeout + FRONTEND_DEADLINE_MARGIN,
                    )
                    binds = await nursery.start(serve_http, app, http_sockets)
                    log.info("listening", http=binds)
                if listener is not None:
                    await nursery.start(
                        partial(
                            serve_dovecot_listener,
                            listener,
                            authenticate,
                            mechanisms=mechanisms,
                            tempfail_disconnect=config.server.tempfail == "disconnect",
                            request_timeout=config.server.request_timeout
                            + FRONTEND_DEADLINE_MARGIN,
                            max_connections=config.server.max_connections,
                            line_timeout=config.server.line_timeout,
                        )
                    )
                    log.info("listening", socket=config.server.auth_socket, protocol="dovecot")
                if saslauthd_listener is not None:
                    await nursery.start(
                        partial(
                            serve_saslauthd_listener,
                            saslauthd_listener,
                            authenticate,
                            request_timeout=config.server.request_timeout
                            + FRONTEND_DEADLINE_MARGIN,
                            max_connections=config.server.max_connections,
                            max_password_bytes=config.server.max_token_bytes,
                        )
                    )
                    log.info(
                        "listening", socket=config.server.saslauthd_socket, protocol="saslauthd"
                    )
                if handle_signals:
                    nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
                log.info(
                    "started",
                    config=config.source,
                    providers=[p.name for p in config.providers],
                    rules=[r.name for r in config.rules],
                )
                task_status.started(engine)
            await registry.aclose()
    finally:
        for s in http_sockets:
            s.close()
        # Only the socket files this run created: one that was in use stays.
        bound = [
            config.server.auth_socket if listener is not None else None,
            config.server.saslauthd_socket if saslauthd_listener is not None else None,
            config.server.http_socket
            if any(s.family == socket.AF_UNIX for s in http_sockets)
            else None,
        ]
        for path in bound:
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
    log.info("stopped")


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping", signal=signal.Signals(signum).name)
            scope.cancel()
            return
