"""Process plumbing shared by the peer harnesses (Postfix, Exim, Dovecot).

Each peer runs as a daemon in a session (process group) of its own, on a free
loopback port, and writes a log the tests read. These helpers wait for its
banner, wait for a line in its log, and stop its whole process group.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable


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
