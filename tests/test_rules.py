"""Rule conditions on request context and on verified claims; load-time shadowing analysis."""

from __future__ import annotations

from typing import Any

import pytest

from saslauthd_oidc.config import parse_config
from saslauthd_oidc.core.outcome import Reason
from saslauthd_oidc.core.request import AuthRequest, Credentials, Mechanism, RequestContext
from saslauthd_oidc.core.rules import (
    account_domain_mismatch,
    claim_mismatch,
    config_warnings,
    context_mismatch,
    discovery_hint,
    ordered,
)

PROVIDERS = [{"name": "idp", "issuer": "https://idp.example.org"}]


def rule(**kw: Any) -> Any:
    if not {"audiences", "authorized_parties", "check_audience"} & set(kw):
        kw["check_audience"] = False
    cfg = parse_config({"provider": PROVIDERS, "rule": [{"provider": "idp", **kw}]})
    return cfg.rules[0]


def req(
    *,
    mech: Mechanism = Mechanism.OAUTHBEARER,
    user: str | None = "alice@example.org",
    host: str | None = None,
    port: int | None = None,
    **ctx: Any,
) -> AuthRequest:
    return AuthRequest(mech, Credentials("t", user, host, port), RequestContext(**ctx))


@pytest.mark.parametrize(
    ("conditions", "request_", "reason"),
    [
        ({}, req(), None),
        ({"services": ["smtp"]}, req(service="smtp"), None),
        ({"services": ["smtp"]}, req(service="imap"), Reason.NO_RULE_FOR_CONTEXT),
        ({"services": ["smtp"]}, req(), Reason.NO_RULE_FOR_CONTEXT),
        ({"domains": ["example.org"]}, req(user="bob@Example.ORG"), None),
        ({"domains": ["example.org"]}, req(user="bob@example.net"), Reason.NO_RULE_FOR_CONTEXT),
        # no user named: judged on the account instead (account_domain_mismatch)
        ({"domains": ["example.org"]}, req(user=None), None),
        ({"domains": ["example.org"]}, req(user="alice"), Reason.NO_RULE_FOR_CONTEXT),
        ({"hosts": ["mail.example.org"]}, req(host="MAIL.example.org."), None),
        ({"hosts": ["mail.example.org"]}, req(local_name="mail.example.org"), None),
        ({"hosts": ["mail.example.org"]}, req(host="other.example.org"), Reason.HOST_MISMATCH),
        ({"ports": [587]}, req(port=587), None),
        ({"ports": [587]}, req(local_port=587), None),
        ({"ports": [587]}, req(local_port=25), Reason.HOST_MISMATCH),
        # what the server says beats what the client claims (docs/SECURITY.md)
        ({"ports": [587]}, req(port=587, local_port=25), Reason.HOST_MISMATCH),
        ({"ports": [25]}, req(port=587, local_port=25), None),
        (
            {"hosts": ["mail.example.org"]},
            req(host="mail.example.org", local_name="other.example.org"),
            Reason.HOST_MISMATCH,
        ),
        ({"mechanisms": ["XOAUTH2"]}, req(), Reason.NO_RULE_FOR_CONTEXT),
        ({"mechanisms": ["XOAUTH2"]}, req(mech=Mechanism.XOAUTH2), None),
        ({"remote_networks": ["10.0.0.0/8"]}, req(remote_ip="10.1.2.3"), None),
        ({"remote_networks": ["10.0.0.0/8", "::1"]}, req(remote_ip="::1"), None),
        (
            {"remote_networks": ["10.0.0.0/8"]},
            req(remote_ip="192.0.2.1"),
            Reason.NO_RULE_FOR_CONTEXT,
        ),
        ({"remote_networks": ["10.0.0.0/8"]}, req(remote_ip=None), Reason.NO_RULE_FOR_CONTEXT),
        ({"remote_networks": ["10.0.0.0/8"]}, req(remote_ip="garbage"), Reason.NO_RULE_FOR_CONTEXT),
        ({"require_secured": True}, req(secured=True), None),
        ({"require_secured": True}, req(), Reason.NO_RULE_FOR_CONTEXT),
    ],
)
def test_context_conditions(
    conditions: dict[str, Any], request_: AuthRequest, reason: Reason | None
) -> None:
    m = context_mismatch(rule(**conditions), request_)
    assert (m.reason if m else None) is reason


