"""OidcProvider's opaque-token paths (RFC 7662 introspection, userinfo), metadata
Cache-Control and multi-tenant issuers, against a real DevIssuer on loopback."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from saslauthd_oidc.config import ProviderConfig
from saslauthd_oidc.core.outcome import Outcome, Reason, Refusal
from saslauthd_oidc.providers.jwt import VerifiedClaims, peek
from saslauthd_oidc.providers.oidc import OidcProvider
from tests.support import FakeClock
from tests.support_issuer import FaultIssuer

DISCOVERY = "/.well-known/openid-configuration"
JWKS = "/jwks.json"
INTROSPECT = "/introspect"
USERINFO = "/userinfo"
SECRET = "saslauthd-secret"
LONG = 10**7  # token lifetime that outlives any FakeClock advance here

USERINFO_VALIDATION: dict[str, Any] = {"userinfo_validation": True}


@pytest.fixture
async def issuer(nursery: trio.Nursery) -> FaultIssuer:
    iss = FaultIssuer(algorithms=("ES256",))
    await nursery.start(iss.serve)
    return iss


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as captured:
        yield captured


def provider(
    iss: FaultIssuer,
    client: httpx.AsyncClient,
    clock: FakeClock,
    *,
    fetch_timeout: float = 2.0,
    client_secret: str | None = SECRET,
    **overrides: Any,
) -> OidcProvider:
    fields: dict[str, Any] = {
        "name": "dev",
        "issuer": iss.issuer,
        "allow_http": True,
        "algorithms": ("ES256",),
        "client_id": "saslauthd",
        "client_secret_file": "/nonexistent/secret",  # the ctor's client_secret wins
    }
    fields.update(overrides)
    config = ProviderConfig(**fields)
    secret = client_secret if config.introspects else None
    return OidcProvider(
        config, client, clock=clock, fetch_timeout=fetch_timeout, client_secret=secret
    )


def reason(result: VerifiedClaims | Refusal) -> Reason:
    return Reason.OK if isinstance(result, VerifiedClaims) else result.reason


async def verify_jwt(p: OidcProvider, token: str) -> VerifiedClaims | Refusal:
    unverified = peek(token)
    assert not isinstance(unverified, Refusal), unverified
    return await p.verify(token, unverified)


def failures(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e.get("log_level") in ("warning", "error")]


# --------------------------------------------------------------------------- introspection


async def test_active_opaque_token_gives_its_claims(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    token = issuer.mint_opaque(
        {"client_id": "webmail", "scope": "openid mail"}, audience=["mail", "x"], subject="bob"
    )
    result = await provider(issuer, client, clock).verify(token, None)
    assert isinstance(result, VerifiedClaims), result
    assert result.claims["aud"] == ["mail", "x"]
    assert result.claims["scope"] == "openid mail"
    assert result.claims["client_id"] == "webmail"
    assert result.claims["sub"] == "bob"
    assert result.claims["iss"] == issuer.issuer
    assert result.expires_at == result.claims["exp"]
    form = dict(parse_qsl(issuer.last_request_body.decode()))
    assert form["token"] == token
    assert form["token_type_hint"] == "access_token"


async def test_revoked_and_unknown_tokens_are_inactive(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock)
    token = issuer.mint_opaque()
    assert reason(await p.verify(token, None)) is Reason.OK
    issuer.revoke(token)
    assert reason(await p.verify(token, None)) is Reason.TOKEN_INACTIVE
    assert reason(await p.verify("never-issued", None)) is Reason.TOKEN_INACTIVE
    assert issuer.requests[INTROSPECT] == 3


async def test_introspected_refresh_token_is_refused(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    token = issuer.mint_opaque({"token_type": "refresh_token"})
    assert reason(await provider(issuer, client, clock).verify(token, None)) is (
        Reason.WRONG_TOKEN_TYPE
    )


async def test_introspection_naming_another_issuer_is_refused(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    token = issuer.mint_opaque({"iss": "https://elsewhere.example.org"})
    result = await provider(issuer, client, clock).verify(token, None)
    assert reason(result) is Reason.WRONG_ISSUER


async def test_wrong_client_secret_is_temporary_and_logged(
    issuer: FaultIssuer,
    client: httpx.AsyncClient,
    clock: FakeClock,
    logs: list[MutableMapping[str, Any]],
) -> None:
    token = issuer.mint_opaque()
    p = provider(issuer, client, clock, client_secret="not-the-secret")
    result = await p.verify(token, None)
    assert reason(result) is Reason.PROVIDER_UNAVAILABLE
    assert isinstance(result, Refusal)
    assert result.reason.outcome is Outcome.TEMPFAIL
    assert issuer.requests[INTROSPECT] == 1
    [entry] = failures(logs)
    assert entry["provider"] == "dev"
    assert entry["stage"] == "introspection"
    assert "401" in entry["detail"]
    assert "client_secret_file" in entry["detail"]
    assert "not-the-secret" not in repr(logs)
    assert token not in repr(logs)


async def test_unknown_client_id_is_refused(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock, client_id="stranger")
    assert reason(await p.verify(issuer.mint_opaque(), None)) is Reason.PROVIDER_UNAVAILABLE


HARD_SECRET = "s3cr:et %41 with spaces+plus/é"


async def test_client_secret_basic_form_urlencodes_both_parts(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    issuer.clients = {"mail server:1": HARD_SECRET}
    p = provider(
        issuer,
        client,
        clock,
        client_id="mail server:1",
        client_secret=HARD_SECRET,
        introspection_auth="client_secret_basic",
    )
    result = await p.verify(issuer.mint_opaque(), None)
    assert reason(result) is Reason.OK  # the DevIssuer decoded and accepted both parts
    scheme, _, value = issuer.last_request_headers["authorization"].partition(" ")
    assert scheme == "Basic"
    decoded = base64.b64decode(value).decode("ascii")
    cid, sep, secret = decoded.partition(":")
    assert sep == ":"
    assert ":" not in secret and " " not in secret and "%41" not in secret
    assert cid == "mail%20server%3A1"
    assert secret.startswith("s3cr%3Aet%20%2541")
    form = dict(parse_qsl(issuer.last_request_body.decode()))
    assert "client_secret" not in form and "client_id" not in form
    assert HARD_SECRET not in issuer.last_request_body.decode()


async def test_client_secret_post_sends_credentials_in_the_body(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    issuer.clients = {"saslauthd": HARD_SECRET}
    p = provider(
        issuer, client, clock, client_secret=HARD_SECRET, introspection_auth="client_secret_post"
    )
    assert reason(await p.verify(issuer.mint_opaque(), None)) is Reason.OK
    assert "authorization" not in issuer.last_request_headers
    assert issuer.last_request_headers["content-type"] == "application/x-www-form-urlencoded"
    form = dict(parse_qsl(issuer.last_request_body.decode()))
    assert form["client_id"] == "saslauthd"
    assert form["client_secret"] == HARD_SECRET


async def test_client_secret_read_from_file(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock, tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    os.chmod(secret_file, 0o600)
    config = ProviderConfig(
        name="dev",
        issuer=issuer.issuer or "",
        allow_http=True,
        algorithms=("ES256",),
        client_id="saslauthd",
        client_secret_file=str(secret_file),
    )
    p = OidcProvider(config, client, clock=clock)
    assert reason(await p.verify(issuer.mint_opaque(), None)) is Reason.OK


async def test_endpoint_learnt_from_discovery(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock)
    for _ in range(3):
        assert reason(await p.verify(issuer.mint_opaque(), None)) is Reason.OK
    assert issuer.requests == {DISCOVERY: 1, INTROSPECT: 3}


async def test_configured_endpoint_needs_no_discovery(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock, introspection_endpoint=f"{issuer.url}{INTROSPECT}")
    assert reason(await p.verify(issuer.mint_opaque(), None)) is Reason.OK
    assert issuer.requests == {INTROSPECT: 1}


async def test_configured_endpoint_wins_over_discovery(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock, introspection_endpoint=f"{issuer.url}/elsewhere")
    assert reason(await p.verify(issuer.mint_opaque(), None)) is Reason.PROVIDER_UNAVAILABLE
    assert issuer.requests == {"/elsewhere": 1}


async def test_http_endpoint_from_discovery_refused_without_allow_http(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock, allow_http=False, discovery_url=issuer.discovery_url)
    result = await p.verify(issuer.mint_opaque(), None)
    assert reason(result) is Reason.PROVIDER_UNAVAILABLE
    assert isinstance(result, Refusal)
    assert "introspection_endpoint" in result.detail
    assert issuer.requests[INTROSPECT] == 0


async def test_token_never_logged(
    issuer: FaultIssuer,
    client: httpx.AsyncClient,
    clock: FakeClock,
    logs: list[MutableMapping[str, Any]],
) -> None:
    token = issuer.mint_opaque()
    p = provider(issuer, client, clock)
    await p.verify(token, None)
    issuer.revoke(token)
    await p.verify(token, None)
    issuer.fail_status = 500
    await p.verify(token, None)
    issuer.fail_status = None
    await provider(issuer, client, clock, client_secret="wrong").verify(token, None)
    await provider(issuer, client, clock, client_id=None, **USERINFO_VALIDATION).verify(token, None)
    issuer.redirect = f"{issuer.url}/?token={token}"
    await provider(
        issuer, client, clock, introspection_endpoint=f"{issuer.url}{INTROSPECT}"
    ).verify(token, None)
    assert len(failures(logs)) >= 3
    assert token not in repr(logs)
    assert SECRET not in repr(logs)


async def test_issuer_down_is_provider_unavailable(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock)
    token = issuer.mint_opaque()
    assert reason(await p.verify(token, None)) is Reason.OK  # discovery now cached
    issuer.fail_status = 503
    result = await p.verify(token, None)
    assert reason(result) is Reason.PROVIDER_UNAVAILABLE
    # and when even discovery is down
    fresh = provider(issuer, client, clock)
    assert reason(await fresh.verify(token, None)) is Reason.PROVIDER_UNAVAILABLE


async def test_unreachable_provider_is_provider_unavailable(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ProviderConfig(
        name="gone",
        issuer=f"http://127.0.0.1:{port}",
        allow_http=True,
        client_id="x",
        client_secret_file="/nonexistent",
        introspection_endpoint=f"http://127.0.0.1:{port}/introspect",
    )
    p = OidcProvider(config, client, clock=clock, client_secret="s")
    assert reason(await p.verify("opaque", None)) is Reason.PROVIDER_UNAVAILABLE


async def test_slow_introspection_is_a_timeout(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock, fetch_timeout=0.3)
    token = issuer.mint_opaque()
    assert reason(await p.verify(token, None)) is Reason.OK  # discovery cached
    issuer.delay = 30.0
    with trio.fail_after(10):  # a hang would fail here, not wait for the delay
        result = await p.verify(token, None)
    assert reason(result) is Reason.TIMEOUT
    assert isinstance(result, Refusal)
    assert result.reason.outcome is Outcome.TEMPFAIL


async def test_slow_configured_endpoint_is_a_timeout(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    issuer.delay = 30.0
    p = provider(
        issuer, client, clock, fetch_timeout=0.3, introspection_endpoint=f"{issuer.url}{INTROSPECT}"
    )
    with trio.fail_after(10):
        assert reason(await p.verify(issuer.mint_opaque(), None)) is Reason.TIMEOUT


async def test_redirect_is_refused_not_followed(
    issuer: FaultIssuer,
    nursery: trio.Nursery,
    client: httpx.AsyncClient,
    clock: FakeClock,
    logs: list[MutableMapping[str, Any]],
) -> None:
    other = FaultIssuer()
    await nursery.start(other.serve)
    issuer.redirect = f"{other.url}{INTROSPECT}"
    p = provider(issuer, client, clock, introspection_endpoint=f"{issuer.url}{INTROSPECT}")
    result = await p.verify(issuer.mint_opaque(), None)
    assert reason(result) is Reason.PROVIDER_UNAVAILABLE
    assert isinstance(result, Refusal)
    assert "redirect" in result.detail
    assert sum(other.requests.values()) == 0
    assert [e["kind"] for e in failures(logs)] == ["redirect"]


async def test_opaque_token_without_introspection_or_userinfo_is_malformed(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock, client_id=None)
    assert reason(await p.verify(issuer.mint_opaque(), None)) is Reason.MALFORMED_TOKEN
    assert sum(issuer.requests.values()) == 0


# --------------------------------------------------------------------------- userinfo


async def test_userinfo_validates_opaque_tokens_without_client_id(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock, client_id=None, **USERINFO_VALIDATION)
    token = issuer.mint_opaque(subject="bob", email="bob@example.org")
    result = await p.verify(token, None)
    assert isinstance(result, VerifiedClaims), result
    assert result.claims["sub"] == "bob"
    assert result.claims["email"] == "bob@example.org"
    assert result.claims["iss"] == issuer.issuer
    assert "aud" not in result.claims  # userinfo says nothing about the audience
    assert issuer.last_request_headers["authorization"] == f"Bearer {token}"
    assert issuer.requests[INTROSPECT] == 0
    issuer.revoke(token)
    assert reason(await p.verify(token, None)) is Reason.TOKEN_INACTIVE
    assert issuer.requests[USERINFO] == 2


async def test_introspection_preferred_over_userinfo(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock, userinfo=True)
    assert reason(await p.verify(issuer.mint_opaque(), None)) is Reason.OK
    assert issuer.requests[INTROSPECT] == 1
    assert issuer.requests[USERINFO] == 0


async def test_userinfo_without_sub_is_bad_claim(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock, client_id=None, **USERINFO_VALIDATION)
    issuer.profiles["alice"] = {"sub": None}
    assert reason(await p.verify(issuer.mint_opaque(), None)) is Reason.BAD_CLAIM


async def test_userinfo_down_is_provider_unavailable(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(
        issuer,
        client,
        clock,
        client_id=None,
        userinfo_endpoint=f"{issuer.url}{USERINFO}",
        **USERINFO_VALIDATION,
    )
    issuer.fail_status = 503
    assert reason(await p.verify(issuer.mint_opaque(), None)) is Reason.PROVIDER_UNAVAILABLE


async def test_userinfo_for_a_jwt(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock, client_id=None, userinfo=True)
    issuer.profiles["alice"] = {"email": "alice@profile.example"}
    result = await p.userinfo(issuer.mint())
    assert isinstance(result, VerifiedClaims)
    assert result.claims["email"] == "alice@profile.example"


# --------------------------------------------------------------------------- metadata Cache-Control


async def test_discovery_cache_control_max_age_is_honoured(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    issuer.metadata_cache_control = "max-age=120"
    p = provider(issuer, client, clock, jwks_min_refresh=60.0, jwks_refresh=3600.0)
    token = issuer.mint_opaque(lifetime=LONG)
    assert reason(await p.verify(token, None)) is Reason.OK
    assert issuer.requests[DISCOVERY] == 1
    clock.advance(100)
    assert reason(await p.verify(token, None)) is Reason.OK
    assert issuer.requests[DISCOVERY] == 1
    clock.advance(30)  # 130 s after the fetch
    assert reason(await p.verify(token, None)) is Reason.OK
    assert issuer.requests[DISCOVERY] == 2
    assert issuer.requests[INTROSPECT] == 3


async def test_jwks_cache_control_max_age_is_honoured(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    issuer.metadata_cache_control = "max-age=120"
    p = provider(issuer, client, clock, jwks_min_refresh=60.0, jwks_refresh=3600.0)
    token = issuer.mint(lifetime=LONG)
    assert reason(await verify_jwt(p, token)) is Reason.OK
    assert issuer.requests == {DISCOVERY: 1, JWKS: 1}
    clock.advance(100)
    assert reason(await verify_jwt(p, token)) is Reason.OK
    assert issuer.requests == {DISCOVERY: 1, JWKS: 1}
    clock.advance(30)
    assert reason(await verify_jwt(p, token)) is Reason.OK
    assert issuer.requests == {DISCOVERY: 2, JWKS: 2}


async def test_no_store_means_refetch_after_min_refresh(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    issuer.metadata_cache_control = "no-store"
    p = provider(issuer, client, clock, jwks_min_refresh=60.0, jwks_refresh=3600.0)
    opaque, jwt = issuer.mint_opaque(lifetime=LONG), issuer.mint(lifetime=LONG)
    assert reason(await p.verify(opaque, None)) is Reason.OK
    assert reason(await verify_jwt(p, jwt)) is Reason.OK
    assert issuer.requests[DISCOVERY] == 1
    assert issuer.requests[JWKS] == 1
    clock.advance(50)
    assert reason(await p.verify(opaque, None)) is Reason.OK
    assert reason(await verify_jwt(p, jwt)) is Reason.OK
    assert (issuer.requests[DISCOVERY], issuer.requests[JWKS]) == (1, 1)
    clock.advance(15)
    assert reason(await p.verify(opaque, None)) is Reason.OK
    assert reason(await verify_jwt(p, jwt)) is Reason.OK
    assert (issuer.requests[DISCOVERY], issuer.requests[JWKS]) == (2, 2)


async def test_huge_max_age_is_capped_at_jwks_refresh(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    issuer.metadata_cache_control = "public, max-age=31536000"
    p = provider(issuer, client, clock, jwks_min_refresh=60.0, jwks_refresh=3600.0)
    opaque, jwt = issuer.mint_opaque(lifetime=LONG), issuer.mint(lifetime=LONG)
    assert reason(await p.verify(opaque, None)) is Reason.OK
    assert reason(await verify_jwt(p, jwt)) is Reason.OK
    clock.advance(3500)
    assert reason(await p.verify(opaque, None)) is Reason.OK
    assert reason(await verify_jwt(p, jwt)) is Reason.OK
    assert (issuer.requests[DISCOVERY], issuer.requests[JWKS]) == (1, 1)
    clock.advance(200)
    assert reason(await p.verify(opaque, None)) is Reason.OK
    assert reason(await verify_jwt(p, jwt)) is Reason.OK
    assert (issuer.requests[DISCOVERY], issuer.requests[JWKS]) == (2, 2)


async def test_no_cache_header_means_jwks_refresh(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    issuer.metadata_cache_control = None
    p = provider(issuer, client, clock, jwks_min_refresh=60.0, jwks_refresh=600.0)
    opaque = issuer.mint_opaque(lifetime=LONG)
    assert reason(await p.verify(opaque, None)) is Reason.OK
    clock.advance(590)
    assert reason(await p.verify(opaque, None)) is Reason.OK
    assert issuer.requests[DISCOVERY] == 1
    clock.advance(20)
    assert reason(await p.verify(opaque, None)) is Reason.OK
    assert issuer.requests[DISCOVERY] == 2


# --------------------------------------------------------------------------- multi-tenant issuers


@pytest.fixture
async def entra(nursery: trio.Nursery) -> FaultIssuer:
    """A DevIssuer whose discovery document names the issuer ``{url}/{tenantid}/v2.0``."""
    iss = FaultIssuer(algorithms=("ES256",), issuer_path="/{tenantid}/v2.0")
    await nursery.start(iss.serve)
    assert iss.issuer is not None and iss.issuer.endswith("/{tenantid}/v2.0")
    return iss


def tenant_provider(
    entra: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock, *tenants: str, **kw: Any
) -> OidcProvider:
    fields: dict[str, Any] = {
        "name": "entra",
        "issuer": entra.issuer,
        "allow_http": True,
        "algorithms": ("ES256",),
        "allowed_tenants": tenants,
        # The DevIssuer serves its document under the literal template path
        # (Entra serves it under /common/); the issuer check is the same.
        "discovery_url": entra.discovery_url,
    }
    fields.update(kw)
    return OidcProvider(ProviderConfig(**fields), client, clock=clock)


def tenant_token(entra: FaultIssuer, tenant: str, tid: object = None, **claims: Any) -> str:
    assert entra.url is not None
    iss = f"{entra.url}/{tenant}/v2.0"
    return entra.mint({"iss": iss, "tid": tenant if tid is None else tid, **claims})


async def test_tenant_token_accepted_through_discovery(
    entra: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = tenant_provider(entra, client, clock, "t1", "t2")
    result = await verify_jwt(p, tenant_token(entra, "t1"))
    assert isinstance(result, VerifiedClaims), result
    assert result.claims["tid"] == "t1"
    assert reason(await verify_jwt(p, tenant_token(entra, "t2"))) is Reason.OK
    assert entra.requests == {"/{tenantid}/v2.0" + DISCOVERY: 1, JWKS: 1}


@pytest.mark.parametrize("via", ["discovery", "jwks_uri"])
async def test_tenant_rules(
    entra: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock, via: str
) -> None:
    kw = {"jwks_uri": entra.jwks_uri, "discovery_url": None} if via == "jwks_uri" else {}
    p = tenant_provider(entra, client, clock, "t1", **kw)
    assert reason(await verify_jwt(p, tenant_token(entra, "t1"))) is Reason.OK
    assert reason(await verify_jwt(p, tenant_token(entra, "T1", tid="t1"))) is Reason.OK
    # verified tid must be the issuer's tenant
    assert reason(await verify_jwt(p, tenant_token(entra, "t1", tid="t2"))) is Reason.WRONG_ISSUER
    assert reason(await verify_jwt(p, tenant_token(entra, "t1", tid=5))) is (Reason.WRONG_ISSUER)
    no_tid = entra.mint({"iss": f"{entra.url}/t1/v2.0"})
    assert reason(await verify_jwt(p, no_tid)) is Reason.WRONG_ISSUER
    # a tenant that is not allowed, even with a matching tid
    assert reason(await verify_jwt(p, tenant_token(entra, "t2"))) is Reason.WRONG_ISSUER
    # an iss that does not fit the template
    for iss in (
        f"{entra.url}/t1/v1.0",
        f"{entra.url}/t1/x/v2.0",
        f"{entra.url}//v2.0",
        entra.issuer,
        f"{entra.url}/t1/v2.0/",
    ):
        tok = entra.mint({"iss": iss, "tid": "t1"})
        assert reason(await verify_jwt(p, tok)) is Reason.WRONG_ISSUER, iss
    if via == "jwks_uri":
        assert entra.requests == {JWKS: 1}


async def test_any_tenant_with_star(
    entra: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = tenant_provider(entra, client, clock, "*")
    for tenant in ("t1", "9188040d-6c67-4c5b-b112-36a304b66dad", "contoso"):
        assert reason(await verify_jwt(p, tenant_token(entra, tenant))) is Reason.OK, tenant
    assert reason(await verify_jwt(p, tenant_token(entra, "t1", tid="t2"))) is Reason.WRONG_ISSUER
    assert reason(await verify_jwt(p, tenant_token(entra, "a.b"))) is Reason.WRONG_ISSUER


async def test_tenant_introspection_answer_iss_must_fit(
    entra: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    config = ProviderConfig(
        name="entra",
        issuer=entra.issuer or "",
        allow_http=True,
        allowed_tenants=("t1",),
        discovery_url=entra.discovery_url,
        client_id="saslauthd",
        client_secret_file="/nonexistent",
    )
    p = OidcProvider(config, client, clock=clock, client_secret=SECRET)
    ok = entra.mint_opaque({"iss": f"{entra.url}/t1/v2.0"})
    assert reason(await p.verify(ok, None)) is Reason.OK
    other = entra.mint_opaque({"iss": f"{entra.url}/t2/v2.0"})
    assert reason(await p.verify(other, None)) is Reason.WRONG_ISSUER
