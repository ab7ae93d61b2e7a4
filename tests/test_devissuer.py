"""The development issuer: minting, key management, its HTTP surface, and the thread wrapper."""

from __future__ import annotations

import time

import httpx
import pytest
import trio

from saslauthd_oidc.config import ProviderConfig
from saslauthd_oidc.core.outcome import Reason, Refusal
from saslauthd_oidc.providers.http import make_http_client
from saslauthd_oidc.providers.jwt import VerifiedClaims, peek
from saslauthd_oidc.providers.oidc import OidcProvider
from saslauthd_oidc.tools.devissuer import SUPPORTED_ALGORITHMS, DevIssuer, DevIssuerThread
from tests.support_issuer import FaultIssuer


async def _verify(p: OidcProvider, token: str) -> VerifiedClaims | Refusal:
    u = peek(token)
    assert not isinstance(u, Refusal)
    return await p.verify(token, u)


async def test_minted_tokens_verify_through_provider(nursery: trio.Nursery) -> None:
    iss = DevIssuer(algorithms=SUPPORTED_ALGORITHMS)
    await nursery.start(iss.serve)
    assert iss.issuer is not None
    cfg = ProviderConfig(
        name="dev",
        issuer=iss.issuer,
        allow_http=True,
        algorithms=SUPPORTED_ALGORITHMS,
        token_types=("at+jwt",),
    )
    async with make_http_client(timeout=2) as client:
        p = OidcProvider(cfg, client)
        for alg in SUPPORTED_ALGORITHMS:
            result = await _verify(p, iss.mint(alg=alg))
            assert isinstance(result, VerifiedClaims), (alg, result)
            c = result.claims
            assert c["iss"] == iss.issuer
            assert (c["sub"], c["aud"], c["email"]) == ("alice", "mail", "alice@example.org")
            assert c["preferred_username"] == "alice"
            assert c["client_id"] == "dev-client"
            assert set(c["scope"].split()) == {"openid", "email", "profile"}
            assert c["exp"] - c["iat"] == 600
            assert result.header == {"alg": alg, "typ": "at+jwt", "kid": iss.kid(alg)}
        # typ policy of the provider sees the token type
        untyped = iss.mint(typ=None)
        assert "typ" not in peek(untyped).header  # type: ignore[union-attr]
        rejected = await _verify(p, untyped)
        assert isinstance(rejected, Refusal)
        assert rejected.reason is Reason.WRONG_TOKEN_TYPE


def test_mint_overrides_and_deletes_claims() -> None:
    iss = DevIssuer()
    iss.issuer = "https://dev.example"
    tok = iss.mint(
        {"email": None, "groups": ["mail"], "aud": ["mail", "web"]},
        subject="bob",
        lifetime=60,
        header={"x-test": 1},
    )
    u = peek(tok)
    assert not isinstance(u, Refusal)
    assert "email" not in u.claims
    assert u.claims["sub"] == "bob"
    assert u.claims["groups"] == ["mail"]
    assert u.claims["aud"] == ["mail", "web"]
    assert u.claims["iss"] == "https://dev.example"
    assert abs(u.claims["exp"] - time.time() - 60) < 5
    assert u.header["x-test"] == 1
    assert u.header["kid"] == iss.kid("ES256")


def test_mint_header_override_can_lie_about_alg() -> None:
    iss = DevIssuer()
    iss.issuer = "https://dev.example"
    u = peek(iss.mint(header={"alg": "RS256", "kid": None}))
    assert not isinstance(u, Refusal)
    assert u.header["alg"] == "RS256"
    assert "kid" not in u.header


def test_mint_needs_an_issuer_and_a_key() -> None:
    iss = DevIssuer()
    with pytest.raises(RuntimeError, match="serve"):
        iss.mint()
    assert peek(iss.mint({"iss": "https://x"})) is not None
    with pytest.raises(KeyError):
        iss.mint({"iss": "https://x"}, alg="RS256")
    with pytest.raises(ValueError, match="unsupported"):
        DevIssuer(algorithms=("HS256",))


