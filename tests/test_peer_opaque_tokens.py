"""Opaque and JWT tokens from a real OpenID provider, through a real Postfix.

SMTP client → Postfix smtpd (``smtpd_sasl_type = dovecot``) → ``saslauthd-oidc
serve`` → npm ``oidc-provider`` on loopback: discovery, JWKS and RFC 7662
introspection (as the peer's ``saslauthd`` client, secret from a 0600 file).
Tokens come from real grants at the peer: client_credentials (opaque without
a resource, JWT with ``resource=urn:mail``) and a scripted authorization_code
+ PKCE flow for alice. Caching and single-flight are proven by counting the
requests the provider received. The provider is then frozen (SIGSTOP) and
killed: new tokens get a temporary failure (Postfix 454), cached ones still
log in.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from tests.peers.daemon import README_MAIN_CF, Daemon
from tests.peers.oidc_provider import OidcProviderPeer
from tests.peers.postfix import PostfixInstance, make_shared_tmpdir, smtp_auth
from tests.support import oauthbearer, xoauth2

pytestmark = pytest.mark.peer

DESKTOP = "mail-desktop@clients.example.org"
WEBMAIL = "mail-webmail@clients.example.org"
ALICE = "alice@example.org"
REQUEST_TIMEOUT = 3.0


def write_config(op: OidcProviderPeer, workdir: Path) -> Path:
    secret = workdir / "introspection.secret"
    secret.write_text(op.introspect_credentials("saslauthd")[1] + "\n")
    secret.chmod(0o600)
    config = {
        "server": {
            "auth_socket": str(workdir / "auth"),
            "auth_socket_mode": "0666",
            "request_timeout": REQUEST_TIMEOUT,
            "tempfail": "disconnect",
        },
        "cache": {"ttl": 300, "negative_ttl": 30},
        "logging": {"level": "info", "format": "json"},
        "provider": [
            {
                "name": "op",
                "issuer": op.issuer,
                "allow_http": True,
                "algorithms": ["ES256", "RS256"],
                "client_id": "saslauthd",
                "client_secret_file": str(secret),
            }
        ],
        "rule": [
            {  # JWT access tokens for the mail resource (resource indicators)
                "name": "mail-resource",
                "provider": "op",
                "audiences": ["urn:mail"],
                "required_scopes": ["mail"],
                "username": "{email}",
            },
            {  # opaque tokens of the desktop client, checked by introspection
                "name": "desktop",
                "provider": "op",
                "authorized_parties": ["mail-desktop"],
                "required_scopes": ["mail"],
                "username": "{email}",
            },
            {  # opaque tokens of users who logged in through the web mail
                "name": "webmail-users",
                "provider": "op",
                "authorized_parties": ["mail-webmail"],
                "required_scopes": ["mail"],
                "claims": {"sub": "alice"},
                "username": "{email}",
            },
        ],
    }
    path = workdir / "saslauthd-oidc.toml"
    path.write_bytes(tomli_w.dumps(config).encode())
    return path


Stack = tuple[OidcProviderPeer, Daemon, PostfixInstance]


@pytest.fixture(scope="module")
def stack(oidc_provider_ready: None, postfix_ready: None) -> Iterator[Stack]:
    workdir = make_shared_tmpdir()
    try:
        with OidcProviderPeer() as op:
            daemon = Daemon(write_config(op, workdir), workdir / "auth", workdir / "daemon.log")
            try:
                with PostfixInstance(str(workdir / "auth"), extra_main_cf=README_MAIN_CF) as pf:
                    yield op, daemon, pf
            finally:
                assert daemon.stop() == 0, daemon.log()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def introspections(op: OidcProviderPeer) -> int:
    return op.count("introspection_endpoint", "POST")


def login(pf: PostfixInstance, token: str, user: str, mech: str = "XOAUTH2") -> int:
    ir = xoauth2(token, user) if mech == "XOAUTH2" else oauthbearer(token, user)
    replies = smtp_auth(
        pf.host, pf.port, mech, ir, continuation=b"" if mech == "XOAUTH2" else b"\x01"
    )
    return replies[-1][0]


# --------------------------------------------------------------------------- pass and fail


def test_opaque_client_credentials_token_logs_in_once_introspected(stack: Stack) -> None:
    op, daemon, pf = stack
    token = op.token("mail-desktop")  # no resource: opaque
    assert token.count(".") == 0
    before = introspections(op)
    assert login(pf, token, DESKTOP) == 235
    pf.wait_for_log(re.compile(r"auth reply: OK\?\d+\?user=" + re.escape(DESKTOP) + "$", re.M))
    event = daemon.event(token)
    assert (event["rule"], event["reason"], event["account"]) == ("desktop", "ok", DESKTOP)
    for mech in ("OAUTHBEARER", "XOAUTH2", "OAUTHBEARER"):
        assert login(pf, token, DESKTOP, mech) == 235
    assert introspections(op) - before == 1  # four logins, one introspection


def test_opaque_token_of_another_client_is_refused(stack: Stack) -> None:
    """mail-webmail's own client_credentials token: active, but it is no user's.

    The desktop rule refuses the client; the webmail-users rule trusts the
    client but wants sub alice. The refusal reported is the one of the rule
    that got furthest.
    """
    op, daemon, pf = stack
    token = op.token("mail-webmail")
    assert login(pf, token, WEBMAIL) == 535
    event = daemon.event(token)
    assert (event["rule"], event["reason"]) == (None, "claim_mismatch")


def test_opaque_token_without_the_mail_scope_is_refused(stack: Stack) -> None:
    op, daemon, pf = stack
    token = op.token("mail-desktop", scope="email")
    assert login(pf, token, DESKTOP) == 535
    assert daemon.event(token)["reason"] == "insufficient_scope"


def test_unknown_opaque_token_is_inactive_and_negatively_cached(stack: Stack) -> None:
    op, daemon, pf = stack
    token = op.token("mail-desktop") + "x"  # the provider never issued this one
    before = introspections(op)
    assert login(pf, token, DESKTOP) == 535
    assert login(pf, token, DESKTOP) == 535
    reasons = [e["reason"] for e in daemon.events_for(token)]
    assert reasons == ["token_inactive", "token_inactive"]
    assert introspections(op) - before == 1


def test_authzid_must_match_the_introspected_account(stack: Stack) -> None:
    op, daemon, pf = stack
    token = op.token("mail-desktop")
    assert login(pf, token, "bob@example.org") == 535
    assert daemon.event(token)["reason"] == "authzid_mismatch"


def test_user_tokens_from_authorization_code_with_pkce(stack: Stack) -> None:
    """alice logs in at the provider; her JWT (resource) and opaque tokens both work."""
    op, daemon, pf = stack
    jwt_answer = op.authorization_code_tokens(resource="urn:mail", scope="openid email mail")
    jwt_token = jwt_answer["access_token"]
    assert jwt_token.count(".") == 2
    before = introspections(op)
    assert login(pf, jwt_token, ALICE, "OAUTHBEARER") == 235
    assert daemon.event(jwt_token)["rule"] == "mail-resource"
    assert introspections(op) == before  # a JWT is verified locally, never introspected

    opaque = op.authorization_code_tokens(resource=None, scope="openid email mail")
    token = opaque["access_token"]
    assert login(pf, token, ALICE, "OAUTHBEARER") == 235
    event = daemon.event(token)
    assert (event["rule"], event["account"]) == ("webmail-users", ALICE)
    assert introspections(op) - before == 1


def test_jwt_for_another_resource_is_refused_without_introspection(stack: Stack) -> None:
    op, daemon, pf = stack
    token = op.token("mail-webmail", resource="urn:other", scope="other")
    before = introspections(op)
    assert login(pf, token, WEBMAIL) == 535
    # mail-resource refuses the audience; webmail-users trusts the client but
    # finds no "mail" scope, and got further: its refusal is the one reported.
    assert daemon.event(token)["reason"] == "insufficient_scope"
    assert introspections(op) == before


def test_no_token_in_any_log(stack: Stack) -> None:
    op, daemon, pf = stack
    token = op.token("mail-desktop")
    assert login(pf, token, DESKTOP) == 235
    assert token not in daemon.log()
    assert token not in pf.maillog()


# --------------------------------------------------------------------------- single-flight


def test_concurrent_logins_with_one_new_token_introspect_once(stack: Stack) -> None:
    """20 SMTP sessions at once (20 smtpd processes, 20 auth connections), one token."""
    op, daemon, pf = stack
    token = op.token("mail-desktop")
    before = introspections(op)
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        codes = list(pool.map(lambda _: login(pf, token, DESKTOP), range(20)))
    assert codes == [235] * 20
    assert len(daemon.events_for(token)) >= 1
    assert introspections(op) - before == 1


# --------------------------------------------------------------------------- provider outage


def test_unreachable_provider_is_a_temporary_failure_and_cached_tokens_still_work(
    stack: Stack,
) -> None:
    op, daemon, pf = stack
    cached = op.token("mail-desktop")
    assert login(pf, cached, DESKTOP) == 235
    fresh = op.token("mail-desktop")
    op.pause()  # connections are accepted by the kernel, nothing answers
    try:
        started = time.monotonic()
        assert login(pf, fresh, DESKTOP) == 454  # tempfail = "disconnect"
        elapsed = time.monotonic() - started
        assert login(pf, cached, DESKTOP) == 235
    finally:
        op.resume()
    event = daemon.event(fresh)
    assert (event["outcome"], event["reason"]) == ("tempfail", "timeout")
    assert "op" in str(event["detail"])  # the log names the provider
    print(f"frozen provider: 454 after {elapsed:.2f}s (request_timeout {REQUEST_TIMEOUT}s)")
    # Back up: the same token now logs in (temporary failures are never cached).
    assert login(pf, fresh, DESKTOP) == 235


def test_provider_gone_is_a_temporary_failure(
    oidc_provider_ready: None, postfix_ready: None
) -> None:
    """The provider process is dead (connection refused): 454, not 535."""
    workdir = make_shared_tmpdir()
    try:
        with OidcProviderPeer() as op:
            daemon = Daemon(write_config(op, workdir), workdir / "auth", workdir / "daemon.log")
            try:
                with PostfixInstance(str(workdir / "auth"), extra_main_cf=README_MAIN_CF) as pf:
                    cached = op.token("mail-desktop")
                    fresh = op.token("mail-desktop")
                    assert login(pf, cached, DESKTOP) == 235
                    op.__exit__(None, None, None)
                    assert not op.running
                    assert login(pf, fresh, DESKTOP) == 454
                    assert login(pf, cached, DESKTOP) == 235
                    event = daemon.event(fresh)
                    assert (event["outcome"], event["reason"]) == (
                        "tempfail",
                        "provider_unavailable",
                    )
                    assert fresh not in daemon.log() and cached not in daemon.log()
            finally:
                assert daemon.stop() == 0, daemon.log()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        assert not os.path.exists(workdir)


# --------------------------------------------------------------------------- userinfo only


def test_userinfo_as_the_last_resort_for_opaque_tokens(oidc_provider_ready: None) -> None:
    """No introspection client: an opaque user token is valid if userinfo answers for it."""
    workdir = make_shared_tmpdir()
    try:
        with OidcProviderPeer() as op:
            config = {
                "server": {"auth_socket": str(workdir / "auth"), "request_timeout": 3.0},
                "provider": [
                    {
                        "name": "op",
                        "issuer": op.issuer,
                        "allow_http": True,
                        "userinfo_validation": True,
                    }
                ],
                # userinfo proves no audience: the rule must say it checks none
                "rule": [
                    {
                        "name": "users",
                        "provider": "op",
                        "username": "{email}",
                        "check_audience": False,
                    }
                ],
            }
            path = workdir / "c.toml"
            path.write_bytes(tomli_w.dumps(config).encode())
            check = subprocess.run(
                [sys.executable, "-m", "saslauthd_oidc", "check-config", "--config", str(path)],
                capture_output=True,
                text=True,
                check=False,
            )
            assert check.returncode == 0, check.stderr
            assert "checks opaque tokens by userinfo" in check.stdout
            daemon = Daemon(path, workdir / "auth", workdir / "daemon.log")
            try:
                token = op.authorization_code_tokens(resource=None)["access_token"]

                def auth_test(tok: str) -> int:
                    return subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "saslauthd_oidc",
                            "auth-test",
                            "--socket",
                            str(workdir / "auth"),
                            "--token",
                            "-",
                            "--user",
                            ALICE,
                        ],
                        input=tok,
                        capture_output=True,
                        text=True,
                        check=False,
                    ).returncode

                before = op.count("userinfo_endpoint")
                assert auth_test(token) == 0
                assert auth_test(token) == 0
                assert op.count("userinfo_endpoint") - before == 1
                event = daemon.events_for(token)[0]
                assert (event["rule"], event["account"]) == ("users", ALICE)
                assert auth_test(token[:-2] + "xx") == 1
                assert daemon.events_for(token[:-2] + "xx")[0]["reason"] == "token_inactive"
                assert op.count("introspection_endpoint") == 0
            finally:
                assert daemon.stop() == 0, daemon.log()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
