"""Assemble and run the daemon: HTTP client, providers, engine, listeners, signals.

This is the only place that knows how the pieces fit at run time; ``cli``
calls :func:`run_daemon`, tests call it too (in-process) or run ``serve``.

Sockets are bound here, or taken over from systemd (socket activation, by the
names ``auth``, ``saslauthd`` and ``http``). SIGHUP reloads the configuration
(:mod:`.lifecycle`): a broken file is logged and the running configuration
stays. SIGTERM/SIGINT stop accepting, let the authentications in flight
finish (within ``request_timeout``) and return. systemd is told about each
step (READY, RELOADING, STOPPING, STATUS, WATCHDOG) when it listens.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import signal
import socket
import stat
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import httpx
import structlog
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from saslauthd_oidc.config import (
    DAEMON_USER,
    SECRET_FILE_ADVICE,
    SYMMETRIC_ALGORITHMS,
    Config,
    ConfigError,
    load_config,
    read_secret_file,
)
from saslauthd_oidc.engine import Engine
from saslauthd_oidc.frontends.accept import ConnectionTable
from saslauthd_oidc.frontends.dovecot import serve_dovecot_listener
from saslauthd_oidc.frontends.http import (
    CallerAuth,
    HttpFrontend,
    HttpLimits,
    load_caller_auth,
    serve_http,
)
from saslauthd_oidc.frontends.saslauthd import serve_saslauthd_listener
from saslauthd_oidc.lifecycle import Current, DrainableListener, ReloadReporter, plan_reload
from saslauthd_oidc.limits import Caps, budget_for, caps_for, raise_nofile_limit
from saslauthd_oidc.metrics import Metrics
from saslauthd_oidc.observability import configure_logging
from saslauthd_oidc.providers import ProviderRegistry
from saslauthd_oidc.providers.cache import VerificationCache
from saslauthd_oidc.providers.http import make_http_client, make_ssl_context
from saslauthd_oidc.providers.jwt import KeySet
from saslauthd_oidc.request import Mechanism
from saslauthd_oidc.rules import config_warnings
from saslauthd_oidc.systemd import UNNAMED, Notifier

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
    """Bind a Unix stream socket with the configured mode and group (see open_unix_socket)."""
    raw = open_unix_socket(path, mode, group, backlog=backlog, key=key)
    return trio.SocketListener(trio.socket.from_stdlib_socket(raw))


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"mode {stat.S_IMODE(st.st_mode):04o}, {user}:{group}"


_SOCKET_ADVICE = (
    "give the daemon's user write access to that directory, choose one it owns "
    "(e.g. /run/saslauthd-oidc, RuntimeDirectory= in the unit), or let systemd create "
    "the socket (saslauthd-oidc.socket)"
)


POSTFIX_SPOOL = "/var/spool/postfix"


def _postfix_hint(path: str) -> str:
    if not os.path.abspath(path).startswith(POSTFIX_SPOOL + "/"):
        return ""
    return (
        f"; for Postfix's chrooted smtpd, a directory of the daemon's own under {POSTFIX_SPOOL}: "
        f"install -d -o {DAEMON_USER} -g postfix -m 0750 {POSTFIX_SPOOL}/saslauthd-oidc "
        f"(Postfix's own private/ is 0700 postfix)"
    )


def socket_problems(path: str, group: str | None, *, key: str) -> list[ConfigError]:
    """What binding ``path`` with ``group`` would fail on, found without creating anything.

    The one check :func:`open_unix_socket` (serve) and ``check-config`` share: the
    directory must exist or be creatable, and be writable and searchable by this
    user; an existing file there must be a socket; the group must exist and be one
    this user may give a file (root, or a member of it).
    """
    problems: list[ConfigError] = []
    p = Path(path)
    directory = p.parent
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problems.append(ConfigError(key, f"cannot create {path}: {existing} is not a directory"))
    elif not os.access(existing, os.W_OK | os.X_OK, effective_ids=_EFFECTIVE):
        what = "the socket" if existing == directory else f"the directory {directory}"
        problems.append(
            ConfigError(
                key,
                f"cannot create {what} in {existing} ({_owner(existing.stat())}): "
                f"user {_user()} may not write there; {_SOCKET_ADVICE}{_postfix_hint(path)}",
            )
        )
    with contextlib.suppress(OSError):
        if not stat.S_ISSOCK(p.lstat().st_mode):
            problems.append(ConfigError(key, f"{path} exists and is not a socket"))
    if group:
        problems.extend(_group_problems(group, key=f"{key}_group"))
    return problems


def _group_problems(group: str, *, key: str) -> list[ConfigError]:
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return [ConfigError(key, f"no such group {group!r}")]
    if os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups():
        return []
    return [
        ConfigError(
            key,
            f"user {_user()} is not a member of group {group!r}, so it cannot give the "
            f"socket that group: add it (adduser {_user()} {group}, then restart the daemon) "
            "or let systemd create the socket (SocketGroup= in the socket unit)",
        )
    ]


_EFFECTIVE = os.access in os.supports_effective_ids


def open_unix_socket(
    path: str, mode: int, group: str | None, *, backlog: int = 512, key: str = "server.auth_socket"
) -> socket.socket:
    """:func:`open_unix_listener` as a plain listening socket; errors name ``key``."""
    problems = socket_problems(path, group, key=key)
    if problems:
        raise problems[0]
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(key, f"cannot create {p.parent}: {exc.strerror}") from None
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
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ConfigError(
                key, f"cannot create {path}: {exc.strerror} (user {_user()}); {_SOCKET_ADVICE}"
            ) from None
        raise ConfigError(key, f"cannot create {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    try:
        if gid != -1:
            try:
                os.chown(path, -1, gid)
            except OSError as exc:
                raise ConfigError(
                    f"{key}_group", f"cannot give {path} the group {group!r}: {exc.strerror}"
                ) from None
        os.chmod(path, mode)
    except BaseException:
        raw.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    raw.listen(backlog)
    return raw


@dataclass(frozen=True, slots=True)
class Preflight:
    """What ``serve`` would refuse before listening (``problems``), and what to know (``notes``)."""

    problems: list[ConfigError]
    notes: list[str]
    warnings: list[str]
    #: What ``serve`` survives by refusing one listener's callers (``http_problems``)
    #: so that the auth socket stays up; ``check-config`` reports them as errors.
    degraded: list[ConfigError]


def preflight(config: Config, passed: Collection[str] = ()) -> Preflight:
    """Everything ``serve`` checks before it listens, without binding or changing anything.

    ``serve`` refuses to start on the first problem; ``check-config`` prints them
    all. ``passed`` are the socket names systemd passes (``auth``, ``saslauthd``,
    ``http``): their configured paths are not used, so not checked. A path where
    something already listens (systemd's socket unit, the running daemon) is not
    checked either: serve would find it in use, or be handed it.
    """
    problems: list[ConfigError] = []
    notes: list[str] = []
    warnings: list[str] = []
    server = config.server
    sockets = (
        ("auth", server.auth_socket, server.auth_socket_group, "server.auth_socket"),
        (
            "saslauthd",
            server.saslauthd_socket,
            server.saslauthd_socket_group,
            "server.saslauthd_socket",
        ),
        ("http", server.http_socket, server.http_socket_group, "server.http_socket"),
    )
    for name, path, group, key in sockets:
        if not path:
            continue
        if name in passed:
            notes.append(f"{key} {path} is not used: systemd passes the {name!r} socket")
        elif _listening(path) is not False:
            notes.append(
                f"{key} {path}: something listens there already (systemd's socket unit "
                "or a running daemon); not checked"
            )
        else:
            problems.extend(socket_problems(path, group, key=key))
            warnings.extend(_daemon_user_socket_warnings(path, group, key=key))
    http = config.http
    http_enabled = bool(server.http_listen or server.http_socket or "http" in passed)
    degraded = http_problems(config, http_passed="http" in passed)
    if http_enabled and not degraded:
        try:
            load_caller_auth(http)
        except ConfigError as exc:
            problems.append(exc)
        for key, path in (
            ("http.users_file", http.users_file),
            ("http.secret_file", http.secret_file),
        ):
            if path and http.auth != "open":
                warnings.extend(_unreadable_for_daemon(key, path))
    listen = () if "http" in passed else server.http_listen
    for host, port in listen:
        if port < _unprivileged_port_start() and not _may_bind_low_ports():
            problems.append(
                ConfigError(
                    "server.http_listen",
                    f"cannot listen on {host}:{port} as user {_user()}: ports below "
                    f"{_unprivileged_port_start()} need root or CAP_NET_BIND_SERVICE; "
                    "use a port above it (the default is 8480) or let systemd pass the socket",
                )
            )
    for i, provider in enumerate(config.providers):
        if provider.ca_file:
            try:
                make_ssl_context(provider.ca_file)
            except (OSError, ValueError) as exc:
                error = ConfigError(
                    f"provider[{i}].ca_file", f"cannot load {provider.ca_file}: {exc}"
                )
                error.label = f'provider "{provider.name}"'
                problems.append(error)
        files = []
        if provider.introspects and provider.client_secret_file:
            files.append(("client_secret_file", provider.client_secret_file))
        if provider.hmac_secret_file and SYMMETRIC_ALGORITHMS & set(provider.algorithms):
            files.append(("hmac_secret_file", provider.hmac_secret_file))
        for setting, path in files:
            key = f"provider[{i}].{setting}"
            try:
                secret = read_secret_file(key, path)
                if setting == "hmac_secret_file":
                    try:
                        KeySet.with_hmac_secret(secret, provider.algorithms)
                    except ValueError as exc:
                        raise ConfigError(key, f"{path}: {exc}") from None
            except ConfigError as exc:
                exc.label = f'provider "{provider.name}"'
                problems.append(exc)
            else:
                warnings.extend(_unreadable_for_daemon(key, path))
    if config.server.workers > 1 and passed:
        problems.append(
            ConfigError(
                "server.workers",
                "socket activation passes one set of sockets; use workers = 1 with it",
            )
        )
    # Imported here: workers imports this module.
    from saslauthd_oidc.workers import worker_problem  # noqa: PLC0415

    problem = worker_problem(config)
    if problem is not None:
        problems.append(problem)
    return Preflight(problems, notes, warnings, degraded)


_SO_ACCEPTCON = 0x10000
_CAP_NET_BIND_SERVICE = 10


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def _may_bind_low_ports() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return True  # cannot tell: let serve find out
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_NET_BIND_SERVICE & 1)
    return True


def _listening(path: str) -> bool | None:
    """Whether a socket listens at ``path``, without connecting (which would start a
    socket-activated service); None when that cannot be told (no /proc/net/unix)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    try:
        table = Path("/proc/net/unix").read_text("utf-8", "replace")
    except OSError:
        return None
    names = {path, os.path.abspath(path)}
    for line in table.splitlines()[1:]:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] in names and int(fields[3], 16) & _SO_ACCEPTCON:
            return True
    return False


