"""Engine + real ProviderRegistry against served DevIssuers: opaque tokens through rules,
the b64token gate, userinfo enrichment, and the verification cache's single-flight."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from saslauthd_oidc.config import Config, parse_config
from saslauthd_oidc.core.engine import Engine
from saslauthd_oidc.core.outcome import Outcome, Reason, Verdict
from saslauthd_oidc.core.request import AuthRequest, Credentials, Mechanism, RequestContext
from saslauthd_oidc.providers.registry import ProviderRegistry
from saslauthd_oidc.providers.verification_cache import VerificationCache
from tests.support import FakeClock, b64u
from tests.support_issuer import FaultIssuer

INTROSPECT = "/introspect"
USERINFO = "/userinfo"
SECRET = "saslauthd-secret"
LONG = 10**7

USERINFO_VALIDATION: dict[str, Any] = {"userinfo_validation": True}


async def _serve(nursery: trio.Nursery) -> FaultIssuer:
    iss = FaultIssuer(algorithms=("ES256",))
    await nursery.start(iss.serve)
    return iss


@pytest.fixture
async def idp_a(nursery: trio.Nursery) -> FaultIssuer:
    return await _serve(nursery)


@pytest.fixture
async def idp_b(nursery: trio.Nursery) -> FaultIssuer:
    return await _serve(nursery)


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "client-secret"
    path.write_text(SECRET + "\n")
    os.chmod(path, 0o600)
    return str(path)


def provider_entry(name: str, idp: FaultIssuer, **kw: Any) -> dict[str, Any]:
    return {"name": name, "issuer": idp.issuer, "allow_http": True, "algorithms": ["ES256"], **kw}


EngineFactory = Callable[[dict[str, Any]], Engine]


@pytest.fixture
def make_engine(client: httpx.AsyncClient, clock: FakeClock) -> EngineFactory:
    def build(data: dict[str, Any]) -> Engine:
        config: Config = parse_config(data)
        registry = ProviderRegistry(config, client, clock=clock)
        return Engine(config, registry, cache=VerificationCache(config.cache, clock=clock))

    return build


def login(token: str, user: str | None = None) -> AuthRequest:
    return AuthRequest(
        Mechanism.OAUTHBEARER, Credentials(token, user), RequestContext(service="imap")
    )


def requests_to(*idps: FaultIssuer) -> int:
    return sum(sum(i.requests.values()) for i in idps)


# --------------------------------------------------------------------------- rule conditions


@pytest.fixture
def strict_engine(make_engine: EngineFactory, idp_a: FaultIssuer, secret_file: str) -> Engine:
    return make_engine(
        {
            "provider": [
                provider_entry("a", idp_a, client_id="saslauthd", client_secret_file=secret_file)
            ],
            "rule": [
                {
                    "name": "mail",
                    "provider": "a",
                    "audiences": ["mail"],
                    "required_scopes": ["mail"],
                    "authorized_parties": ["webmail"],
                }
            ],
        }
    )


async def test_opaque_token_passing_every_condition(
    strict_engine: Engine, idp_a: FaultIssuer
) -> None:
    token = idp_a.mint_opaque({"scope": "openid mail", "client_id": "webmail"})
    v = await strict_engine.authenticate(login(token, "alice@example.org"))
    assert (v.reason, v.rule, v.provider, v.account) == (
        Reason.OK,
        "mail",
        "a",
        "alice@example.org",
    )
    assert idp_a.requests[INTROSPECT] == 1


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"aud": "other"}, Reason.WRONG_AUDIENCE),
        ({"aud": None}, Reason.WRONG_AUDIENCE),
        ({"scope": "openid email"}, Reason.INSUFFICIENT_SCOPE),
        ({"scope": None}, Reason.INSUFFICIENT_SCOPE),
        ({"client_id": "dev-client"}, Reason.UNTRUSTED_AUTHORIZED_PARTY),
        ({"azp": "stranger"}, Reason.UNTRUSTED_AUTHORIZED_PARTY),  # azp wins over client_id
        ({"token_type": "refresh_token"}, Reason.WRONG_TOKEN_TYPE),
        ({"active": False}, Reason.TOKEN_INACTIVE),
        ({"iss": "https://elsewhere.example"}, Reason.WRONG_ISSUER),
    ],
)
async def test_opaque_token_failing_a_condition(
    strict_engine: Engine, idp_a: FaultIssuer, claims: dict[str, Any], expected: Reason
) -> None:
    base = {"scope": "openid mail", "client_id": "webmail", **claims}
    v = await strict_engine.authenticate(login(idp_a.mint_opaque(base), "alice@example.org"))
    assert v.reason is expected, v.detail
    assert v.outcome is Outcome.FAIL
    assert idp_a.requests[INTROSPECT] == 1


async def test_revoked_opaque_token_refused(strict_engine: Engine, idp_a: FaultIssuer) -> None:
    token = idp_a.mint_opaque({"scope": "mail", "client_id": "webmail"})
    idp_a.revoke(token)
    v = await strict_engine.authenticate(login(token))
    assert v.reason is Reason.TOKEN_INACTIVE


async def test_issuer_down_is_tempfail(strict_engine: Engine, idp_a: FaultIssuer) -> None:
    idp_a.fail_status = 503
    v = await strict_engine.authenticate(login(idp_a.mint_opaque()))
    assert v.reason is Reason.PROVIDER_UNAVAILABLE
    assert v.outcome is Outcome.TEMPFAIL


# --------------------------------------------------------------------------- several providers


async def test_token_known_only_to_the_second_provider(
    make_engine: EngineFactory, idp_a: FaultIssuer, idp_b: FaultIssuer, secret_file: str
) -> None:
    engine = make_engine(
        {
            "provider": [
                provider_entry("a", idp_a, client_id="saslauthd", client_secret_file=secret_file),
                provider_entry("b", idp_b, client_id="saslauthd", client_secret_file=secret_file),
            ],
            "rule": [
                {"name": "rule-a", "provider": "a", "audiences": ["mail"]},
                {"name": "rule-b", "provider": "b", "audiences": ["mail"]},
            ],
        }
    )
    v = await engine.authenticate(login(idp_b.mint_opaque(subject="bob", email="bob@example.org")))
    assert (v.reason, v.rule, v.provider, v.account) == (
        Reason.OK,
        "rule-b",
        "b",
        "bob@example.org",
    )
    assert idp_a.requests[INTROSPECT] == 1
    assert idp_b.requests[INTROSPECT] == 1
    trace = {t.rule: t.reason for t in v.trace}
    assert trace["rule-a"] is Reason.TOKEN_INACTIVE
    # known to neither: refused, each asked once
    v = await engine.authenticate(login("bm90LWlzc3VlZC1hbnl3aGVyZQ"))
    assert v.reason is Reason.TOKEN_INACTIVE
    assert (idp_a.requests[INTROSPECT], idp_b.requests[INTROSPECT]) == (2, 2)


async def test_provider_without_introspection_is_skipped(
    make_engine: EngineFactory, idp_a: FaultIssuer, idp_b: FaultIssuer, secret_file: str
) -> None:
    engine = make_engine(
        {
            "provider": [
                provider_entry("a", idp_a),
                provider_entry("b", idp_b, client_id="saslauthd", client_secret_file=secret_file),
            ],
            "rule": [
                {"name": "rule-a", "provider": "a", "audiences": ["mail"]},
                {"name": "rule-b", "provider": "b", "audiences": ["mail"]},
            ],
        }
    )
    v = await engine.authenticate(login(idp_b.mint_opaque()))
    assert (v.reason, v.rule) == (Reason.OK, "rule-b")
    assert sum(idp_a.requests.values()) == 0
    assert {t.rule: t.reason for t in v.trace}["rule-a"] is Reason.MALFORMED_TOKEN


async def test_no_provider_introspects(make_engine: EngineFactory, idp_a: FaultIssuer) -> None:
    engine = make_engine(
        {
            "provider": [provider_entry("a", idp_a)],
            "rule": [{"name": "rule-a", "provider": "a", "audiences": ["mail"]}],
        }
    )
    v = await engine.authenticate(login(idp_a.mint_opaque()))
    assert v.reason is Reason.MALFORMED_TOKEN
    assert "introspect" in v.detail
    assert sum(idp_a.requests.values()) == 0


# --------------------------------------------------------------------------- what is never sent


@pytest.fixture
def two_introspecting(
    make_engine: EngineFactory, idp_a: FaultIssuer, idp_b: FaultIssuer, secret_file: str
) -> Engine:
    return make_engine(
        {
            "provider": [
                provider_entry(
                    "a", idp_a, client_id="saslauthd", client_secret_file=secret_file, userinfo=True
                ),
                provider_entry("b", idp_b, **USERINFO_VALIDATION),
            ],
            "rule": [
                {"name": "rule-a", "provider": "a", "audiences": ["mail"]},
                {"name": "rule-b", "provider": "b", "audiences": ["mail"]},
            ],
        }
    )


@pytest.mark.parametrize(
    "token",
    [
        "has space",
        "semi;colon",
        'quote"d',
        "new\nline",
        "tab\there",
        "per%cent",
        "com,ma",
        "at@sign",
        "ümlaut",
        "=leading-equals",
        "trailing=junk",
        "\x00nul",
        "a" * 40 + "\x7f",
    ],
)
async def test_token_outside_b64token_never_leaves_the_daemon(
    two_introspecting: Engine, idp_a: FaultIssuer, idp_b: FaultIssuer, token: str
) -> None:
    v = await two_introspecting.authenticate(login(token))
    assert v.outcome is Outcome.FAIL
    assert v.reason is Reason.MALFORMED_TOKEN
    assert requests_to(idp_a, idp_b) == 0


@pytest.mark.parametrize(
    "token",
    [
        b64u(b"{") + ".e30.c2ln",  # header "{"
        b64u(b' {"alg":') + ".e30.c2ln",
        "eyJhbGciOiJFUzI1NiJ9.bm90LWpzb24.c2ln",  # JWS header, payload not JSON
        "eyJhbGciOiJub25lIn0.e30.",  # alg none, empty signature
    ],
)
async def test_malformed_jws_is_not_introspected(
    two_introspecting: Engine, idp_a: FaultIssuer, idp_b: FaultIssuer, token: str
) -> None:
    v = await two_introspecting.authenticate(login(token))
    assert v.outcome is Outcome.FAIL
    assert requests_to(idp_a, idp_b) == 0


async def test_b64token_with_dots_and_padding_is_introspected(
    two_introspecting: Engine, idp_a: FaultIssuer
) -> None:
    # opaque tokens may contain ".", "~", "+", "/" and trailing "=" (RFC 6750 2.1)
    v = await two_introspecting.authenticate(login("abc.def~ghi+jkl/mno=="))
    assert v.reason is Reason.TOKEN_INACTIVE
    assert idp_a.requests[INTROSPECT] == 1


# --------------------------------------------------------------------------- userinfo enrichment


@pytest.fixture
def enriching(make_engine: EngineFactory, idp_a: FaultIssuer) -> Engine:
    return make_engine(
        {
            "provider": [provider_entry("a", idp_a, userinfo=True)],
            "rule": [
                {"name": "mail", "provider": "a", "audiences": ["mail"], "username": "{email}"}
            ],
        }
    )


async def test_jwt_without_email_enriched_from_userinfo_once(
    enriching: Engine, idp_a: FaultIssuer
) -> None:
    idp_a.profiles["alice"] = {"email": "alice@profile.example"}
    token = idp_a.mint({"email": None}, lifetime=LONG)
    for _ in range(5):
        v = await enriching.authenticate(login(token))
        assert (v.reason, v.account) == (Reason.OK, "alice@profile.example"), v.detail
    assert idp_a.requests[USERINFO] == 1
    assert idp_a.last_request_headers["authorization"] == f"Bearer {token}"


async def test_jwt_with_the_claims_needs_no_userinfo(enriching: Engine, idp_a: FaultIssuer) -> None:
    idp_a.profiles["alice"] = {"email": "mallory@example.org"}
    v = await enriching.authenticate(login(idp_a.mint(email="alice@token.example")))
    assert (v.reason, v.account) == (Reason.OK, "alice@token.example")
    assert idp_a.requests[USERINFO] == 0


async def test_userinfo_for_another_subject_is_refused(
    enriching: Engine, idp_a: FaultIssuer
) -> None:
    idp_a.profiles["alice"] = {"sub": "mallory", "email": "mallory@example.org"}
    v = await enriching.authenticate(login(idp_a.mint({"email": None})))
    assert v.reason is Reason.BAD_CLAIM
    assert v.account is None
    assert v.outcome is Outcome.FAIL


async def test_userinfo_cannot_supply_a_decision_claim(
    make_engine: EngineFactory, idp_a: FaultIssuer
) -> None:
    engine = make_engine(
        {
            "provider": [provider_entry("a", idp_a, userinfo=True)],
            "rule": [
                {
                    "name": "mail",
                    "provider": "a",
                    "audiences": ["mail"],
                    "required_scopes": ["mail"],
                    "username": "{email}",
                }
            ],
        }
    )
    idp_a.profiles["alice"] = {"email": "alice@example.org", "scope": "mail", "aud": "mail"}
    v = await engine.authenticate(login(idp_a.mint({"email": None, "scope": "openid"})))
    assert v.reason is Reason.INSUFFICIENT_SCOPE


async def test_revoked_token_refused_at_enrichment(enriching: Engine, idp_a: FaultIssuer) -> None:
    token = idp_a.mint({"email": None})
    idp_a.revoke(token)
    v = await enriching.authenticate(login(token))
    assert v.reason is Reason.TOKEN_INACTIVE
    assert v.account is None


async def test_no_enrichment_without_userinfo_flag(
    make_engine: EngineFactory, idp_a: FaultIssuer
) -> None:
    engine = make_engine(
        {
            "provider": [provider_entry("a", idp_a)],
            "rule": [
                {"name": "mail", "provider": "a", "audiences": ["mail"], "username": "{email}"}
            ],
        }
    )
    v = await engine.authenticate(login(idp_a.mint({"email": None})))
    assert v.reason is Reason.IDENTITY_UNMAPPABLE
    assert idp_a.requests[USERINFO] == 0


# --------------------------------------------------------------------------- single-flight + TTL


async def test_concurrent_logins_with_one_new_token_introspect_once(
    make_engine: EngineFactory, idp_a: FaultIssuer, secret_file: str, clock: FakeClock
) -> None:
    engine = make_engine(
        {
            "cache": {"ttl": 60},
            "provider": [
                provider_entry(
                    "a",
                    idp_a,
                    client_id="saslauthd",
                    client_secret_file=secret_file,
                    introspection_endpoint=f"{idp_a.url}{INTROSPECT}",
                )
            ],
            "rule": [{"name": "mail", "provider": "a", "audiences": ["mail"]}],
        }
    )
    token = idp_a.mint_opaque(lifetime=LONG)
    idp_a.delay = 0.2  # keep the one request in flight while all of them pile up

    async def round_of(n: int) -> list[Verdict]:
        verdicts: list[Verdict] = []

        async def one() -> None:
            verdicts.append(await engine.authenticate(login(token)))

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
        return verdicts

    first = await round_of(100)
    assert [v.reason for v in first] == [Reason.OK] * 100
    assert idp_a.requests[INTROSPECT] == 1
    clock.advance(30)
    assert all(v.ok for v in await round_of(10))
    assert idp_a.requests[INTROSPECT] == 1
    clock.advance(31)  # past the cache ttl
    second = await round_of(100)
    assert [v.reason for v in second] == [Reason.OK] * 100
    assert idp_a.requests[INTROSPECT] == 2
