"""End to end through a real Postfix: SMTP client → Postfix smtpd → our socket → dev issuer.

The daemon runs as a subprocess (``saslauthd-oidc serve --config …``), as an
administrator runs it; Postfix's main.cf carries exactly the README recipe's
SASL lines; tokens come from a real HTTP issuer on loopback (DevIssuer).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from saslauthd_oidc.core.request import token_fingerprint
from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread
from tests.peers.daemon import README_MAIN_CF, Daemon
from tests.peers.postfix import (
    PostfixInstance,
    curl_available,
    curl_smtp_auth,
    make_shared_tmpdir,
    smtp_auth,
    smtp_ehlo,
)
from tests.support import oauthbearer, write_config, xoauth2

pytestmark = pytest.mark.peer

USER = "alice@example.org"


@pytest.fixture(scope="module")
def issuer() -> Iterator[DevIssuer]:
    with DevIssuerThread(DevIssuer(algorithms=("ES256", "RS256"))) as iss:
        yield iss


@pytest.fixture(scope="module")
def stack(postfix_ready: None, issuer: DevIssuer) -> Iterator[tuple[Daemon, PostfixInstance]]:
    workdir = make_shared_tmpdir()
    sock = workdir / "auth"
    config = workdir / "saslauthd-oidc.toml"
    write_config(config, sock, issuer.issuer)
    daemon = Daemon(config, sock, workdir / "daemon.log")
    try:
        with PostfixInstance(str(sock), extra_main_cf=README_MAIN_CF) as pf:
            yield daemon, pf
    finally:
        assert daemon.stop() == 0, daemon.log()


def good_token(issuer: DevIssuer, **kw: object) -> str:
    kw.setdefault("email", USER)
    kw.setdefault("audience", "mail")
    return issuer.mint(**kw)  # type: ignore[arg-type]


def decode_challenge(text: str) -> dict[str, object]:
    return json.loads(base64.b64decode(text))  # type: ignore[no-any-return]


def test_ehlo_offers_both_mechanisms(stack: tuple[Daemon, PostfixInstance]) -> None:
    _, pf = stack
    mechs = smtp_ehlo(pf.host, pf.port)["auth"].split()
    assert {"OAUTHBEARER", "XOAUTH2"} <= set(mechs)


@pytest.mark.parametrize("mech", ["OAUTHBEARER", "XOAUTH2"])
@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_good_token_with_initial_response(
    stack: tuple[Daemon, PostfixInstance], issuer: DevIssuer, mech: str, alg: str
) -> None:
    _, pf = stack
    tok = good_token(issuer, alg=alg)
    ir = oauthbearer(tok) if mech == "OAUTHBEARER" else xoauth2(tok)
    replies = smtp_auth(pf.host, pf.port, mech, ir)
    assert replies[-1][0] == 235, replies


@pytest.mark.parametrize("mech", ["oauthbearer", "XOAUTH2"])
def test_good_token_after_334(
    stack: tuple[Daemon, PostfixInstance], issuer: DevIssuer, mech: str
) -> None:
    _, pf = stack
    tok = good_token(issuer)
    data = oauthbearer(tok) if mech.upper() == "OAUTHBEARER" else xoauth2(tok)
    replies = smtp_auth(pf.host, pf.port, mech, None, continuation=data)
    assert replies[0] == (334, "")
    assert replies[-1][0] == 235, replies


def test_bad_token_gets_rfc7628_challenge_then_535(
    stack: tuple[Daemon, PostfixInstance], issuer: DevIssuer
) -> None:
    _, pf = stack
    tok = good_token(issuer, audience="another-client")
    replies = smtp_auth(pf.host, pf.port, "OAUTHBEARER", oauthbearer(tok), continuation=b"\x01")
    assert replies[0][0] == 334
    challenge = decode_challenge(replies[0][1])
    assert challenge == {
        "status": "invalid_token",
        "scope": "email",
        "openid-configuration": f"{issuer.issuer}/.well-known/openid-configuration",
    }
    assert replies[-1][0] == 535


def test_xoauth2_failure_challenge_then_535(
    stack: tuple[Daemon, PostfixInstance], issuer: DevIssuer
) -> None:
    _, pf = stack
    tok = good_token(issuer, claims={"scope": "openid"})
    replies = smtp_auth(pf.host, pf.port, "XOAUTH2", xoauth2(tok), continuation=b"")
    assert replies[0][0] == 334
    assert decode_challenge(replies[0][1]) == {
        "status": "403",
        "schemes": "bearer",
        "scope": "email",
    }
    assert replies[-1][0] == 535


@pytest.mark.parametrize(
    "case",
    ["expired", "other_user", "bad_signature", "unknown_kid", "wrong_typ", "garbage", "alg_none"],
)
def test_refused_tokens_give_535_and_the_daemon_says_why(
    stack: tuple[Daemon, PostfixInstance], issuer: DevIssuer, case: str
) -> None:
    daemon, pf = stack
    user = USER
    if case == "expired":
        tok = good_token(
            issuer,
            claims={"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200, "nbf": None},
        )
    elif case == "other_user":
        tok, user = good_token(issuer), "bob@example.org"
    elif case == "bad_signature":
        head, body, sig = good_token(issuer).split(".")
        flipped = "A" if sig[10] != "A" else "B"
        tok = f"{head}.{body}.{sig[:10]}{flipped}{sig[11:]}"
    elif case == "unknown_kid":
        tok = good_token(issuer, header={"kid": "no-such-key"})
    elif case == "wrong_typ":
        tok = good_token(issuer, typ="JWT")
    elif case == "garbage":
        tok = "not-a-jwt"
    else:
        head = base64.urlsafe_b64encode(b'{"alg":"none","typ":"at+jwt"}').rstrip(b"=").decode()
        body = good_token(issuer).split(".")[1]
        tok = f"{head}.{body}."
    replies = smtp_auth(
        pf.host, pf.port, "OAUTHBEARER", oauthbearer(tok, user), continuation=b"\x01"
    )
    assert replies[0][0] == 334
    assert replies[-1][0] == 535
    expected = {
        "expired": "expired",
        "other_user": "authzid_mismatch",
        "bad_signature": "bad_signature",
        "unknown_kid": "unknown_key",
        "wrong_typ": "wrong_token_type",
        "garbage": "malformed_token",
        "alg_none": "unsupported_algorithm",
    }[case]
    lines = daemon.events_for(tok)
    assert lines, daemon.log()
    assert lines[-1]["reason"] == expected
    assert lines[-1]["service"] == "smtp"
    assert lines[-1]["remote"] == "127.0.0.1"


@pytest.mark.parametrize("mech", ["OAUTHBEARER", "XOAUTH2"])
def test_curl_oauth2_bearer(
    stack: tuple[Daemon, PostfixInstance], issuer: DevIssuer, mech: str
) -> None:
    reason = curl_available()
    if reason:
        from tests.conftest import require_peer

        require_peer("curl", reason)
    _, pf = stack
    status, _ = curl_smtp_auth(pf.host, pf.port, USER, good_token(issuer), mech)
    assert status == 0
    status, verbose = curl_smtp_auth(
        pf.host, pf.port, USER, good_token(issuer, audience="nope"), mech
    )
    assert status == 67  # CURLE_LOGIN_DENIED
    assert "535" in verbose


def test_no_secret_in_postfix_auth_replies_or_daemon_log(
    stack: tuple[Daemon, PostfixInstance], issuer: DevIssuer
) -> None:
    daemon, pf = stack
    tok = good_token(issuer)
    assert smtp_auth(pf.host, pf.port, "OAUTHBEARER", oauthbearer(tok))[-1][0] == 235
    pf.wait_for_log(r"auth reply: OK")
    replies = "\n".join(pf.auth_replies())
    payload = tok.split(".")[1]
    assert "user=alice@example.org" in replies
    for text in (replies, daemon.log()):
        assert tok not in text and payload not in text
    assert token_fingerprint(tok) in daemon.log()


def test_daemon_survives_garbage_on_its_socket(
    stack: tuple[Daemon, PostfixInstance], issuer: DevIssuer
) -> None:
    daemon, pf = stack
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(daemon.socket_path))
        s.sendall(b"VERSION\t1\t2\nAUTH\t1\tNOPE\tservice=smtp\n" + b"x" * 20000 + b"\n\x00\xff\n")
        s.settimeout(2)
        got = b""
        while b"FAIL\t1" not in got:
            got += s.recv(4096)
    assert smtp_auth(pf.host, pf.port, "XOAUTH2", xoauth2(good_token(issuer)))[-1][0] == 235


def test_tempfail_disconnect_gives_454(postfix_ready: None, tmp_path: Path) -> None:
    """IdP down with no keys cached: with tempfail = "disconnect" Postfix answers 454, not 535."""
    stopped = DevIssuer()
    with DevIssuerThread(stopped) as iss:
        issuer_url = iss.issuer
        tok = iss.mint(email=USER, audience="mail")
    # the issuer is gone now; the daemon never saw its keys
    workdir = make_shared_tmpdir()
    sock = workdir / "auth"
    config = workdir / "c.toml"
    write_config(config, sock, issuer_url, tempfail="disconnect")
    daemon = Daemon(config, sock, workdir / "daemon.log")
    try:
        with PostfixInstance(str(sock), extra_main_cf=README_MAIN_CF) as pf:
            replies = smtp_auth(pf.host, pf.port, "OAUTHBEARER", oauthbearer(tok))
            assert replies[-1][0] == 454, replies
            events = [e for e in daemon.log_events() if e.get("event") == "authentication"]
            assert events[-1]["outcome"] == "tempfail"
            assert events[-1]["reason"] == "provider_unavailable"
    finally:
        assert daemon.stop() == 0
    assert not os.path.exists(sock)  # removed on SIGTERM
