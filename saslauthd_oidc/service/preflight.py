"""What ``serve`` would refuse before listening, checked without listening.

``check-config`` and ``serve`` both call :func:`preflight`: sockets that could
not be created (:mod:`.listeners`), TLS trust files and secrets that cannot be
read, and — run as root, as an admin's check-config is — what the daemon's own
user would be refused.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from saslauthd_oidc.config import SYMMETRIC_ALGORITHMS, Config, ConfigError
from saslauthd_oidc.frontends.http_callers import load_caller_auth
from saslauthd_oidc.providers.http import make_ssl_context
from saslauthd_oidc.providers.jwt import KeySet
from saslauthd_oidc.secret_files import DAEMON_USER, SECRET_FILE_ADVICE, read_secret_file
from saslauthd_oidc.service.listeners import (
    _SOCKET_ADVICE,
    _listening,
    _may_bind_low_ports,
    _owner,
    _unprivileged_port_start,
    _user,
    http_problems,
    socket_problems,
)


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
    from saslauthd_oidc.service.workers import worker_problem  # noqa: PLC0415

    problem = worker_problem(config)
    if problem is not None:
        problems.append(problem)
    return Preflight(problems, notes, warnings, degraded)


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
