"""PLAIN and LOGIN on the Dovecot socket, the bearer token as the password, through real Postfix.

For mail clients that cannot do OAUTHBEARER/XOAUTH2. Opt-in with
``server.mechanisms``: without it Postfix must not even advertise them.
"""

from __future__ import annotations

import base64
import tomllib
from collections.abc import Iterator

import pytest

from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread
from tests.peers.daemon import README_MAIN_CF, Daemon
from tests.peers.postfix import PostfixInstance, make_shared_tmpdir, smtp_auth, smtp_ehlo
from tests.recipes import recipe
from tests.support import write_config

pytestmark = pytest.mark.peer

USER = "alice@example.org"
#: The README's opt-in line (taken from README.md).
ALL: list[str] = tomllib.loads(recipe("plain-login.toml"))["server"]["mechanisms"]


@pytest.fixture(scope="module")
def issuer() -> Iterator[DevIssuer]:
    with DevIssuerThread(DevIssuer(algorithms=("ES256",))) as iss:
        yield iss


def stack_for(
    issuer: DevIssuer, mechanisms: list[str] | None
) -> Iterator[tuple[Daemon, PostfixInstance]]:
    workdir = make_shared_tmpdir()
    sock = workdir / "auth"
    config = workdir / "saslauthd-oidc.toml"
    write_config(config, sock, issuer.issuer)
    if mechanisms is not None:
        listed = ", ".join(f'"{m}"' for m in mechanisms)
        config.write_text(
            config.read_text().replace("[server]\n", f"[server]\nmechanisms = [{listed}]\n")
        )
    daemon = Daemon(config, sock, workdir / "daemon.log")
    try:
        with PostfixInstance(str(sock), extra_main_cf=README_MAIN_CF) as pf:
            yield daemon, pf
    finally:
        assert daemon.stop() == 0, daemon.log()


@pytest.fixture(scope="module")
def opted_in(postfix_ready: None, issuer: DevIssuer) -> Iterator[tuple[Daemon, PostfixInstance]]:
    yield from stack_for(issuer, ALL)


@pytest.fixture(scope="module")
def default(postfix_ready: None, issuer: DevIssuer) -> Iterator[tuple[Daemon, PostfixInstance]]:
    yield from stack_for(issuer, None)


def plain(token: str, user: str = USER, authzid: str = "") -> bytes:
    return f"{authzid}\0{user}\0{token}".encode()


def token_for(issuer: DevIssuer, **kw: object) -> str:
    kw.setdefault("email", USER)
    return issuer.mint(**kw)  # type: ignore[arg-type]


def test_not_advertised_unless_configured(
    default: tuple[Daemon, PostfixInstance], issuer: DevIssuer
) -> None:
    daemon, pf = default
    assert smtp_ehlo(pf.host, pf.port)["auth"].split() == ["OAUTHBEARER", "XOAUTH2"]
    token = token_for(issuer)
    replies = smtp_auth(pf.host, pf.port, "PLAIN", plain(token))
    assert replies[-1][0] == 535, replies
    assert daemon.events_for(token, timeout=0.5) == []  # Postfix never asked us


def test_advertised_when_configured(opted_in: tuple[Daemon, PostfixInstance]) -> None:
    _, pf = opted_in
    assert smtp_ehlo(pf.host, pf.port)["auth"].split() == ALL


def test_plain_initial_response(
    opted_in: tuple[Daemon, PostfixInstance], issuer: DevIssuer
) -> None:
    daemon, pf = opted_in
    token = token_for(issuer)
    assert smtp_auth(pf.host, pf.port, "PLAIN", plain(token))[-1][0] == 235
    event = daemon.event(token)
    assert (event["mech"], event["account"], event["frontend"]) == ("PLAIN", USER, "dovecot")
    same = token_for(issuer)
    assert smtp_auth(pf.host, pf.port, "PLAIN", plain(same, authzid=USER))[-1][0] == 235


def test_plain_after_334(opted_in: tuple[Daemon, PostfixInstance], issuer: DevIssuer) -> None:
    _, pf = opted_in
    replies = smtp_auth(pf.host, pf.port, "plain", None, continuation=plain(token_for(issuer)))
    assert [code for code, _ in replies] == [334, 235], replies


def test_login(opted_in: tuple[Daemon, PostfixInstance], issuer: DevIssuer) -> None:
    daemon, pf = opted_in
    token = token_for(issuer)
    replies = smtp_auth(
        pf.host, pf.port, "LOGIN", None, continuation=[USER.encode(), token.encode()]
    )
    assert replies == [
        (334, base64.b64encode(b"Username:").decode()),
        (334, base64.b64encode(b"Password:").decode()),
        (235, "2.7.0 Authentication successful"),
    ]
    assert daemon.event(token)["mech"] == "LOGIN"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("other_user", "authzid_mismatch"),
        ("wrong_audience", "wrong_audience"),
        ("garbage", "malformed_token"),
    ],
)
@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_refusals_are_535_without_a_challenge(
    opted_in: tuple[Daemon, PostfixInstance], issuer: DevIssuer, mech: str, case: str, reason: str
) -> None:
    daemon, pf = opted_in
    user = USER
    token = token_for(issuer)
    if case == "other_user":
        user = "bob@example.org"
    elif case == "wrong_audience":
        token = token_for(issuer, audience="another-client")
    else:
        token = f"not-a-jwt-{mech}"
    if mech == "PLAIN":
        replies = smtp_auth(pf.host, pf.port, "PLAIN", plain(token, user))
        assert [code for code, _ in replies] == [535], replies
    else:
        login = [user.encode(), token.encode()]
        replies = smtp_auth(pf.host, pf.port, "LOGIN", None, continuation=login)
        assert [code for code, _ in replies] == [334, 334, 535], replies
    assert daemon.event(token)["reason"] == reason
    pf.wait_for_log(r"auth reply: FAIL")
    for line in pf.auth_replies():
        assert token not in line
