"""File-descriptor budgets: how many connections each listener may hold at once.

Every connection costs one descriptor, and all listeners share the process's
``RLIMIT_NOFILE``. Left alone, whichever side is flooded first (the HTTP
port, or idle auth connections) takes every descriptor, and the auth socket
stops accepting Postfix's connections. So the limit is split up front:

* a **reserve** for what is not a connection: standard streams, the event
  loop, the listening sockets, the log, the configuration and secret files
  read on reload, DNS lookups (32 plus 1/32 of the limit);
* **outbound** connections to the identity providers (each HTTP client's
  pool size, ``providers.http.MAX_OUTBOUND``);
* the rest among the listeners that are configured, by weight: the auth
  socket 6, the saslauthd socket 2, the HTTP listener 2 (the HTTP share is
  always below the auth socket's).

A configured cap above its share is lowered to the share (logged, and a
``check-config`` warning); an unset cap is the default (``DEFAULT_*``)
within the share. At start the daemon raises the soft limit toward the hard
one (:func:`raise_nofile_limit`), so the shares are computed from the limit
it actually obtained.

Pure except :func:`raise_nofile_limit` and :func:`current_nofile_limit`.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from saslauthd_oidc.config import Config

#: The soft limit the daemon raises itself to (at most the hard limit).
TARGET_NOFILE = 65536
#: Connection caps when none is configured (still within the share).
DEFAULT_AUTH_CONNECTIONS = 4096
DEFAULT_HTTP_CONNECTIONS = 256
#: Pool size of one outbound HTTP client (providers/http.py MAX_OUTBOUND).
OUTBOUND_PER_CLIENT = 20

_WEIGHTS = {"auth": 6, "saslauthd": 2, "http": 2}


@dataclass(frozen=True, slots=True)
class Budget:
    """Descriptors per purpose, out of ``limit``; a listener not in use has 0."""

    limit: int
    reserve: int
    outbound: int
    auth: int
    saslauthd: int
    http: int

    def describe(self) -> dict[str, int]:
        return {
            "nofile": self.limit,
            "reserve": self.reserve,
            "outbound": self.outbound,
            "auth": self.auth,
            "saslauthd": self.saslauthd,
            "http": self.http,
        }


def split(limit: int, *, auth: bool, saslauthd: bool, http: bool, outbound: int) -> Budget:
    """Share ``limit`` descriptors among the listeners in use (each gets at least 1)."""
    reserve = 32 + limit // 32
    available = max(0, limit - reserve - outbound)
    used = {"auth": auth, "saslauthd": saslauthd, "http": http}
    weight = sum(w for name, w in _WEIGHTS.items() if used[name])
    shares = {
        name: max(1, available * w // weight) if used[name] and weight else 0
        for name, w in _WEIGHTS.items()
    }
    return Budget(limit, reserve, outbound, shares["auth"], shares["saslauthd"], shares["http"])


def budget_for(
    config: Config,
    limit: int,
    *,
    auth: bool | None = None,
    saslauthd: bool | None = None,
    http: bool | None = None,
) -> Budget:
    """The budget under ``limit`` descriptors of the listeners in use (default: configured)."""
    server = config.server
    clients = 1 + sum(1 for p in config.providers if p.ca_file)
    return split(
        limit,
        auth=bool(server.auth_socket) if auth is None else auth,
        saslauthd=bool(server.saslauthd_socket) if saslauthd is None else saslauthd,
        http=bool(server.http_listen or server.http_socket) if http is None else http,
        outbound=OUTBOUND_PER_CLIENT * clients,
    )


@dataclass(frozen=True, slots=True)
class Caps:
    """The connection caps in force, and what was lowered to fit the budget."""

    auth: int
    saslauthd: int
    http: int
    lowered: tuple[tuple[str, int, int], ...] = ()  # (key, configured, used)


def caps_for(config: Config, budget: Budget) -> Caps:
    """Configured (or default) caps, each at most its listener's share."""
    lowered: list[tuple[str, int, int]] = []

    def cap(key: str, configured: int | None, default: int, share: int) -> int:
        if configured is None:
            return max(1, min(default, share))
        if configured > share:
            lowered.append((key, configured, share))
            return max(1, share)
        return configured

    configured = config.server.max_connections
    return Caps(
        auth=cap("server.max_connections", configured, DEFAULT_AUTH_CONNECTIONS, budget.auth),
        saslauthd=cap(
            "server.max_connections", configured, DEFAULT_AUTH_CONNECTIONS, budget.saslauthd
        )
        if budget.saslauthd
        else 0,
        http=cap(
            "http.max_connections",
            config.http.max_connections,
            DEFAULT_HTTP_CONNECTIONS,
            budget.http,
        )
        if budget.http
        else 0,
        lowered=tuple(dict.fromkeys(lowered)),
    )


def planned_limit(soft: int, hard: int) -> int:
    """The soft limit :func:`raise_nofile_limit` would obtain from ``(soft, hard)``."""
    if hard == resource.RLIM_INFINITY or hard < 0:
        return max(soft, TARGET_NOFILE)
    return max(soft, min(hard, TARGET_NOFILE))


def current_nofile_limit() -> tuple[int, int]:
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_nofile_limit() -> tuple[int, int, str | None]:
    """Raise the soft RLIMIT_NOFILE toward the hard limit; (before, after, error or None)."""
    soft, hard = current_nofile_limit()
    want = planned_limit(soft, hard)
    if want <= soft:
        return soft, soft, None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError) as exc:
        return soft, soft, str(exc)
    return soft, current_nofile_limit()[0], None


def limit_warnings(config: Config, soft: int, hard: int) -> list[str]:
    """``check-config`` warnings: caps the descriptor limit ``serve`` would get cannot hold."""
    limit = planned_limit(soft, hard)
    caps = caps_for(config, budget_for(config, limit))
    return [
        f"{key} = {configured} does not fit the descriptor limit: with RLIMIT_NOFILE "
        f"{limit} serve allows {used}; raise LimitNOFILE= in the systemd unit "
        f"(the shipped unit sets 65536) or lower {key}"
        for key, configured, used in caps.lowered
    ]