def _daemon_user_socket_warnings(path: str, group: str | None, *, key: str) -> list[str]:
    """Run as root (an admin's check-config): would the daemon's user be refused here?"""
    if os.geteuid() != 0:
        return []
    try:
        user = pwd.getpwnam(DAEMON_USER)
    except KeyError:
        return []
    groups = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    warnings: list[str] = []
    existing = Path(path).parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    with contextlib.suppress(OSError):
        st = existing.stat()
        if st.st_uid == user.pw_uid:
            bits = (st.st_mode >> 6) & 0o7
        elif st.st_gid in groups:
            bits = (st.st_mode >> 3) & 0o7
        else:
            bits = st.st_mode & 0o7
        if bits & 0o3 != 0o3:
            warnings.append(
                f"{key}: the daemon's user {DAEMON_USER} may not create {path} in {existing} "
                f"({_owner(st)}), should serve bind it itself (without a socket unit); "
                f"{_SOCKET_ADVICE}"
            )
    if group:
        with contextlib.suppress(KeyError):
            if grp.getgrnam(group).gr_gid not in groups:
                warnings.append(
                    f"{key}_group: the daemon's user {DAEMON_USER} is not in group {group!r}, "
                    "so it cannot give the socket that group, should serve bind it itself "
                    f"(adduser {DAEMON_USER} {group}, or SocketGroup= in a socket unit)"
                )
    return warnings


