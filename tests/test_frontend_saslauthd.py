"""The trio shell around the saslauthd mux protocol, over real Unix sockets.

A stub stands in for the engine here; ``test_daemon_saslauthd`` below runs the
assembled daemon with a real issuer.
"""

from __future__ import annotations

import functools
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from saslauthd_oidc.config import ConfigError, parse_config
from saslauthd_oidc.core.outcome import Reason, Verdict
from saslauthd_oidc.core.request import AuthRequest, Mechanism
from saslauthd_oidc.frontends.saslauthd import serve_saslauthd_listener
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.tools.devissuer import DevIssuer


def counted(*fields: bytes | str) -> bytes:
    raw = [f.encode() if isinstance(f, str) else f for f in fields]
    return b"".join(struct.pack("!H", len(f)) + f for f in raw)


class Stub:
    """An engine stand-in: the token says what to answer."""

    def __init__(self) -> None:
        self.seen: list[AuthRequest] = []
        self.cancelled = 0

    async def __call__(self, request: AuthRequest) -> Verdict:
        self.seen.append(request)
        token = request.credentials.token
        if token == "good":
            return Verdict(reason=Reason.OK, account=request.credentials.authzid)
        if token == "temp":
            return Verdict(reason=Reason.PROVIDER_UNAVAILABLE, detail="jwks fetch failed")
        if token == "boom":
            raise RuntimeError("engine bug")
        if token == "hang":
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled += 1
        return Verdict(reason=Reason.BAD_SIGNATURE, detail="signature")


