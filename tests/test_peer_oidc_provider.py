"""A real OpenID provider (npm ``oidc-provider``) as the issuer: the peer itself works.

Tokens come from real OAuth flows at the peer (client_credentials with
client_secret_basic and client_secret_post; authorization_code with PKCE for
a scripted user).  JWT access tokens (resource indicators) go through the
providers layer and through the assembled daemon over its Unix socket.
Opaque tokens are checked against the peer's own introspection endpoint here;
tests/test_peer_opaque_tokens.py takes them through the daemon and Postfix.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from saslauthd_oidc.config import Config, parse_config
from saslauthd_oidc.core.outcome import Refusal
from saslauthd_oidc.providers.http import make_http_client
from saslauthd_oidc.providers.jwt import VerifiedClaims, peek
from saslauthd_oidc.providers.registry import ProviderRegistry
from saslauthd_oidc.service.daemon import run_daemon
from tests.peers.dovecot_client import LineClient
from tests.peers.oidc_provider import OidcProviderPeer

pytestmark = pytest.mark.peer

RESOURCE = "urn:mail"
OTHER_RESOURCE = "urn:other"
CLIENT_DOMAIN = "clients.example.org"


@pytest.fixture(scope="module")
def op(oidc_provider_ready: None) -> Iterator[OidcProviderPeer]:
    with OidcProviderPeer() as peer:
        yield peer
    assert not peer.running


def make_config(op: OidcProviderPeer, sock: str = "/nonexistent/auth") -> Config:
    return parse_config(
        {
            "server": {
                "auth_socket": sock,
                "mechanisms": ["OAUTHBEARER", "XOAUTH2"],
                "request_timeout": 5.0,
            },
            "provider": [
                {
                    "name": "oidc-provider",
                    "issuer": op.issuer,
                    "allow_http": True,
                    "algorithms": ["ES256", "RS256"],
                    "token_types": ["at+jwt"],
                }
            ],
            "rule": [
                {
                    "name": "clients",
                    "provider": "oidc-provider",
                    "audiences": [RESOURCE],
                    "authzid": "ignore",
                    "username": "{client_id}@" + CLIENT_DOMAIN,
                }
            ],
        }
    )


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    def dec(seg: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
        return out

    head, body, _ = token.split(".")
    return dec(head), dec(body)


@pytest.fixture
async def registry(op: OidcProviderPeer) -> AsyncIterator[ProviderRegistry]:
    async with make_http_client(timeout=5.0) as client:
        reg = ProviderRegistry(make_config(op), client)
        yield reg
        await reg.aclose()


async def verify(registry: ProviderRegistry, token: str) -> VerifiedClaims:
    unverified = peek(token)
    assert not isinstance(unverified, Refusal), unverified
    result = await registry.get("oidc-provider").verify(token, unverified)
    assert isinstance(result, VerifiedClaims), result
    return result


# --------------------------------------------------------------------------- the peer


def test_discovery_names_the_peer_issuer(op: OidcProviderPeer) -> None:
    d = op.discovery
    assert d["issuer"] == op.issuer == f"http://127.0.0.1:{op.port}"
    assert d["token_endpoint"] == f"{op.issuer}/token"
    assert d["introspection_endpoint"] == f"{op.issuer}/token/introspection"
    assert "client_credentials" in d["grant_types_supported"]
    assert {"client_secret_basic", "client_secret_post"} <= set(
        d["token_endpoint_auth_methods_supported"]
    )
    jwks = httpx.get(d["jwks_uri"], trust_env=False).json()
    assert {k["alg"] for k in jwks["keys"]} == {"RS256", "ES256"}
    assert all("d" not in k for k in jwks["keys"])


def test_unknown_resource_and_wrong_secret_are_refused(op: OidcProviderPeer) -> None:
    resp = op.token_response("mail-desktop", resource="urn:nope")
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_target"
    op.clients["mail-desktop"], good = "wrong", op.clients["mail-desktop"]
    try:
        resp = op.token_response("mail-desktop", resource=RESOURCE)
    finally:
        op.clients["mail-desktop"] = good
    assert resp.status_code == 401 and resp.json()["error"] == "invalid_client"


# --------------------------------------------------------------------------- JWT access tokens


@pytest.mark.parametrize("client_id", ["mail-webmail", "mail-desktop"])  # basic, post
async def test_client_credentials_jwt_verifies(
    op: OidcProviderPeer, registry: ProviderRegistry, client_id: str
) -> None:
    token = op.token(client_id, resource=RESOURCE)
    header, _ = jwt_parts(token)
    assert header["typ"] == "at+jwt" and header["alg"] == "ES256"
    claims = (await verify(registry, token)).claims
    assert claims["iss"] == op.issuer
    assert claims["aud"] == RESOURCE
    assert claims["client_id"] == claims["sub"] == client_id
    assert claims["email"] == f"{client_id}@{CLIENT_DOMAIN}"
    assert set(claims["scope"].split()) == {"mail", "email"}


async def test_rs256_jwt_for_other_resource_verifies(
    op: OidcProviderPeer, registry: ProviderRegistry
) -> None:
    token = op.token("mail-webmail", resource=OTHER_RESOURCE, scope="other")
    assert jwt_parts(token)[0]["alg"] == "RS256"
    claims = (await verify(registry, token)).claims
    assert claims["aud"] == OTHER_RESOURCE and claims["scope"] == "other"


async def test_authorization_code_pkce_jwt_for_alice(
    op: OidcProviderPeer, registry: ProviderRegistry
) -> None:
    answer = op.authorization_code_tokens("mail-webmail", resource=RESOURCE)
    assert "id_token" in answer
    claims = (await verify(registry, answer["access_token"])).claims
    assert claims["sub"] == "alice"
    assert claims["email"] == "alice@example.org"
    assert claims["aud"] == RESOURCE and claims["client_id"] == "mail-webmail"


# --------------------------------------------------------------------------- opaque tokens


def test_opaque_token_is_active_at_introspection(op: OidcProviderPeer) -> None:
    token = op.token("mail-desktop")  # no resource: opaque
    assert isinstance(peek(token), Refusal)  # not a JWS
    client_id, secret = op.introspect_credentials("saslauthd")
    resp = httpx.post(
        op.discovery["introspection_endpoint"],
        data={"token": token},
        auth=(client_id, secret),  # client_secret_basic
        trust_env=False,
    )
    assert resp.status_code == 200
    answer = resp.json()
    assert answer["active"] is True
    assert answer["iss"] == op.issuer
    assert answer["client_id"] == "mail-desktop"
    assert answer["email"] == f"mail-desktop@{CLIENT_DOMAIN}"
    assert set(answer["scope"].split()) == {"mail", "email"}
    assert op.introspect(token + "x") == {"active": False}


def test_opaque_user_token_introspects_with_sub(op: OidcProviderPeer) -> None:
    answer = op.authorization_code_tokens(resource=None, scope="openid email")
    info = op.introspect(answer["access_token"])
    assert info["active"] is True
    assert info["sub"] == "alice" and info["email"] == "alice@example.org"


# --------------------------------------------------------------------------- the daemon


def oauthbearer(token: str, authzid: str = "someone@example.org") -> str:
    payload = f"n,a={authzid},\x01auth=Bearer {token}\x01\x01".encode()
    return base64.b64encode(payload).decode()


async def test_daemon_accepts_peer_jwt_and_refuses_other_resource(
    op: OidcProviderPeer, nursery: trio.Nursery, tmp_path: Path
) -> None:
    # Tokens first: the peer's client is synchronous (the daemon is not running yet).
    good = {cid: op.token(cid, resource=RESOURCE) for cid in ("mail-webmail", "mail-desktop")}
    other = op.token("mail-webmail", resource=OTHER_RESOURCE, scope="other")

    sock = str(tmp_path / "auth")
    config = make_config(op, sock)
    await nursery.start(
        lambda task_status: run_daemon(config, task_status=task_status, handle_signals=False)
    )
    client = LineClient(await trio.open_unix_socket(sock))
    await client.send("VERSION\t1\t2\nCPID\t42")
    while await client.line() != "DONE":
        pass

    for rid, (cid, token) in enumerate(good.items(), start=1):
        await client.send(f"AUTH\t{rid}\tOAUTHBEARER\tservice=smtp\tresp={oauthbearer(token)}")
        assert await client.line() == f"OK\t{rid}\tuser={cid}@{CLIENT_DOMAIN}"

    await client.send(f"AUTH\t9\tOAUTHBEARER\tservice=smtp\tresp={oauthbearer(other)}")
    reply = await client.line()
    assert reply.startswith("CONT\t9\t"), reply
    challenge = json.loads(base64.b64decode(reply.split("\t", 2)[2]))
    assert challenge["status"] == "invalid_token"
    await client.send("CONT\t9\tAQ==")
    reply = await client.line()
    assert reply.startswith("FAIL\t9\t") and "user=" not in reply
    nursery.cancel_scope.cancel()
