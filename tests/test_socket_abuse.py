"""Load and abuse on the sockets: slow clients, silent clients, floods, vanishing clients, fds.

* ``line_timeout`` (Dovecot socket): a client sending a byte a second is
  disconnected once one line has taken ``line_timeout``; a client idle
  *between* lines (Postfix between logins) is kept; one that never sends its
  first line, or never reads our replies, is dropped. These run on memory
  streams under trio's autojump MockClock: virtual time, no sleeping.
* Over the daemon's real socket: a slow client does not block others;
  1,000 concurrent connections each get the right answer; over-long lines and
  clients that vanish mid-request cost only their own request.
* File-descriptor exhaustion: the daemon runs as ``saslauthd-oidc serve`` in
  a subprocess with a low RLIMIT_NOFILE; the test holds twice as many
  connections as the limit, checks that each newcomer is served (the
  longest-idle connection makes room), that the daemon never ran out
  (no ``accept_failed``), and that it serves as before afterwards.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import resource
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from saslauthd_oidc.config import LoggingConfig, parse_config
from saslauthd_oidc.frontends.dovecot import handle_dovecot_stream
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.service.logs import configure_logging
from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread
from tests.peers.dovecot_client import LineClient
from tests.support import MECHS, Stub, auth_line, serve_at_fd_limit

USER = "alice@example.org"

# --------------------------------------------------------------------------- line_timeout


async def _read_until(stream: trio.abc.ReceiveStream, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = await stream.receive_some(65536)
        assert chunk, got
        got += chunk
    return got


async def _read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    got = b""
    while chunk := await stream.receive_some(65536):
        got += chunk
    return got


async def _drip(stream: trio.abc.SendStream, data: bytes, interval: float) -> None:
    """Send ``data`` a byte at a time, ``interval`` seconds apart, until the server hangs up."""
    try:
        for byte in data:
            await stream.send_all(bytes([byte]))
            await trio.sleep(interval)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _handler(
    server: trio.abc.Stream, stub: Stub, line_timeout: float = 30.0
) -> Callable[[], Awaitable[None]]:
    return functools.partial(
        handle_dovecot_stream,
        server,
        stub,
        mechanisms=MECHS,
        spid=1,
        cuid=7,
        line_timeout=line_timeout,
    )


async def test_byte_a_second_client_is_disconnected_after_line_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    server, client = trio.testing.memory_stream_pair()
    stub = Stub()
    line = f"VERSION\t1\t2\n{auth_line(1, 'good-alice')}".encode()  # no final newline, ever
    assert len(line) > 60
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_handler(server, stub))
            await _read_until(client, b"DONE\n")
            start = trio.current_time()
            nursery.start_soon(_drip, client, line, 1.0)
            rest = await _read_to_eof(client)  # the server hung up
            elapsed = trio.current_time() - start
            nursery.cancel_scope.cancel()
    assert rest == b""
    assert stub.seen == []  # the partial AUTH never reached the engine
    # virtual time: the first complete line (VERSION) restarted the clock once
    assert 30 <= elapsed < len(line)
    timeouts = [e for e in logs if e["event"] == "line_timeout"]
    assert timeouts and timeouts[0]["cuid"] == 7 and timeouts[0]["partial_bytes"] > 0


async def test_client_that_never_sends_its_first_line_is_disconnected(
    autojump_clock: trio.abc.Clock,
) -> None:
    server, client = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_handler(server, Stub(), line_timeout=10))
        await _read_until(client, b"DONE\n")
        assert await _read_to_eof(client) == b""


async def test_idle_connection_between_lines_is_kept(autojump_clock: trio.abc.Clock) -> None:
    """Postfix keeps its auth connection open between logins: hours of silence are fine."""
    server, client = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_handler(server, Stub(), line_timeout=30))
        await _read_until(client, b"DONE\n")
        await client.send_all(f"VERSION\t1\t2\nCPID\t1\n{auth_line(1, 'good-a')}\n".encode())
        assert (await _read_until(client, b"\n")).endswith(b"OK\t1\tuser=a\n")
        await trio.sleep(6 * 3600)
        await client.send_all(f"{auth_line(2, 'good-b')}\n".encode())
        assert await _read_until(client, b"\n") == b"OK\t2\tuser=b\n"
        await client.aclose()


async def test_slow_but_finished_line_is_served(autojump_clock: trio.abc.Clock) -> None:
    server, client = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_handler(server, Stub(), line_timeout=30))
        await _read_until(client, b"DONE\n")
        await client.send_all(b"VERSION\t1\t2\n")
        await _drip(client, b"CPID\t1\n", 2.0)  # 14 s for one line: within the bound
        await client.send_all(f"{auth_line(1, 'good-a')}\n".encode())
        assert await _read_until(client, b"\n") == b"OK\t1\tuser=a\n"
        await client.aclose()


async def test_slow_overlong_line_is_bounded_too(autojump_clock: trio.abc.Clock) -> None:
    """While an over-long line is being discarded the clock still runs."""
    server, client = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_handler(server, Stub(), line_timeout=30))
        await _read_until(client, b"DONE\n")
        await client.send_all(b"VERSION\t1\t2\nAUTH\t5\tOAUTHBEARER\tresp=" + b"A" * 20000)
        assert (await _read_until(client, b"\n")).startswith(b"FAIL\t5\t")
        nursery.start_soon(_drip, client, b"A" * 1000, 1.0)
        start = trio.current_time()
        assert await _read_to_eof(client) == b""  # hung up before the 1000 s drip ended
        assert trio.current_time() - start < 1000
        nursery.cancel_scope.cancel()


async def test_client_that_never_reads_is_dropped(autojump_clock: trio.abc.Clock) -> None:
    """Lockstep streams: a send completes only when the peer reads, like a full socket buffer."""
    server, _client = trio.testing.lockstep_stream_pair()
    done = trio.Event()

    async def serve() -> None:
        await _handler(server, Stub(), line_timeout=30)()
        done.set()

    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await done.wait()  # never read a byte: the handshake send times out
    assert [e["event"] for e in logs if e["event"] == "send_timeout"] == ["send_timeout"]


# --------------------------------------------------------------------------- the real daemon


@pytest.fixture
async def daemon(nursery: trio.Nursery) -> AsyncIterator[tuple[str, DevIssuer, io.StringIO]]:
    issuer = DevIssuer()
    await nursery.start(issuer.serve)
    directory = tempfile.mkdtemp(prefix="ab", dir="/tmp")
    sock = str(Path(directory) / "auth")
    config = parse_config(
        {
            "server": {"auth_socket": sock, "request_timeout": 3.0, "line_timeout": 1.0},
            "provider": [{"name": "dev", "issuer": issuer.issuer, "allow_http": True}],
            "rule": [
                {"name": "mail", "provider": "dev", "audiences": ["mail"], "username": "{email}"}
            ],
        }
    )
    log = io.StringIO()
    configure_logging(LoggingConfig(level="info", format="json"), stream=log)
    await nursery.start(
        lambda task_status: run_daemon(config, task_status=task_status, handle_signals=False)
    )
    yield sock, issuer, log
    nursery.cancel_scope.cancel()


def ob(token: str) -> str:
    return base64.b64encode(f"n,a={USER},\x01auth=Bearer {token}\x01\x01".encode()).decode()


async def login(client: LineClient, rid: int, token: str) -> str:
    await client.send(f"AUTH\t{rid}\tOAUTHBEARER\tservice=smtp\tresp={ob(token)}")
    return await client.line()


async def connect(sock: str) -> LineClient:
    client = LineClient(await trio.open_unix_socket(sock))
    await client.handshake()
    return client


async def test_slow_client_blocks_nobody_and_is_eventually_dropped(
    daemon: tuple[str, DevIssuer, io.StringIO],
) -> None:
    sock, issuer, log = daemon
    token = issuer.mint(email=USER)
    slow = await trio.open_unix_socket(sock)
    slow_line = f"VERSION\t1\t2\n{auth_line(1, token)}".encode()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drip, slow, slow_line, 0.05)
        # meanwhile others log in, on one connection and on fresh ones
        client = await connect(sock)
        for rid in range(1, 21):
            assert await login(client, rid, token) == f"OK\t{rid}\tuser={USER}"
            other = await connect(sock)
            assert await login(other, 1, token) == f"OK\t1\tuser={USER}"
            await other.stream.aclose()
        # and the slow client, which never finishes its line, is hung up on
        with trio.fail_after(30):
            assert (await _read_to_eof(slow)).endswith(b"DONE\n")
        nursery.cancel_scope.cancel()
    assert '"event": "line_timeout"' in log.getvalue()


async def test_thousand_concurrent_connections(
    daemon: tuple[str, DevIssuer, io.StringIO],
) -> None:
    sock, issuer, _ = daemon
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2300:
        pytest.skip(f"RLIMIT_NOFILE {soft} < 2300: 1,000 client + 1,000 server fds do not fit")
    users = [f"user{i}@example.org" for i in range(1000)]
    tokens = {u: issuer.mint(email=u) for u in users}
    connected = trio.Event()
    count = 0
    answers: dict[str, str] = {}

    # Connecting is paced (a Unix socket's backlog is 512 and a non-blocking
    # connect() to a full backlog fails); all 1,000 are open before anyone asks.
    pace = trio.CapacityLimiter(100)

    async def one(user: str) -> None:
        nonlocal count
        async with pace:
            client = LineClient(await trio.open_unix_socket(sock), timeout=60)
            await client.handshake()
        count += 1
        if count == len(users):
            connected.set()
        await connected.wait()  # all 1,000 are open at once before anyone asks
        ir = base64.b64encode(f"n,a={user},\x01auth=Bearer {tokens[user]}\x01\x01".encode())
        await client.send(f"AUTH\t1\tOAUTHBEARER\tservice=smtp\tresp={ir.decode()}")
        answers[user] = await client.line()
        await client.stream.aclose()

    async with trio.open_nursery() as nursery:
        for user in users:
            nursery.start_soon(one, user)
    assert answers == {u: f"OK\t1\tuser={u}" for u in users}


async def test_overlong_lines_fail_only_their_request(
    daemon: tuple[str, DevIssuer, io.StringIO],
) -> None:
    sock, issuer, _ = daemon
    client = await connect(sock)
    junk = b"AUTH\t7\tOAUTHBEARER\tservice=smtp\tresp=" + b"A" * (4 << 20) + b"\n"
    for i in range(0, len(junk), 65536):  # 4 MiB in chunks, one line
        await client.stream.send_all(junk[i : i + 65536])
    assert (await client.line()).startswith("FAIL\t7\t")
    await client.stream.send_all(b"\x00" * 100_000 + b"\n")  # no id: no reply at all
    assert await login(client, 8, issuer.mint(email=USER)) == f"OK\t8\tuser={USER}"


async def test_clients_vanishing_mid_request(
    daemon: tuple[str, DevIssuer, io.StringIO],
) -> None:
    sock, issuer, log = daemon
    token = issuer.mint(email=USER)
    bad = issuer.mint(email=USER, audience="other")
    for payload in (
        f"VERSION\t1\t2\n{auth_line(1, token)}"[:50],  # half a line
        f"VERSION\t1\t2\n{auth_line(1, token)}\n",  # a whole request, gone before the reply
        f"VERSION\t1\t2\n{auth_line(1, bad)}\n",  # gone during the failure challenge
        "VERSION\t1\t2\n" + "\n".join(auth_line(i, token) for i in range(1, 60)) + "\n",
    ):
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(sock)
            raw.sendall(payload.encode())
            raw.shutdown(socket.SHUT_RDWR)
    client = await connect(sock)
    for rid in range(1, 6):
        assert await login(client, rid, token) == f"OK\t{rid}\tuser={USER}"
    assert '"level": "error"' not in log.getvalue()


# --------------------------------------------------------------------------- fd exhaustion


NOFILE = 64


@pytest.fixture
def low_fd_daemon() -> Iterator[tuple[str, Path, DevIssuer]]:
    with DevIssuerThread(DevIssuer()) as issuer:
        directory = Path(tempfile.mkdtemp(prefix="fd", dir="/tmp"))
        sock = directory / "auth"
        config = directory / "c.toml"
        config.write_text(
            f'[server]\nauth_socket = "{sock}"\nauth_socket_mode = "0600"\n'
            'request_timeout = 3.0\n[logging]\nlevel = "info"\nformat = "json"\n'
            f'[[provider]]\nname = "dev"\nissuer = "{issuer.issuer}"\nallow_http = true\n'
            '[[rule]]\nname = "mail"\nprovider = "dev"\naudiences = ["mail"]\n'
            'username = "{email}"\n'
        )
        log_path = directory / "daemon.log"
        with serve_at_fd_limit(config, log_path, NOFILE):
            yield str(sock), log_path, issuer


def _sync_login(path: str, token: str, timeout: float = 15.0) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        ir = base64.b64encode(f"n,a={USER},\x01auth=Bearer {token}\x01\x01".encode()).decode()
        s.sendall(
            f"VERSION\t1\t2\nCPID\t1\nAUTH\t1\tOAUTHBEARER\tservice=smtp\tresp={ir}\n".encode()
        )
        got = b""
        while b"\t1\t" not in got.rsplit(b"DONE\n", 1)[-1] or not got.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got.rsplit(b"DONE\n", 1)[-1].decode().strip()


def test_fd_exhaustion_is_logged_and_survived(
    low_fd_daemon: tuple[str, Path, DevIssuer],
) -> None:
    """At RLIMIT_NOFILE 64 the auth socket's share is a handful of connections:

    holding many more never runs the daemon out of descriptors (no EMFILE),
    each newcomer is served (the longest-idle connection makes room), and the
    daemon authenticates as before once they are gone.
    """
    sock, log_path, issuer = low_fd_daemon
    token = issuer.mint(email=USER)
    assert _sync_login(sock, token) == f"OK\t1\tuser={USER}"  # keys loaded, token cached
    held: list[socket.socket] = []
    try:
        for _ in range(NOFILE * 2):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(15)
            s.connect(sock)
            held.append(s)
            got = b""
            while b"DONE\n" not in got:  # every newcomer is served at once
                chunk = s.recv(65536)
                assert chunk, log_path.read_text()[-2000:]
                got += chunk
        assert _sync_login(sock, token) == f"OK\t1\tuser={USER}"
    finally:
        for s in held:
            s.close()
    assert _sync_login(sock, issuer.mint(email=USER)) == f"OK\t1\tuser={USER}"
    events = [
        json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")
    ]
    assert not [e for e in events if e.get("event") == "accept_failed"]
    budget = next(e for e in events if e.get("event") == "descriptor_budget")
    assert budget["nofile"] == NOFILE
    assert int(budget["max_connections_auth"]) < NOFILE
    limit = [e for e in events if e.get("event") == "connection_limit"]
    assert limit and limit[0]["level"] == "warning"
    assert limit[0]["max_connections"] == budget["max_connections_auth"]
