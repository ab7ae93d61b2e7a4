"""RFC 9728 discovery, pure: Host syntax, Referer boundaries, rule specificity, scopes."""

from __future__ import annotations

from typing import Any

import pytest

from saslauthd_oidc.config import ConfigError, parse_config
from saslauthd_oidc.core.resource_metadata import (
    ResourceRequest,
    discovery_warnings,
    parse_host,
    referer_matches,
    resource_path,
    scopes_for,
    select_rule,
)

PROVIDERS = [
    {"name": "a", "issuer": "https://a.example.org"},
    {"name": "b", "issuer": "https://b.example.org"},
]


def config(*rules: dict[str, Any]) -> Any:
    # discovery ignores the audience; each rule is a login rule too and must name one
    rules = tuple({"audiences": ["mail"], **r} for r in rules)
    return parse_config({"provider": PROVIDERS, "rule": list(rules)})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mail.example.org", ("mail.example.org", None)),
        ("MAIL.Example.org.", ("mail.example.org", None)),
        ("mail.example.org:8443", ("mail.example.org", 8443)),
        ("mail.example.org:", ("mail.example.org", None)),
        ("192.0.2.1:80", ("192.0.2.1", 80)),
        ("[2001:DB8::1]:443", ("[2001:db8::1]", 443)),
        ("[::1]", ("[::1]", None)),
        # what an attacker sends
        ("jmap.example.org:443@evil.test", None),
        ("jmap.example.org@evil.test", None),
        ("mail.example.org/evil", None),
        ("mail.example.org, evil.test", None),
        ("mail.example.org:99999", None),
        ("mail.example.org:0", None),
        ("mail.example.org:8a", None),
        ("mail.example.org:443:1", None),
        ("[v1.fe]:443", None),
        ("[::1", None),
        ("[::1]x", None),
        ("", None),
        (".", None),
        ("mail%2eexample.org", None),
        ("bücher.example", None),
        ("a" * 254, None),
    ],
)
def test_host_syntax(value: str, expected: tuple[str, int | None] | None) -> None:
    assert parse_host(value) == expected


@pytest.mark.parametrize(
    ("referer", "ok"),
    [
        ("https://webmail.example.net", True),
        ("https://webmail.example.net/", True),
        ("https://WEBMAIL.example.net:443/inbox?x=1", True),
        ("https://webmail.example.net./", True),
        ("https://webmail.example.net.attacker.test/", False),
        ("https://webmail.example.network/", False),
        ("https://webmail.example.net@attacker.test/", False),
        ("https://user@webmail.example.net/", False),
        ("https://webmail.example.net:8443/", False),
        ("http://webmail.example.net/", False),
        ("https://attacker.test/https://webmail.example.net/", False),
        ("not a url", False),
        ("https://webmail.example.net:99999/", False),
    ],
)
def test_referer_has_a_host_boundary(referer: str, ok: bool) -> None:
    assert referer_matches("https://webmail.example.net", referer) is ok


def test_referer_path_by_segments_and_idna() -> None:
    assert referer_matches("https://example.net/app", "https://example.net/app")
    assert referer_matches("https://example.net/app/", "https://example.net/app/inbox")
    assert not referer_matches("https://example.net/app", "https://example.net/application")
    assert not referer_matches("https://example.net/app", "https://example.net/")
    assert referer_matches("https://bücher.example/", "https://xn--bcher-kva.example/x")


def test_bad_referer_settings_name_the_key() -> None:
    for bad in ("https://user@webmail.example.net/", "https://w.example/?q", "https://:80/"):
        with pytest.raises(ConfigError) as info:
            config({"name": "r", "provider": "a", "referers": [bad]})
        assert info.value.key.endswith("referers")


def test_configured_hosts_are_idna_a_labels() -> None:
    cfg = config({"name": "r", "provider": "a", "hosts": ["Bücher.Example."]})
    assert cfg.rules[0].hosts == ("xn--bcher-kva.example",)
    assert select_rule(cfg.rules, ResourceRequest(host="xn--bcher-kva.example")) is not None
    with pytest.raises(ConfigError) as info:
        config({"name": "r", "provider": "a", "hosts": ["bü..example"]})
    assert info.value.key.endswith("hosts")


