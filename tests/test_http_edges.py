"""Small leaks and wrong discovery answers of the HTTP listeners, through the assembled daemon.

One daemon (``run_daemon``, in process) with its Dovecot-protocol socket, an
HTTP listener on loopback and one on a Unix socket, two real loopback
issuers. Each test is an attack or a wrong answer seen on the real
listeners: the client's ``port=`` overriding the server's ``lport``, HTTP
Basic refusing unknown users without hashing, Referer matching without a
host boundary, ``Host``/``X-Forwarded-Host`` reflected into ``resource``,
discovery by file order, one-element ``scopes_supported``.
"""

from __future__ import annotations

import base64
import hmac
import json
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import saslauthd_oidc.frontends.http_callers as http_callers
from saslauthd_oidc.config import parse_config
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.tools.devissuer import DevIssuer
from tests.peers.dovecot_client import LineClient
from tests.peers.postfix import free_tcp_port

USER = "alice@example.org"
CALLER, CALLER_SECRET = "dovecot", "caller-secret"
WELL_KNOWN = "/.well-known/oauth-protected-resource"


@dataclass
class Stack:
    a: DevIssuer
    b: DevIssuer
    tcp: httpx.AsyncClient  # loopback: not a trusted proxy
    unix: httpx.AsyncClient  # the Unix-socket listener: trusted_proxies = ["unix"]
    auth_socket: str


@pytest.fixture
async def stack(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Stack]:
    a, b = DevIssuer(algorithms=("ES256",)), DevIssuer(algorithms=("ES256",))
    for issuer in (a, b):
        await nursery.start(issuer.serve)
    users = tmp_path / "http-users"
    users.write_text(f"{CALLER}:{CALLER_SECRET}\n")
    users.chmod(0o600)
    port = free_tcp_port()
    sock = tmp_path / "http"
    auth_socket = str(tmp_path / "auth")
    config = parse_config(
        {
            "server": {
                "auth_socket": auth_socket,
                "http_socket": str(sock),
                "http_listen": [f"127.0.0.1:{port}"],
                "request_timeout": 3.0,
            },
            "http": {"users_file": str(users), "trusted_proxies": ["unix"]},
            "provider": [
                {"name": "a", "issuer": a.issuer, "allow_http": True},
                {"name": "b", "issuer": b.issuer, "allow_http": True},
            ],
            "rule": [
                {
                    "name": "webmail",
                    "provider": "a",
                    "audiences": ["webmail"],
                    "services": ["imap"],  # not for the SMTP tests' challenges
                    "referers": ["https://webmail.example.net"],
                    "challenge_scope": "openid email profile",
                },
                # Before the more specific rules below: discovery must not care.
                {"name": "any", "provider": "b", "audiences": ["mail"]},
                {
                    "name": "submission",
                    "provider": "a",
                    "audiences": ["mail"],
                    "ports": [587],
                    "required_scopes": ["mail", "email"],
                },
                {
                    "name": "mail-host",
                    "provider": "a",
                    "audiences": ["mail"],
                    "hosts": ["mail.example.net"],
                    "challenge_scope": "openid email profile",
                },
                {
                    "name": "jmap",
                    "provider": "b",
                    "audiences": ["jmap"],
                    "hosts": ["jmap.example.org"],
                    "resource_paths": ["/jmap"],
                },
            ],
        }
    )
    await nursery.start(
        lambda task_status: run_daemon(config, task_status=task_status, handle_signals=False)
    )
    unix = httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(sock)), base_url="http://localhost"
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as tcp, unix:
        yield Stack(a, b, tcp, unix, auth_socket)
    nursery.cancel_scope.cancel()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def discover(
    client: httpx.AsyncClient, path: str = "", **headers: str
) -> tuple[int, dict[str, Any] | None, bytes]:
    r = await client.get(WELL_KNOWN + path, headers=headers)
    body = r.json() if r.headers.get("content-type") == "application/json" else None
    return r.status_code, body, r.content


# --------------------------------------------------------------------------- port= vs lport


async def test_the_servers_lport_beats_the_clients_port(stack: Stack) -> None:
    """A client on port 25 saying ``port=587`` does not get the port-587 rule."""
    client = await LineClient.connect(stack.auth_socket)
    await client.handshake()
    token = stack.a.mint(
        {"scope": "mail email"}, email=USER, audience="mail"
    )  # good for rule "submission" only (rule "any" is provider b's)
    payload = f"n,a={USER},\x01port=587\x01auth=Bearer {token}\x01\x01"
    await client.send(f"AUTH\t1\tOAUTHBEARER\tservice=smtp\tlport=25\tresp={b64(payload.encode())}")
    reply = await client.line()
    assert reply.startswith("CONT\t1\t"), reply
    await client.send("CONT\t1\tAQ==")
    assert (await client.line()).startswith("FAIL\t1")
    await client.send(
        f"AUTH\t2\tOAUTHBEARER\tservice=smtp\tlport=587\tresp={b64(payload.encode())}"
    )
    assert await client.line() == f"OK\t2\tuser={USER}"
    # No lport (Postfix, Exim send none): the client's port= is all there is.
    await client.send(f"AUTH\t3\tOAUTHBEARER\tservice=smtp\tresp={b64(payload.encode())}")
    assert await client.line() == f"OK\t3\tuser={USER}"
    await client.stream.aclose()


async def test_challenge_names_every_required_scope(stack: Stack) -> None:
    client = await LineClient.connect(stack.auth_socket)
    await client.handshake()
    token = stack.a.mint({"scope": "mail"}, email=USER, audience="mail")  # "email" missing
    payload = f"n,a={USER},\x01auth=Bearer {token}\x01\x01".encode()
    await client.send(f"AUTH\t1\tOAUTHBEARER\tservice=smtp\tlport=587\tresp={b64(payload)}")
    reply = await client.line()
    challenge = json.loads(base64.b64decode(reply.split("\t", 2)[2]))
    assert challenge["scope"] == "mail email"
    await client.stream.aclose()


