"""systemd integration without libsystemd: socket activation and sd_notify.

Socket activation (sd_listen_fds(3)): systemd passes listening sockets as
file descriptors 3, 4, … and describes them in ``LISTEN_FDS`` (how many),
``LISTEN_PID`` (for which process) and ``LISTEN_FDNAMES`` (colon-separated
names, from ``FileDescriptorName=``). :func:`parse_listen_fds` is pure: an
environment mapping and a pid in, a mapping name → fds (or an
:class:`ActivationError`) out. :func:`take_listen_fds` reads the real
environment and removes those variables, as ``sd_listen_fds(unset=1)`` does,
so that children do not inherit them.

Notification (sd_notify(3)): :class:`Notifier` sends ``READY=1``,
``STATUS=…``, ``RELOADING=1``, ``STOPPING=1`` and ``WATCHDOG=1`` as one
datagram each to the AF_UNIX socket named by ``NOTIFY_SOCKET`` (a path, or an
abstract name written with a leading ``@``). Without ``NOTIFY_SOCKET`` it does
nothing. :func:`watchdog_interval` reads ``WATCHDOG_USEC``/``WATCHDOG_PID``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

SD_LISTEN_FDS_START = 3
ACTIVATION_ENV = ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID")
# systemd's name for an fd without FileDescriptorName= (and ours for a lone fd).
UNNAMED = "unknown"
_MAX_FDS = 1024


@dataclass(frozen=True, slots=True)
class ActivationError:
    """The activation variables are present but make no sense; ``detail`` says why."""

    detail: str


def parse_listen_fds(
    env: Mapping[str, str], pid: int
) -> dict[str, list[int]] | ActivationError | None:
    """Name → passed fds, from an environment; None when not socket-activated (or not for us).

    Names come from ``LISTEN_FDNAMES``; without it every fd is ``"unknown"``
    (systemd's own default). Several fds may share a name (two ``ListenStream=``
    in one socket unit).
    """
    count_raw = env.get("LISTEN_FDS")
    if count_raw is None:
        return None
    pid_raw = env.get("LISTEN_PID")
    if pid_raw is not None:
        try:
            target = int(pid_raw)
        except ValueError:
            return ActivationError(f"LISTEN_PID={pid_raw!r} is not a number")
        if target != pid:
            return None  # meant for another process (our parent, before an exec)
    try:
        count = int(count_raw)
    except ValueError:
        return ActivationError(f"LISTEN_FDS={count_raw!r} is not a number")
    if not 0 <= count <= _MAX_FDS:
        return ActivationError(f"LISTEN_FDS={count} is out of range")
    if count == 0:
        return None
    names_raw = env.get("LISTEN_FDNAMES")
    names = names_raw.split(":") if names_raw else [UNNAMED] * count
    if len(names) != count:
        return ActivationError(
            f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count} descriptors"
        )
    fds: dict[str, list[int]] = {}
    for offset, name in enumerate(names):
        fds.setdefault(name or UNNAMED, []).append(SD_LISTEN_FDS_START + offset)
    return fds


def take_listen_fds(
    env: MutableMapping[str, str] | None = None, pid: int | None = None
) -> dict[str, list[int]] | ActivationError | None:
    """:func:`parse_listen_fds` on the process environment, then unset the variables.

    The passed fds are marked close-on-exec, as ``sd_listen_fds`` does.
    """
    environ = os.environ if env is None else env
    result = parse_listen_fds(environ, os.getpid() if pid is None else pid)
    for name in ACTIVATION_ENV:
        environ.pop(name, None)
    if isinstance(result, dict):
        for fds in result.values():
            for fd in fds:
                try:
                    os.set_inheritable(fd, False)
                except OSError as exc:
                    return ActivationError(f"passed fd {fd} is not open: {exc.strerror}")
    return result


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``); None when off."""
    usec_raw = env.get("WATCHDOG_USEC")
    if not usec_raw:
        return None
    pid_raw = env.get("WATCHDOG_PID")
    if pid_raw:
        try:
            if int(pid_raw) != pid:
                return None
        except ValueError:
            return None
    try:
        usec = int(usec_raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000 / 2


def notify_address(value: str | None) -> str | bytes | None:
    """The ``socket.connect`` address for a ``NOTIFY_SOCKET`` value (``@`` = abstract)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other forms are not supported: stay silent


class Notifier:
    """sd_notify over a datagram socket; a no-op when ``NOTIFY_SOCKET`` is unset.

    Failures to send are swallowed (as sd_notify's callers do): losing a
    status line must never stop the daemon.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        self.address = notify_address(environ.get("NOTIFY_SOCKET"))
        self.watchdog = watchdog_interval(environ, os.getpid())
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> bool:
        """Send one datagram of ``KEY=value`` lines (keys upper-cased); True when sent."""
        if self.address is None:
            return False
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        fields = {"READY": "1"}
        if status is not None:
            fields["STATUS"] = status
        return self.send(**fields)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd ≥ 253 (Type=notify-reload) match READY=1 to it.
        return self.send(RELOADING="1", MONOTONIC_USEC=str(time.monotonic_ns() // 1000))

    def stopping(self, status: str | None = None) -> bool:
        fields = {"STOPPING": "1"}
        if status is not None:
            fields["STATUS"] = status
        return self.send(**fields)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def ping(self) -> bool:
        return self.send(WATCHDOG="1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


HTTP_SOCKET_UNIT = "saslauthd-oidc-http.socket"


def unit_enabled(unit: str) -> bool:
    """Whether systemd starts ``unit`` (``systemctl is-enabled`` or ``is-active``).

    False without systemctl or when it cannot tell: only for warnings and
    checks that would otherwise miss what the unit will pass.
    """
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return False
    for verb in ("is-enabled", "is-active"):
        try:
            result = subprocess.run(
                [systemctl, verb, "--quiet", unit],
                capture_output=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        if result.returncode == 0:
            return True
    return False
