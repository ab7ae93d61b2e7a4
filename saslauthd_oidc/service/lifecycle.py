"""What the daemon swaps on reload and drains on stop.

* :func:`plan_reload` (pure) compares the running config with a newly loaded
  one: which settings need a restart (``[server]`` and ``[cache]``: sockets,
  listeners, limits, and the cache's size), which providers were removed or
  changed. The config put into service keeps the running ``[server]`` and
  ``[cache]`` so that what runs is what is reported.
* :class:`Current` is what the frontends call: ``authenticate`` delegates to
  the engine in service when the request arrives, so a reload swaps the
  engine atomically and in-flight requests finish on the one they started
  on. It counts requests in flight, and the replies the frontends have
  decided but not yet written (``owe`` / ``paid``, HTTP requests till the
  app returns); :meth:`Current.drain` stops taking new ones and waits
  (bounded) until both are done.
* :class:`DrainableListener` wraps a listening socket so that accepting can
  stop while the connections already accepted carry on.
* :class:`ReloadReport` / :class:`ReloadReporter`: the daemon's answer to a
  reload, one JSON line in ``$RUNTIME_DIRECTORY/reload`` (systemd's
  ``RuntimeDirectory=``), which ``saslauthd-oidc reload`` waits for so that
  ``systemctl reload`` fails when the new configuration was refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import trio

from saslauthd_oidc.config import Config
from saslauthd_oidc.core.engine import Authenticates, Pending, unanswered
from saslauthd_oidc.core.outcome import Verdict
from saslauthd_oidc.core.request import AuthRequest

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    config: Config  # what goes into service
    restart_keys: tuple[str, ...]  # changed settings that only a restart applies
    removed_providers: tuple[str, ...]
    changed_providers: tuple[str, ...]
    added_providers: tuple[str, ...]
    logging_changed: bool


_HTTP_LIMIT_KEYS = frozenset(
    f"http.{name}"
    for name in (
        "max_connections",
        "read_timeout",
        "write_timeout",
        "keepalive_timeout",
        "max_requests_per_connection",
    )
)


def _changed_fields(section: str, old: object, new: object) -> list[str]:
    return [
        f"{section}.{f.name}"
        for f in dataclasses.fields(old)  # type: ignore[arg-type]
        if getattr(old, f.name) != getattr(new, f.name)
    ]


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """How ``new`` replaces ``old`` in a running daemon."""
    restart = _changed_fields("server", old.server, new.server)
    restart += _changed_fields("cache", old.cache, new.cache)
    # The HTTP listener's bounds are set when it starts (frontends/http.py serve_http).
    restart += [k for k in _changed_fields("http", old.http, new.http) if k in _HTTP_LIMIT_KEYS]
    old_providers = {p.name: p for p in old.providers}
    new_providers = {p.name: p for p in new.providers}
    return ReloadPlan(
        config=dataclasses.replace(new, server=old.server, cache=old.cache),
        restart_keys=tuple(restart),
        removed_providers=tuple(n for n in old_providers if n not in new_providers),
        changed_providers=tuple(
            n for n, p in new_providers.items() if n in old_providers and old_providers[n] != p
        ),
        added_providers=tuple(n for n in new_providers if n not in old_providers),
        logging_changed=old.logging != new.logging,
    )


class Current:
    """The engine (and HTTP app) in service; swapped whole on reload, drained on stop."""

    def __init__(self, engine: Authenticates, http_app: AsgiApp | None = None) -> None:
        self.swap(engine, http_app)
        self.in_flight = 0  # requests the engine is deciding
        self.owed = 0  # decided, the reply not yet written (frontends report: owe, paid)
        self.draining = False
        self._idle = trio.Event()
        self._idle.set()

    def _enter(self) -> None:
        if self.in_flight + self.owed == 0:
            self._idle = trio.Event()

    def _leave(self) -> None:
        if self.in_flight + self.owed == 0:
            self._idle.set()

    def owe(self) -> None:
        """A frontend holds a decided request's reply, not yet written."""
        self._enter()
        self.owed += 1

    def paid(self) -> None:
        """That reply is written, or its client gone."""
        self.owed -= 1
        self._leave()

    def swap(self, engine: Authenticates, http_app: AsgiApp | None = None) -> None:
        """Later requests go to ``engine``; those in flight finish where they started."""
        self.engine = engine
        self.http_app = http_app

    async def authenticate(self, request: AuthRequest) -> Verdict:
        if self.draining:
            # Stopping: no new work. The request is never answered; its
            # connection closes when the daemon exits, which Postfix and Exim
            # report as a temporary failure (454), not as a wrong password.
            await trio.sleep_forever()
        engine = self.engine
        self._enter()
        self.in_flight += 1
        try:
            return await engine.authenticate(request)
        finally:
            self.in_flight -= 1
            self._leave()

    def start(self, request: AuthRequest) -> Verdict | Pending:
        """The engine's :meth:`~saslauthd_oidc.core.engine.Engine.start` (nothing while
        draining)."""
        if self.draining:
            return unanswered(request)
        return self.engine.start(request)

    async def finish(self, pending: Pending) -> Verdict:
        """Finish ``pending`` on the engine it started on, counted as in flight."""
        engine = pending.engine
        if engine is None:  # arrived while draining: never answered (see authenticate)
            await trio.sleep_forever()
        assert engine is not None
        self._enter()
        self.in_flight += 1
        try:
            return await engine.finish(pending)
        finally:
            self.in_flight -= 1
            self._leave()

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point that delegates to the HTTP app in service."""
        app = self.http_app
        if app is None:  # pragma: no cover - only mounted when there is an app
            return
        if scope["type"] != "http":  # lifespan lasts as long as the server
            await app(scope, receive, send)
            return
        # The app returns once hypercorn has written its response: counted till then.
        self.owe()
        try:
            await app(scope, receive, send)
        finally:
            self.paid()

    async def drain(self, timeout: float) -> int:
        """Take no new requests; wait up to ``timeout`` s for those in flight
        and for the frontends to write the replies they owe.

        Returns how many were still in flight or owed when the time ran out (0: all done).
        """
        self.draining = True
        with trio.move_on_after(timeout):
            # A request's reply is owed the moment its engine step ends, so the
            # count passes through 0 only when nothing is left; checked again anyway.
            while self.in_flight + self.owed:
                await self._idle.wait()
        return self.in_flight + self.owed


class _Closable(Protocol):
    def close(self) -> None: ...

    def getsockname(self) -> Any: ...


StreamT = TypeVar("StreamT", bound=trio.abc.Stream)
StreamT_co = TypeVar("StreamT_co", bound=trio.abc.Stream, covariant=True)


class Accepting(Protocol[StreamT_co]):
    """What :class:`DrainableListener` wraps: a trio listener, or a worker's own."""

    async def accept(self) -> StreamT_co: ...

    async def aclose(self) -> None: ...


