"""Process plumbing shared by the peer harnesses (Postfix, Exim, Dovecot, Cyrus IMAP).

Each peer runs as a daemon in a session (process group) of its own, on a free
loopback port, and writes a log the tests read. These helpers wait for its
banner, wait for a line in its log, and stop its whole process group;
:class:`PeerDaemon` is the life cycle Exim, Dovecot and Cyrus IMAP share (Postfix
stops through ``postfix stop`` and greets over several lines: its own).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Self


class PortTaken(Exception):
    """The peer lost the race for its free port; start it again on another."""


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def wait_for_banner(
    proc: subprocess.Popen[bytes],
    host: str,
    port: int,
    *,
    banner: bytes,
    goodbye: bytes,
    timeout: float,
    name: str,
    diagnostics: Callable[[], str],
) -> None:
    """Until the peer greets with ``banner`` on ``host:port``; PortTaken or RuntimeError else."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            diag = diagnostics()
            if "Address already in use" in diag:
                raise PortTaken
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{diag}")
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                greeting = s.makefile("rb").readline(4096)
                if greeting.startswith(banner):
                    s.sendall(goodbye)
                    return
                last = f"unexpected greeting {greeting!r}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    raise RuntimeError(
        f"{name} did not greet on {host}:{port} within {timeout:.0f}s (last: {last})\n"
        f"{diagnostics()}"
    )


def stop_process_group(proc: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
    """SIGTERM the peer's process group, then SIGKILL whatever is left of it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    # Children the daemon did not reap in time are in its process group too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


def wait_for_match(
    read: Callable[[], str], pattern: str | re.Pattern[str], *, timeout: float, what: str
) -> re.Match[str]:
    """Until ``pattern`` (a regex) matches somewhere in ``read()``."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    deadline = time.monotonic() + timeout
    while True:
        m = rx.search(read())
        if m is not None:
            return m
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{rx.pattern!r} not in {what} after {timeout}s; tail:\n{tail(read())}"
            )
        time.sleep(0.05)


class PeerDaemon:
    """A peer daemon in a directory and a process group of its own, on a free loopback port.

    A context manager: entering starts it (again, on another port, when it lost the
    race for its port) and waits for its banner; leaving stops it and removes the
    directory, as an ``atexit`` hook does if the block is never left. A harness
    says how the peer is called and greets (``name``, ``banner``, ``goodbye``),
    and gives :meth:`_start` (the directory from :meth:`_make_directory`, a free
    ``port``, the process in ``_proc``) and :meth:`diagnostics`.
    """

    host = "127.0.0.1"
    name: ClassVar[str]
    banner: ClassVar[bytes]  # how its greeting starts
    goodbye: ClassVar[bytes]  # what ends the banner check's connection politely

    def __init__(self, *, startup_timeout: float) -> None:
        self.startup_timeout = startup_timeout
        self.port = 0
        self.directory: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        for _ in range(3):
            try:
                self._start()
                self._wait_ready()
                return self
            except PortTaken:
                self.stop()
            except BaseException:
                self.stop()
                raise
        raise RuntimeError(f"could not find a free port for {self.name}")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        raise NotImplementedError

    def _make_directory(self, prefix: str) -> Path:
        """A fresh world-readable directory under /tmp, removed by :meth:`stop`."""
        d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.directory = d
        atexit.register(self.stop)
        os.chmod(d, 0o755)
        return d

    def diagnostics(self) -> str:
        """What the peer said, for an error that it did not start."""
        return ""

    def _wait_ready(self) -> None:
        assert self._proc is not None
        wait_for_banner(
            self._proc,
            self.host,
            self.port,
            banner=self.banner,
            goodbye=self.goodbye,
            timeout=self.startup_timeout,
            name=self.name,
            diagnostics=self.diagnostics,
        )

    def stop(self) -> None:
        """Stop the peer's process group and remove its directory (idempotent)."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                stop_process_group(proc)
        finally:
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None
            atexit.unregister(self.stop)
