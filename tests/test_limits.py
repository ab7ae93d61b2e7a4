"""Descriptor budgets, the fair accept loop, guarded streams, key-size bounds: unit level.

The same behaviours through a real daemon process are in tests/test_attacks_dos.py.
"""

from __future__ import annotations

import base64
import errno
import functools
import json
import os
import re
import resource
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from saslauthd_oidc.config import ConfigError, ProviderConfig, parse_config
from saslauthd_oidc.frontends.accept import (
    ConnectionTable,
    GuardedStream,
    _Connection,
    serve_connections,
)
from saslauthd_oidc.frontends.http import HttpLimits, serve_http
from saslauthd_oidc.providers.http import make_http_client
from saslauthd_oidc.providers.keypolicy import (
    HMAC_MAX_SECRET_BYTES,
    RefusalLog,
    hmac_secret_refusal,
    jwk_refusal,
)
from saslauthd_oidc.providers.oidc import OidcProvider
from saslauthd_oidc.service.limits import (
    TARGET_NOFILE,
    budget_for,
    caps_for,
    limit_warnings,
    planned_limit,
    split,
)
from saslauthd_oidc.tools.devissuer import DevIssuer

PROVIDER = {"name": "p", "issuer": "https://idp.example.org", "jwks_uri": "https://idp/jwks"}
RULE = {"name": "r", "provider": "p", "audiences": ["mail"], "username": "{email}"}


def config(server: dict[str, Any] | None = None, http: dict[str, Any] | None = None) -> Any:
    return parse_config(
        {
            "server": {"auth_socket": "/run/x/auth", **(server or {})},
            "http": {"auth": "open", **(http or {})},
            "provider": [PROVIDER],
            "rule": [RULE],
        }
    )


# --------------------------------------------------------------------------- budgets


def test_split_reserves_and_keeps_http_below_auth() -> None:
    b = split(1024, auth=True, saslauthd=False, http=True, outbound=20)
    assert b.reserve == 32 + 1024 // 32
    assert b.auth + b.http + b.reserve + b.outbound <= 1024
    assert 0 < b.http < b.auth
    assert b.saslauthd == 0
    alone = split(1024, auth=True, saslauthd=False, http=False, outbound=20)
    assert alone.auth > b.auth and alone.http == 0
    three = split(1024, auth=True, saslauthd=True, http=True, outbound=20)
    assert three.auth > three.saslauthd > 0 and three.auth > three.http > 0


def test_split_at_a_tiny_limit_still_gives_each_listener_a_slot() -> None:
    b = split(40, auth=True, saslauthd=True, http=True, outbound=20)
    assert (b.auth, b.saslauthd, b.http) == (1, 1, 1)


def test_outbound_counts_each_http_client() -> None:
    plain = config(server={"http_listen": ["127.0.0.1:8480"]})
    own_ca = parse_config(
        {
            "server": {"auth_socket": "/run/x/auth"},
            "provider": [PROVIDER, {**PROVIDER, "name": "q", "ca_file": "/etc/ca.pem"}],
            "rule": [RULE],
        }
    )
    assert budget_for(plain, 1024).outbound == 20
    assert budget_for(own_ca, 1024).outbound == 40


def test_unset_caps_are_defaults_within_the_budget() -> None:
    cfg = config(server={"http_listen": ["127.0.0.1:8480"]})
    big = caps_for(cfg, budget_for(cfg, 65536))
    assert (big.auth, big.http, big.lowered) == (4096, 256, ())
    small = caps_for(cfg, budget_for(cfg, 1024))
    assert small.auth == budget_for(cfg, 1024).auth < 4096
    assert small.lowered == ()  # nothing was configured, so nothing is "lowered"