class DrainableListener(trio.abc.Listener[StreamT], Generic[StreamT]):
    """A ``trio.SocketListener`` whose accepting can be stopped on its own.

    After :meth:`stop_accepting`, ``accept`` blocks forever (the serving task
    is cancelled later, with everything else) and the listening socket is
    closed: a connection attempt is refused instead of waiting in a backlog
    nobody reads. A socket passed by systemd stays open in systemd, which
    queues new connections for the next start.
    """

    def __init__(self, inner: Accepting[StreamT], sock: _Closable) -> None:
        self.inner = inner
        self._socket = sock
        self.stopped = False
        self._scope: trio.CancelScope | None = None

    @property
    def socket(self) -> _Closable:
        return self._socket

    async def accept(self) -> StreamT:
        if not self.stopped:
            with trio.CancelScope() as scope:
                self._scope = scope
                try:
                    return await self.inner.accept()
                except trio.ClosedResourceError:
                    if not self.stopped:
                        raise
                finally:
                    self._scope = None
        await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    def stop_accepting(self) -> None:
        self.stopped = True
        if self._scope is not None:
            self._scope.cancel()
        self._socket.close()

    async def aclose(self) -> None:
        await self.inner.aclose()


# --------------------------------------------------------------------------- reload reports

RELOAD_REPORT_FILE = "reload"


@dataclass(frozen=True, slots=True)
class ReloadReport:
    """One answer: ``generation`` counts reloads since start (0: the start itself)."""

    generation: int
    ok: bool
    key: str | None = None  # the config key a refused reload failed on
    message: str = ""

    def render(self) -> str:
        return json.dumps(
            {"generation": self.generation, "ok": self.ok, "key": self.key, "message": self.message}
        )

    @classmethod
    def parse(cls, text: str) -> ReloadReport | None:
        """The report in ``text``, or None when it is not one (absent, half-written...)."""
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        generation, ok = data.get("generation"), data.get("ok")
        key, message = data.get("key"), data.get("message", "")
        if (
            not isinstance(generation, int)
            or isinstance(generation, bool)
            or not isinstance(ok, bool)
            or not (key is None or isinstance(key, str))
            or not isinstance(message, str)
        ):
            return None
        return cls(generation=generation, ok=ok, key=key, message=message)


def read_reload_report(directory: str) -> ReloadReport | None:
    try:
        with open(os.path.join(directory, RELOAD_REPORT_FILE), encoding="utf-8") as f:
            return ReloadReport.parse(f.read())
    except OSError:
        return None


class ReloadReporter:
    """Writes the daemon's reload answers into ``directory`` (None: nowhere)."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory or None
        self.generation = 0

    def _write(self, report: ReloadReport) -> bool:
        if self.directory is None:
            return False
        path = os.path.join(self.directory, RELOAD_REPORT_FILE)
        partial = f"{path}.{os.getpid()}.new"
        try:
            with open(partial, "w", encoding="utf-8") as f:
                f.write(report.render() + "\n")
            os.replace(partial, path)  # readers see the old answer or the new one
        except OSError:
            return False
        return True

    def started(self) -> bool:
        return self._write(ReloadReport(generation=0, ok=True, message="started"))

    def report(self, ok: bool, key: str | None = None, message: str = "") -> ReloadReport:
        self.generation += 1
        answer = ReloadReport(generation=self.generation, ok=ok, key=key, message=message)
        self._write(answer)
        return answer
