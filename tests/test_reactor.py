"""The Dovecot reactor: every socket connection of a listener served from one task and one epoll.

Timeouts (first line, partial line, idle kept, blocked send), backpressure,
fairness between a pipelining client and a single request, eviction at the
cap, and what happens to open connections when the listener stops.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from saslauthd_oidc.core.engine import Pending, unanswered
from saslauthd_oidc.core.outcome import Reason, Verdict
from saslauthd_oidc.core.request import AuthRequest
from saslauthd_oidc.frontends import reactor
from saslauthd_oidc.frontends.accept import ConnectionTable
from saslauthd_oidc.frontends.dovecot import serve_dovecot_listener
from saslauthd_oidc.frontends.reactor import EVENTS_PER_ROUND
from tests.support import MECHS, Client, auth_line

LINE_TIMEOUT = 5.0


class Steps:
    """An engine stand-in: 'now-X' answered inline (OK, user X), 'hang' waits forever."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled = 0

    def start(self, request: AuthRequest) -> Verdict | Pending:
        tok = request.credentials.token
        self.started.append(tok)
        if tok.startswith("now-"):
            return Verdict(reason=Reason.OK, account=tok.removeprefix("now-"))
        return unanswered(request)

    async def finish(self, pending: Pending) -> Verdict:
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled += 1

    async def authenticate(self, request: AuthRequest) -> Verdict:  # pragma: no cover
        raise AssertionError("the frontend uses start/finish")


class SmallSendBuffers(trio.abc.Listener[trio.SocketStream]):
    """Accepted Unix sockets with a small send buffer (they do not inherit the listener's)."""

    def __init__(self, inner: trio.abc.Listener[Any], sndbuf: int) -> None:
        self.inner = inner
        self.sndbuf = sndbuf

    async def accept(self) -> trio.SocketStream:
        stream = await self.inner.accept()
        assert isinstance(stream, trio.SocketStream)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        return stream

    async def aclose(self) -> None:
        await self.inner.aclose()


async def listen(
    nursery: trio.Nursery,
    path: str,
    steps: Steps,
    *,
    max_connections: int = 64,
    sndbuf: int | None = None,
    **kw: Any,
) -> ConnectionTable:
    table = ConnectionTable("auth", max_connections)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(64)
    listener: trio.abc.Listener[Any] = trio.SocketListener(sock)
    if sndbuf is not None:
        listener = SmallSendBuffers(listener, sndbuf)
    await nursery.start(
        functools.partial(
            serve_dovecot_listener,
            listener,
            steps,
            mechanisms=MECHS,
            table=table,
            line_timeout=LINE_TIMEOUT,
            **kw,
        )
    )
    return table


async def connected(path: str) -> Client:
    client = await Client.connect(path)
    await client.handshake()
    return client


async def until_eof(client: Client) -> None:
    while await client.line() is not None:
        pass


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# ------------------------------------------------------------------- timeouts


async def test_first_line_is_owed_within_line_timeout(
    nursery: trio.Nursery, socket_path: str, autojump_clock: trio.abc.Clock
) -> None:
    await listen(nursery, socket_path, Steps())
    with capture_logs() as logs:
        client = await Client.connect(socket_path)
        connected_at = trio.current_time()
        assert await client.line() == "VERSION\t1\t2"  # the handshake comes at once
        with trio.fail_after(10 * LINE_TIMEOUT):
            await until_eof(client)  # nothing sent: hung up
        assert trio.current_time() - connected_at >= LINE_TIMEOUT
    assert len(events(logs, "line_timeout")) == 1


async def test_idle_connection_is_kept_and_a_partial_line_is_owed(
    nursery: trio.Nursery, socket_path: str, autojump_clock: trio.abc.Clock
) -> None:
    await listen(nursery, socket_path, Steps())
    with capture_logs() as logs:
        client = await connected(socket_path)
        await trio.sleep(20 * LINE_TIMEOUT)  # idle between lines: no deadline
        assert await client.authenticate(1, "now-alice") == "OK\t1\tuser=alice"
        await trio.sleep(20 * LINE_TIMEOUT)
        await client.stream.send_all(b"AUTH\t2\tOAUTH")  # a line begun, never ended
        begun = trio.current_time()
        with trio.fail_after(10 * LINE_TIMEOUT):
            await until_eof(client)
        assert trio.current_time() - begun >= LINE_TIMEOUT
    [timeout] = events(logs, "line_timeout")
    assert timeout["partial_bytes"] == len(b"AUTH\t2\tOAUTH")


