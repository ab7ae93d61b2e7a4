"""End to end through a real Dovecot 2.3: IMAP client → Dovecot passdb oauth2 → our /introspect.

The daemon runs as a subprocess (``saslauthd-oidc serve``) with its HTTP
listener on a loopback port and callers authenticated by HTTP Basic (the
credentials sit in Dovecot's ``introspection_url``, as the README recipe
says). Dovecot's passdb is the README recipe. Tokens come from a real HTTP
issuer on loopback (DevIssuer). Clients: Python's imaplib and curl.
"""

from __future__ import annotations

import base64
import imaplib
import json
import urllib.request
from collections.abc import Iterator

import pytest

from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread
from tests.conftest import require_peer
from tests.peers.daemon import Daemon
from tests.peers.dovecot import (
    CALLER_SECRET,
    DovecotInstance,
    behind_dovecot,
    curl_imap_auth,
    fresh_source_address,
    imap_authenticate,
)
from tests.peers.postfix import curl_available

pytestmark = pytest.mark.peer

USER = "alice@example.org"
DOWN_ISSUER = "http://127.0.0.1:9/down"  # nothing listens on the discard port


@pytest.fixture(scope="module")
def issuer() -> Iterator[DevIssuer]:
    with DevIssuerThread(DevIssuer(algorithms=("ES256",))) as iss:
        yield iss


def providers_and_rules(issuer: str) -> str:
    return f"""
[[provider]]
name = "dev"
issuer = "{issuer}"
allow_http = true
token_types = ["at+jwt"]

[[provider]]
name = "down"
issuer = "{DOWN_ISSUER}"
allow_http = true

[[rule]]
name = "imap"
provider = "dev"
audiences = ["mail"]
services = ["imap"]
username = "{{email}}"

[[rule]]
name = "down"
provider = "down"
audiences = ["mail"]
"""


@pytest.fixture(scope="module")
def stack(dovecot_ready: None, issuer: DevIssuer) -> Iterator[tuple[Daemon, DovecotInstance]]:
    with behind_dovecot(providers_and_rules(issuer.issuer or "")) as stack:
        yield stack


def good_token(issuer: DevIssuer, email: str = USER) -> str:
    return issuer.mint(email=email, audience="mail")


@pytest.mark.parametrize("mech", ["XOAUTH2", "OAUTHBEARER"])
def test_imaplib_good_token_logs_in(
    stack: tuple[Daemon, DovecotInstance], issuer: DevIssuer, mech: str
) -> None:
    daemon, dc = stack
    token = good_token(issuer)
    source = fresh_source_address()
    typ, text = imap_authenticate(dc.host, dc.port, mech, USER, token, source=source)
    assert typ == "OK", (typ, text, dc.log()[-3000:])
    event = daemon.event(token)
    assert event["outcome"] == "ok"
    assert event["frontend"] == "http"
    assert event["mech"] == "BEARER"
    # send_auth_headers = yes: Dovecot's service fed rule selection ("imap" rule).
    assert event["service"] == "imap"
    assert event["rule"] == "imap"
    assert event["remote"] == source


@pytest.mark.parametrize("mech", ["XOAUTH2", "OAUTHBEARER"])
def test_imaplib_bad_token_is_refused(
    stack: tuple[Daemon, DovecotInstance], issuer: DevIssuer, mech: str
) -> None:
    daemon, dc = stack
    # same claims, a key nobody published, under the issuer's own kid: a forgery,
    # not a key rotation (a kid nobody knows yet would be a temporary failure
    # while the JWKS refetch is in its cooldown)
    forged = DevIssuer(algorithms=("ES256",))
    token = forged.mint(
        claims={"iss": issuer.issuer}, email=USER, audience="mail", header={"kid": issuer.kid()}
    )
    typ, text = imap_authenticate(dc.host, dc.port, mech, USER, token)
    assert typ == "NO", (typ, text)
    assert "AUTHENTICATIONFAILED" in text
    event = daemon.event(token)
    assert event["outcome"] == "fail"
    assert event["reason"] in ("unknown_key", "bad_signature")


def test_token_for_another_user_is_refused(
    stack: tuple[Daemon, DovecotInstance], issuer: DevIssuer
) -> None:
    """Dovecot compares our username with the SASL user: bob's token does not log in alice."""
    _, dc = stack
    token = good_token(issuer, email="bob@example.org")
    typ, _ = imap_authenticate(dc.host, dc.port, "XOAUTH2", USER, token)
    assert typ == "NO"
    typ, _ = imap_authenticate(dc.host, dc.port, "XOAUTH2", "bob@example.org", token)
    assert typ == "OK"