@pytest.mark.parametrize(
    ("conditions", "claims", "reason"),
    [
        ({"audiences": ["mail"]}, {"aud": "mail"}, None),
        ({"audiences": ["mail"]}, {"aud": ["mail"]}, None),
        ({"audiences": ["mail"]}, {"aud": "Mail"}, Reason.WRONG_AUDIENCE),
        ({"audiences": ["mail"]}, {}, Reason.WRONG_AUDIENCE),
        ({"audiences": ["mail"]}, {"aud": ""}, Reason.WRONG_AUDIENCE),
        ({"audiences": ["mail"]}, {"aud": []}, Reason.WRONG_AUDIENCE),
        ({"audiences": ["mail"]}, {"aud": 123}, Reason.WRONG_AUDIENCE),
        ({"audiences": ["mail"]}, {"aud": [1, "mail"]}, Reason.BAD_CLAIM),
        # OIDC Core 3.1.3.7: several audiences need a trusted azp
        ({"audiences": ["mail"]}, {"aud": ["mail", "evil"]}, Reason.UNTRUSTED_AUTHORIZED_PARTY),
        (
            {"audiences": ["mail"]},
            {"aud": ["mail", "evil"], "azp": "evil"},
            Reason.UNTRUSTED_AUTHORIZED_PARTY,
        ),
        ({"audiences": ["mail"]}, {"aud": ["mail", "account"], "azp": "mail"}, None),
        (
            {"audiences": ["account"], "authorized_parties": ["webmail"]},
            {"aud": ["account", "broker"], "azp": "webmail"},
            None,
        ),
        ({"authorized_parties": ["webmail"]}, {"azp": "webmail"}, None),
        ({"authorized_parties": ["webmail"]}, {"client_id": "webmail"}, None),
        (
            {"authorized_parties": ["webmail"]},
            {"azp": "other", "client_id": "webmail"},
            Reason.UNTRUSTED_AUTHORIZED_PARTY,
        ),
        ({"authorized_parties": ["webmail"]}, {}, Reason.UNTRUSTED_AUTHORIZED_PARTY),
        ({"required_scopes": ["email", "mail"]}, {"scope": "openid email mail"}, None),
        ({"required_scopes": ["email", "mail"]}, {"scope": ["email", "mail"]}, None),
        ({"required_scopes": ["mail"]}, {"scp": "mail"}, None),
        ({"required_scopes": ["mail"]}, {"scope": "email"}, Reason.INSUFFICIENT_SCOPE),
        ({"required_scopes": ["mail"]}, {}, Reason.INSUFFICIENT_SCOPE),
        ({"claims": {"tid": "t1"}}, {"tid": "t1"}, None),
        ({"claims": {"tid": "t1"}}, {"tid": "t2"}, Reason.CLAIM_MISMATCH),
        ({"claims": {"email_verified": True}}, {"email_verified": "true"}, Reason.CLAIM_MISMATCH),
        ({"claims": {"groups": "mail"}}, {"groups": ["staff", "mail"]}, None),
    ],
)
def test_claim_conditions(
    conditions: dict[str, Any], claims: dict[str, Any], reason: Reason | None
) -> None:
    m = claim_mismatch(rule(**conditions), claims)
    assert (m.reason if m else None) is reason


def test_fallback_rules_go_last() -> None:
    cfg = parse_config(
        {
            "provider": PROVIDERS,
            "rule": [
                {"name": "fb", "provider": "idp", "fallback": True, "audiences": ["x"]},
                {"name": "a", "provider": "idp", "audiences": ["a"]},
                {"name": "b", "provider": "idp", "audiences": ["b"]},
            ],
        }
    )
    assert [r.name for r in ordered(cfg.rules)] == ["a", "b", "fb"]


