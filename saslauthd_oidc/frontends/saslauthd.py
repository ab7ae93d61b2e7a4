"""The Cyrus saslauthd socket: a thin trio shell around the sans-I/O mux protocol.

One request per connection, as saslauthd does: read the counted strings
(bounded by the protocol's field limits, within ``request_timeout``), ask the
engine (within ``request_timeout``), send the one reply, half-close, drain
what the client still sends, close. A malformed or slow request gets ``NO``
and closes only its own connection. All wire decisions are made by
:mod:`saslauthd_oidc.protocol.saslauthd`; all authentication decisions by the
``authenticate`` callable (the engine).
"""

from __future__ import annotations

import structlog
import trio

from saslauthd_oidc.core.engine import Authenticator
from saslauthd_oidc.core.outcome import Reason, Verdict
from saslauthd_oidc.core.request import AuthRequest
from saslauthd_oidc.frontends.accept import ConnectionTable, NoReplies, Replies, serve_connections
from saslauthd_oidc.protocol.saslauthd import (
    NeedData,
    Rejected,
    Request,
    SaslauthdServerConnection,
    encode_reply,
)

__all__ = ["handle_saslauthd_stream", "serve_saslauthd_listener"]


log = structlog.get_logger("saslauthd_oidc.saslauthd")

_RECEIVE_SIZE = 16384
_DRAIN_LIMIT = 65536  # bytes read and discarded after the reply, at most


async def serve_saslauthd_listener(
    listener: trio.abc.Listener[trio.SocketStream],
    authenticate: Authenticator,
    *,
    request_timeout: float = 5.0,
    max_connections: int = 4096,
    table: ConnectionTable | None = None,  # the cap and its counts, shared with /metrics
    max_password_bytes: int = 16384,
    replies: Replies | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``listener`` forever, at most ``max_connections`` at a time.

    ``replies`` hears of each reply decided but not yet written (the daemon's drain).
    """

    async def serve_one(stream: trio.SocketStream) -> None:
        await handle_saslauthd_stream(
            stream,
            authenticate,
            request_timeout=request_timeout,
            max_password_bytes=max_password_bytes,
            replies=replies,
        )

    await serve_connections(
        listener,
        serve_one,
        max_connections=max_connections,
        table=table,
        task_status=task_status,
    )


async def handle_saslauthd_stream(
    stream: trio.abc.HalfCloseableStream,
    authenticate: Authenticator,
    *,
    request_timeout: float = 5.0,
    max_password_bytes: int = 16384,
    replies: Replies | None = None,
) -> None:
    """Serve one request on ``stream`` and close it. Never raises for anything the client does."""
    connection = SaslauthdServerConnection(max_password_bytes=max_password_bytes)
    owed = replies if replies is not None else NoReplies()
    async with stream:
        try:
            event = await _read_request(stream, connection, request_timeout)
            if isinstance(event, Request):
                verdict = await _verdict_for(authenticate, event.request, request_timeout)
                owed.owe()  # until the reply is written (or the client is gone)
                try:
                    await stream.send_all(encode_reply(verdict))
                finally:
                    owed.paid()
            else:
                log.info(
                    "protocol_error",
                    frontend="saslauthd",
                    reason=event.verdict.reason.value,
                    error=event.verdict.detail,
                )
                await stream.send_all(encode_reply(event.verdict))
            await stream.send_eof()
            await _drain(stream, request_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("client_gone", frontend="saslauthd")


async def _read_request(
    stream: trio.abc.ReceiveStream, connection: SaslauthdServerConnection, timeout: float
) -> Request | Rejected:
    with trio.move_on_after(timeout):
        while True:
            data = bytes(await stream.receive_some(_RECEIVE_SIZE))
            event = connection.receive_data(data)
            if not isinstance(event, NeedData):
                return event
    return Rejected(
        Verdict(
            reason=Reason.MALFORMED_REQUEST,
            detail="request not complete within request_timeout",
        )
    )


async def _verdict_for(
    authenticate: Authenticator, request: AuthRequest, timeout: float
) -> Verdict:
    with trio.move_on_after(timeout):
        try:
            return await authenticate(request)
        except Exception as exc:  # the engine's bug must not take the listener down
            log.error("authenticate_failed", error=type(exc).__name__, exc_info=True)
            return Verdict(reason=Reason.INTERNAL_ERROR, detail="authenticator raised")
    return Verdict(reason=Reason.TIMEOUT, detail="request_timeout exceeded")


async def _drain(stream: trio.abc.ReceiveStream, timeout: float) -> None:
    """Read until the client closes (as saslauthd does), so closing cannot reset the reply."""
    received = 0
    with trio.move_on_after(timeout):
        while received < _DRAIN_LIMIT:
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data:
                return
            received += len(data)
