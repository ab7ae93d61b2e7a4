"""The pure parts of the trust policy: which tokens are bearer access tokens, which
accounts a rule may produce, which e-mail names an account, the config rules and
warnings around them; and the provider's retry and rotation timing (fake clock).

The same attacks through the daemon's socket: tests/test_attacks_trust.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from saslauthd_oidc.config import Config, ConfigError, ProviderConfig, parse_config
from saslauthd_oidc.core.identity import check_account_domain, email_problem, map_account
from saslauthd_oidc.core.outcome import Reason, Refusal
from saslauthd_oidc.core.rules import config_warnings, token_policy
from saslauthd_oidc.providers.answers import interpret_introspection
from saslauthd_oidc.providers.jwt import VerifiedClaims, bearer_problem, peek
from saslauthd_oidc.providers.oidc import OidcProvider
from saslauthd_oidc.tools.cli import main
from tests.support import FakeClock
from tests.support_issuer import FaultIssuer

A = "https://a.example.org"
B = "https://b.example.org"

# --------------------------------------------------------------------------- bearer tokens

# Access tokens as real IdPs issue them: none may be taken for an ID token.
REAL_ACCESS_TOKENS: dict[str, dict[str, Any]] = {
    "kanidm": {"aud": "webmail", "client_id": "webmail", "scope": "openid", "auth_time": 1},
    "authentik": {"aud": "webmail", "azp": "webmail", "auth_time": 1, "acr": "x", "amr": ["pwd"]},
    "keycloak": {"aud": "account", "azp": "tb", "typ": "Bearer", "scope": "email", "auth_time": 1},
    "keycloak-old-with-nonce": {"aud": "account", "azp": "tb", "typ": "Bearer", "nonce": "n"},
    "entra-v2-delegated": {"aud": "api://mail", "azp": "c1", "scp": "Mail.Send", "tid": "t"},
    "entra-v2-app-only": {"aud": "api://mail", "azp": "c1", "roles": ["Mail.Send"]},
    "entra-v1": {"aud": "api://mail", "appid": "c1", "scp": "Mail.Send"},
    "okta": {"aud": "api://default", "cid": "c1", "scp": ["email"]},
    "oidc-provider": {"aud": "urn:mail", "client_id": "c1", "scope": "mail email"},
}

ID_TOKENS: dict[str, dict[str, Any]] = {
    "at_hash": {"aud": "c1", "azp": "c1", "at_hash": "h"},
    "c_hash": {"aud": "c1", "azp": "c1", "c_hash": "h"},
    "s_hash": {"aud": "c1", "azp": "c1", "s_hash": "h"},
    "nonce": {"aud": "c1", "azp": "c1", "nonce": "n"},
    "keycloak-typ-ID": {"aud": "c1", "azp": "c1", "typ": "ID"},
    "oidc-provider-code-flow": {"aud": "c1", "email": "a@x", "email_verified": True},
}


@pytest.mark.parametrize("shape", list(REAL_ACCESS_TOKENS))
def test_real_access_tokens_are_bearer_tokens(shape: str) -> None:
    assert bearer_problem(REAL_ACCESS_TOKENS[shape], accept_id_tokens=False) is None


@pytest.mark.parametrize("shape", list(ID_TOKENS))
def test_id_tokens_are_refused_unless_accepted(shape: str) -> None:
    refused = bearer_problem(ID_TOKENS[shape], accept_id_tokens=False)
    assert isinstance(refused, Refusal) and refused.reason is Reason.ID_TOKEN
    assert "accept_id_tokens" in refused.detail
    assert bearer_problem(ID_TOKENS[shape], accept_id_tokens=True) is None


@pytest.mark.parametrize("kind", ["Refresh", "Offline", "Logout"])
def test_keycloak_non_access_tokens_are_never_accepted(kind: str) -> None:
    for accept in (False, True):
        refused = bearer_problem({"azp": "c", "typ": kind}, accept_id_tokens=accept)
        assert isinstance(refused, Refusal) and refused.reason is Reason.WRONG_TOKEN_TYPE


@pytest.mark.parametrize(
    "cnf", [{"jkt": "x"}, {"x5t#S256": "x"}, {"jwk": {"kty": "EC"}}, {"kid": "k"}, "garbage"]
)
def test_sender_constrained_tokens_are_refused_even_with_accept_id_tokens(cnf: object) -> None:
    token_claims = {**REAL_ACCESS_TOKENS["oidc-provider"], "cnf": cnf}
    for accept in (False, True):
        refused = bearer_problem(token_claims, accept_id_tokens=accept)
        assert isinstance(refused, Refusal) and refused.reason is Reason.SENDER_CONSTRAINED


def _introspect(doc: dict[str, Any]) -> VerifiedClaims | Refusal:
    return interpret_introspection(
        {"active": True, "client_id": "c", **doc},
        issuer=A,
        accepts_issuer=lambda iss: iss == A,
        now=1000.0,
        leeway=60,
    )


@pytest.mark.parametrize(
    "doc", [{"cnf": {"jkt": "x"}}, {"cnf": {"x5t#S256": "x"}}, {"token_type": "DPoP"}]
)
def test_introspection_answers_for_sender_constrained_tokens_are_refused(
    doc: dict[str, Any],
) -> None:
    refused = _introspect(doc)
    assert isinstance(refused, Refusal) and refused.reason is Reason.SENDER_CONSTRAINED


def test_introspection_answers_are_not_judged_by_id_token_markers() -> None:
    # an introspection answer describes an access token; nonce there is the IdP's business
    assert isinstance(_introspect({"nonce": "n", "token_type": "Bearer"}), VerifiedClaims)


# --------------------------------------------------------------------------- e-mail


@pytest.mark.parametrize("verified", [False, "true", 1, None, [True]])
def test_email_the_idp_does_not_verify_names_no_account(verified: object) -> None:
    problem = email_problem(
        {"email": "a@x", "email_verified": verified}, multi_tenant=False, trust_unverified=False
    )
    assert isinstance(problem, Refusal) and problem.reason is Reason.UNVERIFIED_EMAIL
    assert (
        email_problem(
            {"email": "a@x", "email_verified": verified}, multi_tenant=False, trust_unverified=True
        )
        is None
    )


def test_an_idp_that_does_not_send_email_verified_is_believed() -> None:
    assert email_problem({"email": "a@x"}, multi_tenant=False, trust_unverified=False) is None


@pytest.mark.parametrize(
    ("extra", "ok"),
    [
        ({}, False),
        ({"xms_edov": True}, True),
        ({"email_verified": True}, True),
        ({"xms_edov": 1}, False),
    ],
)
def test_multi_tenant_email_needs_a_verification_claim(extra: dict[str, Any], ok: bool) -> None:
    problem = email_problem({"email": "a@x", **extra}, multi_tenant=True, trust_unverified=False)
    assert (problem is None) is ok
    if problem is not None:
        assert "preferred_username" in problem.detail


# --------------------------------------------------------------------------- account domains


def two_idps(rule_b: dict[str, Any], rule_a: dict[str, Any] | None = None) -> Config:
    return parse_config(
        {
            "provider": [{"name": "a", "issuer": A}, {"name": "b", "issuer": B}],
            "rule": [
                {
                    "name": "a",
                    "provider": "a",
                    "audiences": ["m"],
                    **(rule_a if rule_a is not None else {"domains": ["example.org"]}),
                },
                {"name": "b", "provider": "b", "audiences": ["m"], **rule_b},
            ],
        }
    )


@pytest.mark.parametrize(
    ("rule_b", "account", "refused"),
    [
        ({}, "alice@example.org", True),  # claimed by provider a's rule
        ({}, "bob@example.net", False),  # claimed by nobody
        ({}, "bob", False),  # no domain: only account_domains limits these
        ({"account_domains": ["example.org"]}, "alice@example.org", False),  # explicit
        ({"account_domains": ["example.org"]}, "bob", True),
        ({"domains": ["example.net"]}, "alice@example.org", True),  # its domains are its own
        ({"domains": ["example.net"]}, "bob@example.net", False),
        ({"username": "{preferred_username}@example.org"}, "alice@example.org", False),
    ],
)
def test_account_domains(rule_b: dict[str, Any], account: str, refused: bool) -> None:
    rule = two_idps(rule_b).rules[1]
    problem = check_account_domain(account, rule)
    assert (problem is not None) is refused, problem
    if problem is not None:
        assert problem.reason is Reason.UNTRUSTED_ACCOUNT_DOMAIN


def test_domains_compare_without_case() -> None:
    rule = two_idps({"domains": ["example.net"], "normalize": False}).rules[1]
    assert check_account_domain("Bob@Example.NET", rule) is None


def test_a_template_domain_is_claimed_like_domains() -> None:
    cfg = two_idps({}, {"username": "{preferred_username|localpart}@Example.ORG"})
    a, b = cfg.rules
    assert a.template_domain == "example.org" and a.trusted_account_domains == ("example.org",)
    assert b.foreign_domains == ("example.org",)
    assert check_account_domain("alice@example.org", b) is not None


def test_the_same_issuer_claims_nothing_from_itself() -> None:
    cfg = parse_config(
        {
            "provider": [{"name": "a", "issuer": A}, {"name": "a2", "issuer": A}],
            "rule": [
                {"name": "x", "provider": "a", "audiences": ["m"], "domains": ["example.org"]},
                {"name": "y", "provider": "a2", "audiences": ["n"]},
            ],
        }
    )
    assert cfg.rules[1].foreign_domains == ()


def test_map_account_applies_domain_map_before_the_domain_policy() -> None:
    cfg = two_idps({"domain_map": {"idm.example.net": "example.net"}, "username": "{upn}"})
    rule, p = cfg.rules[1], cfg.provider("b")
    assert map_account(rule, p, {"upn": "bob@idm.example.net"}) == "bob@example.net"
    refused = map_account(rule, p, {"upn": "alice@example.org"})
    assert isinstance(refused, Refusal)
    assert refused.reason is Reason.UNTRUSTED_ACCOUNT_DOMAIN


# --------------------------------------------------------------------------- config


def load(rule: dict[str, Any], **provider: Any) -> Config:
    return parse_config(
        {"provider": [{"name": "p", "issuer": A, **provider}], "rule": [{"provider": "p", **rule}]}
    )


@pytest.mark.parametrize(
    ("rule", "provider", "key", "words"),
    [
        ({}, {}, "rule[0].audiences", "check_audience = false"),
        (
            {"hosts": ["mail.x"], "resource_paths": ["/jmap"]},
            {},
            "rule[0].audiences",
            "any other application",
        ),
        (
            {"audiences": ["m"], "check_audience": False},
            {},
            "rule[0].check_audience",
            "contradicts",
        ),
        (
            {"audiences": ["m"]},
            {"force_introspection": True},
            "provider[0].force_introspection",
            "client_id",
        ),
        (
            {"audiences": ["m"]},
            {"introspection_cache_ttl": 5},
            "provider[0].introspection_cache_ttl",
            "does not introspect",
        ),
        ({"audiences": ["m"]}, {"jwks_retry": 0}, "provider[0].jwks_retry", "at least"),
    ],
)
def test_config_errors_name_the_key(
    rule: dict[str, Any], provider: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(rule, **provider)
    assert err.value.key == key and words in str(err.value)


def test_a_userinfo_validation_rule_is_told_what_fits() -> None:
    with pytest.raises(ConfigError) as err:
        load({}, userinfo_validation=True)
    assert err.value.key == "rule[0].audiences"
    assert "name no audience" in str(err.value) and "check_audience = false" in str(err.value)
    assert (
        load({"check_audience": False}, userinfo_validation=True).rules[0].check_audience is False
    )


def test_introspection_ttl_defaults() -> None:
    base = ProviderConfig(name="p", issuer=A, client_id="c", client_secret_file="/x")
    assert base.effective_introspection_ttl is None  # the cache's own ttl
    forced = ProviderConfig(
        name="p", issuer=A, client_id="c", client_secret_file="/x", force_introspection=True
    )
    assert forced.effective_introspection_ttl == 30.0
    own = ProviderConfig(
        name="p", issuer=A, client_id="c", client_secret_file="/x", introspection_cache_ttl=7
    )
    assert own.effective_introspection_ttl == 7


def test_warnings_for_domains_two_idps_share_and_rules_naming_none() -> None:
    shared = config_warnings(two_idps({"account_domains": ["example.org"]}))
    assert any("both produce accounts in example.org" in w for w in shared), shared
    unnamed = config_warnings(two_idps({}))
    assert any(
        "rule[1] (b) names no domains or account_domains" in w and "refused: example.org" in w
        for w in unnamed
    ), unnamed
    assert not any("both produce" in w for w in unnamed)
    # one IdP only: it is trusted for every account anyway
    assert not any("domains" in w for w in config_warnings(load({"audiences": ["m"]})))


def test_warnings_for_unverifiable_email_and_id_tokens() -> None:
    entra = {"issuer": "https://login.example.com/{tenantid}/v2.0", "allowed_tenants": ["*"]}
    cfg = parse_config(
        {
            "provider": [
                {"name": "e", **entra},
                {"name": "p", "issuer": A, "accept_id_tokens": True},
            ],
            "rule": [
                {"name": "mt", "provider": "e", "audiences": ["m"]},
                {
                    "name": "trusting",
                    "provider": "p",
                    "audiences": ["m"],
                    "trust_unverified_email": True,
                    "account_domains": ["example.org"],
                },
            ],
        }
    )
    text = "\n".join(config_warnings(cfg))
    assert "rule[0] (mt) maps {email} of the multi-tenant issuer" in text
    assert "{preferred_username}" in text and "{oid}" in text
    assert 'accepts every tenant (allowed_tenants = ["*"])' in text
    assert "rule[1] (trusting) trusts unverified e-mail" in text
    assert "provider[1] (p) accepts ID tokens" in text


def test_check_config_prints_the_token_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "s"
    secret.write_text("x\n")
    secret.chmod(0o600)
    path = tmp_path / "c.toml"
    path.write_text(
        '[[provider]]\nname = "kanidm"\nissuer = "https://idm.example.org/oauth2/openid/m"\n'
        'token_types = ["at+jwt"]\n'
        '[[provider]]\nname = "kc"\nissuer = "https://sso.example.org/realms/mail"\n'
        f'client_id = "saslauthd"\nclient_secret_file = "{secret}"\nforce_introspection = true\n'
        '[[rule]]\nprovider = "kanidm"\naudiences = ["m"]\n'
        '[[rule]]\nprovider = "kc"\naudiences = ["m"]\naccount_domains = ["example.net"]\n'
    )
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "provider kanidm: JWT typ must be at+jwt; ID tokens" in out
    assert "a revoked JWT works until its exp" in out
    assert "provider kc: any JWT typ" in out
    assert "a revoked JWT works for up to 30s (force_introspection)" in out
    assert "a revoked opaque token for up to 30s" in out
    policy = token_policy(load({"audiences": ["m"]}))
    assert policy == [
        "provider p: any JWT typ; ID tokens (nonce, at_hash, c_hash, s_hash, typ ID, no client) "
        "refused; "
        "cnf-bound (DPoP, mTLS) refused; a revoked JWT works until its exp"
    ]


# --------------------------------------------------------------------------- provider timing


@pytest.fixture
async def issuer(nursery: trio.Nursery) -> FaultIssuer:
    iss = FaultIssuer(algorithms=("ES256",))
    await nursery.start(iss.serve)
    return iss


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as c:
        yield c


def make(iss: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock, **kw: Any) -> OidcProvider:
    assert iss.issuer is not None
    cfg = ProviderConfig(
        name="dev", issuer=iss.issuer, allow_http=True, algorithms=("ES256",), **kw
    )
    return OidcProvider(cfg, client, clock=clock, fetch_timeout=2.0)


async def verdict(p: OidcProvider, token: str) -> Reason:
    unverified = peek(token)
    assert not isinstance(unverified, Refusal)
    with trio.move_on_after(0.2):  # a short deadline: no waiting for a retry here
        result = await p.verify(token, unverified)
        return Reason.OK if isinstance(result, VerifiedClaims) else result.reason
    return Reason.TIMEOUT


async def test_failed_fetches_back_off_from_jwks_retry_to_the_cooldown(
    issuer: FaultIssuer, client: httpx.AsyncClient
) -> None:
    clock = FakeClock()
    retry, cooldown = 1.0, 30.0
    p = make(issuer, client, clock, jwks_retry=retry, jwks_cooldown=cooldown)
    issuer.fail_status = 503
    token = issuer.mint()

    def attempts() -> int:
        return issuer.requests["/.well-known/openid-configuration"]

    assert await verdict(p, token) is Reason.PROVIDER_UNAVAILABLE
    assert attempts() == 1
    gap = retry
    for _ in range(7):
        clock.advance(gap - 0.01)
        assert await verdict(p, token) is Reason.PROVIDER_UNAVAILABLE
        before = attempts()
        clock.advance(0.01)
        assert await verdict(p, token) is Reason.PROVIDER_UNAVAILABLE
        assert attempts() == before + 1  # exactly one attempt per gap
        gap = min(gap * 2, cooldown)  # 1, 2, 4, 8, 16, then the cooldown
    # back: the next attempt succeeds, and a success resets the backoff
    issuer.fail_status = None
    clock.advance(cooldown)
    assert await verdict(p, token) is Reason.OK


async def test_the_idp_is_used_again_one_retry_after_it_is_back(
    issuer: FaultIssuer, client: httpx.AsyncClient
) -> None:
    clock = FakeClock()
    p = make(issuer, client, clock)
    issuer.fail_status = 503
    token = issuer.mint()
    assert await verdict(p, token) is Reason.PROVIDER_UNAVAILABLE
    issuer.fail_status = None
    assert await verdict(p, token) is Reason.PROVIDER_UNAVAILABLE  # the retry is 1 s away
    clock.advance(1.0)
    assert await verdict(p, token) is Reason.OK  # not 30 s (jwks_cooldown) later


async def test_an_unknown_kid_during_an_outage_is_temporary(
    issuer: FaultIssuer, client: httpx.AsyncClient
) -> None:
    clock = FakeClock()
    p = make(issuer, client, clock)
    assert await verdict(p, issuer.mint()) is Reason.OK
    issuer.rotate("ES256")
    issuer.fail_status = 503
    assert await verdict(p, issuer.mint()) is Reason.PROVIDER_UNAVAILABLE
    issuer.fail_status = None
    clock.advance(1.0)
    assert await verdict(p, issuer.mint()) is Reason.OK


async def test_an_old_token_with_an_unknown_kid_fails_at_once(
    issuer: FaultIssuer, client: httpx.AsyncClient
) -> None:
    """Issued well before the keys were fetched: its key would have been in them."""
    clock = FakeClock()
    p = make(issuer, client, clock, leeway=60)
    assert await verdict(p, issuer.mint()) is Reason.OK
    old = issuer.mint({"iat": int(clock.now) - 600, "nbf": None}, header={"kid": "gone"})
    assert await verdict(p, old) is Reason.UNKNOWN_KEY
    assert issuer.requests["/jwks.json"] == 2  # one unknown-kid refetch
    # a second one within the cooldown: no fetch, and still permanent
    older = issuer.mint({"iat": int(clock.now) - 600, "nbf": None}, header={"kid": "gone2"})
    assert await verdict(p, older) is Reason.UNKNOWN_KEY
    assert issuer.requests["/jwks.json"] == 2


async def test_force_introspection_bounds_the_cache_and_checks_the_subject(
    issuer: FaultIssuer, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    clock = FakeClock()
    secret = tmp_path / "s"
    secret.write_text(issuer.clients["saslauthd"] + "\n")
    secret.chmod(0o600)
    assert issuer.url is not None
    p = make(
        issuer,
        client,
        clock,
        client_id="saslauthd",
        client_secret_file=str(secret),
        introspection_endpoint=issuer.url + "/introspect",
        force_introspection=True,
    )
    token = issuer.mint(lifetime=600)
    unverified = peek(token)
    assert not isinstance(unverified, Refusal)
    assert p.verify_now(token, unverified) is None  # always needs the IdP
    result = await p.verify(token, unverified)
    assert isinstance(result, VerifiedClaims)
    assert result.expires_at == pytest.approx(clock.now + 30)  # not the token's exp
    issuer.revoke(token)
    result = await p.verify(token, unverified)
    assert isinstance(result, Refusal) and result.reason is Reason.TOKEN_INACTIVE


def test_the_readme_lists_every_reason_code() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("Reason codes:") :]
    section = section[: section.index("###")]
    missing = [r.value for r in Reason if f"`{r.value}`" not in section]
    assert not missing, f"README's reason list lacks {missing}"
