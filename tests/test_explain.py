"""explain at 3 a.m.: each frontend's request imitated, the token's facts, why a rule refused.

Through the command line (``main``), checking the exit status and what is printed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from saslauthd_oidc.config import parse_config
from saslauthd_oidc.core.request import AuthRequest, Credentials, Mechanism, RequestContext
from saslauthd_oidc.core.rules import account_domain_mismatch, claim_mismatch, context_mismatch
from saslauthd_oidc.tools.cli import main
from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread
from saslauthd_oidc.tools.explain import issuer_difference

KANIDM = "https://idm.example.org/oauth2/openid/webmail"


@pytest.fixture(scope="module")
def issuer() -> Iterator[DevIssuer]:
    with DevIssuerThread(DevIssuer(any_issuer_path=True)) as iss:
        yield iss


def explain(
    capsys: pytest.CaptureFixture[str], config: Path, token: str, *args: str
) -> tuple[int, str, str]:
    code = main(["explain", "--config", str(config), "--token", token, *args])
    captured = capsys.readouterr()
    assert token not in captured.out + captured.err
    return code, captured.out, captured.err


def explain_json(
    capsys: pytest.CaptureFixture[str], config: Path, token: str, *args: str
) -> tuple[int, dict[str, Any]]:
    code, out, _ = explain(capsys, config, token, "--json", *args)
    return code, json.loads(out)


@pytest.fixture
def config(tmp_path: Path, issuer: DevIssuer) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f"""
[server]
mechanisms = ["OAUTHBEARER", "XOAUTH2"]
http_listen = "127.0.0.1:8480"

[http]
auth = "open"
stalwart_issuer = "http://127.0.0.1:8480/stalwart"

[[provider]]
name = "dev"
issuer = "{issuer.issuer}"
allow_http = true

[[provider]]
name = "kanidm"
issuer = "{KANIDM}"

[[rule]]
name = "catch-all"
provider = "dev"
audiences = ["mail"]
fallback = true

[[rule]]
name = "submission"
provider = "dev"
audiences = ["mail"]
hosts = ["mail.example.org"]
domains = ["example.org"]

[[rule]]
name = "imap"
provider = "dev"
audiences = ["mail"]
services = ["imap"]
remote_networks = ["192.0.2.0/24"]

