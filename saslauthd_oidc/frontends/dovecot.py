"""The Dovecot auth-client socket: a thin trio shell around the sans-I/O protocol.

This module owns the I/O for the auth socket: accepting connections (bounded),
one task per connection, one task per pending authentication, the per-request
timeout, serialised writes, and what happens when a client vanishes. When an
``authenticate_now`` callable is given (the engine's no-I/O fast path), a
request it can answer at once (a cached token, a JWT whose keys are fresh) is
answered by the connection's reader without a task or timer of its own; only
requests that need I/O get a task. All wire
decisions are made by :mod:`saslauthd_oidc.protocol.dovecot`; all
authentication decisions by the ``authenticate`` callable (the engine).
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
import trio

from saslauthd_oidc.frontends.accept import ConnectionTable, serve_connections
from saslauthd_oidc.outcome import Outcome, Reason, Verdict
from saslauthd_oidc.protocol.dovecot import DovecotServerConnection, NeedVerdict
from saslauthd_oidc.request import AuthRequest, Mechanism

__all__ = [
    "Authenticator",
    "InlineAuthenticator",
    "handle_dovecot_stream",
    "serve_dovecot_listener",
]

Authenticator = Callable[[AuthRequest], Awaitable[Verdict]]
#: The engine's no-I/O fast path: a verdict now, or None when it needs a task.
InlineAuthenticator = Callable[[AuthRequest], Verdict | None]

log = structlog.get_logger("saslauthd_oidc.dovecot")

_RECEIVE_SIZE = 65536


async def serve_dovecot_listener(
    listener: trio.abc.Listener[Any],  # any stream: a worker's listener counts its connections
    authenticate: Authenticator,
    *,
    mechanisms: Sequence[Mechanism],
    tempfail_disconnect: bool = False,
    request_timeout: float = 5.0,
    max_connections: int = 4096,
    table: ConnectionTable | None = None,  # the cap and its counts, shared with /metrics
    line_timeout: float = 30.0,
    authenticate_now: InlineAuthenticator | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``listener`` forever, at most ``max_connections`` at a time."""
    cuids = itertools.count(1)
    spid = os.getpid()

    async def serve_one(stream: trio.abc.Stream) -> None:
        await handle_dovecot_stream(
            stream,
            authenticate,
            mechanisms=mechanisms,
            spid=spid,
            cuid=next(cuids),
            tempfail_disconnect=tempfail_disconnect,
            request_timeout=request_timeout,
            line_timeout=line_timeout,
            authenticate_now=authenticate_now,
        )

    await serve_connections(
        listener,
        serve_one,
        max_connections=max_connections,
        table=table,
        task_status=task_status,
    )


async def handle_dovecot_stream(
    stream: trio.abc.Stream,
    authenticate: Authenticator,
    *,
    mechanisms: Sequence[Mechanism],
    spid: int,
    cuid: int,
    tempfail_disconnect: bool = False,
    request_timeout: float = 5.0,
    line_timeout: float = 30.0,
    authenticate_now: InlineAuthenticator | None = None,
) -> None:
    """Serve one auth-client connection until EOF, a fatal protocol error or disconnect.

    A client gets ``line_timeout`` seconds for its first line after connecting,
    for each line once its first byte has arrived, and for taking each batch
    of replies; past that it is disconnected (slow-loris). A connection idle
    between lines is kept: Postfix holds one open between logins.
    Never raises for anything the client does; closes ``stream`` on return.
    """
    connection = DovecotServerConnection(
        mechanisms, spid=spid, cuid=cuid, cookie=secrets.token_hex(16)
    )
    session = _Session(
        stream,
        connection,
        authenticate,
        request_timeout,
        tempfail_disconnect,
        line_timeout=line_timeout,
        authenticate_now=authenticate_now,
    )
    log.debug("connection_open", cuid=cuid)
    async with stream:
        await session.run()
    log.debug("connection_closed", cuid=cuid, client_pid=connection.client_pid)