async def test_a_client_that_does_not_read_is_cut_off_and_others_are_served(
    nursery: trio.Nursery, socket_path: str, mock_clock: trio.testing.MockClock
) -> None:
    """Backpressure and the blocked send: the reader stops reading, the deadline ends it."""
    table = await listen(nursery, socket_path, Steps())
    greedy = await connected(socket_path)
    total = 64 << 20
    sent = 0
    broken = trio.Event()

    async def flood() -> None:
        nonlocal sent
        rid = 1
        try:
            while sent < total:
                chunk = "".join(auth_line(r, f"now-u{r}") + "\n" for r in range(rid, rid + 50))
                rid += 50
                await greedy.stream.send_all(chunk.encode())
                sent += len(chunk)
        except trio.BrokenResourceError:
            broken.set()

    with capture_logs() as logs:
        nursery.start_soon(flood)
        await trio.testing.wait_all_tasks_blocked()  # the flood is stuck: we stopped reading
        assert sent < total and not broken.is_set()
        other = await connected(socket_path)
        for rid in range(1, 4):
            assert await other.authenticate(rid, f"now-bob{rid}") == f"OK\t{rid}\tuser=bob{rid}"
        assert len(table) == 2
        mock_clock.jump(LINE_TIMEOUT + 1)
        with trio.fail_after(1):
            await broken.wait()
        assert await other.authenticate(9, "now-bob") == "OK\t9\tuser=bob"
    assert [e["event"] for e in logs if "timeout" in e["event"]] == ["send_timeout"]
    await trio.testing.wait_all_tasks_blocked()
    assert len(table) == 1


async def test_a_slow_reader_that_keeps_taking_replies_is_not_cut_off(
    nursery: trio.Nursery, socket_path: str, mock_clock: trio.testing.MockClock
) -> None:
    """The send deadline runs from the last progress, not from the first blocked send.

    A small send buffer keeps replies waiting in the reactor while the client
    takes some of them at each step, so the output never empties.
    """
    await listen(nursery, socket_path, Steps(), sndbuf=8192)
    slow = await connected(socket_path)
    stop = trio.Event()

    async def flood() -> None:
        rid = 1
        with contextlib.suppress(trio.BrokenResourceError):  # cut off: asserted below
            while not stop.is_set():
                chunk = "".join(auth_line(r, f"now-u{r}") + "\n" for r in range(rid, rid + 50))
                rid += 50
                await slow.stream.send_all(chunk.encode())

    with capture_logs() as logs:
        nursery.start_soon(flood)
        await trio.testing.wait_all_tasks_blocked()  # replies are backed up
        for _ in range(6):  # 6 x 0.6 line timeouts: well past one in total
            mock_clock.jump(0.6 * LINE_TIMEOUT)
            taken = 0
            while taken < 64 << 10:
                data = await slow.stream.receive_some(4096)
                assert data, f"the slow reader was cut off: {[e['event'] for e in logs]}"
                taken += len(data)
            await trio.testing.wait_all_tasks_blocked()
        stop.set()
    assert not [e for e in logs if "timeout" in e["event"]]