# --------------------------------------------------------------------------- HTTP Basic


async def test_basic_hashes_and_compares_for_unknown_users_too(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same work refuses a known name with a wrong password and an unknown name."""
    compared: list[bytes] = []

    def compare_digest(x: bytes, y: bytes) -> bool:
        compared.append(y)
        return hmac.compare_digest(x, y)

    monkeypatch.setattr(http_callers, "hmac", types.SimpleNamespace(compare_digest=compare_digest))

    async def introspect(user: str, password: str) -> int:
        compared.clear()
        r = await stack.tcp.post(
            "/introspect",
            content=b"token=x",
            headers={"content-type": "application/x-www-form-urlencoded"},
            auth=(user, password),
        )
        return r.status_code

    assert await introspect(CALLER, "wrong") == 401
    known = list(compared)
    assert await introspect("nobody", "wrong") == 401
    unknown = list(compared)
    assert len(known) == len(unknown) == 1
    assert known[0] != unknown[0]  # the dummy digest, not a real user's
    assert await introspect(CALLER, CALLER_SECRET) == 200


# --------------------------------------------------------------------------- Referer


@pytest.mark.parametrize(
    "referer",
    [
        "https://webmail.example.net.attacker.test/",
        "https://webmail.example.network/",
        "https://webmail.example.net@attacker.test/",
        "https://webmail.example.net:8443/",
        "http://webmail.example.net/",
    ],
)
async def test_referer_needs_the_exact_origin(stack: Stack, referer: str) -> None:
    status, doc, _ = await discover(stack.tcp, host="other.example.net", referer=referer)
    assert status == 200 and doc is not None
    assert doc["authorization_servers"] == [stack.b.issuer]  # rule "any", not "webmail"


async def test_referer_of_the_webmail_selects_its_rule(stack: Stack) -> None:
    status, doc, _ = await discover(
        stack.tcp, host="other.example.net", referer="https://WEBMAIL.example.net/inbox?x"
    )
    assert status == 200 and doc is not None
    assert doc["authorization_servers"] == [stack.a.issuer]
    assert doc["scopes_supported"] == ["openid", "email", "profile"]  # three scopes, not one


# --------------------------------------------------------------------------- Host


@pytest.mark.parametrize(
    "host",
    [
        "jmap.example.org:443@evil.test",
        "jmap.example.org@evil.test",
        "jmap.example.org/evil.test",
        "evil.test, jmap.example.org",
        "jmap.example.org:99999",
    ],
)
async def test_invalid_host_is_refused_and_not_reflected(stack: Stack, host: str) -> None:
    for client in (stack.tcp, stack.unix):
        status, doc, body = await discover(client, "/jmap", host=host)
        assert status == 400, host
        assert doc == {"error": "invalid_request", "error_description": "bad Host"}
        assert b"evil" not in body


async def test_forwarded_host_only_from_a_trusted_proxy(stack: Stack) -> None:
    headers = {"host": "jmap.example.org", "x-forwarded-host": "evil.test"}
    # Loopback TCP is not in trusted_proxies: X-Forwarded-* are ignored.
    status, doc, body = await discover(
        stack.tcp, "/jmap", **headers, **{"x-forwarded-proto": "http"}
    )
    assert status == 200 and doc is not None
    assert doc["resource"] == "https://jmap.example.org/jmap"
    assert b"evil" not in body
    # The Unix-socket listener is ("unix"): the proxy's headers count, and must be valid.
    status, doc, _ = await discover(
        stack.unix, "/jmap", host="127.0.0.1:8480", **{"x-forwarded-host": "jmap.example.org"}
    )
    assert status == 200 and doc is not None
    assert doc["resource"] == "https://jmap.example.org/jmap"
    status, _, body = await discover(stack.unix, "/jmap", **headers)
    assert status == 404  # evil.test: no rule for it, nothing advertised
    assert b"evil" not in body
    status, _, body = await discover(
        stack.unix, "/jmap", host="jmap.example.org", **{"x-forwarded-host": "a@evil.test"}
    )
    assert status == 400
    assert b"evil" not in body


async def test_resource_holds_only_configured_values(stack: Stack) -> None:
    long_path = "/jmap/" + "x" * 30000
    status, _, body = await discover(stack.tcp, long_path, host="jmap.example.org")
    assert status == 414  # over 2048 bytes: refused before routing (serve_http's bounds)
    assert len(body) < 200
    status, doc, _ = await discover(stack.tcp, "/jmap", host="JMAP.example.org.:8443")
    assert status == 200 and doc is not None
    assert doc["resource"] == "https://jmap.example.org:8443/jmap"
    assert doc["authorization_servers"] == [stack.b.issuer]


# --------------------------------------------------------------------------- specificity


async def test_discovery_picks_the_most_specific_rule_not_the_first(stack: Stack) -> None:
    """Rule "any" (no conditions) comes first in the file; the host's own rule wins."""
    status, doc, _ = await discover(stack.tcp, host="mail.example.net")
    assert status == 200 and doc is not None
    assert doc["authorization_servers"] == [stack.a.issuer]
    assert doc["resource"] == "https://mail.example.net"
    assert doc["scopes_supported"] == ["openid", "email", "profile"]
    # A host with a referer-only rule and a rule without conditions: the referer one.
    status, doc, _ = await discover(
        stack.tcp, host="mail.example.net", referer="https://webmail.example.net/"
    )
    assert doc is not None and doc["authorization_servers"] == [stack.a.issuer]
