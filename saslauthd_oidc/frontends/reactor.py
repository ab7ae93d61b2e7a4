"""One task and one epoll for every Dovecot-protocol socket connection of a listener.

This module owns the event loop of the Dovecot auth socket on Linux: the
reactor task waits for its own ``select.epoll`` descriptor to be readable
(the public ``trio.lowlevel.wait_readable``), takes every ready connection
from ``epoll.poll(0)`` and serves it inline: one ``recv``, the sans-I/O
protocol (:mod:`saslauthd_oidc.protocol.dovecot`), the engine's ``start``,
one ``send``. An idle connection is a few objects, not a task. The
engine's steps come through :class:`Answering` (:mod:`.dovecot` wraps the
engine with the connection's catch-all); the accept loop (:mod:`.accept`)
hands connections over and gets them back closed.

* A request that needs I/O is finished in a task of the reactor's nursery;
  its reply goes into the connection's output, sent at once if the socket
  takes it, else when epoll reports the socket writable. Replies leave in
  the order they were concluded, as on the task-per-connection path.
* ``line_timeout``: one deadline per connection (the first line owed, a
  partial line owed, a send that makes no progress; none while idle between lines), all in
  one heap; the reactor's wait runs in one cancel scope whose deadline is
  moved in place to the earliest, replaced only when it fires.
* Backpressure: a connection whose unsent output is over ``OUTPUT_LIMIT``
  is not read from until the client takes it.
* Fairness: at most ``EVENTS_PER_ROUND`` requests of one connection are
  answered per round; the rest wait for the next round, after the others.
* :data:`round_hooks` run before and after each round (the service's log
  lines are held during a round and written together at its end).
"""

from __future__ import annotations

import contextlib
import heapq
import math
import select
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import structlog
import trio

from saslauthd_oidc.core.outcome import Outcome, Verdict
from saslauthd_oidc.frontends.accept import Connection, Replies
from saslauthd_oidc.protocol.dovecot import DovecotServerConnection, NeedVerdict, ProtocolError

log = structlog.get_logger("saslauthd_oidc.dovecot")

RECEIVE_SIZE = 65536
#: Unsent output above which a connection is not read from (backpressure).
OUTPUT_LIMIT = 65536
#: Requests of one connection answered per round before the others' turn.
EVENTS_PER_ROUND = 16

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_BROKEN = select.EPOLLHUP | select.EPOLLERR

available = hasattr(select, "epoll")


def _nothing() -> None:
    pass


class RoundHooks:
    """What runs when a round starts and when it ends (even by an exception).

    A module-level object, so that the compiled build sees what the service
    (or a test) sets; both do nothing until then. ``end`` must not raise.
    """

    __slots__ = ("begin", "end")

    def __init__(self) -> None:
        self.begin: Callable[[], None] = _nothing
        self.end: Callable[[], None] = _nothing


round_hooks = RoundHooks()


class _Conn:
    """One connection's state in the reactor."""

    __slots__ = (
        "backlog",
        "fd",
        "mask",
        "out",
        "owed",
        "proto",
        "raw",
        "reactor",
        "read_deadline",
        "record",
        "send_deadline",
        "tasks",
    )

    def __init__(
        self,
        reactor: Reactor,
        record: Connection,
        raw: socket.socket,
        proto: DovecotServerConnection,
    ) -> None:
        self.reactor = reactor
        self.record = record
        self.raw = raw
        self.fd = raw.fileno()
        self.proto = proto
        self.out = b""  # what the socket did not take yet
        self.backlog: deque[NeedVerdict | ProtocolError] | None = None
        self.mask = 0
        self.owed = False  # a reply owed to the drain while ``out`` is not empty
        self.read_deadline = math.inf
        self.send_deadline = math.inf
        self.tasks: set[trio.CancelScope] | None = None

    def gone(self) -> None:
        """The stream's ``on_gone`` (a bound method is smaller than a closure)."""
        self.reactor._gone(self)