[[rule]]
name = "webmail"
provider = "kanidm"
audiences = ["webmail"]
"""
    )
    return path


def test_dovecot_imap_login_is_reproduced_with_the_introspection_call(
    capsys: pytest.CaptureFixture[str], config: Path, issuer: DevIssuer
) -> None:
    token = issuer.mint(email="alice@example.org", audience="mail")
    code, out, _ = explain(
        capsys,
        config,
        token,
        "--frontend",
        "introspect",
        "--service",
        "imap",
        "--remote",
        "192.0.2.7",
        "--local-ip",
        "192.0.2.1",
        "--port",
        "143",
    )
    assert code == 0, out
    assert "C: POST /introspect" in out
    assert "X-Dovecot-Auth-Service: imap" in out
    assert "X-Dovecot-Auth-Local: 192.0.2.1:143" in out
    assert "X-Dovecot-Auth-Remote: 192.0.2.7:0" in out
    assert "request  mech=BEARER service=imap" in out and "remote=192.0.2.7" in out
    assert '"active":true' in out and '"username":"alice@example.org"' in out
    assert "rule     imap" in out


def test_mech_bearer_points_at_the_http_frontends(
    capsys: pytest.CaptureFixture[str], config: Path, issuer: DevIssuer
) -> None:
    code, _, err = explain(capsys, config, issuer.mint(), "--mech", "BEARER")
    assert code == 2
    assert "--frontend introspect" in err and "Traceback" not in err


def test_introspect_refusal_is_what_dovecot_gets(
    capsys: pytest.CaptureFixture[str], config: Path, issuer: DevIssuer
) -> None:
    token = issuer.mint(email="alice@example.org", audience="web")
    code, data = explain_json(capsys, config, token, "--frontend", "introspect")
    assert code == 1
    assert data["frontend"] == "introspect"
    assert data["reply"] == ['HTTP 200 {"active":false}']
    assert data["request"]["mech"] == "BEARER"


def test_token_facts_are_shown_never_the_token(
    capsys: pytest.CaptureFixture[str], config: Path, issuer: DevIssuer
) -> None:
    now = int(time.time())
    token = issuer.mint(
        {"azp": "thunderbird", "scope": "openid email", "iat": now - 600, "nbf": now - 600},
        email="alice@example.org",
        audience=["mail", "thunderbird"],
        lifetime=-180,
    )
    code, out, _ = explain(capsys, config, token, "--user", "alice@example.org")
    assert code == 1
    assert f"iss       {issuer.issuer}" in out
    assert 'aud       ["mail", "thunderbird"]' in out
    assert "azp       thunderbird" in out
    assert "scope     openid email" in out
    assert "expired 3 min ago" in out
    assert f"alg ES256  kid {issuer.kid('ES256')}  typ at+jwt" in out
    code, data = explain_json(capsys, config, token, "--user", "alice@example.org")
    facts = data["token_facts"]
    assert (facts["iss"], facts["azp"], facts["typ"], facts["alg"]) == (
        issuer.issuer,
        "thunderbird",
        "at+jwt",
        "ES256",
    )
    assert "expired 3 min ago" in facts["exp_relative"]
    assert data["reason"] == "expired"


def test_kanidm_token_from_another_domain_says_what_differs(
    capsys: pytest.CaptureFixture[str], config: Path, issuer: DevIssuer
) -> None:
    token = issuer.mint(
        {"iss": "https://idm.example.com/oauth2/openid/webmail"}, audience="webmail"
    )
    code, out, _ = explain(capsys, config, token)
    assert code == 1
    assert "outcome  fail (unknown_issuer)" in out
    assert "closest provider 'kanidm'" in out
    assert "host idm.example.com vs configured idm.example.org" in out


def test_kanidm_token_of_another_client_says_which_client(
    capsys: pytest.CaptureFixture[str], config: Path, issuer: DevIssuer
) -> None:
    token = issuer.mint(
        {"iss": "https://idm.example.org/oauth2/openid/thunderbird"}, audience="thunderbird"
    )
    code, data = explain_json(capsys, config, token)
    assert code == 1 and data["reason"] == "unknown_issuer"
    assert "issued to client 'thunderbird'" in data["hint"]
    [webmail] = [r for r in data["rules"] if r["rule"] == "webmail"]
    assert (
        "path /oauth2/openid/thunderbird vs configured /oauth2/openid/webmail"
        in (webmail["detail"])
    )


def test_rules_are_listed_in_file_order_with_their_phase(
    capsys: pytest.CaptureFixture[str], config: Path, issuer: DevIssuer
) -> None:
    token = issuer.mint(email="alice@example.org", audience="mail")
    code, data = explain_json(capsys, config, token)
    assert code == 0
    assert [(r["position"], r["rule"], r["phase"]) for r in data["rules"]] == [
        (1, "catch-all", "fallback"),
        (2, "submission", "normal"),
        (3, "imap", "normal"),
        (4, "webmail", "normal"),
    ]
    assert data["rule"] == "catch-all"
    code, out, _ = explain(capsys, config, token)
    lines = [line.split()[1] for line in out.splitlines() if line.startswith("  rule ")]
    assert lines == ["catch-all", "submission", "imap", "webmail"]
    assert "fallback rules are tried after all normal ones" in out


def test_no_python_none_in_messages(
    capsys: pytest.CaptureFixture[str], config: Path, issuer: DevIssuer
) -> None:
    token = issuer.mint(email="alice@example.org", audience="web", typ=None)
    code, out, _ = explain(capsys, config, token, "--service", "imap")
    assert code == 1
    assert "None" not in out
    assert "no host given" in out
    assert "no remote address given" in out


def test_saslauthd_frontend_puts_login_and_realm_together(
    capsys: pytest.CaptureFixture[str], config: Path, issuer: DevIssuer
) -> None:
    token = issuer.mint(email="alice@example.org", audience="mail")
    code, out, _ = explain(
        capsys,
        config,
        token,
        "--frontend",
        "saslauthd",
        "--user",
        "alice",
        "--realm",
        "example.org",
        "--service",
        "imap",
    )
    assert code == 0, out
    assert "4 counted strings" in out
    assert "request  mech=PLAIN service=imap user=alice@example.org" in out
    assert "reply    OK ok" in out
    code, _, err = explain(capsys, config, token, "--frontend", "saslauthd")
    assert code == 2 and "needs --user" in err


def test_stalwart_frontend(
    capsys: pytest.CaptureFixture[str], config: Path, issuer: DevIssuer, tmp_path: Path
) -> None:
    token = issuer.mint(email="alice@example.org", audience="mail")
    code, out, _ = explain(capsys, config, token, "--frontend", "stalwart")
    assert code == 0, out
    assert "C: GET /stalwart/userinfo" in out
    assert '"username":"alice@example.org"' in out
    bare = tmp_path / "bare.toml"
    bare.write_text(
        f'[[provider]]\nname = "dev"\nissuer = "{issuer.issuer}"\nallow_http = true\n'
        '[[rule]]\nprovider = "dev"\naudiences = ["mail"]\n'
    )
    code, _, err = explain(capsys, bare, token, "--frontend", "stalwart")
    assert code == 2 and "http.stalwart_issuer is not set" in err


def test_mechanism_the_socket_does_not_offer(
    capsys: pytest.CaptureFixture[str], config: Path, issuer: DevIssuer
) -> None:
    token = issuer.mint(email="alice@example.org", audience="mail")
    code, data = explain_json(capsys, config, token, "--mech", "PLAIN", "--user", "a@example.org")
    assert code == 1
    assert data["reason"] == "unsupported_mechanism"
    assert data["request"] is None
    assert any("not in server.mechanisms" in n for n in data["notes"])
    assert data["reply"] == ["FAIL\t1\treason=Unsupported mechanism"]


def test_dovecot_socket_follows_the_failure_challenge(
    capsys: pytest.CaptureFixture[str], config: Path, issuer: DevIssuer
) -> None:
    token = issuer.mint(email="alice@example.org", audience="web")
    code, data = explain_json(capsys, config, token, "--user", "alice@example.org")
    assert code == 1
    assert data["reply"][0].startswith("CONT\t1\t")
    assert data["reply"][-1].startswith("FAIL\t1\t")
    assert any('"status":"invalid_token"' in r for r in data["reply"])


@pytest.mark.parametrize(
    ("iss", "configured", "fragment"),
    [
        (
            "https://ak.example.org/application/o/mail",
            "https://ak.example.org/application/o/mail/",
            "only the trailing '/' differs",
        ),
        ("https://IDM.example.org/x", "https://idm.example.org/x", "upper/lower case"),
        (
            "http://idm.example.org/oauth2/openid/webmail",
            KANIDM,
            "scheme http vs configured https",
        ),
        (
            "https://idm.example.org:8443/oauth2/openid/webmail",
            KANIDM,
            "port 8443 vs configured default",
        ),
        (
            "https://ak.example.org/application/o/webmail/",
            "https://ak.example.org/application/o/mail/",
            "issued by application 'webmail'",
        ),
        (None, KANIDM, "the token has no iss"),
    ],
)
def test_issuer_difference(iss: str | None, configured: str, fragment: str) -> None:
    assert fragment in issuer_difference(iss, configured)


def test_an_opaque_token_never_shows_even_form_encoded(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    token = "opaque+token/with=signs" * 3
    for frontend in ("introspect", "dovecot-socket", "saslauthd", "stalwart"):
        code, out, _ = explain(
            capsys, config, token, "--frontend", frontend, "--user", "alice@example.org"
        )
        assert code == 1, out
        for shown in (token, "opaque%2Btoken", "b3BhcXVl"):
            assert shown not in out, (frontend, shown)
        assert "opaque token (69 characters)" in out


def test_auth_test_mech_bearer_points_at_explain(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["auth-test", "--socket", "/nonexistent", "--token", "t", "--mech", "bearer"])
    assert code == 2
    assert "explain --frontend introspect" in capsys.readouterr().err


def test_a_frontend_the_config_does_not_serve_is_noted(
    capsys: pytest.CaptureFixture[str], config: Path, issuer: DevIssuer
) -> None:
    token = issuer.mint(email="alice@example.org", audience="mail")
    code, data = explain_json(
        capsys, config, token, "--frontend", "saslauthd", "--user", "alice@example.org"
    )
    assert code == 0
    assert data["notes"][0].startswith("server.saslauthd_socket is not set")


@pytest.mark.parametrize(
    "condition",
    [
        {"services": ["smtp"]},
        {"hosts": ["mail.example.org"]},
        {"ports": [587]},
        {"remote_networks": ["192.0.2.0/24"]},
    ],
)
def test_context_mismatch_on_an_empty_request_never_says_none(condition: dict[str, Any]) -> None:

    cfg = parse_config(
        {
            "provider": [{"name": "idp", "issuer": "https://idp.example.org"}],
            "rule": [{"provider": "idp", "audiences": ["mail"], **condition}],
        }
    )
    request = AuthRequest(Mechanism.OAUTHBEARER, Credentials("t"), RequestContext())
    mismatch = context_mismatch(cfg.rules[0], request)
    assert mismatch is not None
    assert "None" not in mismatch.detail and "given" in mismatch.detail


def test_domains_on_a_request_naming_no_user_are_judged_on_the_account() -> None:
    cfg = parse_config(
        {
            "provider": [{"name": "idp", "issuer": "https://idp.example.org"}],
            "rule": [{"provider": "idp", "audiences": ["mail"], "domains": ["example.org"]}],
        }
    )
    request = AuthRequest(Mechanism.OAUTHBEARER, Credentials("t"), RequestContext())
    assert context_mismatch(cfg.rules[0], request) is None
    mismatch = account_domain_mismatch(cfg.rules[0], request, "alice@example.net")
    assert mismatch is not None
    assert "None" not in mismatch.detail and "alice@example.net" in mismatch.detail
    assert account_domain_mismatch(cfg.rules[0], request, "alice@example.org") is None


@pytest.mark.parametrize(
    ("condition", "claims"),
    [
        ({"authorized_parties": ["web"]}, {"aud": "mail"}),
        ({"audiences": ["a", "b"]}, {"aud": ["a", "b"]}),
    ],
)
def test_claim_mismatch_without_azp_never_says_none(
    condition: dict[str, Any], claims: dict[str, Any]
) -> None:

    rule = {"provider": "idp", "audiences": ["mail"], **condition}
    cfg = parse_config(
        {"provider": [{"name": "idp", "issuer": "https://idp.example.org"}], "rule": [rule]}
    )
    mismatch = claim_mismatch(cfg.rules[0], claims)
    assert mismatch is not None
    assert "None" not in mismatch.detail