def test_provider_outage_is_a_temporary_failure(
    stack: tuple[Daemon, DovecotInstance], issuer: DevIssuer
) -> None:
    """503 from /introspect: Dovecot says UNAVAILABLE (try again), not AUTHENTICATIONFAILED."""
    daemon, dc = stack
    token = issuer.mint(claims={"iss": DOWN_ISSUER}, email=USER, audience="mail")
    typ, text = imap_authenticate(dc.host, dc.port, "XOAUTH2", USER, token)
    assert typ == "NO"
    assert "UNAVAILABLE" in text, text
    assert daemon.event(token)["outcome"] == "tempfail"


@pytest.mark.parametrize("mech", ["XOAUTH2", "OAUTHBEARER"])
def test_curl_imap(stack: tuple[Daemon, DovecotInstance], issuer: DevIssuer, mech: str) -> None:
    require_peer("curl", curl_available())
    _, dc = stack
    status, _ = curl_imap_auth(dc.host, dc.port, USER, good_token(issuer), mech)
    assert status == 0
    forged = DevIssuer(algorithms=("ES256",)).mint(
        claims={"iss": issuer.issuer}, email=USER, audience="mail"
    )
    status, _ = curl_imap_auth(dc.host, dc.port, USER, forged, mech)
    assert status == 67  # CURLE_LOGIN_DENIED


def test_introspect_needs_the_callers_credentials(
    stack: tuple[Daemon, DovecotInstance], issuer: DevIssuer
) -> None:
    _, dc = stack
    port = dc.introspection_port
    body = f"token={good_token(issuer)}".encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/introspect", data=body)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 401
    assert json.loads(info.value.read()) == {"error": "invalid_client"}


def test_no_token_in_any_log(stack: tuple[Daemon, DovecotInstance], issuer: DevIssuer) -> None:
    daemon, dc = stack
    token = good_token(issuer)
    assert imap_authenticate(dc.host, dc.port, "OAUTHBEARER", USER, token)[0] == "OK"
    daemon.event(token)
    dc.wait_for_log(r"imap-login: Info: Login: user=<alice@example.org>, method=OAUTHBEARER")
    signature = token.rsplit(".", 1)[1]
    for log in (daemon.log(), dc.log()):
        assert signature not in log
        assert CALLER_SECRET not in log


def xoauth2_b64_len(token: str) -> int:
    return len(base64.b64encode(f"user={USER}\x01auth=Bearer {token}\x01\x01".encode()))


def test_long_tokens_through_dovecot(
    stack: tuple[Daemon, DovecotInstance], issuer: DevIssuer
) -> None:
    """Dovecot 2.3's imap-login takes a SASL response of up to 8192 bytes of base64.

    A 3.9 KB token logs in after "+" (imaplib) and on the AUTHENTICATE line
    (curl --sasl-ir); one whose response is longer than 8192 bytes is cut off
    by Dovecot itself ("Authentication response too large",
    LOGIN_MAX_AUTH_BUF_SIZE, not a setting) before our endpoint is asked.
    """
    daemon, dc = stack
    groups = [f"group-{i:05d}-mail-users" for i in range(100)]
    token = issuer.mint(email=USER, audience="mail", claims={"groups": groups})
    assert len(token) > 3500 and xoauth2_b64_len(token) < 8192
    typ, text = imap_authenticate(dc.host, dc.port, "XOAUTH2", USER, token)
    assert typ == "OK", (typ, text, dc.log()[-2000:])
    require_peer("curl", curl_available())
    status, verbose = curl_imap_auth(dc.host, dc.port, USER, token, "OAUTHBEARER")
    assert status == 0, verbose[-1500:]
    assert "AUTHENTICATE OAUTHBEARER " in verbose  # the initial response on the command line
    too_long = issuer.mint(email=USER, audience="mail", claims={"groups": groups * 3})
    assert xoauth2_b64_len(too_long) > 8192
    with pytest.raises((OSError, imaplib.IMAP4.abort)):
        imap_authenticate(dc.host, dc.port, "XOAUTH2", USER, too_long)
    dc.wait_for_log(r"Disconnected: Authentication response too large")
    assert daemon.events_for(too_long, timeout=0.5) == []
