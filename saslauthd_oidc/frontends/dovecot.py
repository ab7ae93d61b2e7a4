"""The Dovecot auth-client socket: a thin trio shell around the sans-I/O protocol.

This module owns the I/O for the auth socket: accepting connections (bounded,
:mod:`.accept`), handing socket connections to one :class:`~.reactor.Reactor`
per listener (one task, one epoll for all of them), a task per connection for
any other stream (tests' memory streams, a platform without epoll), the line
timeout, serialised writes, and what happens when a client vanishes. All wire
decisions are made by :mod:`saslauthd_oidc.protocol.dovecot`; all
authentication decisions by the engine
(:class:`~saslauthd_oidc.core.engine.Authenticates`: ``start`` decides
without I/O when it can, ``finish`` does the rest).

The hot path, a request whose verdict needs no I/O (a cached token, a JWT
whose keys are fresh), is one ``recv``, the protocol and the engine's
``start`` inline, and one ``send``: no task, no timer, no cancel scope of its
own. On the task path (:func:`handle_dovecot_stream`) a socket connection is
read and written directly, waiting only when the kernel says it would block
(``trio.lowlevel.wait_readable`` / ``wait_writable``); any other stream goes
through ``receive_some`` / ``send_all``. Only a request that needs I/O gets a
task.

``line_timeout`` is one deadline per connection, moved in place:
``line_timeout`` seconds for the first line after connecting, for each line
once its first byte has arrived, and for a blocked send of replies; no
deadline while the client is idle between lines (Postfix holds its
connection open between logins).
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
import socket
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import structlog
import trio

from saslauthd_oidc.core.engine import Authenticates, Authenticator
from saslauthd_oidc.core.outcome import Outcome, Reason, Verdict
from saslauthd_oidc.core.request import AuthRequest, Mechanism
from saslauthd_oidc.frontends import reactor as _reactor
from saslauthd_oidc.frontends.accept import (
    Connection,
    ConnectionTable,
    NoReplies,
    Replies,
    serve_connections,
)
from saslauthd_oidc.frontends.reactor import Reactor, log_protocol_error
from saslauthd_oidc.protocol.dovecot import DovecotServerConnection, NeedVerdict, ProtocolError

__all__ = [
    "Authenticator",
    "handle_dovecot_stream",
    "serve_dovecot_listener",
]

log = structlog.get_logger("saslauthd_oidc.dovecot")

_RECEIVE_SIZE = 65536

#: The stdlib socket class the reader wraps the descriptor in (a seam for the structural tests).
_RawSocket = socket.socket


@runtime_checkable
class _Steps(Protocol):
    """What a session needs of the engine: a verdict now, or something to finish later."""

    def start(self, request: AuthRequest) -> Verdict | Any: ...

    async def finish(self, pending: Any) -> Verdict: ...


class _Later:
    __slots__ = ("request",)

    def __init__(self, request: AuthRequest) -> None:
        self.request = request


class _Deferred:
    """A plain ``async (request) -> Verdict`` callable (tests, tools) as :class:`_Steps`.

    It decides nothing inline; it gets the deadline and the catch-all the
    engine's own ``finish`` has.
    """

    def __init__(self, authenticate: Authenticator, request_timeout: float) -> None:
        self._authenticate = authenticate
        self._timeout = request_timeout

    def start(self, request: AuthRequest) -> _Later:
        return _Later(request)

    async def finish(self, pending: _Later) -> Verdict:
        with trio.move_on_after(self._timeout):
            try:
                return await self._authenticate(pending.request)
            except Exception as exc:  # the engine's bug must not take the connection down
                log.error("authenticate_failed", error=type(exc).__name__, exc_info=True)
                return Verdict(reason=Reason.INTERNAL_ERROR, detail="authenticator raised")
        return Verdict(reason=Reason.TIMEOUT, detail="request_timeout exceeded")


def _steps(authenticate: Authenticates | Authenticator, request_timeout: float) -> _Steps:
    if isinstance(authenticate, _Steps):  # the engine, lifecycle.Current
        return authenticate
    return _Deferred(authenticate, request_timeout)


class _Answers:
    """The engine's steps for the reactor, each with the connection's catch-all."""

    __slots__ = ("_steps", "tempfail_disconnect")

    def __init__(self, steps: _Steps, *, tempfail_disconnect: bool) -> None:
        self._steps = steps
        self.tempfail_disconnect = tempfail_disconnect

    def start(self, need: NeedVerdict) -> Verdict | Any:
        try:
            return self._steps.start(need.request)
        except Exception as exc:  # the engine's bug must not take the connection down
            return _raised(need, exc)

    async def finish(self, need: NeedVerdict, pending: Any) -> Verdict:
        try:
            return await self._steps.finish(pending)
        except Exception as exc:  # finish has its own catch-all; this is the connection's
            return _raised(need, exc)


def _raised(need: NeedVerdict, exc: Exception) -> Verdict:
    log.error(
        "authenticate_failed",
        request_id=need.request_id,
        error=type(exc).__name__,
        exc_info=True,
    )
    return Verdict(reason=Reason.INTERNAL_ERROR, detail="authenticator raised")


async def serve_dovecot_listener(
    listener: trio.abc.Listener[Any],  # any stream: a worker's listener counts its connections
    authenticate: Authenticates | Authenticator,
    *,
    mechanisms: Sequence[Mechanism],
    tempfail_disconnect: bool = False,
    request_timeout: float = 5.0,
    max_connections: int = 4096,
    table: ConnectionTable | None = None,  # the cap and its counts, shared with /metrics
    line_timeout: float = 30.0,
    replies: Replies | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``listener`` forever, at most ``max_connections`` at a time.

    ``authenticate`` is the engine (or ``lifecycle.Current``): its ``start`` /
    ``finish`` steps; a plain async callable is accepted too (it is never
    answered inline and is bounded by ``request_timeout`` here). ``replies``
    hears of each reply decided but not yet written (the daemon's drain).
    Socket connections are served by one :class:`~.reactor.Reactor` (Linux);
    any other stream by a task of its own.
    """
    cuids = itertools.count(1)
    spid = os.getpid()
    steps = _steps(authenticate, request_timeout)
    owed = replies if replies is not None else NoReplies()

    async def serve_one(stream: trio.abc.Stream) -> None:
        await _serve_stream(
            stream,
            steps,
            mechanisms=mechanisms,
            spid=spid,
            cuid=next(cuids),
            tempfail_disconnect=tempfail_disconnect,
            line_timeout=line_timeout,
            replies=owed,
        )

    if not _reactor.available:  # pragma: no cover - the daemon runs on Linux
        await serve_connections(
            listener,
            serve_one,
            max_connections=max_connections,
            table=table,
            task_status=task_status,
        )
        return

    def make_proto() -> DovecotServerConnection:
        return DovecotServerConnection(
            mechanisms, spid=spid, cuid=next(cuids), cookie=secrets.token_hex(16)
        )

    async with trio.open_nursery() as nursery:
        reactor = Reactor(
            nursery,
            _Answers(steps, tempfail_disconnect=tempfail_disconnect),
            line_timeout=line_timeout,
            replies=owed,
            raw_socket=lambda fileno: _RawSocket(fileno=fileno),
        )
        nursery.start_soon(reactor.run, name="dovecot-reactor")

        def adopt(record: Connection) -> bool:
            return reactor.adopt(record, make_proto)

        await serve_connections(
            listener,
            serve_one,
            max_connections=max_connections,
            table=table,
            adopt=adopt,
            task_status=task_status,
        )
        # Stopped accepting: the reactor's connections go on to their end, as tasks' do.
        await reactor.wait_empty()
        nursery.cancel_scope.cancel()


