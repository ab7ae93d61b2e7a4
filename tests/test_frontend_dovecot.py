"""The trio shell around the Dovecot protocol, over real Unix sockets."""

from __future__ import annotations

import base64
import functools
import os
import re
from typing import Any

import trio
import trio.testing

from saslauthd_oidc.frontends.dovecot import handle_dovecot_stream, serve_dovecot_listener
from tests.support import MECHS, Client, Stub, auth_line


async def serve(nursery: trio.Nursery, path: str, authenticate: Stub, **kw: Any) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(256)
    listener = trio.SocketListener(sock)
    await nursery.start(
        functools.partial(serve_dovecot_listener, listener, authenticate, mechanisms=MECHS, **kw)
    )


async def test_handshake(nursery: trio.Nursery, socket_path: str) -> None:
    await serve(nursery, socket_path, Stub())
    first = await (await Client.connect(socket_path)).handshake()
    second = await (await Client.connect(socket_path)).handshake()
    for lines in (first, second):
        assert lines[:3] == [
            "VERSION\t1\t2",
            "MECH\tOAUTHBEARER\tplaintext",
            "MECH\tXOAUTH2\tplaintext",
        ]
        assert lines[3] == f"SPID\t{os.getpid()}"
        assert re.fullmatch(r"CUID\t[0-9]+", lines[4])
        assert re.fullmatch(r"COOKIE\t[0-9a-f]{32}", lines[5])
        assert len(lines) == 6
    assert first[4] != second[4]
    assert first[5] != second[5]


async def test_ok_fail_tempfail(nursery: trio.Nursery, socket_path: str) -> None:
    stub = Stub()
    await serve(nursery, socket_path, stub)
    client = await Client.connect(socket_path)
    await client.handshake()
    assert await client.authenticate(1, "good-alice@example.org") == "OK\t1\tuser=alice@example.org"
    assert await client.authenticate(2, "bad") == "FAIL\t2\treason=Authentication failed"
    assert await client.authenticate(3, "temp") == (
        "FAIL\t3\tcode=temp_fail\treason=Temporary authentication failure"
    )
    assert [r.context.frontend for r in stub.seen] == ["dovecot"] * 3
    assert stub.seen[0].context.service == "smtp"


async def test_failure_challenge_reaches_client(nursery: trio.Nursery, socket_path: str) -> None:
    await serve(nursery, socket_path, Stub())
    client = await Client.connect(socket_path)
    await client.handshake()
    await client.send(auth_line(5, "bad"))
    reply = await client.line()
    assert reply is not None and reply.startswith("CONT\t5\t")
    assert b"openid-configuration" in base64.b64decode(reply.split("\t")[2])
    await client.send("CONT\t5\tAQ==")
    assert await client.line() == "FAIL\t5\treason=Authentication failed"


async def test_many_concurrent_connections(nursery: trio.Nursery, socket_path: str) -> None:
    await serve(nursery, socket_path, Stub())
    results: dict[int, list[str | None]] = {}

    async def one(n: int) -> None:
        client = await Client.connect(socket_path)
        await client.handshake()
        replies = []
        for rid in range(1, 6):
            token = f"good-u{n}-{rid}@example.org" if rid % 2 else "bad"
            replies.append(await client.authenticate(rid, token))
        results[n] = replies
        await client.stream.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as clients:
            for n in range(50):
                clients.start_soon(one, n)
    assert len(results) == 50
    for n, replies in results.items():
        assert replies == [
            f"OK\t1\tuser=u{n}-1@example.org",
            "FAIL\t2\treason=Authentication failed",
            f"OK\t3\tuser=u{n}-3@example.org",
            "FAIL\t4\treason=Authentication failed",
            f"OK\t5\tuser=u{n}-5@example.org",
        ]


async def test_pipelined_requests_on_one_connection(
    nursery: trio.Nursery, socket_path: str
) -> None:
    await serve(nursery, socket_path, Stub())
    client = await Client.connect(socket_path)
    await client.handshake()
    await client.send(*(auth_line(rid, f"good-u{rid}") for rid in range(1, 21)))
    with trio.fail_after(5):
        replies = {await client.line() for _ in range(20)}
    assert replies == {f"OK\t{rid}\tuser=u{rid}" for rid in range(1, 21)}


async def test_vanishing_client_does_not_disturb_others(
    nursery: trio.Nursery, socket_path: str
) -> None:
    stub = Stub()
    await serve(nursery, socket_path, stub)
    other = await Client.connect(socket_path)
    await other.handshake()
    leaver = await Client.connect(socket_path)
    await leaver.handshake()
    await leaver.send(auth_line(1, "hang"))
    with trio.fail_after(5):
        await stub.started.wait()
    await leaver.stream.aclose()
    with trio.fail_after(5):
        while stub.cancelled == 0:  # its in-flight authentication is cancelled
            await trio.sleep(0.01)
        assert await other.authenticate(1, "good-bob") == "OK\t1\tuser=bob"