def test_rotate_and_add_key() -> None:
    iss = DevIssuer(algorithms=("ES256", "EdDSA"))
    first = iss.kid("ES256")
    added = iss.add_key("ES256")
    assert iss.kid("ES256") == added
    assert {k["kid"] for k in iss.jwks()["keys"]} == {first, added, iss.kid("EdDSA")}
    rotated = iss.rotate("ES256")
    kids = {k["kid"] for k in iss.jwks()["keys"]}
    assert rotated in kids
    assert added not in kids
    assert first in kids  # rotate replaces only the current key
    for jwk in iss.jwks()["keys"]:
        assert jwk["use"] == "sig"
        assert "d" not in jwk  # public material only


async def test_http_surface(nursery: trio.Nursery) -> None:
    iss = DevIssuer(issuer_path="/realms/x")
    port = await nursery.start(iss.serve)
    assert iss.url == f"http://127.0.0.1:{port}"
    assert iss.issuer == f"{iss.url}/realms/x"
    async with httpx.AsyncClient() as c:
        doc = (await c.get(iss.discovery_url)).json()
        assert doc["issuer"] == iss.issuer
        assert doc["jwks_uri"] == f"{iss.url}/jwks.json"
        assert doc["token_endpoint"].startswith(iss.url)
        assert "code" in doc["response_types_supported"]
        r = await c.get(iss.jwks_uri)
        assert r.headers["content-type"] == "application/jwk-set+json"
        assert r.json() == iss.jwks()
        assert "cache-control" not in r.headers  # metadata: the client caches as it likes
        assert (await c.get(f"{iss.url}/nope")).status_code == 404
        assert (await c.post(f"{iss.url}/token")).status_code == 400
    assert iss.requests["/realms/x/.well-known/openid-configuration"] == 1
    assert iss.requests["/jwks.json"] == 1
    assert iss.requests["/nope"] == 1


async def test_fault_knobs_of_the_test_issuer(nursery: trio.Nursery) -> None:
    iss = FaultIssuer(issuer_path="/realms/x")
    await nursery.start(iss.serve)
    async with httpx.AsyncClient() as c:
        iss.fail_status = 502
        assert (await c.get(iss.jwks_uri)).status_code == 502
        iss.fail_status = None
        iss.jwks_override = b"garbage"
        assert (await c.get(iss.jwks_uri)).content == b"garbage"
        iss.jwks_override = None
        iss.metadata_cache_control = "max-age=60"
        assert (await c.get(iss.jwks_uri)).headers["cache-control"] == "max-age=60"
        iss.discovery_overrides = {"jwks_uri": "https://elsewhere.example/keys"}
        r = await c.get(iss.discovery_url, headers={"X-Probe": "1"})
        assert r.json()["jwks_uri"] == "https://elsewhere.example/keys"
        assert r.headers["cache-control"] == "max-age=60"
        assert iss.last_request_headers["x-probe"] == "1"
        assert (await c.get(f"{iss.url}/nope")).headers["cache-control"] == "no-store"
        iss.redirect = "https://elsewhere.example/"
        r = await c.get(iss.jwks_uri)
        assert (r.status_code, r.headers["location"]) == (302, "https://elsewhere.example/")
    assert iss.requests["/jwks.json"] == 4


async def test_delay_knob(nursery: trio.Nursery) -> None:
    iss = FaultIssuer()
    await nursery.start(iss.serve)
    iss.delay = 0.3
    start = trio.current_time()
    async with httpx.AsyncClient() as c:
        await c.get(iss.jwks_uri)
    assert trio.current_time() - start >= 0.3


def test_thread_wrapper_serves_and_stops() -> None:
    with DevIssuerThread(DevIssuer()) as iss:
        assert iss.url is not None
        assert iss.url.startswith("http://127.0.0.1:")
        r = httpx.get(iss.discovery_url, timeout=5)
        assert r.json()["issuer"] == iss.issuer
        token = iss.mint()
        assert not isinstance(peek(token), Refusal)
        jwks_uri = iss.jwks_uri
    with pytest.raises(httpx.ConnectError):
        httpx.get(jwks_uri, timeout=2)


def test_thread_wrapper_reports_bind_failure() -> None:
    with DevIssuerThread(DevIssuer()) as first:
        assert first.port is not None
        wrapper = DevIssuerThread(DevIssuer(), port=first.port)
        with pytest.raises(RuntimeError, match="failed to start"):
            wrapper.__enter__()
        wrapper.stop()
