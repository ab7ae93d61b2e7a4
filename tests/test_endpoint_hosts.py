"""URLs learnt from discovery may only point at the provider's own hosts (checklist row 16).

The issuer's host and the discovery URL's host are allowed; any other host
needs ``endpoint_hosts``. A refused URL is never contacted.
"""

from __future__ import annotations

import httpx
import pytest
import trio

from saslauthd_oidc.config import ProviderConfig
from saslauthd_oidc.core.outcome import Reason, Refusal
from saslauthd_oidc.providers.jwt import VerifiedClaims, peek
from saslauthd_oidc.providers.oidc import OidcProvider
from tests.support_issuer import FaultIssuer


async def issuers(nursery: trio.Nursery) -> tuple[FaultIssuer, FaultIssuer]:
    home, elsewhere = FaultIssuer(), FaultIssuer()
    await nursery.start(home.serve, "127.0.0.1")
    await nursery.start(elsewhere.serve, "127.0.0.2")  # another host, also loopback
    return home, elsewhere


def provider(home: FaultIssuer, client: httpx.AsyncClient, *hosts: str) -> OidcProvider:
    assert home.issuer is not None
    config = ProviderConfig(
        name="home",
        issuer=home.issuer,
        allow_http=True,
        algorithms=("ES256",),
        endpoint_hosts=hosts,
    )
    return OidcProvider(config, client, fetch_timeout=2.0)


@pytest.mark.parametrize(
    "jwks_uri",
    ["elsewhere", "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd"],
)
async def test_jwks_uri_on_a_foreign_host_is_refused_unfetched(
    nursery: trio.Nursery, client: httpx.AsyncClient, jwks_uri: str
) -> None:
    home, elsewhere = await issuers(nursery)
    url = f"{elsewhere.url}/jwks.json" if jwks_uri == "elsewhere" else jwks_uri
    home.discovery_overrides = {"jwks_uri": url}
    p = provider(home, client)
    assert not await p.refresh()
    assert p.last_error is not None and "bad_jwks_uri" in p.last_error
    assert sum(elsewhere.requests.values()) == 0
    token = elsewhere.mint({"iss": home.issuer})
    unverified = peek(token)
    assert not isinstance(unverified, Refusal)
    result = await p.verify(token, unverified)
    assert isinstance(result, Refusal) and result.reason is Reason.PROVIDER_UNAVAILABLE


async def test_endpoint_hosts_lets_a_listed_host_serve_the_keys(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    """Google's case: keys on www.googleapis.com for the issuer accounts.google.com."""
    home, elsewhere = await issuers(nursery)
    home.discovery_overrides = {"jwks_uri": f"{elsewhere.url}/jwks.json"}
    p = provider(home, client, "127.0.0.2")
    assert await p.refresh()
    token = elsewhere.mint({"iss": home.issuer})
    unverified = peek(token)
    assert not isinstance(unverified, Refusal)
    assert isinstance(await p.verify(token, unverified), VerifiedClaims)
    assert elsewhere.requests["/jwks.json"] == 1


async def test_discovered_introspection_endpoint_on_a_foreign_host_is_not_used(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    home, elsewhere = await issuers(nursery)
    home.discovery_overrides = {"introspection_endpoint": f"{elsewhere.url}/introspect"}
    assert home.issuer is not None
    config = ProviderConfig(name="home", issuer=home.issuer, allow_http=True, client_id="saslauthd")
    p = OidcProvider(config, client, fetch_timeout=2.0, client_secret="saslauthd-secret")
    result = await p.verify(home.mint_opaque(), None)
    assert isinstance(result, Refusal) and result.reason is Reason.PROVIDER_UNAVAILABLE
    assert "introspection_endpoint" in result.detail
    assert sum(elsewhere.requests.values()) == 0
