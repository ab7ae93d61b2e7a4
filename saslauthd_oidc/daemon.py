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
from saslauthd_oidc.providers import ProviderRegistry
from saslauthd_oidc.providers.http import make_http_client
from saslauthd_oidc.request import Mechanism

log = structlog.get_logger("saslauthd_oidc.daemon")


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
    path: str, mode: int, group: str | None, *, backlog: int = 512
) -> trio.SocketListener:
    """Bind a Unix stream socket with the configured mode and group (see bind_unix_socket)."""
    raw = bind_unix_socket(path, mode, group, backlog=backlog)
    return trio.SocketListener(trio.socket.from_stdlib_socket(raw))


def bind_unix_socket(
    path: str, mode: int, group: str | None, *, backlog: int = 512
) -> socket.socket:
    """Bind and listen on a Unix stream socket with the configured mode and group.

    A stale socket file is replaced; one that answers belongs to another
    running daemon and is an error, as is a path that is not a socket.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        st = p.lstat()
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError("server.auth_socket", f"{path} exists and is not a socket")
        if socket_in_use(path):
            raise ConfigError("server.auth_socket", f"{path} is in use by another process")
        p.unlink()
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError("server.auth_socket_group", f"no such group {group!r}") from None
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # nobody can connect before the chmod below
    try:
        raw.bind(path)
    except OSError as exc:
        raw.close()
        if exc.errno == errno.EACCES:
            raise ConfigError("server.auth_socket", f"permission denied creating {path}") from None
        raise
    finally:
        os.umask(old_umask)
    if gid != -1:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    raw.listen(backlog)
    return raw


async def run_daemon(
    config: Config,
    *,
    task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED,
    handle_signals: bool = True,
    auth_listener: trio.abc.Listener[trio.abc.Stream] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation). Reports the Engine once listening.

    ``auth_listener`` listens on an auth socket opened by someone else (a
    worker's, inherited from the parent of ``server.workers``, which owns and
    removes the socket).
    """
    mechanisms = [Mechanism(m) for m in config.server.mechanisms]
    # Sockets are opened before any nursery, so that their ConfigErrors reach
    # the caller as themselves rather than wrapped in an exception group.
    listener: trio.abc.Listener[trio.abc.Stream] | None = auth_listener
    owns_socket = auth_listener is None
    if auth_listener is None and config.server.auth_socket:
        listener = open_unix_listener(
            config.server.auth_socket,
            config.server.auth_socket_mode,
            config.server.auth_socket_group,
        )
    try:
        async with make_http_client() as client:
            registry = ProviderRegistry(config, client)
            engine = Engine(config, registry)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(registry.refresh_all)
                if listener is not None:
                    await nursery.start(
                        partial(
                            serve_dovecot_listener,
                            listener,
                            engine.authenticate,
                            mechanisms=mechanisms,
                            tempfail_disconnect=config.server.tempfail == "disconnect",
                            request_timeout=config.server.request_timeout,
                            max_connections=config.server.max_connections,
                            authenticate_now=engine.authenticate_now,
                        )
                    )
                    log.info("listening", socket=config.server.auth_socket, protocol="dovecot")
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
        if listener is not None and config.server.auth_socket and owns_socket:
            with contextlib.suppress(OSError):
                os.unlink(config.server.auth_socket)
    log.info("stopped")


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping", signal=signal.Signals(signum).name)
            scope.cancel()
            return
