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
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from saslauthd_oidc.devissuer import DevIssuer, DevIssuerThread
from saslauthd_oidc.request import token_fingerprint
from tests.idp_shapes import kanidm, keycloak, localize_example
from tests.peers.postfix import PostfixInstance, make_shared_tmpdir, smtp_auth

pytestmark = pytest.mark.peer

EXAMPLE = (
    Path(__file__).resolve().parent.parent / "etc" / "examples" / "kanidm-several-clients.toml"
)

# The README's Postfix recipe (smtpd_sasl_path is set by PostfixInstance).
MAIN_CF = {
    "smtpd_sasl_auth_enable": "yes",
    "smtpd_sasl_type": "dovecot",
    "smtpd_sasl_security_options": "noanonymous",
}


class Daemon:
    """``saslauthd-oidc serve`` in a subprocess; stopped with SIGTERM."""

    def __init__(self, config: Path, socket_path: Path, log_path: Path) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "saslauthd_oidc", "serve", "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not self._accepting():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"daemon did not start:\n{self.log()}")
            time.sleep(0.05)

    def _accepting(self) -> bool:
        if not self.socket_path.exists():
            return False
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def event(self, token: str) -> dict[str, object]:
        """The one "authentication" log line for ``token`` (waits for the write)."""
        fp = token_fingerprint(token)
        deadline = time.monotonic() + 5
        while True:
            lines: list[dict[str, object]] = [
                json.loads(x) for x in self.log().splitlines() if x.startswith("{")
            ]
            mine = [e for e in lines if e.get("event") == "authentication" and e["token"] == fp]
            if mine or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(mine) == 1, self.log()
        return mine[0]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


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
