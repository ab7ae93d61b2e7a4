"""Scenario 1 (one Kanidm, several clients) through a real Postfix.

SMTP client → Postfix smtpd (service=smtp) → ``saslauthd-oidc serve`` running
etc/examples/kanidm-several-clients.toml (URLs swapped for loopback
DevIssuers, one per Kanidm client, each with its own issuer path and key) →
the DevIssuers' discovery and JWKS.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread
from tests.idp_shapes import kanidm, keycloak, localize_example
from tests.peers.daemon import README_MAIN_CF, Daemon
from tests.peers.postfix import PostfixInstance, make_shared_tmpdir, smtp_auth

pytestmark = pytest.mark.peer

EXAMPLE = (
    Path(__file__).resolve().parent.parent / "etc" / "examples" / "kanidm-several-clients.toml"
)

# The README's Postfix recipe, from README.md (smtpd_sasl_path is this test's socket).
MAIN_CF = README_MAIN_CF


Issuers = dict[str, DevIssuer]


@pytest.fixture(scope="module")
def stack(postfix_ready: None) -> Iterator[tuple[Daemon, PostfixInstance, Issuers]]:
    with ExitStack() as es:
        iss: Issuers = {
            client: es.enter_context(
                DevIssuerThread(DevIssuer(issuer_path=f"/oauth2/openid/{client}/"))
            )
            for client in ("webmail", "jmap-app", "thunderbird")
        }
        iss["legacy"] = es.enter_context(
            DevIssuerThread(DevIssuer(algorithms=("RS256",), issuer_path="/realms/mail/"))
        )
        urls = {
            f"https://idm.example.org/oauth2/openid/{c}": iss[c].issuer or ""
            for c in ("webmail", "jmap-app", "thunderbird")
        }
        urls["https://sso.example.org/realms/mail"] = iss["legacy"].issuer or ""
        workdir = make_shared_tmpdir()
        es.callback(shutil.rmtree, workdir, True)
        sock = workdir / "auth"
        config = localize_example(EXAMPLE, workdir / EXAMPLE.name, urls, auth_socket=sock)
        daemon = Daemon(config, sock, workdir / "daemon.log")
        try:
            with PostfixInstance(str(sock), extra_main_cf=MAIN_CF) as pf:
                yield daemon, pf, iss
        finally:
            assert daemon.stop() == 0, daemon.log()


def oauthbearer(token: str, user: str) -> bytes:
    return f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()


def xoauth2(token: str, user: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


@pytest.mark.parametrize(
    ("client", "name", "mech", "rule"),
    [
        ("webmail", "alice", "OAUTHBEARER", "webmail"),
        ("thunderbird", "carol", "XOAUTH2", "thunderbird"),
        ("legacy", "dave", "XOAUTH2", "legacy-keycloak"),
    ],
)
def test_each_client_logs_in_as_its_account(
    stack: tuple[Daemon, PostfixInstance, Issuers], client: str, name: str, mech: str, rule: str
) -> None:
    daemon, pf, iss = stack
    account = f"{name}@example.org"
    if client == "legacy":  # the migration fallback: a Keycloak token of Thunderbird
        token = keycloak(iss[client], "thunderbird", email=account)
    else:
        token = kanidm(iss[client], client, name=name)
    ir = oauthbearer(token, account) if mech == "OAUTHBEARER" else xoauth2(token, account)
    replies = smtp_auth(pf.host, pf.port, mech, ir)
    assert replies[-1][0] == 235, replies
    pf.wait_for_log(re.compile(r"(?m)auth reply: OK\?\d+\?user=" + re.escape(account) + "$"))
    event = daemon.event(token)
    assert (event["rule"], event["reason"], event["account"]) == (rule, "ok", account)
    assert (event["service"], event["mech"]) == ("smtp", mech)


def test_client_whose_rule_does_not_fit_smtp_is_told_where_to_go(
    stack: tuple[Daemon, PostfixInstance, Issuers],
) -> None:
    """The JMAP app's token is good, but its rule is IMAP-only and Postfix says smtp."""
    daemon, pf, iss = stack
    token = kanidm(iss["jmap-app"], "jmap-app", name="erin")
    user = "erin@example.org"
    replies = smtp_auth(
        pf.host, pf.port, "OAUTHBEARER", oauthbearer(token, user), continuation=b"\x01"
    )
    assert [code for code, _ in replies] == [334, 535], replies
    assert json.loads(base64.b64decode(replies[0][1])) == {
        "status": "invalid_token",
        "scope": "openid email profile",
        "openid-configuration": iss["thunderbird"].discovery_url,
    }
    event = daemon.event(token)
    assert (event["rule"], event["reason"], event["service"]) == (None, "unknown_issuer", "smtp")
    assert not any(f"user={user}" in line for line in pf.auth_replies())
