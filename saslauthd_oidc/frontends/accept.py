"""The accept loop every listener shares: bounded, fair between peers, resilient to running out.

At most ``max_connections`` connections are served at once (the listener's
share of the descriptor budget, :mod:`saslauthd_oidc.service.limits`). When a new
connection arrives at the cap, it is served all the same and the
longest-idle connection of the *peer holding the most* is closed to make
room, as Dovecot's ``client_limit`` does with its oldest idle client: a
peer is the client's uid (``SO_PEERCRED``) on a Unix socket, its IP address
on TCP. One local user opening hundreds of idle auth connections therefore
only ever displaces its own once another user (``postfix``) connects, and a
Postfix whose smtpd processes hold every slot closes its own longest-idle
connection (smtpd reconnects on its next AUTH). A stream's "idle" time is
since the last byte it received or sent.

Each connection is a :class:`GuardedStream`: it records its last activity,
may carry a write deadline (a client that does not take an answer within
``write_timeout`` is dropped), and once the peer is gone (a failed or timed
out write, an eviction) the connection's task is cancelled at once (or, for a
connection the Dovecot reactor took over, it is dropped from the reactor), so
no work continues for a client that left (pipelined requests included).

An ``accept`` that fails because the process or the system is out of file
descriptors or memory is logged (``accept_failed``) and retried after a
short pause instead of ending the listener.

Why not ``trio.serve_listeners``: it retries the same errnos with the same
0.1 s pause and closes each stream forcefully after its handler, and so does
this loop; but it has no cap, no eviction, no per-peer fairness, no idle or
write tracking, no cancellation when the peer leaves and no way to stop
accepting while connections finish (a drain), and it logs through the stdlib
logger, not ours. Those are this module's purpose, so the loop is ours; what
it shares with trio's is kept identical.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Protocol

import structlog
import trio

log = structlog.get_logger("saslauthd_oidc.accept")

# accept() errors that mean "out of resources right now", not "listener broken".
ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_DELAY = 0.1
#: At most one "connection_limit" warning per listener this often (seconds).
LIMIT_LOG_INTERVAL = 10.0

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Replies(Protocol):
    """Where a frontend reports the replies it still owes (the daemon's drain waits for them).

    ``owe()`` once a request is decided but its reply not yet written;
    ``paid()`` once it is written or the connection is gone.
    """

    def owe(self) -> None: ...

    def paid(self) -> None: ...


class NoReplies:
    """Nobody waits for the replies."""

    def owe(self) -> None:
        pass

    def paid(self) -> None:
        pass


def peer_of(stream: Any) -> Hashable:
    """Who is on the other end: ``("uid", N)`` on a Unix socket, ``("ip", A)`` on TCP."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None
    try:
        if sock.family == socket.AF_UNIX:
            _, uid, _ = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
            return ("uid", uid)
        return ("ip", sock.getpeername()[0])
    except (OSError, AttributeError, IndexError, struct.error):
        return None


class GuardedStream(trio.abc.HalfCloseableStream):
    """A served connection: last activity, an optional write deadline, abortable.

    After :meth:`abort` (or a failed or timed-out write) the stream is *gone*:
    sends raise ``BrokenResourceError``, receives return EOF, and ``on_gone``
    has been called once (it cancels the connection's task).
    """

    def __init__(
        self,
        inner: trio.abc.Stream,
        *,
        write_timeout: float | None = None,
        on_gone: Callable[[], None] | None = None,
    ) -> None:
        self.inner = inner
        self.last_active = trio.current_time()
        self.gone = False
        self._write_timeout = write_timeout
        #: Called once when the stream is gone: cancels its task, or (a
        #: connection the Dovecot reactor serves) takes it off the reactor.
        self.on_gone = on_gone
        self._ops: set[trio.CancelScope] | None = None  # made by the first timed send

    @property
    def socket(self) -> Any:
        """The inner stream's socket (hypercorn reads addresses from it)."""
        return self.inner.socket  # type: ignore[attr-defined]

    def mark_active(self) -> None:
        """Activity seen by a reader that bypasses this stream (the Dovecot raw-socket loop)."""
        self.last_active = trio.current_time()

    def abort(self) -> None:
        """The peer is gone (or evicted): stop every operation and the connection's task."""
        if self.gone:
            return
        self.gone = True
        for scope in list(self._ops or ()):
            scope.cancel()
        if self.on_gone is not None:
            self.on_gone()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.gone:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("the client is gone")
        if self._write_timeout is None:
            # No deadline of ours: the connection's own cancellation (an
            # eviction) interrupts the send; no scope to set up per call.
            try:
                await self.inner.send_all(data)
            except trio.BrokenResourceError:
                self.abort()
                raise
            self.last_active = trio.current_time()
            return
        # A scope of our own, inside whatever shields the caller puts around
        # the send (hypercorn does): the deadline and abort() reach it.
        scope = trio.CancelScope(deadline=trio.current_time() + self._write_timeout)
        if self._ops is None:
            self._ops = set()
        self._ops.add(scope)
        try:
            with scope:
                await self.inner.send_all(data)
        except trio.BrokenResourceError:
            self.abort()
            raise
        finally:
            self._ops.discard(scope)
        if scope.cancelled_caught:
            if not self.gone:
                log.info("write_timeout", timeout=self._write_timeout)
            self.abort()
            raise trio.BrokenResourceError("the client did not take the answer in time")
        self.last_active = trio.current_time()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        # An abort() cancels the connection's task, which ends a pending receive.
        if self.gone:
            await trio.lowlevel.checkpoint()
            return b""
        data = await self.inner.receive_some(max_bytes)
        self.last_active = trio.current_time()
        return data

    async def send_eof(self) -> None:
        if self.gone:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("the client is gone")
        send_eof = getattr(self.inner, "send_eof", None)
        if send_eof is None:
            await trio.lowlevel.checkpoint()
            return
        await send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Connection:
    __slots__ = ("_done", "peer", "released", "scope", "stream", "table")

    def __init__(
        self,
        stream: GuardedStream,
        peer: Hashable,
        scope: trio.CancelScope,
        table: ConnectionTable | None = None,
    ) -> None:
        self.stream = stream
        self.peer = peer
        self.scope = scope
        self.table = table
        self.released = False
        self._done: trio.Event | None = None  # made only for someone who waits (an eviction)

    async def wait_released(self) -> None:
        if self.released:
            await trio.lowlevel.checkpoint()
            return
        if self._done is None:
            self._done = trio.Event()
        await self._done.wait()

    async def release(self) -> None:
        """Close the descriptor and take the connection off its table (whoever served it)."""
        try:
            await trio.aclose_forcefully(self.stream.inner)
        finally:
            if self.table is not None:
                self.table.remove(self)
            self.released = True
            if self._done is not None:
                self._done.set()


#: A connection handed over whole (to the Dovecot reactor) instead of getting a task.
Connection = _Connection


class ConnectionTable:
    """The connections one listener (or a group of listeners) serves, by peer; the cap."""

    def __init__(self, name: str, max_connections: int) -> None:
        self.name = name
        self.max_connections = max(1, max_connections)
        self.evicted = 0
        self._by_peer: dict[Hashable, dict[int, _Connection]] = {}
        self._count = 0
        self._empty = trio.Event()
        self._empty.set()
        self._last_warning = -float("inf")
        self._evicted_since_warning = 0
        self.accepting = True
        self._accepts: set[trio.CancelScope] = set()

    def stop_accepting(self) -> None:
        """Every loop on this table stops accepting; its connections go on to their end."""
        self.accepting = False
        for scope in list(self._accepts):
            scope.cancel()

    def __len__(self) -> int:
        return self._count

    def held_by(self, peer: Hashable) -> int:
        return len(self._by_peer.get(peer, ()))

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def add(self, connection: _Connection) -> None:
        self._by_peer.setdefault(connection.peer, {})[id(connection)] = connection
        self._count += 1
        self._empty = trio.Event() if self._empty.is_set() else self._empty

    def remove(self, connection: _Connection) -> None:
        held = self._by_peer.get(connection.peer)
        if held is not None and held.pop(id(connection), None) is not None:
            self._count -= 1
            if not held:
                del self._by_peer[connection.peer]
        if self._count == 0:
            self._empty.set()

    def victim(self, newcomer: Hashable) -> _Connection | None:
        """The longest-idle connection of the peer holding the most (ties: the newcomer's)."""
        if not self._by_peer:
            return None
        own = self.held_by(newcomer)
        held = max(self._by_peer.values(), key=len)
        if own and own >= len(held):
            held = self._by_peer[newcomer]
        # One already closed (and still unwinding) is not closed twice.
        live = [c for c in held.values() if not c.stream.gone]
        return min(live, key=lambda c: c.stream.last_active) if live else None

    def note_eviction(self, victim: _Connection, newcomer: Hashable) -> None:
        self.evicted += 1
        self._evicted_since_warning += 1
        now = trio.current_time()
        idle = round(now - victim.stream.last_active, 1)
        log.debug("connection_evicted", listener=self.name, peer=_label(victim.peer), idle=idle)
        if now - self._last_warning >= LIMIT_LOG_INTERVAL:
            log.warning(
                "connection_limit",
                listener=self.name,
                max_connections=self.max_connections,
                evicted=self._evicted_since_warning,
                peer=_label(victim.peer),
                peer_connections=self.held_by(victim.peer),
                newcomer=_label(newcomer),
                idle=idle,
                detail="closed the longest-idle connection of the peer holding the most",
            )
            self._last_warning = now
            self._evicted_since_warning = 0


def _listener_name(listener: Any) -> str:
    try:
        address = listener.socket.getsockname()
    except (AttributeError, OSError):
        return "socket"
    return address if isinstance(address, str) and address else str(address)


def _label(peer: Hashable) -> str:
    if isinstance(peer, tuple) and len(peer) == 2:
        return f"{peer[0]}={peer[1]}"
    return "unknown"


async def serve_connections(
    listener: trio.abc.Listener[Any],
    serve_one: Callable[[Any], Awaitable[None]],
    *,
    max_connections: int | None = None,
    table: ConnectionTable | None = None,
    write_timeout: float | None = None,
    name: str | None = None,
    adopt: Callable[[_Connection], bool] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept forever; run ``serve_one(stream)`` in its own task for each connection.

    ``table`` may be shared by several listeners (one cap for all of them);
    otherwise one is made with ``max_connections``. After
    ``table.stop_accepting()`` the loop returns once its connections ended.
    ``adopt(connection)`` may take a connection over instead (True): it then
    serves it without a task of this loop, sets ``stream.on_gone`` and calls
    ``connection.release()`` when it ends; this loop does not wait for it.
    """
    if table is None:
        table = ConnectionTable(name or _listener_name(listener), max_connections or 4096)

    async def one(connection: _Connection) -> None:
        try:
            with connection.scope:
                await serve_one(connection.stream)
        finally:
            # Whatever the handler did (hypercorn's close may be cut short by
            # the cancellation), the descriptor is released here.
            await connection.release()

    async with trio.open_nursery() as nursery:
        task_status.started()
        while table.accepting:
            accepting = trio.CancelScope()
            table._accepts.add(accepting)
            raw = None
            try:
                with accepting:
                    raw = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_RETRY_ERRNOS:
                    raise
                log.warning("accept_failed", error=os.strerror(exc.errno or 0))
                await trio.sleep(ACCEPT_RETRY_DELAY)
                continue
            finally:
                table._accepts.discard(accepting)
            if raw is None:
                break
            peer = peer_of(raw)
            if len(table) >= table.max_connections:
                victim = table.victim(peer)
                if victim is not None:
                    table.note_eviction(victim, peer)
                    victim.stream.abort()
                    # One descriptor over the cap at most: the victim is closed first.
                    with trio.move_on_after(1.0):
                        await victim.wait_released()
            scope = trio.CancelScope()
            stream = GuardedStream(raw, write_timeout=write_timeout, on_gone=scope.cancel)
            connection = _Connection(stream, peer, scope, table)
            table.add(connection)
            if adopt is not None and adopt(connection):
                continue
            nursery.start_soon(one, connection)
