"""The saslauthd socket against real Cyrus SASL clients: testsaslauthd, and Postfix via libsasl.

The daemon runs as a subprocess with ``server.saslauthd_socket``; tokens come
from a real HTTP issuer on loopback (DevIssuer). Postfix is the private
instance of ``tests/peers/postfix.py`` with ``smtpd_sasl_type = cyrus`` and a
``smtpd.conf`` saying ``pwcheck_method: saslauthd`` (the README recipe): an
SMTP client sends ``AUTH PLAIN``/``AUTH LOGIN`` with the token as password,
libsasl's PLAIN/LOGIN plugin hands it to our socket as a four-field request.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from saslauthd_oidc.core.request import token_fingerprint
from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread
from tests.conftest import require_peer
from tests.peers.cyrus import (
    CYRUS_MAIN_CF,
    cyrus_plugins_available,
    cyrus_postfix_files,
    run_testsaslauthd,
    testsaslauthd_available,
)
from tests.peers.daemon import Daemon
from tests.peers.postfix import PostfixInstance, make_shared_tmpdir, smtp_auth, smtp_ehlo

pytestmark = pytest.mark.peer

USER = "alice@example.org"


def write_config(path: Path, workdir: Path, issuer: str) -> None:
    path.write_text(
        f"""
[server]
auth_socket = "{workdir / "auth"}"
auth_socket_mode = "0600"
saslauthd_socket = "{workdir / "mux"}"
saslauthd_socket_mode = "0666"
request_timeout = 3.0

[logging]
level = "info"
format = "json"

[[provider]]
name = "dev"
issuer = "{issuer}"
allow_http = true
token_types = ["at+jwt"]

