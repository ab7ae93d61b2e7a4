"""Tokens that are not plain bearer access tokens, from a real OpenID server.

npm ``oidc-provider`` on loopback issues them through real flows: an ID token
from a scripted authorization_code + PKCE login, and DPoP-bound access tokens
(RFC 9449: the token request carries a DPoP proof, so the token says
``cnf.jkt`` and is only valid with a proof of possession, which SASL cannot
carry). Each goes through the assembled daemon's real Dovecot-protocol socket.
Before the fix, the ID token and the DPoP-bound JWT both logged in.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from saslauthd_oidc.config import LoggingConfig, parse_config
from saslauthd_oidc.core.request import token_fingerprint
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.service.logs import configure_logging
from tests.peers.dovecot_client import LineClient
from tests.peers.oidc_provider import CLIENT_AUTH, OidcProviderPeer

pytestmark = pytest.mark.peer

ALICE = "alice@example.org"


@pytest.fixture(scope="module")
def op(oidc_provider_ready: None) -> Iterator[OidcProviderPeer]:
    with OidcProviderPeer() as peer:
        yield peer


def claims_of(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    parsed: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return parsed


def dpop_token(op: OidcProviderPeer, client_id: str, resource: str | None) -> dict[str, Any]:
    """A client_credentials grant with a DPoP proof (RFC 9449 §4): a sender-constrained token."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    proof = pyjwt.encode(
        {
            "jti": secrets.token_urlsafe(16),
            "htm": "POST",
            "htu": op.token_endpoint,
            "iat": int(time.time()),
        },
        key,
        algorithm="ES256",
        headers={"typ": "dpop+jwt", "jwk": jwk},
    )
    data = {"grant_type": "client_credentials", "scope": "mail email"}
    if resource is not None:
        data["resource"] = resource
    secret = op.clients[client_id]
    assert CLIENT_AUTH[client_id] == "client_secret_basic"
    with httpx.Client(timeout=10.0, trust_env=False) as http:
        resp = http.post(
            op.token_endpoint, data=data, auth=(client_id, secret), headers={"DPoP": proof}
        )
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    assert answer["token_type"] == "DPoP", answer
    return answer


class Daemon:
    def __init__(self, sock: str, log: io.StringIO, client: LineClient) -> None:
        self.sock, self.log, self.client, self.rid = sock, log, client, 0

    async def login(self, token: str, user: str | None) -> str:
        self.rid += 1
        gs2 = f"n,a={user}," if user else "n,,"
        payload = base64.b64encode(f"{gs2}\x01auth=Bearer {token}\x01\x01".encode()).decode()
        await self.client.send(f"AUTH\t{self.rid}\tOAUTHBEARER\tservice=smtp\tresp={payload}")
        reply = await self.client.line()
        if reply.startswith(f"CONT\t{self.rid}\t"):
            await self.client.send(f"CONT\t{self.rid}\tAQ==")
            reply = await self.client.line()
        return reply

    def reason(self, token: str) -> str:
        fp = token_fingerprint(token)
        events = [json.loads(line) for line in self.log.getvalue().splitlines() if line]
        found = [e["reason"] for e in events if e.get("token") == fp and "reason" in e]
        assert found, f"no authentication logged for {fp}"
        return str(found[-1])

    async def refused(self, token: str, reason: str, user: str | None = None) -> None:
        reply = await self.login(token, user)
        assert reply.startswith(f"FAIL\t{self.rid}\t") and "temp_fail" not in reply, reply
        assert self.reason(token) == reason

    async def ok(self, token: str, account: str, user: str | None = None) -> None:
        reply = await self.login(token, user)
        assert reply == f"OK\t{self.rid}\tuser={account}", (reply, self.reason(token))


