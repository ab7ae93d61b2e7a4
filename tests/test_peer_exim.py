"""End to end through a real Exim 4.96: SMTP client → Exim ``driver = dovecot`` → our socket.

Exim is Debian's exim4-daemon-heavy, unpacked beside Postfix (tests/peers/exim.py);
its authenticators are the README recipe's. The daemon runs as a subprocess;
tokens come from a real HTTP issuer on loopback (DevIssuer).

How Exim's use of the Dovecot auth protocol differs from Postfix's is written
down here, each as a test (``test_exim_*`` below):

* Exim opens a new auth connection for every AUTH command, and sends
  ``VERSION 1 0`` and ``CPID`` each time; Postfix keeps one connection per
  smtpd process and numbers its requests 1, 2, 3 on it.
* Exim always sends ``resp=``, empty when the SMTP client gave no initial
  response; Postfix leaves ``resp=`` out then.
* Exim sends ``secured`` on a plaintext loopback connection; Postfix only
  after STARTTLS. Behind Exim, ``require_secured`` proves nothing.
* Exim answers ``435 Unable to authenticate at present`` (temporary) when it
  cannot connect to the socket, and also when the daemon hangs up on it
  (``tempfail = "disconnect"``); Postfix's smtpd dies at session start
  without the socket, and says 454 for a hang-up.
* Exim advertises the authenticators in its config whatever the socket's
  MECH lines say, and answers 435 for one the socket does not list; Postfix
  advertises exactly the socket's list.
* Every FAIL is ``535 Incorrect authentication data`` with Exim, never
  showing ``reason=``; Postfix says ``535 5.7.8 Error: authentication
  failed: <reason>``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import smtplib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from saslauthd_oidc.core.request import token_fingerprint
from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread
from tests.conftest import require_peer
from tests.peers.daemon import Daemon
from tests.peers.exim import EximInstance, exim_available
from tests.peers.postfix import (
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
def exim_ready() -> None:
    require_peer("exim (exim4-daemon-heavy, unpacked)", exim_available())


@pytest.fixture(scope="module")
def issuer() -> Iterator[DevIssuer]:
    with DevIssuerThread(DevIssuer(algorithms=("ES256", "RS256"))) as iss:
        yield iss


def start_daemon(issuer_url: str, *, tempfail: str = "fail") -> Daemon:
    workdir = make_shared_tmpdir()
    sock = workdir / "auth"
    config = workdir / "saslauthd-oidc.toml"
    write_config(config, sock, issuer_url, tempfail=tempfail)
    return Daemon(config, sock, workdir / "daemon.log")


@pytest.fixture(scope="module")
def stack(exim_ready: None, issuer: DevIssuer) -> Iterator[tuple[Daemon, EximInstance]]:
    daemon = start_daemon(issuer.issuer)
    try:
        with EximInstance(str(daemon.socket_path)) as ex:
            yield daemon, ex
    finally:
        assert daemon.stop() == 0, daemon.log()


def good_token(issuer: DevIssuer, **kw: object) -> str:
    kw.setdefault("email", USER)
    kw.setdefault("audience", "mail")
    return issuer.mint(**kw)  # type: ignore[arg-type]


def ir_for(mech: str, token: str, user: str = USER) -> bytes:
    return oauthbearer(token, user) if mech == "OAUTHBEARER" else xoauth2(token, user)


def test_ehlo_offers_both_mechanisms(stack: tuple[Daemon, EximInstance]) -> None:
    _, ex = stack
    assert smtp_ehlo(ex.host, ex.port)["auth"].split() == ["OAUTHBEARER", "XOAUTH2"]


@pytest.mark.parametrize("mech", ["OAUTHBEARER", "XOAUTH2"])
@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_good_token_with_initial_response(
    stack: tuple[Daemon, EximInstance], issuer: DevIssuer, mech: str, alg: str
) -> None:
    daemon, ex = stack
    tok = good_token(issuer, alg=alg)
    replies = smtp_auth(ex.host, ex.port, mech, ir_for(mech, tok))
    assert replies == [(235, "Authentication succeeded")]
    event = daemon.event(tok)
    assert (event["mech"], event["service"], event["remote"]) == (mech, "smtp", "127.0.0.1")
    assert event["account"] == USER


@pytest.mark.parametrize("mech", ["oauthbearer", "XOAUTH2"])
def test_good_token_after_empty_334(
    stack: tuple[Daemon, EximInstance], issuer: DevIssuer, mech: str
) -> None:
    """Exim sends an empty ``resp=`` for "no initial response": we must answer CONT, not FAIL."""
    _, ex = stack
    tok = good_token(issuer)
    replies = smtp_auth(ex.host, ex.port, mech, None, continuation=ir_for(mech.upper(), tok))
    assert replies == [(334, ""), (235, "Authentication succeeded")]


def test_bad_token_oauthbearer_challenge_then_535(
    stack: tuple[Daemon, EximInstance], issuer: DevIssuer
) -> None:
    daemon, ex = stack
    tok = good_token(issuer, audience="another-client")
    replies = smtp_auth(ex.host, ex.port, "OAUTHBEARER", oauthbearer(tok), continuation=b"\x01")
    assert replies[0][0] == 334
    assert json.loads(base64.b64decode(replies[0][1])) == {
        "status": "invalid_token",
        "scope": "email",
        "openid-configuration": f"{issuer.issuer}/.well-known/openid-configuration",
    }
    assert replies[1] == (535, "Incorrect authentication data")
    assert daemon.event(tok)["reason"] == "wrong_audience"


def test_bad_token_xoauth2_challenge_then_535(
    stack: tuple[Daemon, EximInstance], issuer: DevIssuer
) -> None:
    _, ex = stack
    tok = good_token(issuer, claims={"scope": "openid"})
    replies = smtp_auth(ex.host, ex.port, "XOAUTH2", xoauth2(tok), continuation=b"")
    assert replies[0][0] == 334
    assert json.loads(base64.b64decode(replies[0][1])) == {
        "status": "403",
        "schemes": "bearer",
        "scope": "email",
    }
    assert replies[1] == (535, "Incorrect authentication data")


@pytest.mark.parametrize("case", ["other_user", "expired", "garbage"])
def test_refusals_are_535(stack: tuple[Daemon, EximInstance], issuer: DevIssuer, case: str) -> None:
    daemon, ex = stack
    user = USER
    if case == "other_user":
        tok, user = good_token(issuer), "bob@example.org"
    elif case == "expired":
        tok = good_token(issuer, lifetime=-3600, claims={"nbf": None, "iat": None})
    else:
        tok = "not-a-jwt"
    replies = smtp_auth(ex.host, ex.port, "XOAUTH2", xoauth2(tok, user), continuation=b"")
    assert replies[-1] == (535, "Incorrect authentication data")
    expected = {
        "other_user": "authzid_mismatch",
        "expired": "expired",
        "garbage": "malformed_token",
    }
    assert daemon.event(tok)["reason"] == expected[case]


@pytest.mark.parametrize("mech", ["OAUTHBEARER", "XOAUTH2"])
@pytest.mark.parametrize("sasl_ir", [True, False])
def test_curl(
    stack: tuple[Daemon, EximInstance], issuer: DevIssuer, mech: str, sasl_ir: bool
) -> None:
    require_peer("curl", curl_available())
    _, ex = stack
    status, verbose = curl_smtp_auth(
        ex.host, ex.port, USER, good_token(issuer), mech, sasl_ir=sasl_ir
    )
    assert status == 0, verbose
    status, verbose = curl_smtp_auth(
        ex.host, ex.port, USER, good_token(issuer, audience="nope"), mech, sasl_ir=sasl_ir
    )
    assert status == 67  # CURLE_LOGIN_DENIED
    assert "535 Incorrect authentication data" in verbose


def test_no_token_in_exim_or_daemon_logs(
    stack: tuple[Daemon, EximInstance], issuer: DevIssuer
) -> None:
    daemon, ex = stack
    good = good_token(issuer)
    bad = good_token(issuer, audience="other")
    assert smtp_auth(ex.host, ex.port, "OAUTHBEARER", oauthbearer(good))[-1][0] == 235
    assert smtp_auth(ex.host, ex.port, "XOAUTH2", xoauth2(bad), continuation=b"")[-1][0] == 535
    ex.wait_for_log(r"xoauth2 authenticator failed")
    daemon.event(bad)
    for tok in (good, bad):
        encoded = [base64.b64encode(ir_for(m, tok)).decode() for m in ("OAUTHBEARER", "XOAUTH2")]
        for text in (ex.logs(), daemon.log()):
            assert tok not in text
            assert tok.split(".")[1] not in text
            assert not any(e in text for e in encoded)
        assert token_fingerprint(tok) in daemon.log()


# ------------------------------------------------------- where Exim differs from Postfix


class Recorder:
    """A Unix-socket relay between Exim and the daemon that records what Exim sends."""

    def __init__(self, path: Path, upstream: Path) -> None:
        self.upstream = upstream
        self.connections: list[bytearray] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o666)
        self._sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(str(self.upstream))
            sent = bytearray()
            self.connections.append(sent)
            threading.Thread(target=self._pump, args=(client, server, sent), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if record is not None:
                    record += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._sock.close()


def test_exim_protocol_use(
    stack: tuple[Daemon, EximInstance], exim_ready: None, issuer: DevIssuer
) -> None:
    daemon, _ = stack
    workdir = make_shared_tmpdir()
    recorder = Recorder(workdir / "relay", daemon.socket_path)
    try:
        with EximInstance(str(workdir / "relay")) as ex:
            tok = good_token(issuer)
            assert smtp_auth(ex.host, ex.port, "XOAUTH2", xoauth2(tok))[-1][0] == 235
            no_ir = smtp_auth(ex.host, ex.port, "XOAUTH2", None, continuation=xoauth2(tok))
            assert no_ir[-1][0] == 235
    finally:
        recorder.close()
    # One auth connection per AUTH command, each with its own handshake.
    assert len(recorder.connections) == 2
    lines = [bytes(c).decode().splitlines() for c in recorder.connections]
    for conn in lines:
        assert conn[0] == "VERSION\t1\t0"
        assert conn[1].startswith("CPID\t")
        auth = conn[2].split("\t")
        assert auth[:3] == ["AUTH", "1", "XOAUTH2"]
        # "secured" although the SMTP session is plaintext on loopback.
        assert {"service=smtp", "secured", "nologin", "rip=127.0.0.1", "lip=127.0.0.1"} <= set(auth)
        assert auth[-1].startswith("resp=")
    first, second = (conn[2].split("\t")[-1] for conn in lines)
    assert first == "resp=" + base64.b64encode(xoauth2(tok)).decode()
    assert second == "resp="  # no initial response: Exim sends it empty, Postfix leaves it out


def test_exim_says_435_when_the_socket_is_unreachable(exim_ready: None) -> None:
    workdir = make_shared_tmpdir()
    with EximInstance(str(workdir / "no-such-socket")) as ex:
        assert smtp_ehlo(ex.host, ex.port)["auth"].split() == ["OAUTHBEARER", "XOAUTH2"]
        for mech, ir in (("OAUTHBEARER", oauthbearer("t")), ("XOAUTH2", xoauth2("t"))):
            assert smtp_auth(ex.host, ex.port, mech, ir) == [
                (435, "Unable to authenticate at present")
            ]
        ex.wait_for_log(r"435 Unable to authenticate at present: unable to connect to UNIX socket")


def test_exim_says_435_on_tempfail_disconnect(exim_ready: None) -> None:
    """IdP down, ``tempfail = "disconnect"``: the daemon hangs up, Exim says 435 (Postfix: 454)."""
    with DevIssuerThread(DevIssuer()) as gone:
        issuer_url = gone.issuer
        tok = gone.mint(email=USER, audience="mail")
    daemon = start_daemon(issuer_url, tempfail="disconnect")
    try:
        with EximInstance(str(daemon.socket_path)) as ex:
            replies = smtp_auth(ex.host, ex.port, "OAUTHBEARER", oauthbearer(tok))
            assert replies == [(435, "Unable to authenticate at present")]
        event = daemon.event(tok)
        assert (event["outcome"], event["reason"]) == ("tempfail", "provider_unavailable")
    finally:
        assert daemon.stop() == 0


def test_exim_tempfail_without_disconnect_is_535(exim_ready: None) -> None:
    """With the default ``tempfail = "fail"`` Exim, like Postfix, reads FAIL as a refusal."""
    with DevIssuerThread(DevIssuer()) as gone:
        issuer_url = gone.issuer
        tok = gone.mint(email=USER, audience="mail")
    daemon = start_daemon(issuer_url)
    try:
        with EximInstance(str(daemon.socket_path)) as ex:
            replies = smtp_auth(ex.host, ex.port, "XOAUTH2", xoauth2(tok), continuation=b"")
            assert replies[-1] == (535, "Incorrect authentication data")
    finally:
        assert daemon.stop() == 0


def test_exim_records_the_account_as_authenticated_id(
    stack: tuple[Daemon, EximInstance], issuer: DevIssuer
) -> None:
    """``server_set_id = $auth1``: the account from OK user= is Exim's authenticated id."""
    _, ex = stack
    tok = good_token(issuer)
    with smtplib.SMTP(ex.host, ex.port, local_hostname="client.test.example", timeout=30) as s:
        s.ehlo()
        code, _ = s.docmd("AUTH", "XOAUTH2 " + base64.b64encode(xoauth2(tok)).decode())
        assert code == 235
        s.sendmail(USER, ["someone@example.net"], b"Subject: t\r\n\r\nhello\r\n")
    ex.wait_for_log(r"<= alice@example\.org .* A=xoauth2:alice@example\.org")