def _unreadable_for_daemon(key: str, path: str) -> list[str]:
    """Run as root (an admin's check-config), warn when the daemon's user could not read it."""
    if os.geteuid() != 0:
        return []
    try:
        user = pwd.getpwnam(DAEMON_USER)
        st = os.stat(path)
    except (KeyError, OSError):
        return []
    groups = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    readable = (
        (st.st_uid == user.pw_uid and st.st_mode & stat.S_IRUSR)
        or (st.st_gid in groups and st.st_mode & stat.S_IRGRP)
        or st.st_mode & stat.S_IROTH
    )
    if readable:
        return []
    return [
        f"{key}: {path} ({_owner(st)}) is not readable by the daemon's user {DAEMON_USER}: "
        + SECRET_FILE_ADVICE.format(path=path)
    ]


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


def http_problems(config: Config, *, http_passed: bool) -> list[ConfigError]:
    """What is wrong with serving an http socket systemd passes (empty: nothing).

    Not fatal to ``serve``: an enabled saslauthd-oidc-http.socket must not take
    the auth socket down with it; the daemon serves the other sockets, and the
    http one refuses every introspection caller, until the file is fixed.
    ``check-config`` reports the same as an error.
    """
    http = config.http
    if http_passed and http.auth == "required" and not (http.users_file or http.secret_file):
        return [
            ConfigError(
                "http.auth",
                "systemd passes an http socket: callers must authenticate: set "
                'http.users_file or http.secret_file, or auth = "open" (loopback only); '
                "until then every /introspect caller is refused",
            )
        ]
    return []


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


