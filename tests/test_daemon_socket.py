"""The assembled daemon over its real Unix socket, with a real issuer on loopback.

Every malformed line, SASL payload and token of the reference lists is sent
on ONE connection: each must fail that request with the right reply, and the
same connection must still authenticate a good token afterwards.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from saslauthd_oidc.config import parse_config
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.tools.devissuer import DevIssuer
from tests.peers.dovecot_client import LineClient
from tests.support import oauthbearer
from tests.test_sasl import OAUTHBEARER_REJECT, XOAUTH2_REJECT

USER = "alice@example.org"


@pytest.fixture
async def daemon(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[tuple[str, DevIssuer]]:
    issuer = DevIssuer(algorithms=("ES256", "RS256"))
    await nursery.start(issuer.serve)
    assert issuer.issuer
    sock = str(tmp_path / "auth")
    config = parse_config(
        {
            "server": {
                "auth_socket": sock,
                "mechanisms": ["OAUTHBEARER", "XOAUTH2", "PLAIN", "LOGIN"],
                "request_timeout": 2.0,
            },
            "provider": [
                {
                    "name": "dev",
                    "issuer": issuer.issuer,
                    "allow_http": True,
                    "algorithms": ["ES256", "RS256"],
                    "token_types": ["at+jwt"],
                }
            ],
            "rule": [
                {"name": "mail", "provider": "dev", "audiences": ["mail"], "username": "{email}"}
            ],
        }
    )
    await nursery.start(
        lambda task_status: run_daemon(config, task_status=task_status, handle_signals=False)
    )
    yield sock, issuer
    nursery.cancel_scope.cancel()


async def connect(sock: str) -> LineClient:
    client = LineClient(await trio.open_unix_socket(sock))
    await client.handshake()
    return client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def expect_ok(client: LineClient, rid: int, token: str) -> None:
    await client.send(f"AUTH\t{rid}\tOAUTHBEARER\tservice=smtp\tresp={b64(oauthbearer(token))}")
    assert await client.line() == f"OK\t{rid}\tuser={USER}"


async def expect_refusal(
    client: LineClient, rid: int, mech: str, payload: bytes
) -> dict[str, Any] | None:
    """AUTH with payload; follow a failure challenge; return the challenge JSON (or None)."""
    await client.send(f"AUTH\t{rid}\t{mech}\tservice=smtp\tresp={b64(payload)}")
    reply = await client.line()
    challenge = None
    if reply.startswith(f"CONT\t{rid}\t"):
        challenge = json.loads(base64.b64decode(reply.split("\t", 2)[2]))
        answer = "AQ==" if mech == "OAUTHBEARER" else ""  # the client's %x01, or empty
        await client.send(f"CONT\t{rid}\t{answer}")
        reply = await client.line()
    assert reply.split("\t")[:2] == ["FAIL", str(rid)], reply
    assert "user=" not in reply
    return challenge


async def test_every_malformed_sasl_payload_fails_only_its_request(
    daemon: tuple[str, DevIssuer],
) -> None:
    sock, issuer = daemon
    client = await connect(sock)
    rid = 0
    cases = [("OAUTHBEARER", p.values[0]) for p in OAUTHBEARER_REJECT]
    cases += [("XOAUTH2", p.values[0]) for p in XOAUTH2_REJECT]
    for mech, payload in cases:
        assert isinstance(payload, bytes)
        rid += 1
        challenge = await expect_refusal(client, rid, mech, payload)
        if challenge is not None:
            assert challenge["status"] in {"invalid_request", "invalid_token", "400", "401"}
    rid += 1
    await expect_ok(client, rid, issuer.mint(email=USER))


async def test_malformed_protocol_lines_keep_the_connection(daemon: tuple[str, DevIssuer]) -> None:
    sock, issuer = daemon
    client = await connect(sock)
    good = b64(oauthbearer(issuer.mint(email=USER)))
    await client.send("AUTH\t1\tFOO\tservice=smtp")
    assert await client.line() == "FAIL\t1\treason=Unsupported mechanism"
    await client.send(f"AUTH\t2\tOAUTHBEARER\tservice=smtp\tresp={good}\tsecured")
    assert (await client.line()).startswith("FAIL\t2\t")
    await client.send("AUTH\t3\tOAUTHBEARER\tservice=smtp\tresp=!!!notb64")
    assert await client.line() == (
        "FAIL\t3\tcode=invalid_base64\treason=Invalid base64 data in initial response"
    )
    await client.send("AUTH\t4\tOAUTHBEARER\tservice=smtp\tresp=" + "A" * 20000)
    assert (await client.line()).startswith("FAIL\t4\t")
    await client.send("CONT\t99\tAQ==")
    assert await client.line() == "FAIL\t99\treason=Authentication request timed out"
    await client.send(b"\x00\xff garbage \x01\x02")
    await client.send("AUTH\t0\tOAUTHBEARER\tservice=smtp")
    await client.send("AUTH\tx\tOAUTHBEARER\tservice=smtp")
    await client.send("AUTH\t5\toauthbearer\tservice=smtp")  # case-insensitive, no IR
    assert await client.line() == "CONT\t5\t"
    await client.send(f"CONT\t5\t{good}")
    assert await client.line() == f"OK\t5\tuser={USER}"
    await client.send("AUTH\t6\tOAUTHBEARER\tservice=smtp\tresp=")  # minor 2: empty response
    assert (await client.line()).startswith("CONT\t6\t")


def _jws(header: dict[str, Any], claims: dict[str, Any], sig: bytes = b"") -> str:
    def enc(o: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(o).encode()).rstrip(b"=").decode()

    return f"{enc(header)}.{enc(claims)}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


async def test_attack_tokens_refused_with_reason_and_connection_survives(
    daemon: tuple[str, DevIssuer],
) -> None:
    sock, issuer = daemon
    client = await connect(sock)
    now = int(time.time())
    attacker = DevIssuer()  # never served: its keys are known to nobody but the attacker
    claims = {
        "iss": issuer.issuer,
        "aud": "mail",
        "sub": "a",
        "email": USER,
        "exp": now + 600,
        "iat": now,
    }
    tokens = [
        *[_jws({"alg": a, "typ": "at+jwt"}, claims) for a in ("none", "None", "NONE", "nOnE", "")],
        _jws({"typ": "at+jwt"}, claims),
        _jws({"alg": 123, "typ": "at+jwt"}, claims),
        _jws({"alg": ["RS256"], "typ": "at+jwt"}, claims),
        issuer.mint(email=USER, alg="RS256", header={"alg": "HS256"}),
        issuer.mint(email=USER, header={"kid": "../../etc/passwd"}),
        issuer.mint(email=USER, header={"kid": "x" * 5000}),
        issuer.mint(email=USER, header={"crit": ["exp"]}),
        # signed by an attacker's key that the header offers (jwk, jku) under the real kid
        attacker.mint(
            claims={"iss": issuer.issuer},
            email=USER,
            header={
                "kid": issuer.kid("ES256"),
                "jku": "http://127.0.0.1:1/jwks.json",
                "jwk": attacker.jwks()["keys"][0],
            },
        ),
        issuer.mint(email=USER, typ="JWT"),
        issuer.mint(email=USER, typ=None),
        issuer.mint(email=USER, claims={"exp": now - 3600, "iat": now - 7200, "nbf": None}),
        issuer.mint(email=USER, claims={"exp": str(now + 600)}),
        issuer.mint(email=USER, claims={"exp": True}),
        issuer.mint(email=USER, claims={"exp": None}),
        issuer.mint(email=USER, claims={"iat": now + 3600}),
        issuer.mint(email=USER, claims={"nbf": now + 3600}),
        issuer.mint(email=USER, claims={"iss": f"{issuer.issuer}/"}),
        issuer.mint(email=USER, audience="evil"),
        issuer.mint(email=USER, audience=["mail", "evil"]),
        issuer.mint(email="v@x\tuser=admin"),
        issuer.mint(email="bob@example.org"),
        "A" * 11000,  # fits the 16384-byte line; not a JWS
    ]
    for rid, token in enumerate(tokens, start=1):
        challenge = await expect_refusal(client, rid, "OAUTHBEARER", oauthbearer(token))
        assert challenge is not None and challenge["status"] == "invalid_token", (rid, challenge)
    await expect_ok(client, len(tokens) + 1, issuer.mint(email=USER))


async def test_many_concurrent_connections(daemon: tuple[str, DevIssuer]) -> None:
    sock, issuer = daemon
    tokens = [issuer.mint(email=USER) for _ in range(5)]

    async def one() -> None:
        client = await connect(sock)
        for rid, token in enumerate(tokens, start=1):
            await expect_ok(client, rid, token)
        await client.stream.aclose()

    async with trio.open_nursery() as n:
        for _ in range(50):
            n.start_soon(one)


async def test_xoauth2_and_plain(daemon: tuple[str, DevIssuer]) -> None:
    sock, issuer = daemon
    client = await connect(sock)
    token = issuer.mint(email=USER)
    xoauth2 = b64(f"user={USER}\x01auth=Bearer {token}\x01\x01".encode())
    await client.send(f"AUTH\t1\tXOAUTH2\tservice=imap\tresp={xoauth2}")
    assert await client.line() == f"OK\t1\tuser={USER}"
    plain = b64(f"\0{USER}\0{token}".encode())
    await client.send(f"AUTH\t2\tPLAIN\tservice=smtp\tresp={plain}")
    assert await client.line() == f"OK\t2\tuser={USER}"