async def test_replies_made_before_the_client_closed_its_side_all_go_out(
    nursery: trio.Nursery, socket_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More replies than the socket holds, then EOF: the rest is written before closing."""
    # Read all of it (EOF included) before the client reads a reply: no backpressure here.
    monkeypatch.setattr(reactor, "OUTPUT_LIMIT", 1 << 30)
    await listen(nursery, socket_path, Steps())
    client = await connected(socket_path)
    count = 16000  # refused at once (no such mechanism): ~600 KB of replies
    await client.send(*(f"AUTH\t{rid}\tNOPE\tservice=smtp" for rid in range(1, count + 1)))
    await client.stream.send_eof()
    await trio.testing.wait_all_tasks_blocked()  # the daemon's sends are blocked
    replies = []
    with trio.fail_after(10):
        while (line := await client.line()) is not None:
            replies.append(line)
    assert len(replies) == count
    assert all(r.startswith(f"FAIL\t{i}\t") for i, r in enumerate(replies, 1))


# ------------------------------------------------------------------- fairness


def _blocking_client(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def _lines(sock: socket.socket, count: int) -> Iterator[str]:
    buffer = b""
    while count:
        while b"\n" not in buffer:
            data = sock.recv(65536)
            assert data, "closed"
            buffer += data
        line, _, buffer = buffer.partition(b"\n")
        count -= 1
        yield line.decode()


async def test_a_pipelining_client_does_not_starve_a_single_request(
    nursery: trio.Nursery, socket_path: str
) -> None:
    steps = Steps()
    await listen(nursery, socket_path, steps)
    many, one = _blocking_client(socket_path), _blocking_client(socket_path)
    with many, one:
        await trio.testing.wait_all_tasks_blocked()
        for sock in (many, one):
            assert "DONE" in _lines(sock, 2 + len(MECHS) + 4)
            sock.sendall(b"VERSION\t1\t2\nCPID\t1\n")
        await trio.testing.wait_all_tasks_blocked()
        pipelined = 60  # under the protocol's 64 requests in flight
        # Both arrive before the reactor looks: the pipeliner is first in line.
        many.sendall(
            "".join(auth_line(r, f"now-m{r}") + "\n" for r in range(1, pipelined + 1)).encode()
        )
        one.sendall((auth_line(1, "now-single") + "\n").encode())
        await trio.testing.wait_all_tasks_blocked()
        assert list(_lines(one, 1)) == ["OK\t1\tuser=single"]
        assert sorted(_lines(many, pipelined)) == sorted(
            f"OK\t{r}\tuser=m{r}" for r in range(1, pipelined + 1)
        )
    assert len(steps.started) == pipelined + 1
    # Its turn came after one round's share of the pipeliner's, not after all of them.
    assert pipelined // 2 > EVENTS_PER_ROUND
    assert steps.started.index("now-single") <= EVENTS_PER_ROUND


# ------------------------------------------------------------ eviction, stop


async def test_at_the_cap_the_longest_idle_connection_is_closed(
    nursery: trio.Nursery, socket_path: str
) -> None:
    table = await listen(nursery, socket_path, Steps(), max_connections=2)
    idle = await connected(socket_path)
    busy = await connected(socket_path)
    assert await busy.authenticate(1, "now-bob") == "OK\t1\tuser=bob"
    with capture_logs() as logs:
        newcomer = await connected(socket_path)
        with trio.fail_after(5):
            await until_eof(idle)
    assert await newcomer.authenticate(1, "now-carol") == "OK\t1\tuser=carol"
    assert await busy.authenticate(2, "now-bob") == "OK\t2\tuser=bob"
    assert len(table) == 2 and table.evicted == 1
    assert len(events(logs, "connection_limit")) == 1


async def test_an_evicted_connection_loses_its_requests_in_flight(
    nursery: trio.Nursery, socket_path: str
) -> None:
    steps = Steps()
    table = await listen(nursery, socket_path, steps, max_connections=1)
    waiting = await connected(socket_path)
    await waiting.send(auth_line(1, "hang"))
    await trio.testing.wait_all_tasks_blocked()
    newcomer = await connected(socket_path)
    with trio.fail_after(5):
        await until_eof(waiting)
    await trio.testing.wait_all_tasks_blocked()
    assert steps.cancelled == 1
    assert await newcomer.authenticate(2, "now-dave") == "OK\t2\tuser=dave"
    assert len(table) == 1


async def test_cancelling_the_listener_closes_every_connection(socket_path: str) -> None:
    steps = Steps()
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nursery:
            table = await listen(nursery, socket_path, steps)
            clients = [await connected(socket_path) for _ in range(3)]
            await clients[0].send(auth_line(1, "hang"))
            assert await clients[1].authenticate(1, "now-eve") == "OK\t1\tuser=eve"
            await trio.testing.wait_all_tasks_blocked()
            assert len(table) == 3
            nursery.cancel_scope.cancel()
        outer.cancel_scope.deadline = trio.current_time() + 5
        for client in clients:
            await until_eof(client)
    assert steps.cancelled == 1
    assert len(table) == 0


async def test_after_stop_accepting_connections_go_on_to_their_end(socket_path: str) -> None:
    async with trio.open_nursery() as nursery:
        table = await listen(nursery, socket_path, Steps())
        client = await connected(socket_path)
        table.stop_accepting()
        await trio.testing.wait_all_tasks_blocked()
        assert await client.authenticate(1, "now-frank") == "OK\t1\tuser=frank"
        await client.stream.aclose()  # the last connection ends: the listener returns
        with trio.fail_after(5):
            await table.wait_empty()
    assert len(table) == 0