class Answering(Protocol):
    """What the reactor needs of the Dovecot frontend: a verdict now, or later."""

    tempfail_disconnect: bool

    def start(self, need: NeedVerdict) -> Verdict | object:
        """The verdict, or something to hand to :meth:`finish` (never raises)."""
        ...

    async def finish(self, need: NeedVerdict, pending: Any) -> Verdict:
        """The verdict of a request that needed I/O (never raises)."""
        ...


class Reactor:
    """The Dovecot connections of one listener, served from one task."""

    def __init__(
        self,
        nursery: trio.Nursery,
        answers: Answering,
        *,
        line_timeout: float,
        replies: Replies,
        raw_socket: Callable[..., socket.socket] = socket.socket,
    ) -> None:
        self._nursery = nursery
        self._answers = answers
        self._line_timeout = line_timeout
        self._replies = replies
        self._raw_socket = raw_socket
        self._epoll = select.epoll()
        self._conns: dict[int, _Conn] = {}
        self._heap: list[tuple[float, int, _Conn]] = []
        self._seq = 0
        self._backlog: list[_Conn] = []
        self._scope = trio.CancelScope()
        self._idle = trio.Event()
        self._idle.set()

    async def wait_empty(self) -> None:
        while self._conns:
            await self._idle.wait()

    # ------------------------------------------------------------ connections

    def adopt(self, record: Connection, make_proto: Callable[[], DovecotServerConnection]) -> bool:
        """Serve ``record`` from now on (False: it has no socket; serve it with a task)."""
        inner = getattr(record.stream, "socket", None)
        if not isinstance(inner, trio.socket.SocketType):
            return False
        try:
            raw = self._raw_socket(fileno=inner.fileno())
        except OSError:
            return False
        raw.setblocking(False)
        proto = make_proto()
        conn = _Conn(self, record, raw, proto)
        record.stream.on_gone = conn.gone
        self._conns[conn.fd] = conn
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        conn.mask = _IN
        self._epoll.register(conn.fd, _IN)
        log.debug("connection_open", cuid=proto.cuid)
        self._set_deadline(conn, read=trio.current_time() + self._line_timeout)
        self._write(conn, proto.handshake())
        return True

    def _gone(self, conn: _Conn) -> None:
        """Off the reactor: unregistered, its tasks cancelled, its descriptor closed (a task)."""
        if self._conns.pop(conn.fd, None) is None:
            return
        with contextlib.suppress(OSError):
            self._epoll.unregister(conn.fd)
        for scope in conn.tasks or ():
            scope.cancel()
        if conn.owed:
            conn.owed = False
            self._replies.paid()
        conn.raw.detach()  # the stream owns the descriptor and closes it
        conn.backlog = None
        log.debug("connection_closed", cuid=conn.proto.cuid, client_pid=conn.proto.client_pid)
        if not self._conns:
            self._idle.set()
        self._nursery.start_soon(conn.record.release)

    def _hang_up(self, conn: _Conn) -> None:
        conn.record.stream.abort()  # -> _gone, and the accept table sees it gone

    # --------------------------------------------------------------- deadlines

    def _set_deadline(
        self, conn: _Conn, *, read: float | None = None, send: float | None = None
    ) -> None:
        if read is not None:
            conn.read_deadline = read
        if send is not None:
            conn.send_deadline = send
        deadline = min(conn.read_deadline, conn.send_deadline)
        if deadline < math.inf:
            self._seq += 1
            heapq.heappush(self._heap, (deadline, self._seq, conn))
            self._scope.deadline = min(self._scope.deadline, deadline)
            if len(self._heap) > 2 * len(self._conns) + 64:
                self._compact()

    def _compact(self) -> None:
        self._heap = [
            entry
            for entry in self._heap
            if entry[2].fd in self._conns
            and entry[0] == min(entry[2].read_deadline, entry[2].send_deadline)
        ]
        heapq.heapify(self._heap)

    def _expire(self, now: float) -> float:
        """Disconnect the connections whose deadline passed; the next deadline."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, conn = heapq.heappop(heap)
            if self._conns.get(conn.fd) is not conn:
                continue
            if deadline != min(conn.read_deadline, conn.send_deadline):
                continue  # moved since
            if conn.send_deadline <= conn.read_deadline:
                # A client that does not read its replies must not hold us forever.
                log.info("send_timeout", cuid=conn.proto.cuid)
            else:
                log.info(
                    "line_timeout",
                    cuid=conn.proto.cuid,
                    partial_bytes=conn.proto.buffered_bytes,
                    in_flight=conn.proto.in_flight,
                )
            self._hang_up(conn)
        return heap[0][0] if heap else math.inf

    # ---------------------------------------------------------------------- run

    async def run(self) -> None:
        """Serve until cancelled; then every connection is closed."""
        try:
            while True:
                self._scope = trio.CancelScope(deadline=self._expire(trio.current_time()))
                with self._scope:
                    await self._rounds()
        finally:
            for conn in list(self._conns.values()):
                self._gone(conn)
            self._epoll.close()

    async def _rounds(self) -> None:
        epoll = self._epoll
        epfd = epoll.fileno()
        hooks = round_hooks
        while True:
            if self._backlog:
                await trio.lowlevel.checkpoint()  # the rest of the process gets its turn
            else:
                await trio.lowlevel.wait_readable(epfd)
            hooks.begin()
            try:
                # Those with requests left from earlier rounds go after the ready ones;
                # one backlogged in this round waits for the next.
                waiting, self._backlog = self._backlog, []
                for fd, events in epoll.poll(0):
                    conn = self._conns.get(fd)
                    if conn is not None:
                        self._ready(conn, events)
                for conn in waiting:
                    # (one that a tempfail ended meanwhile has no backlog left)
                    if self._conns.get(conn.fd) is conn and conn.backlog is not None:
                        self._work(conn)
            finally:
                hooks.end()

    def _ready(self, conn: _Conn, events: int) -> None:
        if events & _OUT:
            self._writable(conn)
            if self._conns.get(conn.fd) is not conn:
                return
        if events & select.EPOLLERR:
            self._hang_up(conn)
        elif conn.mask & _IN:
            if events & (_IN | select.EPOLLHUP):
                self._readable(conn)
        elif events & select.EPOLLHUP:
            self._hang_up(conn)  # gone while we were not reading: replies undeliverable

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.raw.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return  # spurious
        except OSError:  # reset by the peer
            data = b""
        proto = conn.proto
        events = proto.receive_data(data)
        if b"\n" in data:
            conn.record.stream.mark_active()
            if proto.partial_line:
                self._set_deadline(conn, read=trio.current_time() + self._line_timeout)
            elif conn.read_deadline < math.inf:
                self._set_deadline(conn, read=math.inf)
        elif conn.read_deadline == math.inf and proto.partial_line:
            self._set_deadline(conn, read=trio.current_time() + self._line_timeout)
        if events:
            if len(events) == 1 and conn.backlog is None:
                if not self._one(conn, events[0]):
                    return
            else:
                conn.backlog = deque(events)
                self._work(conn)
                return
        self._flush(conn)
        if proto.closed:
            self._end(conn)

    def _work(self, conn: _Conn) -> None:
        """Up to ``EVENTS_PER_ROUND`` requests from the connection's backlog."""
        backlog = conn.backlog
        assert backlog is not None
        answered = 0
        while backlog and answered < EVENTS_PER_ROUND:
            event = backlog.popleft()
            if isinstance(event, NeedVerdict):
                answered += 1
            if not self._one(conn, event):
                return
        if backlog:
            self._backlog.append(conn)
        else:
            conn.backlog = None
        self._flush(conn)
        if conn.backlog is None and conn.proto.closed:
            self._end(conn)

    def _tempfail(self, conn: _Conn, need: NeedVerdict) -> None:
        # Postfix turns every FAIL into 535 and reads it before noticing a
        # close, so only hanging up *instead of* answering gives a 454.
        log.info("tempfail_disconnect", request_id=need.request_id)
        self._flush(conn)  # what other requests were answered still goes out
        conn.backlog = None
        conn.proto.closed = True  # nothing more is read or answered
        self._end(conn)

    def _end(self, conn: _Conn) -> None:
        """EOF or an unrecoverable protocol error: in-flight requests are moot; the
        replies already made still go out (within the send deadline), then it closes."""
        if self._conns.get(conn.fd) is not conn:
            return
        for scope in conn.tasks or ():
            scope.cancel()
        if conn.out:
            self._update_mask(conn)  # only to write what is left
        else:
            self._hang_up(conn)

    def _one(self, conn: _Conn, event: NeedVerdict | ProtocolError) -> bool:
        """Answer one event inline or start its task; False: the connection was hung up."""
        if isinstance(event, ProtocolError):
            log_protocol_error(event)
            return True
        step = self._answers.start(event)
        if not isinstance(step, Verdict):
            self._nursery.start_soon(self._finish, conn, event, step)
            return True
        if self._answers.tempfail_disconnect and step.outcome is Outcome.TEMPFAIL:
            self._tempfail(conn, event)
            return False
        error = conn.proto.conclude(event.request_id, step)
        if error is not None:
            log_protocol_error(error)
        return True

    def _live(self, conn: _Conn) -> bool:
        """Still served, and still answering (not closing)."""
        return self._conns.get(conn.fd) is conn and not conn.proto.closed

    async def _finish(self, conn: _Conn, need: NeedVerdict, pending: Any) -> None:
        if not self._live(conn):
            return
        scope = trio.CancelScope()
        if conn.tasks is None:
            conn.tasks = set()
        conn.tasks.add(scope)
        try:
            with scope:
                verdict = await self._answers.finish(need, pending)
                if not self._live(conn):
                    return
                if self._answers.tempfail_disconnect and verdict.outcome is Outcome.TEMPFAIL:
                    self._tempfail(conn, need)
                    return
                error = conn.proto.conclude(need.request_id, verdict)
                if error is not None:
                    log_protocol_error(error)
                self._flush(conn)
        finally:
            conn.tasks.discard(scope)

    # ---------------------------------------------------------------------- I/O

    def _flush(self, conn: _Conn) -> None:
        if conn.proto.has_output:
            self._write(conn, conn.proto.data_to_send())
        else:
            self._update_mask(conn)

    def _write(self, conn: _Conn, data: bytes) -> None:
        if conn.out:
            conn.out += data  # behind what is already waiting, in order
        else:
            try:
                sent = conn.raw.send(data)  # the hot path: the socket takes it all at once
            except BlockingIOError:
                sent = 0
            except OSError:
                self._hang_up(conn)
                return
            if sent < len(data):
                conn.out = data[sent:]
                if not conn.owed:
                    conn.owed = True
                    self._replies.owe()
                self._set_deadline(conn, send=trio.current_time() + self._line_timeout)
        self._update_mask(conn)

    def _writable(self, conn: _Conn) -> None:
        try:
            sent = conn.raw.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self._hang_up(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            if sent:  # the deadline is on a client that takes nothing, not on a slow reader
                self._set_deadline(conn, send=trio.current_time() + self._line_timeout)
        else:
            self._set_deadline(conn, send=math.inf)
            if conn.owed:
                conn.owed = False
                self._replies.paid()
            if conn.proto.closed and conn.backlog is None:
                self._hang_up(conn)
                return
        self._update_mask(conn)

    def _update_mask(self, conn: _Conn) -> None:
        if self._conns.get(conn.fd) is not conn:
            return
        mask = 0
        if conn.out:
            mask = _OUT
        if conn.backlog is None and not conn.proto.closed and len(conn.out) <= OUTPUT_LIMIT:
            mask |= _IN
        if mask != conn.mask:
            conn.mask = mask
            self._epoll.modify(conn.fd, mask)


def log_protocol_error(error: ProtocolError) -> None:
    log.info("protocol_error", request_id=error.request_id, error=error.message)


__all__ = ["Answering", "Reactor", "RoundHooks", "available", "log_protocol_error", "round_hooks"]