async def exchange(path: str, data: bytes, *, eof: bool = False) -> bytes:
    """Send ``data``, optionally half-close, and read the whole answer until EOF."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(data)
        if eof:
            await stream.send_eof()
        reply = b""
        while chunk := await stream.receive_some(4096):
            reply += chunk
    return reply


def decode(reply: bytes) -> str:
    (length,) = struct.unpack("!H", reply[:2])
    assert len(reply) == 2 + length, reply
    return reply[2:].decode()


@pytest.fixture
def socket_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="sa", dir="/tmp")
    yield str(Path(directory) / "mux")
    shutil.rmtree(directory, ignore_errors=True)


async def serve(nursery: trio.Nursery, path: str, stub: Stub, **kw: Any) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(64)
    await nursery.start(
        functools.partial(serve_saslauthd_listener, trio.SocketListener(sock), stub, **kw)
    )


async def test_ok_no_and_the_request_the_engine_sees(
    nursery: trio.Nursery, socket_path: str
) -> None:
    stub = Stub()
    await serve(nursery, socket_path, stub)
    assert decode(await exchange(socket_path, counted("alice", "good", "smtp", "example.org"))) == (
        "OK ok"
    )
    assert decode(await exchange(socket_path, counted("alice", "bad", "smtp", ""))) == (
        "NO bad_signature"
    )
    five = counted("bob@example.org", "good", "imap", "", "198.51.100.4;4242")
    assert decode(await exchange(socket_path, five)) == "OK ok"
    first, _, third = stub.seen
    assert first.mechanism is Mechanism.PLAIN
    assert first.credentials.authzid == "alice@example.org"
    assert first.context.frontend == "saslauthd"
    assert first.context.service == "smtp"
    assert third.credentials.authzid == "bob@example.org"
    assert third.context.remote_ip == "198.51.100.4"
    assert third.context.remote_port == 4242


async def test_tempfail_and_engine_errors_are_temporary_no(
    nursery: trio.Nursery, socket_path: str
) -> None:
    await serve(nursery, socket_path, Stub())
    temp = decode(await exchange(socket_path, counted("alice", "temp", "smtp", "")))
    assert temp == "NO temporary failure, try again later: provider_unavailable"
    boom = decode(await exchange(socket_path, counted("alice", "boom", "smtp", "")))
    assert boom == "NO temporary failure, try again later: internal_error"


async def test_engine_timeout_gives_temporary_no(nursery: trio.Nursery, socket_path: str) -> None:
    stub = Stub()
    await serve(nursery, socket_path, stub, request_timeout=0.2)
    reply = decode(await exchange(socket_path, counted("alice", "hang", "smtp", "")))
    assert reply == "NO temporary failure, try again later: timeout"
    assert stub.cancelled == 1


@pytest.mark.parametrize(
    ("data", "eof", "text"),
    [
        (counted("", "good", "smtp", ""), False, "NO missing_authzid"),
        (counted("alice", "", "smtp", ""), False, "NO missing_token"),
        (counted("a" * 300), False, "NO malformed_request"),
        (b"\x00\x05alice\xff\xff", False, "NO token_too_large"),
        (counted("alice", "good"), True, "NO malformed_request"),
        (counted("al\nice", "good", "smtp", ""), False, "NO malformed_request"),
    ],
)
async def test_malformed_frames_get_no_and_never_reach_the_engine(
    nursery: trio.Nursery, socket_path: str, data: bytes, eof: bool, text: str
) -> None:
    stub = Stub()
    await serve(nursery, socket_path, stub, max_password_bytes=1000)
    assert decode(await exchange(socket_path, data, eof=eof)) == text
    assert stub.seen == []


async def test_slow_client_gets_no_after_request_timeout(
    nursery: trio.Nursery, socket_path: str
) -> None:
    stub = Stub()
    await serve(nursery, socket_path, stub, request_timeout=0.2)
    assert decode(await exchange(socket_path, b"\x00\x05ali")) == "NO malformed_request"
    assert stub.seen == []


async def test_one_bad_connection_does_not_disturb_another(
    nursery: trio.Nursery, socket_path: str
) -> None:
    await serve(nursery, socket_path, Stub(), request_timeout=5.0)
    idle = await trio.open_unix_socket(socket_path)
    async with idle:
        await idle.send_all(b"\x00\x05al")  # never completed while we work on
        garbage = await exchange(socket_path, b"\xff\xff" + b"x" * 70000)
        assert decode(garbage) == "NO malformed_request"
        good = await exchange(socket_path, counted("alice", "good", "smtp", ""))
        assert decode(good) == "OK ok"


async def test_client_that_vanishes_does_not_take_the_listener_down(
    nursery: trio.Nursery, socket_path: str
) -> None:
    stub = Stub()
    await serve(nursery, socket_path, stub, request_timeout=0.5)
    for _ in range(3):
        stream = await trio.open_unix_socket(socket_path)
        await stream.send_all(counted("alice", "hang", "smtp", ""))
        await stream.aclose()
    assert decode(await exchange(socket_path, counted("alice", "good", "smtp", ""))) == "OK ok"


# ------------------------------------------------------- the assembled daemon, real engine


USER = "alice@example.org"


@pytest.fixture
async def daemon(nursery: trio.Nursery, socket_path: str) -> AsyncIterator[tuple[str, DevIssuer]]:
    issuer = DevIssuer(algorithms=("ES256",))
    await nursery.start(issuer.serve)
    assert issuer.issuer
    config = parse_config(
        {
            "server": {
                "auth_socket": str(Path(socket_path).with_name("auth")),
                "saslauthd_socket": socket_path,
                "saslauthd_socket_mode": "0600",
                "request_timeout": 2.0,
            },
            "provider": [{"name": "dev", "issuer": issuer.issuer, "allow_http": True}],
            "rule": [{"name": "mail", "provider": "dev", "audiences": ["mail"]}],
        }
    )
    await nursery.start(
        lambda task_status: run_daemon(config, task_status=task_status, handle_signals=False)
    )
    yield socket_path, issuer
    nursery.cancel_scope.cancel()


async def test_daemon_saslauthd_socket_with_real_tokens(
    daemon: tuple[str, DevIssuer],
) -> None:
    path, issuer = daemon
    assert Path(path).stat().st_mode & 0o777 == 0o600
    token = issuer.mint(email=USER, audience="mail")
    # PLAIN is not in server.mechanisms (the Dovecot socket's list): the
    # saslauthd socket is opted into by configuring it, not by that list.
    assert decode(await exchange(path, counted(USER, token, "smtp", ""))) == "OK ok"
    assert decode(await exchange(path, counted("alice", token, "smtp", "example.org"))) == "OK ok"
    assert decode(await exchange(path, counted("bob", token, "smtp", "example.org"))) == (
        "NO authzid_mismatch"
    )
    other = issuer.mint(email=USER, audience="other")
    assert decode(await exchange(path, counted(USER, other, "smtp", ""))) == "NO wrong_audience"


def test_saslauthd_socket_config_keys() -> None:
    base: dict[str, Any] = {
        "provider": [{"name": "p", "issuer": "https://idp.example"}],
        "rule": [{"name": "r", "provider": "p", "audiences": ["a"]}],
    }
    cfg = parse_config({**base, "server": {"saslauthd_socket": "/run/x/mux"}})
    assert cfg.server.saslauthd_socket == "/run/x/mux"
    assert cfg.server.saslauthd_socket_mode == 0o660
    assert cfg.server.saslauthd_socket_group is None
    cfg = parse_config(
        {
            **base,
            "server": {
                "saslauthd_socket": "/run/x/mux",
                "saslauthd_socket_mode": "0666",
                "saslauthd_socket_group": "mail",
            },
        }
    )
    assert (cfg.server.saslauthd_socket_mode, cfg.server.saslauthd_socket_group) == (
        0o666,
        "mail",
    )
    assert (
        parse_config({**base, "server": {"saslauthd_socket": ""}}).server.saslauthd_socket is None
    )
    with pytest.raises(ConfigError, match=r"^server\.saslauthd_socket_mode: "):
        parse_config({**base, "server": {"saslauthd_socket_mode": "rw"}})
    with pytest.raises(ConfigError, match=r"^server\.saslauthd_socket: must differ"):
        parse_config({**base, "server": {"auth_socket": "/run/a", "saslauthd_socket": "/run/a"}})


async def test_daemon_names_the_saslauthd_key_on_a_bad_group(tmp_path: Path) -> None:
    config = parse_config(
        {
            "server": {
                "auth_socket": str(tmp_path / "auth"),
                "saslauthd_socket": str(tmp_path / "mux"),
                "saslauthd_socket_group": "no-such-group-xyz",
            },
            "provider": [{"name": "p", "issuer": "https://idp.example"}],
            "rule": [{"name": "r", "provider": "p", "audiences": ["a"]}],
        }
    )
    with pytest.raises(ConfigError, match=r"^server\.saslauthd_socket_group: no such group"):
        await run_daemon(config, handle_signals=False)
    assert not (tmp_path / "auth").exists()  # the other socket is not left behind