async def handle_dovecot_stream(
    stream: trio.abc.Stream,
    authenticate: Authenticates | Authenticator,
    *,
    mechanisms: Sequence[Mechanism],
    spid: int,
    cuid: int,
    tempfail_disconnect: bool = False,
    request_timeout: float = 5.0,
    line_timeout: float = 30.0,
) -> None:
    """Serve one auth-client connection until EOF, a fatal protocol error or disconnect.

    A client gets ``line_timeout`` seconds for its first line after connecting,
    for each line once its first byte has arrived, and for taking each batch
    of replies; past that it is disconnected (slow-loris). A connection idle
    between lines is kept: Postfix holds one open between logins.
    Never raises for anything the client does; closes ``stream`` on return.
    """
    await _serve_stream(
        stream,
        _steps(authenticate, request_timeout),
        mechanisms=mechanisms,
        spid=spid,
        cuid=cuid,
        tempfail_disconnect=tempfail_disconnect,
        line_timeout=line_timeout,
        replies=NoReplies(),
    )


async def _serve_stream(
    stream: trio.abc.Stream,
    steps: _Steps,
    *,
    mechanisms: Sequence[Mechanism],
    spid: int,
    cuid: int,
    tempfail_disconnect: bool,
    line_timeout: float,
    replies: Replies,
) -> None:
    connection = DovecotServerConnection(
        mechanisms, spid=spid, cuid=cuid, cookie=secrets.token_hex(16)
    )
    log.debug("connection_open", cuid=cuid)
    async with stream:
        raw = _raw_socket(stream)
        try:
            await _Session(
                stream,
                raw,
                connection,
                steps,
                tempfail_disconnect=tempfail_disconnect,
                line_timeout=line_timeout,
                replies=replies,
            ).run()
        finally:
            if raw is not None:
                raw.detach()  # the stream owns the descriptor and closes it
    log.debug("connection_closed", cuid=cuid, client_pid=connection.client_pid)