class _Session:
    """One connection's tasks: the reader and one task per pending verdict."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        connection: DovecotServerConnection,
        authenticate: Authenticator,
        request_timeout: float,
        tempfail_disconnect: bool,
        *,
        line_timeout: float = 30.0,
        authenticate_now: InlineAuthenticator | None = None,
    ) -> None:
        self._stream = stream
        self._line_timeout = line_timeout
        self._authenticate_now = authenticate_now
        self._connection = connection
        self._authenticate = authenticate
        self._request_timeout = request_timeout
        self._tempfail_disconnect = tempfail_disconnect
        self._write_lock = trio.Lock()
        self._cancel_scope = trio.CancelScope()

    async def run(self) -> None:
        with self._cancel_scope:
            async with trio.open_nursery() as nursery:
                await self._send(self._connection.handshake())
                await self._read_loop(nursery)
                # EOF or an unrecoverable protocol error: in-flight requests are moot.
                nursery.cancel_scope.cancel()

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        connection = self._connection
        # When the line being received began (the first one is owed from the
        # start); None while the client is idle between complete lines.
        line_started: float | None = trio.current_time()
        while not connection.closed:
            deadline = math.inf if line_started is None else line_started + self._line_timeout
            data = None
            with trio.move_on_at(deadline):
                try:
                    data = bytes(await self._stream.receive_some(_RECEIVE_SIZE))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
            if data is None:
                log.info(
                    "line_timeout",
                    cuid=connection.cuid,
                    partial_bytes=connection.buffered_bytes,
                    in_flight=connection.in_flight,
                )
                return
            for index, need in enumerate(connection.receive_data(data)):
                if index:
                    # A client that pipelines many requests must not keep the
                    # others waiting for all of its inline verdicts.
                    await trio.lowlevel.checkpoint()
                verdict = self._verdict_now(need)
                if verdict is None:
                    nursery.start_soon(self._conclude_one, need)
                elif self._tempfail_disconnect and verdict.outcome is Outcome.TEMPFAIL:
                    log.info("tempfail_disconnect", request_id=need.request_id)
                    self._log_protocol_errors()
                    await self._flush()
                    self._cancel_scope.cancel()
                    return
                else:
                    connection.conclude(need.request_id, verdict)
            if b"\n" in data:
                line_started = trio.current_time() if connection.partial_line else None
            elif line_started is None and connection.partial_line:
                line_started = trio.current_time()
            self._log_protocol_errors()
            # Sending before reading more gives a client that never reads our
            # replies backpressure instead of an ever-growing output queue.
            await self._flush()

    async def _conclude_one(self, need: NeedVerdict) -> None:
        verdict = await self._verdict_for(need)
        if self._tempfail_disconnect and verdict.outcome is Outcome.TEMPFAIL:
            # Postfix turns every FAIL into 535 and reads it before noticing a
            # close, so only hanging up *instead of* answering gives a 454.
            log.info("tempfail_disconnect", request_id=need.request_id)
            await self._flush()
            self._cancel_scope.cancel()
            return
        self._connection.conclude(need.request_id, verdict)
        await self._flush()

    def _verdict_now(self, need: NeedVerdict) -> Verdict | None:
        if self._authenticate_now is None:
            return None
        try:
            return self._authenticate_now(need.request)
        except Exception as exc:  # the engine's bug must not take the connection down
            log.error(
                "authenticate_failed",
                request_id=need.request_id,
                error=type(exc).__name__,
                exc_info=True,
            )
            return Verdict(reason=Reason.INTERNAL_ERROR, detail="authenticator raised")

    async def _verdict_for(self, need: NeedVerdict) -> Verdict:
        with trio.move_on_after(self._request_timeout):
            try:
                return await self._authenticate(need.request)
            except Exception as exc:  # the engine's bug must not take the connection down
                log.error(
                    "authenticate_failed",
                    request_id=need.request_id,
                    error=type(exc).__name__,
                    exc_info=True,
                )
                return Verdict(reason=Reason.INTERNAL_ERROR, detail="authenticator raised")
        return Verdict(reason=Reason.TIMEOUT, detail="request_timeout exceeded")

    async def _flush(self) -> None:
        if not self._connection.has_output:
            return
        # Uncontended (the usual case), taking the lock costs no trip to the scheduler.
        try:
            self._write_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._write_lock.acquire()
        try:
            data = self._connection.data_to_send()
            if data:
                await self._send(data)
        finally:
            self._write_lock.release()

    async def _send(self, data: bytes) -> None:
        try:
            with trio.move_on_after(self._line_timeout) as scope:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The client is gone: its in-flight requests go with it.
            self._cancel_scope.cancel()
            return
        if scope.cancelled_caught:
            # A client that does not read its replies must not hold us forever.
            log.info("send_timeout", cuid=self._connection.cuid)
            self._cancel_scope.cancel()

    def _log_protocol_errors(self) -> None:
        for error in self._connection.take_protocol_errors():
            log.info("protocol_error", request_id=error.request_id, error=error.message)