async def start_daemon(op: OidcProviderPeer, nursery: trio.Nursery, tmp_path: Path) -> Daemon:
    secret = tmp_path / "introspection.secret"
    secret.write_text(op.introspect_credentials("saslauthd")[1] + "\n")
    secret.chmod(0o600)
    sock = str(tmp_path / "auth")
    config = parse_config(
        {
            "server": {"auth_socket": sock, "request_timeout": 5.0},
            "cache": {"negative_ttl": 0},
            "provider": [
                {  # no token_types: the default, where an ID token used to pass
                    "name": "op",
                    "issuer": op.issuer,
                    "allow_http": True,
                    "algorithms": ["ES256", "RS256"],
                    "client_id": "saslauthd",
                    "client_secret_file": str(secret),
                }
            ],
            "rule": [
                {  # access tokens for the mail resource
                    "name": "mail",
                    "provider": "op",
                    "audiences": ["urn:mail"],
                    "authzid": "ignore",
                    "username": "{client_id}@clients.example.org",
                },
                {  # opaque tokens of the client, introspected
                    "name": "opaque",
                    "provider": "op",
                    "authorized_parties": ["mail-webmail"],
                    "authzid": "ignore",
                    "username": "{client_id}@clients.example.org",
                },
                {  # the client_id as audience (Dovecot's habit): what an ID token carries
                    "name": "client-audience",
                    "provider": "op",
                    "audiences": ["mail-webmail"],
                    "username": "{sub}@example.org",
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
    return Daemon(sock, log, client)


@pytest.fixture
async def daemon(
    op: OidcProviderPeer, nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[Daemon]:
    d = await start_daemon(op, nursery, tmp_path)
    yield d
    await d.client.stream.aclose()
    nursery.cancel_scope.cancel()


async def test_a_real_id_token_does_not_log_in(op: OidcProviderPeer, daemon: Daemon) -> None:
    tokens = await trio.to_thread.run_sync(
        lambda: op.authorization_code_tokens("mail-webmail", resource="urn:mail")
    )
    id_token = tokens["id_token"]
    claims = claims_of(id_token)
    # what makes it an ID token: issued to the client (aud), naming no client_id,
    # azp or scope as every access token does; this one has no at_hash or nonce
    assert (claims["aud"], claims["sub"]) == ("mail-webmail", "alice"), claims
    assert not {"client_id", "azp", "scope", "scp"} & set(claims), claims
    await daemon.refused(id_token, "id_token", user=ALICE)
    # the access token of the same login is what logs in
    access = tokens["access_token"]
    assert claims_of(access)["aud"] == "urn:mail"
    await daemon.ok(access, "mail-webmail@clients.example.org")


async def test_a_real_dpop_bound_jwt_does_not_log_in(op: OidcProviderPeer, daemon: Daemon) -> None:
    answer = await trio.to_thread.run_sync(lambda: dpop_token(op, "mail-webmail", "urn:mail"))
    token = answer["access_token"]
    assert "jkt" in claims_of(token)["cnf"]  # bound to the DPoP key
    await daemon.refused(token, "sender_constrained")
    # the same client's plain bearer token logs in
    bearer = await trio.to_thread.run_sync(lambda: op.token("mail-webmail", resource="urn:mail"))
    await daemon.ok(bearer, "mail-webmail@clients.example.org")


async def test_a_real_dpop_bound_opaque_token_does_not_log_in(
    op: OidcProviderPeer, daemon: Daemon
) -> None:
    answer = await trio.to_thread.run_sync(lambda: dpop_token(op, "mail-webmail", None))
    token = answer["access_token"]
    # the provider's own introspection says so: cnf.jkt, token_type DPoP
    seen = await trio.to_thread.run_sync(lambda: op.introspect(token))
    assert seen["active"] is True and "jkt" in seen.get("cnf", {}), seen
    await daemon.refused(token, "sender_constrained")
    bearer = await trio.to_thread.run_sync(lambda: op.token("mail-webmail"))
    await daemon.ok(bearer, "mail-webmail@clients.example.org")


async def test_logins_work_again_as_soon_as_the_real_idp_is_back(
    op: OidcProviderPeer, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The first login after an outage works: no jwks_cooldown (30 s) of 454 answers after it.

    The provider is frozen (SIGSTOP) before the daemon starts, so the daemon never
    has its keys: the first login times out fetching them (a temporary failure:
    454 from Postfix). Right after the provider is resumed, the next login works.
    """
    token = await trio.to_thread.run_sync(lambda: op.token("mail-webmail", resource="urn:mail"))
    op.pause()
    try:
        daemon = await start_daemon(op, nursery, tmp_path)
        reply = await daemon.login(token, None)
        assert reply.startswith(f"FAIL\t{daemon.rid}\t") and "temp_fail" in reply, reply
        assert daemon.reason(token) in ("provider_unavailable", "timeout")
    finally:
        op.resume()
    await daemon.ok(token, "mail-webmail@clients.example.org")
    await daemon.client.stream.aclose()
    nursery.cancel_scope.cancel()