def test_discovery_hint_prefers_rule_setting() -> None:
    cfg = parse_config(
        {
            "provider": PROVIDERS,
            "rule": [
                {
                    "name": "a",
                    "provider": "idp",
                    "audiences": ["m"],
                    "required_scopes": ["mail", "email"],
                },
                {
                    "name": "b",
                    "provider": "idp",
                    "audiences": ["m"],
                    "discovery_hint": "https://h.example/x",
                    "challenge_scope": "s",
                },
            ],
        }
    )
    a, b = cfg.rules
    hint_a = discovery_hint(a, cfg.provider("idp"))
    assert hint_a.openid_configuration == "https://idp.example.org/.well-known/openid-configuration"
    # every scope the rule requires, as one RFC 6749 scope string
    assert hint_a.scope == "mail email"
    hint_b = discovery_hint(b, cfg.provider("idp"))
    assert (hint_b.openid_configuration, hint_b.scope) == ("https://h.example/x", "s")


def warnings_for(rules: list[dict[str, Any]]) -> list[str]:
    providers = [*PROVIDERS, {"name": "other", "issuer": "https://other.example.org"}]
    return config_warnings(parse_config({"provider": providers, "rule": rules}))


def test_shadowed_rule_is_warned() -> None:
    w = warnings_for(
        [
            {"name": "broad", "provider": "idp", "audiences": ["mail", "web"]},
            {"name": "narrow", "provider": "idp", "audiences": ["web"], "services": ["imap"]},
        ]
    )
    assert any("rule[1] (narrow) can never match" in x and "rule[0] (broad)" in x for x in w)


@pytest.mark.parametrize(
    "later",
    [
        {"name": "l", "provider": "idp", "audiences": ["other"]},
        {"name": "l", "provider": "other", "audiences": ["mail"]},
        {"name": "l", "provider": "idp", "audiences": ["mail"], "fallback": True},
    ],
)
def test_not_shadowed(later: dict[str, Any]) -> None:
    w = warnings_for(
        [{"name": "e", "provider": "idp", "audiences": ["mail"], "required_scopes": ["x"]}, later]
    )
    assert not any("can never match" in x for x in w)


def test_overlapping_fallbacks_warned() -> None:
    w = warnings_for(
        [
            {"name": "f1", "provider": "idp", "audiences": ["a", "b"], "fallback": True},
            {
                "name": "f2",
                "provider": "idp",
                "audiences": ["b"],
                "fallback": True,
                "services": ["smtp"],
                "required_scopes": ["x"],
            },
        ]
    )
    assert any("fallback rules 'f1' and 'f2' overlap" in x for x in w)


@pytest.mark.parametrize(
    "second",
    [
        # another issuer: no token can satisfy both
        {"name": "f2", "provider": "other", "audiences": ["a"], "fallback": True},
        # disjoint services
        {
            "name": "f2",
            "provider": "idp",
            "audiences": ["a"],
            "fallback": True,
            "services": ["imap"],
        },
        # disjoint audiences
        {"name": "f2", "provider": "idp", "audiences": ["z"], "fallback": True},
    ],
)
def test_fallbacks_that_cannot_overlap(second: dict[str, Any]) -> None:
    first = {
        "name": "f1",
        "provider": "idp",
        "audiences": ["a"],
        "fallback": True,
        "services": ["smtp"],
    }
    assert not any("overlap" in x for x in warnings_for([first, second]))


def test_domains_judged_on_the_account_when_no_user_is_named() -> None:
    r = rule(domains=["example.org"])
    assert account_domain_mismatch(r, req(user=None), "alice@Example.org") is None
    for account in ("alice@example.net", "alice", "@example.org"):
        mismatch = account_domain_mismatch(r, req(user=None), account)
        assert mismatch is not None and mismatch.reason is Reason.NO_RULE_FOR_CONTEXT
    # a named user was judged in the context phase already
    assert account_domain_mismatch(r, req(user="alice@example.org"), "x@example.net") is None
    assert account_domain_mismatch(rule(), req(user=None), "alice@example.net") is None