def _raw_socket(stream: trio.abc.Stream) -> socket.socket | None:
    """A second (non-owning) stdlib socket object on the stream's descriptor, if it has one.

    trio's own socket wrapper has no synchronous ``recv``/``send``; this one
    does, on the same non-blocking descriptor, and is detached (not closed)
    when the connection ends. Only public trio API: ``SocketStream.socket``
    and its ``fileno()``.
    """
    inner = getattr(stream, "socket", None)  # trio.SocketStream, workers' counted stream
    if not isinstance(inner, trio.socket.SocketType):
        return None
    try:
        raw = _RawSocket(fileno=inner.fileno())
    except OSError:
        return None
    raw.setblocking(False)
    return raw


class _Session:
    """One connection: the reader, and a task per verdict that needs I/O."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        raw: socket.socket | None,
        connection: DovecotServerConnection,
        steps: _Steps,
        *,
        tempfail_disconnect: bool,
        line_timeout: float,
        replies: Replies,
    ) -> None:
        self._replies = replies
        self._stream = stream
        self._raw = raw
        self._fd = raw.fileno() if raw is not None else -1
        self._connection = connection
        self._steps = steps
        self._tempfail_disconnect = tempfail_disconnect
        self._line_timeout = line_timeout
        self._write_lock = trio.Lock()
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        # The connection's one deadline is min(read, send); inf while idle.
        self._read_deadline = math.inf
        self._send_deadline = math.inf
        self._hung_up = False  # we ended the connection on purpose (not a timeout)
        # The accept loop's record of activity (frontends/accept.py GuardedStream):
        # the raw-socket path bypasses the stream, so complete lines are reported.
        self._mark_active = getattr(stream, "mark_active", None)

    # ------------------------------------------------------------------ deadline

    def _set_deadline(self, *, read: float | None = None, send: float | None = None) -> None:
        if read is not None:
            self._read_deadline = read
        if send is not None:
            self._send_deadline = send
        self._scope.deadline = min(self._read_deadline, self._send_deadline)

    def _hang_up(self) -> None:
        self._hung_up = True
        self._scope.cancel()

    # --------------------------------------------------------------------- run

    async def run(self) -> None:
        connection = self._connection
        self._set_deadline(read=trio.current_time() + self._line_timeout)  # first line owed
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._send(connection.handshake())
                await self._read_loop()
                # EOF or an unrecoverable protocol error: in-flight requests are moot.
                nursery.cancel_scope.cancel()
        if self._scope.cancelled_caught and not self._hung_up:
            if self._send_deadline <= self._read_deadline:
                # A client that does not read its replies must not hold us forever.
                log.info("send_timeout", cuid=connection.cuid)
            else:
                log.info(
                    "line_timeout",
                    cuid=connection.cuid,
                    partial_bytes=connection.buffered_bytes,
                    in_flight=connection.in_flight,
                )

    async def _read_loop(self) -> None:
        connection = self._connection
        # When the line being received began (the first one is owed from the
        # start); None while the client is idle between complete lines.
        line_started: float | None = trio.current_time()
        while not connection.closed:
            data = await self._receive()
            answered = 0
            for event in connection.receive_data(data):
                if isinstance(event, ProtocolError):
                    _log_protocol_error(event)
                    continue
                if answered:
                    # A client that pipelines many requests must not keep the
                    # others waiting for all of its inline verdicts.
                    await trio.lowlevel.checkpoint()
                answered += 1
                if not self._verdict(event):  # tempfail = disconnect
                    await self._flush()
                    self._hang_up()
                    return
            if b"\n" in data:
                if self._mark_active is not None:
                    self._mark_active()
                if connection.partial_line:
                    line_started = trio.current_time()
                    self._set_deadline(read=line_started + self._line_timeout)
                elif line_started is not None:
                    line_started = None
                    self._set_deadline(read=math.inf)
            elif line_started is None and connection.partial_line:
                line_started = trio.current_time()
                self._set_deadline(read=line_started + self._line_timeout)
            # Sending before reading more gives a client that never reads our
            # replies backpressure instead of an ever-growing output queue.
            await self._flush()

    def _verdict(self, need: NeedVerdict) -> bool:
        """Answer ``need`` inline, or start its task; False: hang up instead."""
        try:
            step = self._steps.start(need.request)
        except Exception as exc:  # the engine's bug must not take the connection down
            log.error(
                "authenticate_failed",
                request_id=need.request_id,
                error=type(exc).__name__,
                exc_info=True,
            )
            step = Verdict(reason=Reason.INTERNAL_ERROR, detail="authenticator raised")
        if not isinstance(step, Verdict):
            assert self._nursery is not None
            self._nursery.start_soon(self._finish, need, step)
            return True
        if self._tempfail_disconnect and step.outcome is Outcome.TEMPFAIL:
            self._tempfail(need)
            return False
        error = self._connection.conclude(need.request_id, step)
        if error is not None:
            _log_protocol_error(error)
        return True

    async def _finish(self, need: NeedVerdict, pending: Any) -> None:
        try:
            verdict = await self._steps.finish(pending)
        except Exception as exc:  # finish has its own catch-all; this is the connection's
            log.error(
                "authenticate_failed",
                request_id=need.request_id,
                error=type(exc).__name__,
                exc_info=True,
            )
            verdict = Verdict(reason=Reason.INTERNAL_ERROR, detail="authenticator raised")
        if self._tempfail_disconnect and verdict.outcome is Outcome.TEMPFAIL:
            self._tempfail(need)
            await self._flush()  # what other requests were answered still goes out
            self._hang_up()
            return
        self._replies.owe()  # until it is written (or the client is gone)
        try:
            error = self._connection.conclude(need.request_id, verdict)
            if error is not None:
                _log_protocol_error(error)
            await self._flush()
        finally:
            self._replies.paid()

    def _tempfail(self, need: NeedVerdict) -> None:
        # Postfix turns every FAIL into 535 and reads it before noticing a
        # close, so only hanging up *instead of* answering gives a 454.
        log.info("tempfail_disconnect", request_id=need.request_id)

    # ---------------------------------------------------------------------- I/O

    async def _receive(self) -> bytes:
        """The next bytes from the client; ``b""`` at EOF or when it is gone."""
        raw = self._raw
        if raw is None:
            try:
                return bytes(await self._stream.receive_some(_RECEIVE_SIZE))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            try:
                return raw.recv(_RECEIVE_SIZE)
            except BlockingIOError:
                continue  # spurious wake-up
            except OSError:  # reset by the peer
                return b""

    async def _flush(self) -> None:
        connection = self._connection
        if not connection.has_output:
            return
        lock = self._write_lock
        if lock.locked():  # a blocked send is under way: queue behind it, in order
            async with lock:
                await self._send(connection.data_to_send())
            return
        data = connection.data_to_send()
        raw = self._raw
        if raw is None:
            lock.acquire_nowait()
            try:
                await self._send(data)
            finally:
                lock.release()
            return
        try:
            sent = raw.send(data)  # the hot path: the socket takes it all at once
        except BlockingIOError:
            sent = 0
        except OSError:
            self._gone()
            return
        if sent < len(data):
            lock.acquire_nowait()
            try:
                await self._send(memoryview(data)[sent:])
            finally:
                lock.release()

    async def _send(self, data: bytes | memoryview) -> None:
        """All of ``data``, within ``line_timeout`` (the connection's deadline meanwhile)."""
        if not data:
            return
        self._set_deadline(send=trio.current_time() + self._line_timeout)
        raw = self._raw
        try:
            if raw is None:
                await self._stream.send_all(data)
            else:
                view = memoryview(data)
                while view:
                    await trio.lowlevel.wait_writable(self._fd)
                    try:
                        view = view[raw.send(view) :]
                    except BlockingIOError:
                        continue
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._gone()
            return
        self._set_deadline(send=math.inf)

    def _gone(self) -> None:
        """The client is gone: its in-flight requests go with it."""
        self._send_deadline = math.inf
        self._hang_up()


_log_protocol_error = log_protocol_error
