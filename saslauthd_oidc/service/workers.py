"""``server.workers = N``: N worker processes sharing the listening socket.

Unix sockets have no ``SO_REUSEPORT``, so the parent binds the auth socket
once and forks N workers that inherit it; the kernel hands each new
connection to whichever worker's ``accept`` gets there first. Each worker runs
its own ``trio.run`` with its own engine, caches and HTTP client
(:func:`saslauthd_oidc.service.daemon.run_daemon` on the inherited socket), so
nothing is shared at run time and a worker's crash costs only its own
connections.

Connections are long-lived (a Postfix ``smtpd`` keeps its one), so whoever
wins ``accept`` first would otherwise collect a burst of them. Workers keep
their connection counts in a small shared-memory table, and a worker that
has more connections than a live sibling lets that sibling take a pending
connection first (:class:`BalancedListener`): the load spreads evenly.

The parent does no I/O of its own beyond supervising: it never starts trio
(fork and a running event loop or threads do not mix), waits for signals with
``sigwaitinfo``, restarts a worker that died (logged, and at most once per
``RESTART_DELAY`` for the same slot, so a worker that crashes at start does
not spin), and on SIGTERM or SIGINT stops every worker with SIGTERM (SIGKILL
after ``STOP_TIMEOUT``), removes the socket and returns. SIGHUP is passed on
to every worker, each of which reloads the configuration file itself.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import socket
import time
from collections.abc import Callable

import structlog
import trio

from saslauthd_oidc.config import Config, ConfigError
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.service.listeners import open_unix_socket

log = structlog.get_logger("saslauthd_oidc.workers")

RESTART_DELAY = 1.0
STOP_TIMEOUT = 10.0
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP}

#: How long a busier worker leaves a pending connection to a less busy one.
DEFERRAL = 0.002

#: What a worker runs: the config and its listener on the inherited socket; returns an exit code.
WorkerMain = Callable[[Config, "BalancedListener"], int]


def _default_worker_main(config: Config, listener: BalancedListener) -> int:
    trio.run(lambda: run_daemon(config, auth_listener=listener))
    return 0


class LoadTable:
    """Per-worker connection counts and liveness, in memory shared across fork()."""

    def __init__(self, slots: int) -> None:
        self._map = mmap.mmap(-1, 16 * slots)  # anonymous and MAP_SHARED
        view = memoryview(self._map).cast("q")
        self.connections = view[:slots]
        self.alive = view[slots:]

    def busier_than_a_sibling(self, slot: int) -> bool:
        mine = self.connections[slot]
        return any(
            self.alive[i] and self.connections[i] < mine
            for i in range(len(self.connections))
            if i != slot
        )


class BalancedListener(trio.abc.Listener[trio.abc.Stream]):
    """Accepts on the shared socket, after less busy live siblings had their chance."""

    def __init__(self, sock: socket.socket, table: LoadTable, slot: int) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._table = table
        self._slot = slot

    async def accept(self) -> trio.abc.Stream:
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            if self._table.busier_than_a_sibling(self._slot):
                await trio.sleep(DEFERRAL)
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                continue  # a sibling took it
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            self._table.connections[self._slot] += 1
            return _CountedStream(
                trio.SocketStream(trio.socket.from_stdlib_socket(conn)), self._release
            )

    @property
    def socket(self) -> socket.socket:
        """The inherited listening socket (this worker's copy of it)."""
        return self._sock

    def _release(self) -> None:
        self._table.connections[self._slot] -= 1

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class _CountedStream(trio.abc.Stream):
    """A connection that tells the load table when it closes."""

    def __init__(self, inner: trio.SocketStream, on_close: Callable[[], None]) -> None:
        self._inner = inner
        self._on_close: Callable[[], None] | None = on_close
        # The hot methods go straight to the socket stream, without a frame of ours.
        self.send_all = inner.send_all  # type: ignore[method-assign]
        self.receive_some = inner.receive_some  # type: ignore[method-assign]

    @property
    def socket(self) -> trio.socket.SocketType:
        """The connection's socket (the Dovecot frontend reads and writes it directly)."""
        return self._inner.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
        await self._inner.aclose()


class Supervisor:
    """The parent process: forks, watches and stops the workers."""

    def __init__(
        self,
        config: Config,
        listener: socket.socket,
        *,
        worker_main: WorkerMain = _default_worker_main,
    ) -> None:
        self.config = config
        self.listener = listener
        self.count = config.server.workers
        self.worker_main = worker_main
        self.table = LoadTable(self.count)
        self.workers: dict[int, int] = {}  # pid -> slot
        self._started: dict[int, float] = {}  # slot -> monotonic start time
        self._pending: dict[int, float] = {}  # slot -> when to restart it

    def _spawn(self, slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
                    signal.signal(signum, signal.SIG_DFL)
                listener = BalancedListener(self.listener, self.table, slot)
                code = self.worker_main(self.config, listener)
            except BaseException:  # a worker must never return into the parent's code
                with contextlib.suppress(BaseException):
                    log.exception("worker_crashed", worker=slot)
            finally:
                os._exit(code)
        self.workers[pid] = slot
        self.table.connections[slot] = 0
        self.table.alive[slot] = 1
        self._started[slot] = time.monotonic()
        log.info("worker_started", worker=slot, pid=pid)

    def run(self) -> int:
        """Fork the workers and supervise them until SIGTERM/SIGINT; returns the exit code."""
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for slot in range(self.count):
                self._spawn(slot)
            while True:
                timeout = None
                if self._pending:
                    timeout = max(0.0, min(self._pending.values()) - time.monotonic())
                info = (
                    signal.sigtimedwait(_SIGNALS, timeout)
                    if timeout is not None
                    else signal.sigwaitinfo(_SIGNALS)
                )
                if info is not None and info.si_signo == signal.SIGHUP:
                    # Each worker reloads its own configuration (run_daemon's SIGHUP).
                    log.info("reload", workers=len(self.workers))
                    for pid in self.workers:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGHUP)
                    continue
                if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    log.info("stopping", signal=signal.Signals(info.si_signo).name)
                    self._reap()
                    self.stop()
                    return 0
                self._reap()
                self._restart_due()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _reap(self) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.workers.pop(pid, None)
            if slot is None:
                continue
            self.table.alive[slot] = 0
            self.table.connections[slot] = 0
            log.error("worker_died", worker=slot, pid=pid, status=_describe(status))
            ran = time.monotonic() - self._started.get(slot, 0.0)
            self._pending[slot] = time.monotonic() + (RESTART_DELAY if ran < RESTART_DELAY else 0)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, when in list(self._pending.items()):
            if when <= now:
                del self._pending[slot]
                self._spawn(slot)

    def stop(self) -> None:
        """SIGTERM every worker, wait (SIGKILL after STOP_TIMEOUT)."""
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.workers:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.workers.pop(pid, None)
                continue
            if time.monotonic() > deadline:
                for left in self.workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(left, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.02)
        self.workers.clear()


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def worker_problem(config: Config) -> ConfigError | None:
    """Why ``server.workers > 1`` cannot run with this config (check-config asks too)."""
    if config.server.workers <= 1:
        return None
    if not config.server.auth_socket:
        return ConfigError("server.workers", "more than one worker needs server.auth_socket")
    others = [
        key
        for key, value in (
            ("saslauthd_socket", config.server.saslauthd_socket),
            ("http_listen", config.server.http_listen),
            ("http_socket", config.server.http_socket),
        )
        if value
    ]
    if others:
        # Each worker would bind these itself and all but one would fail:
        # until they are bound here and inherited like the auth socket, refuse.
        return ConfigError(
            "server.workers",
            f"more than one worker shares only auth_socket so far, not {', '.join(others)}",
        )
    return None


def serve_workers(config: Config, *, worker_main: WorkerMain = _default_worker_main) -> int:
    """Bind the auth socket, run ``config.server.workers`` workers on it, clean up after."""
    problem = worker_problem(config)
    if problem is not None:
        raise problem
    path = config.server.auth_socket
    assert path is not None
    listener = open_unix_socket(
        path, config.server.auth_socket_mode, config.server.auth_socket_group
    )
    log.info("listening", socket=path, protocol="dovecot", workers=config.server.workers)
    try:
        return Supervisor(config, listener, worker_main=worker_main).run()
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        log.info("stopped")
