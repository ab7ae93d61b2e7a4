"""Engine: rule selection over verified claims, with a fake provider lookup (no network).

The fake verifier "verifies" a token by reading its claims, and counts calls,
so these tests pin down the engine's own decisions: which providers it asks,
in which order the rules are tried, what wins, and what the client is told.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from saslauthd_oidc.config import parse_config
from saslauthd_oidc.core.engine import Engine
from saslauthd_oidc.core.outcome import Outcome, Reason, Refusal
from saslauthd_oidc.core.request import AuthRequest, Credentials, Mechanism, RequestContext
from saslauthd_oidc.providers.jwt import UnverifiedToken, VerifiedClaims

A = "https://a.example.org"
B = "https://b.example.org"


def b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def token(**claims: Any) -> str:
    return f"{b64({'alg': 'ES256', 'typ': 'at+jwt'})}.{b64(claims)}.c2ln"


class FakeVerifier:
    def __init__(self, issuer: str, verdicts: dict[str, Refusal]) -> None:
        self.issuer = issuer
        self.verdicts = verdicts
        self.calls = 0

    def verify_now(
        self, tok: str, unverified: UnverifiedToken | None
    ) -> VerifiedClaims | Refusal | None:
        return None  # always needs its (async) verify: the engine's I/O step

    async def verify(
        self, tok: str, unverified: UnverifiedToken | None
    ) -> VerifiedClaims | Refusal:
        self.calls += 1
        assert unverified is not None  # these tests use JWTs only
        if unverified.claims.get("iss") != self.issuer:
            return Refusal(Reason.WRONG_ISSUER, "iss")
        rejection = self.verdicts.get(str(unverified.claims.get("jti")))
        if rejection:
            return rejection
        return VerifiedClaims(dict(unverified.claims), dict(unverified.header), 2e9)

    async def userinfo(self, tok: str) -> VerifiedClaims | Refusal:
        return Refusal(Reason.PROVIDER_UNAVAILABLE, "no userinfo here")


class FakeLookup:
    def __init__(self, **verifiers: FakeVerifier) -> None:
        self.verifiers = verifiers

    def get(self, name: str) -> FakeVerifier:
        return self.verifiers[name]


CONFIG = {
    "server": {"mechanisms": ["OAUTHBEARER", "XOAUTH2", "PLAIN"]},
    "provider": [{"name": "a", "issuer": A}, {"name": "b", "issuer": B}],
    "rule": [
        {"name": "web", "provider": "a", "audiences": ["web"]},
        {"name": "imap-only", "provider": "a", "audiences": ["desk"], "services": ["imap"]},
        {
            "name": "scoped",
            "provider": "a",
            "audiences": ["desk"],
            "required_scopes": ["mail"],
            "username": "{preferred_username|localpart}@example.org",
        },
        {
            "name": "b-domain",
            "provider": "b",
            "audiences": ["mail"],
            "domains": ["b.example"],
            "discovery_hint": "https://b.example.org/custom",
        },
        {
            "name": "catchall",
            "provider": "b",
            "audiences": ["any"],
            "fallback": True,
            "authzid": "ignore",
        },
    ],
}


def make_engine(**rejections: Refusal) -> tuple[Engine, FakeLookup]:
    lookup = FakeLookup(a=FakeVerifier(A, rejections), b=FakeVerifier(B, rejections))
    return Engine(parse_config(CONFIG), lookup), lookup


def request(
    tok: str,
    user: str | None = "alice@example.org",
    service: str = "smtp",
    mech: Mechanism = Mechanism.OAUTHBEARER,
) -> AuthRequest:
    return AuthRequest(mech, Credentials(tok, user), RequestContext(service=service))


async def test_first_matching_rule_wins() -> None:
    engine, lookup = make_engine()
    v = await engine.authenticate(request(token(iss=A, aud="web", email="Alice@Example.org")))
    assert (v.outcome, v.rule, v.account) == (Outcome.OK, "web", "alice@example.org")
    assert lookup.verifiers["a"].calls == 1
    assert lookup.verifiers["b"].calls == 0  # b's rules were excluded by the unverified iss


async def test_rules_on_one_issuer_told_apart_by_service_and_scope() -> None:
    engine, lookup = make_engine()
    claims = {
        "iss": A,
        "aud": "desk",
        "email": "alice@example.org",
        "preferred_username": "alice@idm.example.org",
        "scope": "openid mail",
    }
    v = await engine.authenticate(request(token(**claims, jti="1"), service="imap"))
    assert v.rule == "imap-only"
    v = await engine.authenticate(request(token(**claims, jti="2"), service="smtp"))
    assert (v.rule, v.account) == ("scoped", "alice@example.org")
    # the provider is asked once per request even when several rules use it
    assert lookup.verifiers["a"].calls == 2


async def test_reason_comes_from_the_rule_that_got_furthest() -> None:
    engine, _ = make_engine()
    v = await engine.authenticate(request(token(iss=A, aud="desk", scope="openid")))
    assert v.outcome is Outcome.FAIL
    # "web" refuses on aud, "scoped" accepts the aud and refuses on scope: scope is the news
    assert v.reason is Reason.INSUFFICIENT_SCOPE
    reasons = {t.rule: t.reason for t in v.trace}
    assert reasons["web"] is Reason.WRONG_AUDIENCE
    assert reasons["imap-only"] is Reason.NO_RULE_FOR_CONTEXT
    assert reasons["scoped"] is Reason.INSUFFICIENT_SCOPE
    assert reasons["b-domain"] is Reason.NO_RULE_FOR_CONTEXT


async def test_authzid_must_match_account() -> None:
    engine, _ = make_engine()
    v = await engine.authenticate(
        request(token(iss=A, aud="web", email="alice@example.org"), user="bob@example.org")
    )
    assert (v.outcome, v.reason, v.rule) == (Outcome.FAIL, Reason.AUTHZID_MISMATCH, "web")
    assert v.account is None


async def test_no_authzid_means_the_mapped_account() -> None:
    engine, _ = make_engine()
    v = await engine.authenticate(
        request(token(iss=A, aud="web", email="alice@example.org"), user=None)
    )
    assert v.account == "alice@example.org"


async def test_token_of_provider_a_refused_where_only_b_fits_the_context() -> None:
    engine, _ = make_engine()
    v = await engine.authenticate(
        request(token(iss=A, aud="mail", email="x@b.example"), user="x@b.example")
    )
    # b-domain fits the context (domain b.example) but the token is A's: refused unverified
    assert v.outcome is Outcome.FAIL
    assert v.rule is None
    # the failure challenge points at the IdP of the first rule fitting the context
    assert v.hint.openid_configuration == f"{A}/.well-known/openid-configuration"


async def test_hint_comes_from_rule_that_fits_domain() -> None:
    cfg = dict(CONFIG)
    cfg["rule"] = [r for r in CONFIG["rule"] if r["provider"] == "b"]  # type: ignore[index]
    engine = Engine(parse_config(cfg), FakeLookup(b=FakeVerifier(B, {})))
    v = await engine.authenticate(request("garbage", user="x@b.example"))
    assert v.reason is Reason.MALFORMED_TOKEN
    assert v.hint.openid_configuration == "https://b.example.org/custom"


async def test_fallback_is_tried_last_and_can_ignore_authzid() -> None:
    engine, _ = make_engine()
    v = await engine.authenticate(
        request(token(iss=B, aud="any", email="svc@b.example"), user="someone-else")
    )
    assert (v.outcome, v.rule, v.account) == (Outcome.OK, "catchall", "svc@b.example")


async def test_unknown_issuer() -> None:
    engine, lookup = make_engine()
    v = await engine.authenticate(request(token(iss="https://evil.example", aud="web")))
    assert v.reason is Reason.UNKNOWN_ISSUER
    assert lookup.verifiers["a"].calls == lookup.verifiers["b"].calls == 0


async def test_temporary_failure_wins_over_later_mismatches() -> None:
    engine, _ = make_engine(j1=Refusal(Reason.PROVIDER_UNAVAILABLE, "jwks fetch failed"))
    v = await engine.authenticate(request(token(iss=A, aud="web", jti="j1")))
    assert v.outcome is Outcome.TEMPFAIL
    assert "a: jwks fetch failed" in v.detail


async def test_signature_failure_is_reported() -> None:
    engine, _ = make_engine(j2=Refusal(Reason.BAD_SIGNATURE, "signature"))
    v = await engine.authenticate(request(token(iss=A, aud="web", jti="j2")))
    assert v.reason is Reason.BAD_SIGNATURE
    assert v.account is None


async def test_disabled_mechanism() -> None:
    cfg = {**CONFIG, "server": {"mechanisms": ["OAUTHBEARER"]}}
    engine = Engine(parse_config(cfg), FakeLookup())
    v = await engine.authenticate(request(token(iss=A), mech=Mechanism.PLAIN))
    assert v.reason is Reason.UNSUPPORTED_MECHANISM


async def test_unnegotiated_request_is_not_held_to_the_offered_mechanisms() -> None:
    """A request that negotiated no mechanism (the saslauthd socket's login + token as
    password) is decided on its token, whatever server.mechanisms offers; the request
    says so, not the name of the frontend it came from."""
    cfg = {**CONFIG, "server": {"mechanisms": ["OAUTHBEARER"]}}
    engine = Engine(parse_config(cfg), FakeLookup(a=FakeVerifier(A, {}), b=FakeVerifier(B, {})))
    tok = token(iss=A, aud="web", email="alice@example.org")
    plain = request(tok, mech=Mechanism.PLAIN)
    unnegotiated = AuthRequest(plain.mechanism, plain.credentials, plain.context, negotiated=False)
    assert (await engine.authenticate(unnegotiated)).outcome is Outcome.OK
    assert (await engine.authenticate(plain)).reason is Reason.UNSUPPORTED_MECHANISM


async def test_engine_error_is_internal_tempfail() -> None:
    class Boom(FakeLookup):
        def get(self, name: str) -> FakeVerifier:
            raise RuntimeError("boom")

    engine = Engine(parse_config(CONFIG), Boom())
    v = await engine.authenticate(request(token(iss=A, aud="web")))
    assert (v.outcome, v.reason) == (Outcome.TEMPFAIL, Reason.INTERNAL_ERROR)


@pytest.mark.parametrize("user", ["alice@example.org", None])
async def test_log_line_has_fingerprint_not_token(user: str | None) -> None:
    import io

    from saslauthd_oidc.config import LoggingConfig
    from saslauthd_oidc.service.logs import configure_logging

    out = io.StringIO()
    configure_logging(LoggingConfig(level="info", format="json"), stream=out)
    engine, _ = make_engine()
    tok = token(iss=A, aud="web", email="alice@example.org")
    v = await engine.authenticate(request(tok, user=user))
    line = json.loads(out.getvalue().strip().splitlines()[-1])
    assert line["event"] == "authentication"
    assert line["outcome"] == "ok" and line["reason"] == "ok" and line["rule"] == "web"
    assert line["token"] == Credentials(tok).fingerprint
    assert isinstance(line["latency_ms"], float)
    assert tok not in json.dumps(line) and tok.split(".")[1] not in json.dumps(line)
    assert v.ok


async def test_domain_map_applies_before_the_authzid_check() -> None:
    cfg = {
        "provider": [{"name": "a", "issuer": A}],
        "rule": [
            {
                "name": "kanidm",
                "provider": "a",
                "audiences": ["web"],
                "username": "{preferred_username}",
                "domain_map": {"idm.example.org": "example.org"},
                "account_domains": ["example.org"],
            }
        ],
    }
    engine = Engine(parse_config(cfg), FakeLookup(a=FakeVerifier(A, {})))
    tok = token(iss=A, aud="web", preferred_username="carol@idm.example.org")
    v = await engine.authenticate(request(tok, user="carol@example.org"))
    assert (v.outcome, v.account) == (Outcome.OK, "carol@example.org")
    tok = token(iss=A, aud="web", preferred_username="mallory@elsewhere.org")
    v = await engine.authenticate(request(tok, user=None))
    assert v.reason is Reason.UNTRUSTED_ACCOUNT_DOMAIN


async def test_hint_prefers_the_context_rule_with_the_tokens_issuer() -> None:
    cfg = {
        "provider": [{"name": "a", "issuer": A}, {"name": "b", "issuer": B}],
        "rule": [
            {"name": "ra", "provider": "a", "audiences": ["x"]},
            {"name": "rb", "provider": "b", "audiences": ["mail"], "required_scopes": ["mail"]},
        ],
    }
    engine = Engine(parse_config(cfg), FakeLookup(a=FakeVerifier(A, {}), b=FakeVerifier(B, {})))
    v = await engine.authenticate(request(token(iss=B, aud="mail", scope="openid")))
    assert v.reason is Reason.INSUFFICIENT_SCOPE
    assert v.hint.openid_configuration == f"{B}/.well-known/openid-configuration"
    assert v.hint.scope == "mail"
    # an issuer no rule knows: the first rule fitting the context is the guess
    v = await engine.authenticate(request(token(iss="https://x.example", aud="mail")))
    assert v.hint.openid_configuration == f"{A}/.well-known/openid-configuration"


async def test_hint_names_a_fallback_rule_only_when_only_fallbacks_fit() -> None:
    engine, _ = make_engine()
    # "catchall" (fallback, provider b) has the token's issuer, but "web" fits the context
    v = await engine.authenticate(request(token(iss=B, aud="nope", email="x@y")))
    assert v.hint.openid_configuration == f"{A}/.well-known/openid-configuration"


async def test_repeated_token_is_verified_once_then_served_from_cache() -> None:
    engine, lookup = make_engine()
    tok = token(iss=A, aud="web", email="alice@example.org", exp=4_000_000_000)
    for _ in range(3):
        v = await engine.authenticate(request(tok))
        assert v.account == "alice@example.org"
    assert lookup.verifiers["a"].calls == 1
    assert (engine.cache.hits, engine.cache.misses) == (2, 1)
    # the rule conditions and the authzid are still checked on every request
    v = await engine.authenticate(request(tok, user="bob@example.org"))
    assert v.reason is Reason.AUTHZID_MISMATCH
    v = await engine.authenticate(request(tok, service="imap"))
    assert v.ok and v.rule == "web"
