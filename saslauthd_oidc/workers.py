"""``server.workers = N``: N worker processes sharing the listening socket.

Unix sockets have no ``SO_REUSEPORT``, so the parent binds the auth socket
once and forks N workers that inherit it; the kernel hands each new
connection to whichever worker's ``accept`` gets there first. Each worker runs
its own ``trio.run`` with its own engine, caches and HTTP client
(:func:`saslauthd_oidc.daemon.run_daemon` on the inherited socket), so
nothing is shared at run time and a worker's crash costs only its own
connections.

The parent does no I/O of its own beyond supervising: it never starts trio
(fork and a running event loop or threads do not mix), waits for signals with
``sigwaitinfo``, restarts a worker that died (logged, and at most once per
``RESTART_DELAY`` for the same slot, so a worker that crashes at start does
not spin), and on SIGTERM or SIGINT stops every worker with SIGTERM (SIGKILL
after ``STOP_TIMEOUT``), removes the socket and returns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable

import structlog
import trio

from saslauthd_oidc.config import Config
from saslauthd_oidc.daemon import bind_unix_socket, run_daemon

log = structlog.get_logger("saslauthd_oidc.workers")

RESTART_DELAY = 1.0
STOP_TIMEOUT = 10.0
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}

#: What a worker runs: the config and the inherited listening socket; returns an exit code.
WorkerMain = Callable[[Config, socket.socket], int]


def _default_worker_main(config: Config, listener: socket.socket) -> int:
    trio.run(lambda: run_daemon(config, auth_listener=listener))
    return 0


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
        self.workers: dict[int, int] = {}  # pid -> slot
        self._started: dict[int, float] = {}  # slot -> monotonic start time
        self._pending: dict[int, float] = {}  # slot -> when to restart it

    def _spawn(self, slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(signum, signal.SIG_DFL)
                code = self.worker_main(self.config, self.listener)
            except BaseException:  # a worker must never return into the parent's code
                with contextlib.suppress(BaseException):
                    log.exception("worker_crashed", worker=slot)
            finally:
                os._exit(code)
        self.workers[pid] = slot
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


def serve_workers(config: Config, *, worker_main: WorkerMain = _default_worker_main) -> int:
    """Bind the auth socket, run ``config.server.workers`` workers on it, clean up after."""
    path = config.server.auth_socket
    if not path:
        raise ValueError("server.workers > 1 needs server.auth_socket")
    listener = bind_unix_socket(
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