[[rule]]
name = "mail"
provider = "dev"
audiences = ["mail"]
username = "{{email}}"
"""
    )


@pytest.fixture(scope="module")
def issuer() -> Iterator[DevIssuer]:
    with DevIssuerThread(DevIssuer(algorithms=("ES256",))) as iss:
        yield iss


@pytest.fixture(scope="module")
def daemon(issuer: DevIssuer) -> Iterator[Daemon]:
    workdir = make_shared_tmpdir()
    config = workdir / "saslauthd-oidc.toml"
    write_config(config, workdir, issuer.issuer)
    d = Daemon(config, workdir / "auth", workdir / "daemon.log")
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log()
    assert not (workdir / "mux").exists()  # removed on SIGTERM


def mux(daemon: Daemon) -> Path:
    return daemon.socket_path.with_name("mux")


# ------------------------------------------------------------------ testsaslauthd


@pytest.fixture(scope="module")
def testsaslauthd_ready() -> None:
    require_peer("testsaslauthd", testsaslauthd_available())


@pytest.mark.parametrize(
    ("user", "realm"),
    [(USER, None), ("alice", "example.org"), (USER, "ignored.example")],
)
def test_testsaslauthd_good_token(
    testsaslauthd_ready: None, daemon: Daemon, issuer: DevIssuer, user: str, realm: str | None
) -> None:
    token = issuer.mint(email=USER)
    status, out = run_testsaslauthd(mux(daemon), user, token, realm=realm)
    assert (status, out.strip()) == (0, '0: OK "Success."')
    event = daemon.event(token)
    assert event["frontend"] == "saslauthd"
    assert event["mech"] == "PLAIN"
    assert event["service"] == "smtp"
    assert event["user"] == USER
    assert event["account"] == USER


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("other_user", "authzid_mismatch"),
        ("other_realm", "authzid_mismatch"),
        ("wrong_audience", "wrong_audience"),
        ("expired", "expired"),
        ("garbage", "malformed_token"),
    ],
)
def test_testsaslauthd_refusals(
    testsaslauthd_ready: None, daemon: Daemon, issuer: DevIssuer, case: str, reason: str
) -> None:
    user, realm = USER, None
    token = issuer.mint(email=USER)
    if case == "other_user":
        user = "bob@example.org"
    elif case == "other_realm":
        user, realm = "alice", "example.net"
    elif case == "wrong_audience":
        token = issuer.mint(email=USER, audience="another-client")
    elif case == "expired":
        token = issuer.mint(email=USER, lifetime=-3600, claims={"nbf": None, "iat": None})
    else:
        token = "not-a-jwt-at-all"
    status, out = run_testsaslauthd(mux(daemon), user, token, realm=realm)
    assert status != 0
    assert out.strip() == '0: NO "authentication failed"'
    assert daemon.event(token)["reason"] == reason


def test_testsaslauthd_service_reaches_the_engine(
    testsaslauthd_ready: None, daemon: Daemon, issuer: DevIssuer
) -> None:
    token = issuer.mint(email=USER)
    status, _ = run_testsaslauthd(mux(daemon), USER, token, service="IMAP")
    assert status == 0
    assert daemon.event(token)["service"] == "imap"


# ------------------------------------------------------------- Postfix + Cyrus SASL


@pytest.fixture(scope="module")
def cyrus_postfix(postfix_ready: None, daemon: Daemon) -> Iterator[PostfixInstance]:
    require_peer("libsasl2-modules", cyrus_plugins_available())
    # No verbose peer logging: then the whole log must be token-free.
    main_cf = {**CYRUS_MAIN_CF, "debug_peer_list": ""}
    with PostfixInstance(
        "smtpd",
        sasl_type="cyrus",
        extra_main_cf=main_cf,
        extra_files=cyrus_postfix_files(mux(daemon)),
    ) as pf:
        yield pf


def plain(token: str, user: str = USER) -> bytes:
    return f"\0{user}\0{token}".encode()


def test_postfix_cyrus_offers_plain_and_login(cyrus_postfix: PostfixInstance) -> None:
    mechs = set(smtp_ehlo(cyrus_postfix.host, cyrus_postfix.port)["auth"].split())
    assert mechs == {"PLAIN", "LOGIN"}


def test_postfix_cyrus_plain_good_and_bad(
    cyrus_postfix: PostfixInstance, daemon: Daemon, issuer: DevIssuer
) -> None:
    pf = cyrus_postfix
    token = issuer.mint(email=USER)
    assert smtp_auth(pf.host, pf.port, "PLAIN", plain(token))[-1][0] == 235
    event = daemon.event(token)
    assert event["frontend"] == "saslauthd"
    assert event["service"] == "smtp"  # smtpd_sasl_service
    assert event["account"] == USER

    bad = issuer.mint(email=USER, audience="another-client")
    assert smtp_auth(pf.host, pf.port, "PLAIN", plain(bad))[-1][0] == 535
    assert daemon.event(bad)["reason"] == "wrong_audience"

    other = issuer.mint(email=USER)
    assert smtp_auth(pf.host, pf.port, "PLAIN", plain(other, "bob@example.org"))[-1][0] == 535
    assert daemon.event(other)["reason"] == "authzid_mismatch"


def test_postfix_cyrus_login_good(
    cyrus_postfix: PostfixInstance, daemon: Daemon, issuer: DevIssuer
) -> None:
    pf = cyrus_postfix
    token = issuer.mint(email=USER)
    replies = smtp_auth(
        pf.host, pf.port, "LOGIN", None, continuation=[USER.encode(), token.encode()]
    )
    assert [code for code, _ in replies] == [334, 334, 235], replies
    assert daemon.event(token)["account"] == USER


def test_postfix_cyrus_tempfail_is_535(postfix_ready: None) -> None:
    """Cyrus clients read only "OK"/"NO": an IdP outage looks like a refusal (535, not 454)."""
    require_peer("libsasl2-modules", cyrus_plugins_available())
    stopped = DevIssuer(algorithms=("ES256",))
    with DevIssuerThread(stopped) as gone:
        token = gone.mint(email=USER)
    # The issuer is gone now; a daemon configured for it never saw its keys.
    workdir = make_shared_tmpdir()
    config = workdir / "c.toml"
    write_config(config, workdir, gone.issuer)
    second = Daemon(config, workdir / "auth", workdir / "daemon.log")
    try:
        with PostfixInstance(
            "smtpd",
            sasl_type="cyrus",
            extra_main_cf=CYRUS_MAIN_CF,
            extra_files=cyrus_postfix_files(workdir / "mux"),
        ) as pf2:
            assert smtp_auth(pf2.host, pf2.port, "PLAIN", plain(token))[-1][0] == 535
        event = second.event(token)
        assert event["outcome"] == "tempfail"
        assert event["reason"] == "provider_unavailable"
    finally:
        assert second.stop() == 0


def test_no_token_in_postfix_or_daemon_logs(
    cyrus_postfix: PostfixInstance, daemon: Daemon, issuer: DevIssuer
) -> None:
    pf = cyrus_postfix
    token = issuer.mint(email=USER)
    assert smtp_auth(pf.host, pf.port, "PLAIN", plain(token))[-1][0] == 235
    bad = issuer.mint(email=USER, audience="x")
    assert smtp_auth(pf.host, pf.port, "PLAIN", plain(bad))[-1][0] == 535
    pf.wait_for_log(r"authentication failed")
    daemon.event(bad)
    for tok in (token, bad):
        b64 = base64.b64encode(plain(tok)).decode()
        for text in (pf.maillog(), daemon.log()):
            assert tok not in text
            assert tok.split(".")[1] not in text
            assert b64 not in text
        assert token_fingerprint(tok) in daemon.log()
