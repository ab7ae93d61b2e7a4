"""Provider faults, end to end: a test issuer we control misbehaves; the daemon's socket answers.

The daemon runs in-process (``run_daemon``) with two providers: ``flaky``
(the DevIssuer the test breaks) and ``steady`` (which must keep working
whatever ``flaky`` does). Every fault must give a *temporary* failure
(``FAIL … code=temp_fail``; Postfix gets 454 with ``tempfail = "disconnect"``)
or a clean refusal, never an OK, never a crash, and requests are counted at
the provider (checklist rows 15 and 16: single-flight refetch with a
cooldown, no redirects, a size cap, keys kept across outages).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import trio

from saslauthd_oidc.config import LoggingConfig, parse_config
from saslauthd_oidc.core.request import token_fingerprint
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.service.logs import configure_logging
from tests.peers.dovecot_client import LineClient
from tests.support_issuer import FaultIssuer

USER = "alice@example.org"


@cache
def _issuer(role: str) -> FaultIssuer:
    return FaultIssuer(algorithms=("ES256",))


def ob(token: str) -> str:
    return base64.b64encode(f"n,a={USER},\x01auth=Bearer {token}\x01\x01".encode()).decode()


@dataclass
class Stack:
    flaky: FaultIssuer
    steady: FaultIssuer
    trap: FaultIssuer
    client: LineClient
    log: io.StringIO
    rid: int = 0

    async def login(self, token: str) -> str:
        self.rid += 1
        rid = self.rid
        await self.client.send(f"AUTH\t{rid}\tOAUTHBEARER\tservice=smtp\tresp={ob(token)}")
        reply = await self.client.line()
        if reply.startswith(f"CONT\t{rid}\t"):
            await self.client.send(f"CONT\t{rid}\tAQ==")
            reply = await self.client.line()
        return reply

    def reason(self, token: str) -> str:
        fp = token_fingerprint(token)
        events = [json.loads(line) for line in self.log.getvalue().splitlines() if line]
        mine = [e for e in events if e.get("event") == "authentication" and e.get("token") == fp]
        return str(mine[-1]["reason"])

    async def ok(self, token: str) -> None:
        assert await self.login(token) == f"OK\t{self.rid}\tuser={USER}"

    async def tempfail(self, token: str, *reasons: str) -> None:
        reply = await self.login(token)
        assert reply.startswith(f"FAIL\t{self.rid}\t") and "code=temp_fail" in reply, reply
        assert self.reason(token) in reasons, self.reason(token)

    async def steady_works(self) -> None:
        await self.ok(self.steady.mint(email=USER, audience="mail"))


Start = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def start(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Start]:
    flaky, steady, trap = _issuer("flaky"), _issuer("steady"), _issuer("trap")
    for iss in (flaky, steady, trap):
        iss.requests.clear()
        iss.fail_status, iss.delay, iss.jwks_override, iss.redirect = None, 0.0, None, None
        await nursery.start(iss.serve)
    started: list[LineClient] = []

    async def _start(*, flaky_issuer: str | None = None, **provider: Any) -> Stack:
        sock = str(tmp_path / "auth")
        config = parse_config(
            {
                "server": {"auth_socket": sock, "request_timeout": 1.0},
                "cache": {"negative_ttl": 0},
                "provider": [
                    {
                        "name": "flaky",
                        "issuer": flaky_issuer or flaky.issuer,
                        "allow_http": True,
                        **provider,
                    },
                    {"name": "steady", "issuer": steady.issuer, "allow_http": True},
                ],
                "rule": [
                    {
                        "name": "f",
                        "provider": "flaky",
                        "audiences": ["mail"],
                        "username": "{email}",
                    },
                    {
                        "name": "s",
                        "provider": "steady",
                        "audiences": ["mail"],
                        "username": "{email}",
                    },
                ],
            }
        )
        log = io.StringIO()
        configure_logging(LoggingConfig(level="info", format="json"), stream=log)
        await nursery.start(
            lambda task_status: run_daemon(config, task_status=task_status, handle_signals=False)
        )
        client = LineClient(await trio.open_unix_socket(sock))
        await client.handshake()
        started.append(client)
        return Stack(flaky, steady, trap, client, log)

    yield _start
    for c in started:
        await c.stream.aclose()
    assert sum(trap.requests.values()) == 0, trap.requests
    nursery.cancel_scope.cancel()


async def test_provider_down(start: Start) -> None:
    flaky = _issuer("flaky")
    token = flaky.mint({"iss": "http://127.0.0.1:9"}, email=USER)  # discard port: refused
    s = await start(flaky_issuer="http://127.0.0.1:9")
    await s.tempfail(token, "provider_unavailable")
    await s.tempfail(token, "provider_unavailable")
    await s.steady_works()


async def test_provider_slower_than_the_timeout(start: Start) -> None:
    _issuer("flaky").delay = 5.0  # request_timeout is 1 s; set before the daemon's first load
    s = await start()
    token = s.flaky.mint(email=USER)
    await s.tempfail(token, "timeout", "provider_unavailable")
    await s.steady_works()
    s.flaky.delay = 0.0


@pytest.mark.parametrize("status", [500, 502, 503, 404, 401])
async def test_provider_error_status(start: Start, status: int) -> None:
    _issuer("flaky").fail_status = status
    s = await start(jwks_cooldown=0)
    await s.tempfail(s.flaky.mint(email=USER), "provider_unavailable")
    await s.steady_works()
    s.flaky.fail_status = None
    # recovers once the provider does (no negative cache configured here)
    await s.ok(s.flaky.mint(email=USER))


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"[]",
        b'{"keys": "nope"}',
        b'{"keys": [1, "x", null]}',
        b'{"keys": []}',
        b'{"keys": [], "keys": []}',
        b"\xff\xfe garbage",
        b'{"keys": [' * 5000,
    ],
    ids=[
        "not-json",
        "empty",
        "array",
        "keys-string",
        "keys-junk",
        "no-keys",
        "duplicate-keys",
        "binary",
        "deep",
    ],
)
async def test_garbage_jwks(start: Start, body: bytes) -> None:
    _issuer("flaky").jwks_override = body
    s = await start()
    token = s.flaky.mint(email=USER)
    reply = await s.login(token)
    assert reply.startswith(f"FAIL\t{s.rid}\t"), reply
    assert s.reason(token) in {"provider_unavailable", "unknown_key"}
    await s.steady_works()


async def test_hundred_megabyte_jwks_is_cut_off(start: Start) -> None:
    _issuer("flaky").jwks_override = b'{"keys": [' + b" " * (100 << 20) + b"]}"
    s = await start()
    token = s.flaky.mint(email=USER)
    await s.tempfail(token, "provider_unavailable")
    await s.steady_works()
    assert "too_large" in s.log.getvalue()
    s.flaky.jwks_override = None


async def test_redirect_to_another_host_is_not_followed(start: Start) -> None:
    trap = _issuer("trap")
    _issuer("flaky").redirect = f"{trap.url}/jwks.json"
    s = await start()
    token = trap.mint({"iss": s.flaky.issuer}, email=USER)  # signed by the redirect target
    await s.tempfail(token, "provider_unavailable")
    assert sum(trap.requests.values()) == 0
    await s.steady_works()
    s.flaky.redirect = None


async def test_key_rotation_old_kid_gone_new_kid_appears(start: Start) -> None:
    s = await start(jwks_cooldown=0)
    old_token = s.flaky.mint(email=USER)
    await s.ok(old_token)
    unused_old = s.flaky.mint(email=USER)
    old_kid = s.flaky.kid("ES256")
    new_kid = s.flaky.rotate("ES256")
    assert new_kid != old_kid
    fetches = s.flaky.requests["/jwks.json"]
    await s.ok(s.flaky.mint(email=USER))  # unknown kid: one refetch finds it
    assert s.flaky.requests["/jwks.json"] == fetches + 1
    reply = await s.login(unused_old)  # its key is gone from the JWKS now
    assert reply.startswith(f"FAIL\t{s.rid}\t") and "temp_fail" not in reply, reply
    assert s.reason(unused_old) == "unknown_key"


async def test_keys_kept_when_provider_goes_down_after_loading(start: Start) -> None:
    s = await start()
    await s.ok(s.flaky.mint(email=USER))
    s.flaky.fail_status = 500
    await s.ok(s.flaky.mint(email=USER))  # a new token, the known key: no fetch needed
    s.flaky.fail_status = None


async def test_unknown_kid_flood_refetches_once_per_cooldown(start: Start) -> None:
    s = await start(jwks_cooldown=3600)
    await s.ok(s.flaky.mint(email=USER))
    before = dict(s.flaky.requests)
    tokens = [s.flaky.mint(email=USER, header={"kid": f"nope-{i}"}) for i in range(300)]
    for rounds in range(2):
        lines = [
            f"AUTH\t{1000 * (rounds + 1) + i}\tOAUTHBEARER\tservice=smtp\tresp={ob(t)}"
            for i, t in enumerate(tokens[:60])
        ]
        await s.client.stream.send_all(("\n".join(lines) + "\n").encode())
        pending = len(lines)
        while pending:
            verb, rid, *_ = (await s.client.line()).split("\t")
            if verb == "CONT":
                await s.client.send(f"CONT\t{rid}\tAQ==")
            else:
                assert verb == "FAIL"
                pending -= 1
    for t in tokens[60:]:
        # new kids in tokens newer than the keys: never an OK; a temporary failure
        # while the one refetch per cooldown is used up (it could be a rotation)
        reply = await s.login(t)
        assert reply.startswith(f"FAIL\t{s.rid}\t") and "user=" not in reply
    after = s.flaky.requests
    assert after["/jwks.json"] - before.get("/jwks.json", 0) <= 1, after
    wk = "/.well-known/openid-configuration"
    assert after[wk] - before.get(wk, 0) <= 1, after
