"""Claims → account: templates, filters, normalisation, forbidden characters, authzid."""

from __future__ import annotations

from typing import Any

import pytest

from saslauthd_oidc.core.identity import check_authzid, render_username, rewrite_domain
from saslauthd_oidc.core.outcome import Reason, Refusal


@pytest.mark.parametrize(
    ("template", "claims", "account"),
    [
        ("{email}", {"email": "Alice@Example.ORG"}, "alice@example.org"),
        ("{preferred_username}@example.org", {"preferred_username": "bob"}, "bob@example.org"),
        # Kanidm: preferred_username is the SPN name@idm-domain
        (
            "{preferred_username|localpart}@example.org",
            {"preferred_username": "carol@idm.example.org"},
            "carol@example.org",
        ),
        ("{sub}", {"sub": 12345}, "12345"),
        ("{email|domain}", {"email": "x@Example.org"}, "example.org"),
        ("{email}", {"email": "ａlice@example.org"}, "alice@example.org"),  # fullwidth → NFKC
    ],
)
def test_templates_render(template: str, claims: dict[str, Any], account: str) -> None:
    assert render_username(template, claims) == account


def test_normalize_false_keeps_case() -> None:
    assert render_username("{email}", {"email": "Alice@X"}, normalize=False) == "Alice@X"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({}, Reason.IDENTITY_UNMAPPABLE),
        ({"email": ""}, Reason.IDENTITY_UNMAPPABLE),
        ({"email": ["a@x"]}, Reason.IDENTITY_UNMAPPABLE),
        ({"email": True}, Reason.IDENTITY_UNMAPPABLE),
        ({"email": "v@x\tuser=admin"}, Reason.INVALID_ACCOUNT),
        ({"email": "v@x\nOK\t1"}, Reason.INVALID_ACCOUNT),
        ({"email": "a\x00b@x"}, Reason.INVALID_ACCOUNT),
        ({"email": "a b@x"}, Reason.INVALID_ACCOUNT),
        ({"email": "admin\u200b@x"}, Reason.INVALID_ACCOUNT),
        ({"email": "a\x01@x"}, Reason.INVALID_ACCOUNT),
        ({"email": "a" * 300}, Reason.INVALID_ACCOUNT),
    ],
)
def test_refusals(claims: dict[str, Any], reason: Reason) -> None:
    result = render_username("{email}", claims)
    assert isinstance(result, Refusal)
    assert result.reason is reason


def test_verified_email_is_fine() -> None:
    assert render_username("{email}", {"email": "a@x", "email_verified": True}) == "a@x"


def test_authzid_compare() -> None:
    assert check_authzid("alice@example.org", None) is None
    assert check_authzid("alice@example.org", "") is None
    assert check_authzid("alice@example.org", "Alice@Example.org") is None
    err = check_authzid("alice@example.org", "bob@example.org")
    assert isinstance(err, Refusal) and err.reason is Reason.AUTHZID_MISMATCH
    # Cyrillic а is not Latin a: NFKC does not fold it, so it must not match.
    assert check_authzid("alice@example.org", "\u0430lice@example.org") is not None
    assert check_authzid("Alice@X", "alice@x", normalize=False) is not None


@pytest.mark.parametrize(
    ("account", "domain_map", "allowed", "expected"),
    [
        ("a@idm.example.org", {"idm.example.org": "example.org"}, (), "a@example.org"),
        ("a@other.org", {"idm.example.org": "example.org"}, (), "a@other.org"),
        (
            "a@idm.example.org",
            {"idm.example.org": "example.org"},
            ("example.org",),
            "a@example.org",
        ),
        ("a@other.org", {}, ("example.org",), None),
        ("a", {}, ("example.org",), None),
        ("a@sub.example.org", {}, ("example.org",), None),  # exact domains, no suffix match
    ],
)
def test_domain_rewriting_and_allow_list(
    account: str, domain_map: dict[str, str], allowed: tuple[str, ...], expected: str | None
) -> None:
    result = rewrite_domain(account, domain_map, allowed)
    if expected is None:
        assert isinstance(result, Refusal) and result.reason is Reason.INVALID_ACCOUNT
    else:
        assert result == expected