def test_configured_caps_above_the_budget_are_lowered_and_warned_about() -> None:
    cfg = config(
        server={"http_listen": ["127.0.0.1:8480"], "max_connections": 4096},
        http={"max_connections": 5000},
    )
    budget = budget_for(cfg, 1024)
    caps = caps_for(cfg, budget)
    assert caps.auth == budget.auth and caps.http == budget.http
    assert caps.lowered == (
        ("server.max_connections", 4096, budget.auth),
        ("http.max_connections", 5000, budget.http),
    )
    warnings = limit_warnings(cfg, 1024, 1024)
    assert len(warnings) == 2
    assert warnings[0].startswith("server.max_connections = 4096 does not fit")
    assert "LimitNOFILE=" in warnings[0]
    # the hard limit lets serve raise the soft one: then it fits
    assert limit_warnings(cfg, 1024, 524288) == []
    fits = config(server={"max_connections": 100})
    assert limit_warnings(fits, 1024, 1024) == []


def test_planned_limit() -> None:
    assert planned_limit(1024, 1024) == 1024
    assert planned_limit(1024, 524288) == TARGET_NOFILE
    assert planned_limit(1024, 4096) == 4096
    assert planned_limit(100000, 200000) == 100000  # never lowered
    assert planned_limit(1024, resource.RLIM_INFINITY) == TARGET_NOFILE


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("server", "max_connections", 0),
        ("http", "max_connections", "many"),
        ("http", "read_timeout", 0),
        ("http", "write_timeout", -1),
        ("http", "keepalive_timeout", "x"),
        ("http", "max_requests_per_connection", 0),
    ],
)
def test_limit_keys_are_validated_by_name(section: str, key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        config(**{section: {key: value}})
    assert err.value.key == f"{section}.{key}"


# --------------------------------------------------------------------------- the accept loop


class _Stream(trio.abc.Stream):
    def __init__(self) -> None:
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


def _conn(table: ConnectionTable, peer: str, last_active: float) -> _Connection:
    stream = GuardedStream(_Stream())
    stream.last_active = last_active
    c = _Connection(stream, ("uid", peer), trio.CancelScope())
    table.add(c)
    return c


async def test_victim_is_the_longest_idle_of_the_peer_holding_the_most() -> None:
    table = ConnectionTable("t", 10)
    a_old = _conn(table, "a", 1.0)
    _conn(table, "a", 5.0)
    _conn(table, "a", 6.0)
    p_old = _conn(table, "postfix", 0.5)
    _conn(table, "postfix", 7.0)
    assert table.victim(("uid", "postfix")) is a_old  # a holds the most
    assert table.victim(("uid", "new")) is a_old
    assert table.victim(("uid", "a")) is a_old
    _conn(table, "postfix", 8.0)  # a tie: the newcomer's own peer gives way
    assert table.victim(("uid", "postfix")) is p_old
    assert table.victim(("uid", "a")) is a_old
    table.remove(a_old)
    assert table.held_by(("uid", "a")) == 2 and len(table) == 5


class _Listener(trio.abc.Listener[Any]):
    """Hands out queued streams; raises queued OSErrors first."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[Any](100)

    async def accept(self) -> Any:
        item = await self.receive.receive()
        if isinstance(item, OSError):
            raise item
        return item

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_at_the_cap_a_newcomer_is_served_and_the_longest_idle_is_closed(
    autojump_clock: trio.abc.Clock,
) -> None:
    listener = _Listener()
    serving: list[GuardedStream] = []
    ended: list[GuardedStream] = []

    async def serve_one(stream: GuardedStream) -> None:
        serving.append(stream)
        try:
            await trio.sleep_forever()
        finally:
            ended.append(stream)

    streams = [_Stream() for _ in range(3)]
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_connections(
                    listener, serve_one, max_connections=2, name="t", task_status=task_status
                )
            )
            for s in streams:
                await listener.send.send(s)
                await trio.sleep(1)
            assert [g.inner for g in serving] == streams
            assert [g.inner for g in ended] == [streams[0]]  # the longest idle made room
            assert serving[0].gone and not serving[1].gone
            nursery.cancel_scope.cancel()
    warning = next(e for e in logs if e["event"] == "connection_limit")
    assert warning["listener"] == "t" and warning["max_connections"] == 2


async def test_accept_out_of_descriptors_is_logged_and_retried(
    autojump_clock: trio.abc.Clock,
) -> None:
    listener = _Listener()
    served: list[Any] = []

    async def serve_one(stream: GuardedStream) -> None:
        served.append(stream.inner)

    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_connections(
                    listener, serve_one, max_connections=5, task_status=task_status
                )
            )
            await listener.send.send(OSError(errno.EMFILE, "Too many open files"))
            stream = _Stream()
            await listener.send.send(stream)
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    assert served == [stream]
    failed = [e for e in logs if e["event"] == "accept_failed"]
    assert failed and failed[0]["log_level"] == "warning"


async def test_guarded_stream_write_timeout_drops_a_client_that_does_not_read(
    autojump_clock: trio.abc.Clock,
) -> None:
    server, client = trio.testing.lockstep_stream_pair()
    gone: list[bool] = []
    guarded = GuardedStream(server, write_timeout=10.0, on_gone=lambda: gone.append(True))
    start = trio.current_time()
    with pytest.raises(trio.BrokenResourceError):
        await guarded.send_all(b"x" * 100)  # nobody reads the other end
    assert 10.0 <= trio.current_time() - start < 11.0
    assert guarded.gone and gone == [True]
    with pytest.raises(trio.BrokenResourceError):
        await guarded.send_all(b"more")  # gone: no further work
    assert await guarded.receive_some() == b""
    await client.aclose()


async def test_guarded_stream_peer_gone_cancels_the_connection() -> None:
    server, client = trio.testing.memory_stream_pair()
    with trio.CancelScope() as scope:
        guarded = GuardedStream(server, on_gone=scope.cancel)
        await client.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await guarded.send_all(b"answer")
        await trio.sleep_forever()  # cancelled by on_gone
    assert scope.cancelled_caught and guarded.gone


async def test_guarded_stream_records_activity(autojump_clock: trio.abc.Clock) -> None:
    server, client = trio.testing.memory_stream_pair()
    guarded = GuardedStream(server)
    first = guarded.last_active
    await trio.sleep(5)
    await client.send_all(b"hello")
    assert await guarded.receive_some() == b"hello"
    assert guarded.last_active == first + 5


# --------------------------------------------------------------------------- key sizes


def b64u(value: int) -> str:
    raw = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def rsa(bits: int, e: int = 65537) -> dict[str, Any]:
    return {"kty": "RSA", "n": b64u(secrets.randbits(bits) | (1 << (bits - 1)) | 1), "e": b64u(e)}


def b64b(size: int) -> str:
    return base64.urlsafe_b64encode(b"\x01" * size).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("jwk", "refused"),
    [
        (rsa(2048), None),
        (rsa(4096), None),
        (rsa(8192), None),
        (rsa(3072, 3), None),
        (rsa(2048, 2**32 - 1), None),
        (rsa(2047), "RSA modulus of 2047 bits"),
        (rsa(8193), "RSA modulus of 8193 bits"),
        (rsa(16384), "RSA modulus missing, invalid or over 8192 bits"),
        (rsa(4096, 2**3000 + 1), "RSA public exponent missing, invalid or over 2**32"),
        (rsa(2048, 2**32 + 1), "RSA public exponent must be odd"),
        (rsa(2048, 65536), "RSA public exponent must be odd"),
        (rsa(2048, 1), "RSA public exponent must be odd"),
        ({"kty": "RSA", "n": "!!!", "e": "AQAB"}, "RSA modulus missing"),
        ({"kty": "RSA", "e": "AQAB"}, "RSA modulus missing"),
        ({"kty": "EC", "crv": "P-256", "x": b64b(32), "y": b64b(32)}, None),
        ({"kty": "EC", "crv": "P-521", "x": b64b(66), "y": b64b(66)}, None),
        ({"kty": "EC", "crv": "P-256", "x": b64b(33), "y": b64b(32)}, "EC x coordinate"),
        ({"kty": "EC", "crv": "P-256", "x": b64b(32), "y": b64b(9000)}, "EC y coordinate"),
        ({"kty": "EC", "crv": "secp256k1", "x": b64b(32), "y": b64b(32)}, "EC curve"),
        ({"kty": "OKP", "crv": "Ed25519", "x": b64b(32)}, None),
        ({"kty": "OKP", "crv": "Ed448", "x": b64b(57)}, None),
        ({"kty": "OKP", "crv": "Ed25519", "x": b64b(64)}, "OKP public key is not 32 bytes"),
        ({"kty": "OKP", "crv": "X25519", "x": b64b(32)}, "OKP curve"),
        ({"kty": "oct", "k": "AAAA"}, "unsupported kty"),
    ],
)
def test_jwk_size_bounds(jwk: dict[str, Any], refused: str | None) -> None:
    reason = jwk_refusal(jwk)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(refused), reason


def test_hmac_secret_bounds() -> None:
    assert hmac_secret_refusal(b"k" * 32, "HS256") is None
    assert hmac_secret_refusal(b"k" * 31, "HS256") == "HMAC secret shorter than 32 bytes"
    assert hmac_secret_refusal(b"k" * 63, "HS512") == "HMAC secret shorter than 64 bytes"
    assert hmac_secret_refusal(b"k" * HMAC_MAX_SECRET_BYTES, "HS512") is None
    too_long = hmac_secret_refusal(b"k" * (HMAC_MAX_SECRET_BYTES + 1), "HS256")
    assert too_long == f"HMAC secret longer than {HMAC_MAX_SECRET_BYTES} bytes"


def test_hmac_secret_too_long_is_a_config_error(tmp_path: Any) -> None:
    secret = tmp_path / "hmac"
    secret.write_bytes(b"s" * (HMAC_MAX_SECRET_BYTES + 1))
    secret.chmod(0o600)
    from saslauthd_oidc.providers.oidc import _hmac_keys

    cfg = parse_config(
        {
            "server": {"auth_socket": "/run/x/auth"},
            "provider": [{**PROVIDER, "algorithms": ["HS256"], "hmac_secret_file": str(secret)}],
            "rule": [RULE],
        }
    )
    with pytest.raises(ConfigError) as err:
        _hmac_keys(cfg.providers[0], None)
    assert err.value.key == "provider p.hmac_secret_file"
    assert "longer than" in err.value.message
    assert "sss" not in str(err.value)  # never the secret itself


def test_the_shipped_unit_holds_the_default_caps() -> None:
    unit = Path(__file__).resolve().parent.parent / "contrib/systemd/saslauthd-oidc.service"
    values = re.findall(r"^LimitNOFILE=(\d+)$", unit.read_text(), re.MULTILINE)
    assert len(values) == 1
    limit = int(values[0])
    cfg = config(
        server={"http_listen": ["127.0.0.1:8480"], "saslauthd_socket": "/run/x/mux"},
    )
    caps = caps_for(cfg, budget_for(cfg, planned_limit(limit, limit)))
    assert (caps.auth, caps.saslauthd, caps.http) == (4096, 4096, 256)
    assert limit_warnings(config(server={"max_connections": 4096}), limit, limit) == []


# --------------------------------------------------------------------------- the HTTP listener


async def _echo_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"got %d" % len(body)})


async def _serve(nursery: trio.Nursery, **limits: Any) -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    await nursery.start(
        functools.partial(serve_http, _echo_app, [sock], limits=HttpLimits(**limits))
    )
    return int(sock.getsockname()[1])


async def _exchange(port: int, data: bytes, *, wait: float = 5.0) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        got = b""
        with trio.fail_after(wait):
            while chunk := await stream.receive_some(65536):
                got += chunk
    return got


def _get(target: str = "/", headers: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode()


async def test_http_request_bounds(nursery: trio.Nursery) -> None:
    port = await _serve(nursery)
    assert (await _exchange(port, _get("/" + "a" * 100))).startswith(b"HTTP/1.1 200")
    long_target = await _exchange(port, _get("/" + "a" * 3000))
    assert long_target.startswith(b"HTTP/1.1 414") and b"aaaa" not in long_target
    long_header = await _exchange(port, _get("/", "Referer: https://" + "r" * 5000 + "\r\n"))
    assert long_header.startswith(b"HTTP/1.1 431")
    token = "t" * 16000  # a long bearer token still fits
    assert (await _exchange(port, _get("/", f"Authorization: Bearer {token}\r\n"))).startswith(
        b"HTTP/1.1 200"
    )


async def test_http_body_that_does_not_arrive_gets_408(nursery: trio.Nursery) -> None:
    port = await _serve(nursery, read_timeout=0.3)
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"
    assert (await _exchange(port, head)).startswith(b"HTTP/1.1 408")


async def test_http_idle_connection_is_closed_after_keepalive_timeout(
    nursery: trio.Nursery,
) -> None:
    port = await _serve(nursery, keepalive_timeout=0.3)
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"  # keep-alive
    got = await _exchange(port, request)  # returns at the server's close
    assert got.startswith(b"HTTP/1.1 200") and got.count(b"HTTP/1.1") == 1
    assert await _exchange(port, b"") == b""  # nothing sent at all: closed too


async def test_http_connection_cap_closes_the_longest_idle(nursery: trio.Nursery) -> None:
    port = await _serve(nursery, max_connections=2, keepalive_timeout=60)
    first = await trio.open_tcp_stream("127.0.0.1", port)
    await trio.sleep(0.05)
    second = await trio.open_tcp_stream("127.0.0.1", port)
    await trio.sleep(0.05)
    assert (await _exchange(port, _get())).startswith(b"HTTP/1.1 200")  # served at the cap
    with trio.fail_after(5):
        assert await first.receive_some() == b""  # the longest idle made room
    await second.send_all(_get())
    with trio.fail_after(5):
        assert (await second.receive_some()).startswith(b"HTTP/1.1 200")
    await first.aclose()
    await second.aclose()


def test_check_config_warns_about_caps_the_descriptor_limit_cannot_hold(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nauth_socket = "/run/x/auth"\nmax_connections = 4096\n'
        'http_listen = ["127.0.0.1:8480"]\n[http]\nauth = "open"\nmax_connections = 1000\n'
        '[[provider]]\nname = "p"\nissuer = "https://idp.example.org"\n'
        'jwks_uri = "https://idp.example.org/jwks"\n'
        '[[rule]]\nname = "r"\nprovider = "p"\naudiences = ["mail"]\nusername = "{email}"\n'
    )

    def at(soft: int, hard: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "saslauthd_oidc", "check-config", "--config", str(path)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
        )

    low = at(1024, 1024)
    assert low.returncode == 0, low.stderr
    warnings = [line for line in low.stdout.splitlines() if line.startswith("warning:")]
    assert any(
        w.startswith("warning: server.max_connections = 4096 does not fit") for w in warnings
    )
    assert any(w.startswith("warning: http.max_connections = 1000 does not fit") for w in warnings)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 8192:
        pytest.skip(f"hard RLIMIT_NOFILE {hard}: cannot show a raisable limit")
    raisable = at(1024, hard)  # serve raises the soft limit: then both fit
    assert raisable.returncode == 0, raisable.stderr
    assert "does not fit" not in raisable.stdout


def test_serve_raises_the_soft_limit_and_budgets_from_what_it_got(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"hard RLIMIT_NOFILE {hard}: nothing to raise to")
    path = tmp_path / "c.toml"
    path.write_text(
        f'[server]\nauth_socket = "{tmp_path}/auth"\n[logging]\nformat = "json"\n'
        '[[provider]]\nname = "p"\nissuer = "https://127.0.0.1:1"\n'
        'jwks_uri = "https://127.0.0.1:1/jwks"\n'
        '[[rule]]\nname = "r"\nprovider = "p"\naudiences = ["mail"]\nusername = "{email}"\n'
    )
    log = tmp_path / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "saslauthd_oidc", "serve", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=lambda: resource.setrlimit(  # noqa: PLW1509 - only setrlimit
                resource.RLIMIT_NOFILE, (1024, hard)
            ),
        )
    try:
        deadline = time.monotonic() + 20
        while b'"event": "started"' not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
    finally:
        proc.terminate()
        proc.wait(10)
    want = planned_limit(1024, hard)
    assert re.search(rf"^Max open files\s+{want}\s", limits, re.MULTILINE), limits
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    budget = next(e for e in events if e["event"] == "descriptor_budget")
    assert budget["raised_from"] == 1024 and budget["nofile"] == want
    assert budget["max_connections_auth"] == min(4096, budget["auth"])


def test_http_limits_changed_on_reload_need_a_restart() -> None:
    from saslauthd_oidc.service.lifecycle import plan_reload

    old = config(server={"http_listen": ["127.0.0.1:8480"]})
    new = config(
        server={"http_listen": ["127.0.0.1:8480"]},
        http={"max_connections": 10, "write_timeout": 3.0, "metrics": False},
    )
    assert plan_reload(old, new).restart_keys == ("http.max_connections", "http.write_timeout")


async def test_peer_is_the_uid_on_unix_sockets_also_through_a_workers_stream() -> None:
    from saslauthd_oidc.frontends.accept import peer_of
    from saslauthd_oidc.service.workers import _CountedStream

    a, b = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    try:
        assert peer_of(stream) == ("uid", os.getuid())
        assert peer_of(_CountedStream(stream, lambda: None)) == ("uid", os.getuid())
        assert peer_of(object()) is None
    finally:
        a.close()
        b.close()


async def _big_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"x" * 4_000_000})


async def test_http_client_that_does_not_read_is_dropped_after_write_timeout(
    nursery: trio.Nursery,
) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    limits = HttpLimits(write_timeout=0.5, keepalive_timeout=60, read_timeout=60)
    with capture_logs() as logs:
        await nursery.start(functools.partial(serve_http, _big_app, [sock], limits=limits))
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        client.setblocking(False)
        await trio.to_thread.run_sync(lambda: client.connect_ex(sock.getsockname()))
        await trio.sleep(0.1)
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(10):
            while not any(e["event"] == "write_timeout" for e in logs):
                await trio.sleep(0.05)
        # the server closed it: the client reads what was sent, then the end
        received = 0
        client.setblocking(True)
        client.settimeout(5)
        try:
            while chunk := await trio.to_thread.run_sync(client.recv, 65536):
                received += len(chunk)
        except ConnectionResetError:
            pass
        client.close()
    assert 0 < received < 4_000_000


def test_refusal_log_reports_each_refused_key_once() -> None:
    log = RefusalLog(limit=3)
    assert log.new(["a", "b", "a"]) == ["a", "b"]
    assert log.new(["a", "b", "c"]) == ["c"]
    assert log.new(["d", "e"]) == ["d", "e"]  # over the limit: reported, not remembered
    assert log.new(["d"]) == ["d"]


class _OversizedKeyIssuer(DevIssuer):
    def jwks(self) -> dict[str, Any]:
        doc = super().jwks()
        doc["keys"].append({**rsa(8200), "kid": "too-big", "use": "sig"})
        return doc


async def test_a_refused_key_is_logged_once_with_provider_and_kid(nursery: trio.Nursery) -> None:
    issuer = _OversizedKeyIssuer(algorithms=("ES256",))
    await nursery.start(issuer.serve)
    cfg = ProviderConfig(
        name="dev", issuer=issuer.issuer or "", allow_http=True, algorithms=("ES256", "RS256")
    )
    async with make_http_client(timeout=2.0) as client:
        provider = OidcProvider(cfg, client)
        with capture_logs() as logs:
            assert await provider.refresh() is True
            assert await provider.refresh() is True  # fetched again: not logged again
    assert issuer.requests["/jwks.json"] == 2
    refused = [e for e in logs if e["event"] == "jwks key refused"]
    assert len(refused) == 1
    assert refused[0]["provider"] == "dev" and refused[0]["log_level"] == "warning"
    assert "kid='too-big'" in refused[0]["key"] and "8200 bits" in refused[0]["key"]
    assert provider.key_count == 1  # the refused key is not among the keys