def test_most_specific_rule_wins_whatever_the_file_order() -> None:
    cfg = config(
        {"name": "none", "provider": "a"},
        {"name": "referer", "provider": "a", "referers": ["https://webmail.example.net/"]},
        {"name": "host", "provider": "b", "hosts": ["mail.example.net"]},
        {
            "name": "host-path",
            "provider": "a",
            "hosts": ["mail.example.net"],
            "resource_paths": ["/", "/jmap"],
        },
        {"name": "fallback", "provider": "b", "hosts": ["mail.example.net"], "fallback": True},
    )

    def chosen(host: str, path: str = "/", referer: str | None = None) -> str | None:
        rule = select_rule(cfg.rules, ResourceRequest(host=host, path=path, referer=referer))
        return rule.name if rule else None

    assert chosen("mail.example.net") == "host-path"
    assert chosen("mail.example.net", "/jmap") == "host-path"
    assert chosen("other.example.net", referer="https://webmail.example.net/x") == "referer"
    assert chosen("other.example.net") == "none"
    without_both = [r for r in cfg.rules if r.name not in ("host-path", "none")]
    assert select_rule(without_both, ResourceRequest(host="mail.example.net")).name == "host"  # type: ignore[union-attr]
    only_fallback = [r for r in cfg.rules if r.name == "fallback"]
    assert select_rule(only_fallback, ResourceRequest(host="mail.example.net")) is not None


def test_paths_are_exact_and_a_rule_without_paths_serves_only_the_host() -> None:
    cfg = config({"name": "jmap", "provider": "a", "resource_paths": ["/jmap/"]})
    assert cfg.rules[0].resource_paths == ("/jmap",)
    assert resource_path("/.well-known/oauth-protected-resource/jmap/") == "/jmap"
    for path, ok in (("/jmap", True), ("/jmap/session", False), ("/jmapx", False), ("/", False)):
        assert (select_rule(cfg.rules, ResourceRequest(host="h", path=path)) is not None) is ok
    bare = config({"name": "bare", "provider": "a"})
    assert select_rule(bare.rules, ResourceRequest(host="h")) is not None
    assert select_rule(bare.rules, ResourceRequest(host="h", path="/jmap")) is None


def test_resource_is_built_from_the_match() -> None:
    request = ResourceRequest(host="[2001:db8::1]", port=8443, path="/jmap", scheme="http")
    assert request.resource("/jmap") == "http://[2001:db8::1]:8443/jmap"
    assert ResourceRequest(host="mail.example.net").resource("/") == "https://mail.example.net"


def test_scopes_supported_lists_separate_scopes() -> None:
    cfg = config(
        {
            "name": "r",
            "provider": "a",
            "required_scopes": ["email"],
            "challenge_scope": "openid  email profile",
        },
        {"name": "s", "provider": "a", "scopes_supported": ["openid email", "mail"]},
    )
    assert cfg.rules[0].challenge_scope == "openid email profile"
    assert scopes_for(cfg.rules[0]) == ["email", "openid", "profile"]
    assert scopes_for(cfg.rules[1]) == ["openid", "email", "mail"]


def test_bad_challenge_scope_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        config({"name": "r", "provider": "a", "challenge_scope": 'openid "email"'})
    assert info.value.key.endswith("challenge_scope")


def test_equally_specific_discovery_rules_are_reported() -> None:
    clash = config(
        {"name": "one", "provider": "a", "hosts": ["mail.example.net"]},
        {"name": "two", "provider": "b", "hosts": ["mail.example.net", "x.example.net"]},
    )
    (warning,) = discovery_warnings(clash)
    assert "rule[1] (two)" in warning and "rule[0] (one)" in warning
    apart = config(
        {"name": "one", "provider": "a", "hosts": ["mail.example.net"]},
        {"name": "two", "provider": "b", "hosts": ["x.example.net"]},
        {"name": "three", "provider": "b", "hosts": ["x.example.net"], "resource_paths": ["/j"]},
        {"name": "login-a", "provider": "a"},
        {"name": "login-b", "provider": "b"},
    )
    assert discovery_warnings(apart) == []