async def test_bad_request_then_good(nursery: trio.Nursery, socket_path: str) -> None:
    await serve(nursery, socket_path, Stub())
    client = await Client.connect(socket_path)
    await client.handshake()
    await client.send("AUTH\t1\tFOO\tservice=smtp")
    assert await client.line() == "FAIL\t1\treason=Unsupported mechanism"
    await client.send("AUTH\t2\tOAUTHBEARER\tresp=!!!")
    assert await client.line() == (
        "FAIL\t2\tcode=invalid_base64\treason=Invalid base64 data in initial response"
    )
    await client.send("AUTH\t3\tOAUTHBEARER\tresp=" + "A" * 20000)
    assert await client.line() == "FAIL\t3\treason=Authentication failed"
    assert await client.authenticate(4, "good-carol") == "OK\t4\tuser=carol"


async def test_timeout_gives_tempfail(nursery: trio.Nursery, socket_path: str) -> None:
    await serve(nursery, socket_path, Stub(), request_timeout=0.3)
    client = await Client.connect(socket_path)
    await client.handshake()
    start = trio.current_time()
    with trio.fail_after(3):
        reply = await client.authenticate(1, "slow")
    assert reply == "FAIL\t1\tcode=temp_fail\treason=Temporary authentication failure"
    assert 0.25 <= trio.current_time() - start < 2
    assert await client.authenticate(2, "good-dave") == "OK\t2\tuser=dave"


async def test_authenticator_exception_is_tempfail(nursery: trio.Nursery, socket_path: str) -> None:
    await serve(nursery, socket_path, Stub())
    client = await Client.connect(socket_path)
    await client.handshake()
    assert await client.authenticate(1, "boom") == (
        "FAIL\t1\tcode=temp_fail\treason=Temporary authentication failure"
    )
    assert await client.authenticate(2, "good-erin") == "OK\t2\tuser=erin"


async def test_tempfail_disconnect(nursery: trio.Nursery, socket_path: str) -> None:
    await serve(nursery, socket_path, Stub(), tempfail_disconnect=True)
    client = await Client.connect(socket_path)
    await client.handshake()
    assert await client.authenticate(1, "bad") == "FAIL\t1\treason=Authentication failed"
    with trio.fail_after(3):
        # No FAIL: Postfix would read it and answer 535. Hanging up gives 454.
        assert await client.authenticate(2, "temp") is None
    second = await Client.connect(socket_path)  # the client reconnects and carries on
    await second.handshake()
    assert await second.authenticate(3, "good-h") == "OK\t3\tuser=h"


async def test_tempfail_disconnect_on_timeout(nursery: trio.Nursery, socket_path: str) -> None:
    await serve(nursery, socket_path, Stub(), tempfail_disconnect=True, request_timeout=0.2)
    client = await Client.connect(socket_path)
    await client.handshake()
    with trio.fail_after(3):
        assert await client.authenticate(1, "slow") is None


async def test_tempfail_without_disconnect_keeps_connection(
    nursery: trio.Nursery, socket_path: str
) -> None:
    await serve(nursery, socket_path, Stub())
    client = await Client.connect(socket_path)
    await client.handshake()
    await client.authenticate(1, "temp")
    assert await client.authenticate(2, "good-f") == "OK\t2\tuser=f"


async def test_incompatible_version_hangs_up(nursery: trio.Nursery, socket_path: str) -> None:
    await serve(nursery, socket_path, Stub())
    client = await Client.connect(socket_path)
    while await client.line() != "DONE":
        pass
    await client.send("VERSION\t2\t0")
    with trio.fail_after(3):
        assert await client.line() is None


async def test_max_connections(nursery: trio.Nursery, socket_path: str) -> None:
    await serve(nursery, socket_path, Stub(), max_connections=2)
    first = await Client.connect(socket_path)
    await first.handshake()
    second = await Client.connect(socket_path)
    await second.handshake()
    await trio.sleep(0.05)
    # the older connection authenticates: the newer one is now the longest idle
    assert await first.authenticate(1, "good-f") == "OK\t1\tuser=f"
    await trio.sleep(0.05)
    # At the cap, a newcomer is served and the longest-idle connection of the
    # peer holding the most (here all three are ours) makes room for it.
    third = await Client.connect(socket_path)
    with trio.fail_after(3):
        assert (await third.handshake())[0] == "VERSION\t1\t2"
        assert await second.line() is None  # closed by the server
    assert await first.authenticate(2, "good-f") == "OK\t2\tuser=f"
    assert await third.authenticate(1, "good-t") == "OK\t1\tuser=t"


async def test_handle_stream_directly() -> None:
    server, client_stream = trio.testing.memory_stream_pair()
    stub = Stub()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(handle_dovecot_stream, server, stub, mechanisms=MECHS, spid=1, cuid=9)
        )
        await client_stream.send_all(f"VERSION\t1\t2\n{auth_line(1, 'good-g')}\n".encode())
        received = b""
        while not received.endswith(b"OK\t1\tuser=g\n"):
            received += await client_stream.receive_some()
        assert received.startswith(b"VERSION\t1\t2\nMECH\tOAUTHBEARER\tplaintext\n")
        assert b"SPID\t1\nCUID\t9\n" in received
        await client_stream.aclose()  # EOF: the handler returns