# --------------------------------------------------------------------------- sockets

PASSED_NAMES = ("auth", "saslauthd", "http")


def _describe(sock: socket.socket) -> str:
    family = getattr(sock.family, "name", str(sock.family))
    kind = getattr(sock.type, "name", str(sock.type))
    return f"{family} {kind}"


def adopt_passed_socket(fd: int, name: str, key: str, *, unix_only: bool) -> socket.socket:
    """The listening socket systemd passed as ``fd``; ConfigError (naming ``key``) if unfit."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(
            key, f"fd {fd} passed by systemd as {name!r} is not a socket: {exc.strerror}"
        ) from None
    families = (socket.AF_UNIX,) if unix_only else (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
    want = "a Unix stream socket (ListenStream=/path)" if unix_only else "a stream socket"
    listening = sock.type == socket.SOCK_STREAM and bool(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    )
    if sock.family not in families or sock.type != socket.SOCK_STREAM or not listening:
        found = _describe(sock) + ("" if listening else ", not listening")
        sock.close()
        raise ConfigError(
            key, f"systemd passed {name!r} (fd {fd}) as {found}; expected a listening {want}"
        )
    sock.setblocking(False)
    return sock


def sort_passed_fds(passed: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Passed fds by the names we know; a lone unnamed fd is ``auth``. ConfigError otherwise."""
    named = {name: list(fds) for name, fds in passed.items()}
    if set(named) == {UNNAMED} and len(named[UNNAMED]) == 1:
        return {"auth": named[UNNAMED]}
    for name, fds in named.items():
        if name not in PASSED_NAMES:
            raise ConfigError(
                "LISTEN_FDNAMES",
                f"systemd passed a socket named {name!r} (fd {fds[0]}); "
                f"expected FileDescriptorName= auth, saslauthd or http",
            )
        if name != "http" and len(fds) > 1:
            raise ConfigError(
                "LISTEN_FDNAMES",
                f"systemd passed {len(fds)} sockets named {name!r}; one is allowed",
            )
    return named


@dataclass
class Listeners:
    """The daemon's listening sockets, bound here or passed by systemd."""

    auth: DrainableListener[Any] | None = None  # a trio socket listener, or a worker's
    saslauthd: DrainableListener[trio.SocketStream] | None = None
    http: list[socket.socket] = field(default_factory=list)
    bound_paths: list[str] = field(default_factory=list)  # socket files this run created
    passed: list[str] = field(default_factory=list)  # names systemd passed

    def stop_accepting(self) -> None:
        for listener in (self.auth, self.saslauthd):
            if listener is not None:
                listener.stop_accepting()

    def close(self) -> None:
        for listener in (self.auth, self.saslauthd):
            if listener is not None:
                listener.socket.close()
        for s in self.http:
            s.close()
        # Only the files this run bound: systemd's, or another daemon's, stay.
        for path in self.bound_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)


class InheritedListener(Protocol):
    """A listener on a socket someone else owns (a worker's ``BalancedListener``)."""

    @property
    def socket(self) -> socket.socket: ...

    async def accept(self) -> trio.abc.Stream: ...

    async def aclose(self) -> None: ...


def _wrap(raw: socket.socket) -> DrainableListener[trio.SocketStream]:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
    return DrainableListener(listener, listener.socket)