def test_exim_plain_needs_the_socket_to_offer_it(
    exim_ready: None, issuer: DevIssuer, stack: tuple[Daemon, EximInstance]
) -> None:
    """Exim advertises whatever authenticators it has; if the socket does not list PLAIN,
    Exim answers 435 (Postfix would not advertise PLAIN at all)."""
    daemon, _ = stack  # mechanisms: the default OAUTHBEARER, XOAUTH2
    tok = good_token(issuer)
    with EximInstance(str(daemon.socket_path), mechanisms=("PLAIN",)) as ex:
        assert "PLAIN" in smtp_ehlo(ex.host, ex.port)["auth"].split()
        replies = smtp_auth(ex.host, ex.port, "PLAIN", f"\0{USER}\0{tok}".encode())
        assert replies == [(435, "Unable to authenticate at present")]
        ex.wait_for_log(r"plain authenticator failed .* 435 ")


def test_exim_plain_and_login_when_opted_in(exim_ready: None, issuer: DevIssuer) -> None:
    workdir = make_shared_tmpdir()
    sock = workdir / "auth"
    config = workdir / "c.toml"
    write_config(config, sock, issuer.issuer)
    text = config.read_text().replace(
        "[server]\n", '[server]\nmechanisms = ["OAUTHBEARER", "XOAUTH2", "PLAIN", "LOGIN"]\n'
    )
    config.write_text(text)
    daemon = Daemon(config, sock, workdir / "daemon.log")
    try:
        with EximInstance(str(sock), mechanisms=("PLAIN", "LOGIN")) as ex:
            tok = good_token(issuer)
            assert smtp_auth(ex.host, ex.port, "PLAIN", f"\0{USER}\0{tok}".encode()) == [
                (235, "Authentication succeeded")
            ]
            login = [USER.encode(), tok.encode()]
            replies = smtp_auth(ex.host, ex.port, "LOGIN", None, continuation=login)
            assert [code for code, _ in replies] == [334, 334, 235], replies
            bad = good_token(issuer, audience="other")
            replies = smtp_auth(ex.host, ex.port, "PLAIN", f"\0{USER}\0{bad}".encode())
            assert replies == [(535, "Incorrect authentication data")]
            assert daemon.event(bad)["reason"] == "wrong_audience"
    finally:
        assert daemon.stop() == 0
