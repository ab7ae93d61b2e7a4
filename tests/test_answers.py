"""What introspection and userinfo answers mean (pure: providers.answers)."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from saslauthd_oidc.config import ProviderConfig
from saslauthd_oidc.core.outcome import Reason, Refusal
from saslauthd_oidc.providers.answers import (
    DECISION_CLAIMS,
    interpret_introspection,
    interpret_userinfo,
    merge_userinfo,
)
from saslauthd_oidc.providers.issuers import accepts_issuer
from saslauthd_oidc.providers.jwt import VerifiedClaims

ISS = "https://idp.example.org/realms/mail"
NOW = 1_800_000_000.0
LEEWAY = 60.0


def _exact(iss: object) -> bool:
    return iss == ISS


def introspect(**doc: Any) -> VerifiedClaims | Refusal:
    answer: dict[str, Any] = {"active": True, "sub": "alice", "exp": NOW + 600}
    answer.update(doc)
    answer = {k: v for k, v in answer.items() if v is not None}
    return interpret_introspection(
        answer, issuer=ISS, accepts_issuer=_exact, now=NOW, leeway=LEEWAY
    )


def reason(result: VerifiedClaims | Refusal) -> Reason:
    return Reason.OK if isinstance(result, VerifiedClaims) else result.reason


# --------------------------------------------------------------------------- introspection


def test_active_answer_gives_its_claims() -> None:
    result = introspect(aud="mail", scope="openid mail", client_id="webmail", iss=ISS)
    assert isinstance(result, VerifiedClaims)
    assert result.claims["aud"] == "mail"
    assert result.claims["scope"] == "openid mail"
    assert result.claims["client_id"] == "webmail"
    assert result.expires_at == NOW + 600
    assert result.header == {}


@pytest.mark.parametrize("active", ["true", "True", 1, 1.0, False, [True], {"v": True}])
def test_only_json_true_is_active(active: object) -> None:
    assert reason(introspect(active=active)) is Reason.TOKEN_INACTIVE


def test_missing_active_is_inactive() -> None:
    doc = {"sub": "alice", "exp": NOW + 600, "iss": ISS}
    result = interpret_introspection(doc, issuer=ISS, accepts_issuer=_exact, now=NOW, leeway=0)
    assert reason(result) is Reason.TOKEN_INACTIVE


def test_inactive_answer_with_claims_is_still_inactive() -> None:
    # RFC 7662 2.2: an inactive answer's other members mean nothing
    assert reason(introspect(active=False, iss=ISS, aud="mail")) is Reason.TOKEN_INACTIVE


def test_absent_iss_is_the_providers_issuer() -> None:
    result = introspect()
    assert isinstance(result, VerifiedClaims)
    assert result.claims["iss"] == ISS


@pytest.mark.parametrize(
    "iss", [ISS + "/", "https://evil.example.org/realms/mail", "", 42, ["x"], ISS.upper()]
)
def test_foreign_iss_is_wrong_issuer(iss: object) -> None:
    assert reason(introspect(iss=iss)) is Reason.WRONG_ISSUER


def test_iss_checked_through_accepts_issuer() -> None:
    seen: list[object] = []

    def accepts(iss: object) -> bool:
        seen.append(iss)
        return iss == "https://login.example/t1/v2.0"

    doc = {"active": True, "iss": "https://login.example/t1/v2.0", "exp": NOW + 60}
    result = interpret_introspection(doc, issuer=ISS, accepts_issuer=accepts, now=NOW, leeway=0)
    assert isinstance(result, VerifiedClaims)
    assert result.claims["iss"] == "https://login.example/t1/v2.0"  # kept, not replaced
    assert seen == ["https://login.example/t1/v2.0"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("token_type", "refresh_token"),
        ("token_type", "Refresh_Token"),
        ("typ", "Refresh"),
        ("typ", "Offline"),
        ("typ", "ID"),
        ("token_type", "id_token"),
    ],
)
def test_refresh_and_id_tokens_are_wrong_token_type(field: str, value: str) -> None:
    assert reason(introspect(**{field: value})) is Reason.WRONG_TOKEN_TYPE


@pytest.mark.parametrize(
    ("field", "value"),
    [("token_type", "Bearer"), ("token_type", "access_token"), ("typ", "Bearer"), ("typ", 5)],
)
def test_access_token_types_pass(field: str, value: object) -> None:
    assert reason(introspect(**{field: value})) is Reason.OK


def test_expired() -> None:
    assert reason(introspect(exp=NOW - LEEWAY - 1)) is Reason.EXPIRED


def test_expired_within_leeway_passes() -> None:
    assert reason(introspect(exp=NOW - LEEWAY + 1)) is Reason.OK


@pytest.mark.parametrize("exp", [str(int(NOW + 600)), "soon", True, -1, [1], math.nan])
def test_exp_not_a_number_is_bad_claim(exp: object) -> None:
    assert reason(introspect(exp=exp)) is Reason.BAD_CLAIM


def test_no_exp_expires_never() -> None:
    result = introspect(exp=None)
    assert isinstance(result, VerifiedClaims)
    assert result.expires_at == math.inf
    assert "exp" not in result.claims


def test_nbf_in_future_not_yet_valid() -> None:
    assert reason(introspect(nbf=NOW + LEEWAY + 30)) is Reason.NOT_YET_VALID


def test_nbf_in_future_without_exp_not_yet_valid() -> None:
    assert reason(introspect(exp=None, nbf=NOW + 3600)) is Reason.NOT_YET_VALID


def test_iat_in_future_without_exp_is_issued_in_future() -> None:
    assert reason(introspect(exp=None, iat=NOW + 3600)) is Reason.ISSUED_IN_FUTURE


def test_nbf_as_string_without_exp_is_bad_claim() -> None:
    assert reason(introspect(exp=None, nbf="0")) is Reason.BAD_CLAIM


def test_past_nbf_and_iat_without_exp_pass() -> None:
    assert reason(introspect(exp=None, nbf=NOW - 10, iat=NOW - 10)) is Reason.OK


# --------------------------------------------------------------------------- userinfo


def userinfo(**doc: Any) -> VerifiedClaims | Refusal:
    return interpret_userinfo(doc, issuer=ISS, accepts_issuer=_exact)


@pytest.mark.parametrize("sub", [None, "", 42, ["alice"], {"id": "alice"}, True])
def test_userinfo_sub_must_be_a_non_empty_string(sub: object) -> None:
    doc = {"email": "alice@example.org"} if sub is None else {"sub": sub}
    assert reason(userinfo(**doc)) is Reason.BAD_CLAIM


def test_userinfo_fills_iss_and_never_expires() -> None:
    result = userinfo(sub="alice", email="alice@example.org")
    assert isinstance(result, VerifiedClaims)
    assert result.claims == {"sub": "alice", "email": "alice@example.org", "iss": ISS}
    assert result.expires_at == math.inf


def test_userinfo_with_own_iss() -> None:
    assert reason(userinfo(sub="alice", iss=ISS)) is Reason.OK
    assert reason(userinfo(sub="alice", iss="https://other.example")) is Reason.WRONG_ISSUER
    assert reason(userinfo(sub="alice", iss=7)) is Reason.WRONG_ISSUER


def test_userinfo_multi_tenant_issuer_through_config() -> None:
    cfg = ProviderConfig(
        name="entra",
        issuer="https://login.example/{tenantid}/v2.0",
        allowed_tenants=("t1",),
    )
    ok = interpret_userinfo(
        {"sub": "a", "iss": "https://login.example/t1/v2.0"},
        issuer=cfg.issuer,
        accepts_issuer=partial(accepts_issuer, cfg),
    )
    assert reason(ok) is Reason.OK
    other = interpret_userinfo(
        {"sub": "a", "iss": "https://login.example/t2/v2.0"},
        issuer=cfg.issuer,
        accepts_issuer=partial(accepts_issuer, cfg),
    )
    assert reason(other) is Reason.WRONG_ISSUER


# --------------------------------------------------------------------------- merge_userinfo


TOKEN = {"iss": ISS, "sub": "alice", "aud": "mail", "scope": "mail", "exp": NOW + 600}


def test_merge_adds_profile_claims() -> None:
    merged = merge_userinfo(TOKEN, {"sub": "alice", "email": "alice@example.org", "name": "A"})
    assert merged == {**TOKEN, "email": "alice@example.org", "name": "A"}


@pytest.mark.parametrize("sub", ["mallory", "", None, "Alice", 1])
def test_merge_refuses_another_subject(sub: object) -> None:
    answer: dict[str, Any] = {"email": "mallory@example.org"}
    if sub is not None:
        answer["sub"] = sub
    merged = merge_userinfo(TOKEN, answer)
    assert isinstance(merged, Refusal)
    assert merged.reason is Reason.BAD_CLAIM


def test_merge_token_wins_conflicts() -> None:
    merged = merge_userinfo(
        {**TOKEN, "email": "alice@token.example"},
        {"sub": "alice", "email": "mallory@example.org", "preferred_username": "alice"},
    )
    assert isinstance(merged, dict)
    assert merged["email"] == "alice@token.example"
    assert merged["preferred_username"] == "alice"


def test_merge_never_adds_decision_claims() -> None:
    token = {"sub": "alice", "iss": ISS, "exp": NOW + 600}  # no aud, scope, azp...
    answer = {
        "sub": "alice",
        "aud": "mail",
        "scope": "mail admin",
        "scp": ["mail"],
        "azp": "webmail",
        "client_id": "webmail",
        "tid": "t1",
        "active": True,
        "email": "alice@example.org",
    }
    merged = merge_userinfo(token, answer)
    assert merged == {**token, "email": "alice@example.org"}


def test_merge_does_not_touch_its_inputs() -> None:
    token = dict(TOKEN)
    answer = {"sub": "alice", "email": "alice@example.org"}
    merge_userinfo(token, answer)
    assert token == TOKEN
    assert answer == {"sub": "alice", "email": "alice@example.org"}


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=8),
    st.lists(st.text(max_size=4), max_size=3),
)
_names = st.one_of(st.sampled_from(sorted(DECISION_CLAIMS)), st.text(min_size=1, max_size=10))


@given(
    token=st.dictionaries(_names, _values, max_size=8),
    answer=st.dictionaries(_names, _values, max_size=8),
)
def test_userinfo_never_changes_a_decision_claim(
    token: dict[str, Any], answer: dict[str, Any]
) -> None:
    if "sub" in token:
        answer["sub"] = token["sub"]  # otherwise refused outright
    merged = merge_userinfo(token, answer)
    assert isinstance(merged, dict)
    for name in DECISION_CLAIMS:
        assert (name in merged) == (name in token)
        if name in token:
            assert merged[name] == token[name]
    for name, value in token.items():
        assert merged[name] == value  # the token wins everything
    assert set(merged) <= set(token) | set(answer)


@given(token=st.dictionaries(_names, _values, max_size=6), sub=st.text(max_size=8))
def test_userinfo_with_another_sub_is_always_refused(token: dict[str, Any], sub: str) -> None:
    token["sub"] = "alice"
    merged = merge_userinfo(token, {"sub": sub if sub != "alice" else "bob", "aud": "x"})
    assert isinstance(merged, Refusal)