def open_listeners(
    config: Config,
    passed: Mapping[str, Sequence[int]] | None = None,
    *,
    auth: InheritedListener | None = None,
) -> Listeners:
    """Take over the sockets systemd passed; bind the configured ones it did not pass.

    ``auth`` is an auth listener someone else owns (a worker's inherited socket).
    """
    server = config.server
    fds = sort_passed_fds(passed) if passed else {}
    out = Listeners(passed=sorted(fds))
    try:
        _log_passed(fds, config)
        if auth is not None:
            out.auth = DrainableListener(auth, auth.socket)
        elif "auth" in fds:
            out.auth = _wrap(
                adopt_passed_socket(fds["auth"][0], "auth", "server.auth_socket", unix_only=True)
            )
        elif server.auth_socket:
            out.auth = _wrap(
                open_unix_socket(
                    server.auth_socket, server.auth_socket_mode, server.auth_socket_group
                )
            )
            out.bound_paths.append(server.auth_socket)
        if "saslauthd" in fds:
            out.saslauthd = _wrap(
                adopt_passed_socket(
                    fds["saslauthd"][0], "saslauthd", "server.saslauthd_socket", unix_only=True
                )
            )
        elif server.saslauthd_socket:
            out.saslauthd = _wrap(
                open_unix_socket(
                    server.saslauthd_socket,
                    server.saslauthd_socket_mode,
                    server.saslauthd_socket_group,
                    key="server.saslauthd_socket",
                )
            )
            out.bound_paths.append(server.saslauthd_socket)
        if "http" in fds:
            for fd in fds["http"]:
                out.http.append(
                    adopt_passed_socket(fd, "http", "server.http_listen", unix_only=False)
                )
        else:
            out.http = open_http_sockets(config)
            if server.http_socket and any(s.family == socket.AF_UNIX for s in out.http):
                out.bound_paths.append(server.http_socket)
    except BaseException:
        out.close()
        raise
    return out


def _log_passed(fds: Mapping[str, Sequence[int]], config: Config) -> None:
    """Say which socket systemd passed, and which configured path is therefore not used."""
    server = config.server
    http = [f"{h}:{p}" for h, p in server.http_listen]
    configured: dict[str, tuple[str, list[str]]] = {
        "auth": ("server.auth_socket", [server.auth_socket] if server.auth_socket else []),
        "saslauthd": (
            "server.saslauthd_socket",
            [server.saslauthd_socket] if server.saslauthd_socket else [],
        ),
        "http": (
            "server.http_listen/http_socket",
            http + ([server.http_socket] if server.http_socket else []),
        ),
    }
    for name, numbers in fds.items():
        served = []
        for fd in numbers:
            try:
                probe = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            with probe:
                address = probe.getsockname()
            served.append(address if isinstance(address, str) else f"{address[0]}:{address[1]}")
        key, paths = configured.get(name, ("", []))
        fields: dict[str, Any] = {"name": name, "socket": served or None}
        unused = [path for path in paths if path not in served]
        if unused:
            fields["not_used"] = unused
            fields["detail"] = (
                f"systemd passes the {name!r} socket; {key} in the config is not used"
            )
        (log.warning if unused else log.info)("socket_activation", **fields)


def _name(listener: DrainableListener[Any]) -> str:
    address = listener.socket.getsockname()
    return address if isinstance(address, str) and address else str(address)


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
        left = await self.current.drain(self.deadline)
        if left:
            log.warning("stopping_with_requests_in_flight", count=left)
        # Let the frontends write the verdicts they just received.
        # (imported here: trio.testing pulls in pytest when it is installed, megabytes
        # of RSS for a helper only the shutdown path uses)
        import trio.testing  # noqa: PLC0415

        with trio.move_on_after(1.0):
            await trio.testing.wait_all_tasks_blocked(0.01)
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

    ``passed_fds`` are systemd's sockets by name (:func:`saslauthd_oidc.systemd.take_listen_fds`).
    ``load`` reads the configuration again on SIGHUP (default: the file it came from).
    ``auth_listener`` listens on an auth socket opened by someone else (a
    worker's, inherited from the parent of ``server.workers``, which owns and
    removes the socket). ``report_dir`` receives the answer to each reload
    (:class:`~saslauthd_oidc.lifecycle.ReloadReporter`; systemd's
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
            metrics.registry.register(ConnectionCollector(tables, nofile))
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
                )
                notifier.ready(status=runtime.status())
                runtime.reports.started()
                task_status.started(engine)
            await runtime.registry.aclose()
    finally:
        listeners.close()
        notifier.close()
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


class ConnectionCollector(Collector):
    """``/metrics``: connections held, their caps and evictions per listener; the fd limit."""

    def __init__(self, tables: Mapping[str, ConnectionTable], nofile: int) -> None:
        self._tables = dict(tables)
        self._nofile = nofile

    def collect(self) -> Iterator[Metric]:
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
