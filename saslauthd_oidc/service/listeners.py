"""The daemon's sockets: bound here or taken over from systemd, checked first.

Unix sockets (``server.auth_socket``, ``server.saslauthd_socket``) are created
with their mode and group, never over a socket another process still listens
on; ``server.http_listen``/``http_socket`` are bound the same way; a socket
passed by systemd (socket activation, by the names ``auth``, ``saslauthd`` and
``http``) is checked for family, type and listening before it is adopted. The
errors name the setting and say what to change. :func:`open_listeners` hands
:mod:`.daemon` the trio listeners it serves.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import socket
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
import trio

from saslauthd_oidc.config import Config, ConfigError
from saslauthd_oidc.secret_files import DAEMON_USER
from saslauthd_oidc.service.lifecycle import DrainableListener
from saslauthd_oidc.service.systemd import UNNAMED

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
