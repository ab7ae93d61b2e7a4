"""Rules with ``domains`` for IMAP logins through a real Dovecot 2.3.

Dovecot's ``passdb oauth2`` calls ``/introspect`` without the SASL user.
The first test records, with a listener of its own in place of the daemon,
exactly what Dovecot 2.3 sends with the README recipe (``send_auth_headers =
yes``): the evidence for what the daemon can use. The others run the daemon
(``saslauthd-oidc serve``) behind the same Dovecot with one rule per mail
domain: the domain is judged on the account the rule maps the token to,
which Dovecot then compares with the login name (``username_attribute``).
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs

import pytest

from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread
from tests.peers.daemon import Daemon
from tests.peers.dovecot import (
    CALLER,
    CALLER_SECRET,
    DovecotInstance,
    behind_dovecot,
    fresh_source_address,
    imap_authenticate,
)

pytestmark = pytest.mark.peer


@pytest.fixture(scope="module")
def issuer() -> Iterator[DevIssuer]:
    with DevIssuerThread(DevIssuer(algorithms=("ES256",))) as iss:
        yield iss


class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length).decode()
        self.seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
        answer = b'{"active":false}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_what_dovecot_23_sends_to_introspect(dovecot_ready: None, issuer: DevIssuer) -> None:
    """The X-Dovecot-Auth-* headers carry service, local and remote address — not the user."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Recorder.seen.clear()
    port = server.server_address[1]
    user = "alice@example.org"
    token = issuer.mint(email=user, audience="mail")
    try:
        url = f"http://{CALLER}:{CALLER_SECRET}@127.0.0.1:{port}/introspect"
        with DovecotInstance(url) as dc:
            source = fresh_source_address()
            typ, _ = imap_authenticate(dc.host, dc.port, "XOAUTH2", user, token, source=source)
            imap_port = dc.port
    finally:
        server.shutdown()
        server.server_close()
    assert typ == "NO"
    (request,) = _Recorder.seen
    headers = {k.lower(): v for k, v in request["headers"].items()}
    dovecot = {k: v for k, v in headers.items() if k.startswith("x-dovecot-")}
    assert dovecot.pop("x-dovecot-auth-service") == "imap"
    assert dovecot.pop("x-dovecot-auth-local") == f"127.0.0.1:{imap_port}"
    assert dovecot.pop("x-dovecot-auth-remote").startswith(f"{source}:")
    assert dovecot == {}  # nothing else: no user, no TLS flag, no local name
    basic = base64.b64decode(headers["authorization"].removeprefix("Basic ")).decode()
    assert basic == f"{CALLER}:{CALLER_SECRET}"
    form = parse_qs(request["body"], keep_blank_values=True)
    assert form["token"] == [token]
    assert set(form) <= {"token", "client_id", "client_secret"}
    # The SASL user is nowhere in the request: only the token names the account.
    everything = json.dumps(request).lower()
    assert "alice" not in everything.replace(token.lower(), "")


def providers_and_rules(issuer: str) -> str:
    return f"""
[[provider]]
name = "dev"
issuer = "{issuer}"
allow_http = true
token_types = ["at+jwt"]

# The README's Authentik shape: one rule per mail domain.
[[rule]]
name = "example-org"
provider = "dev"
audiences = ["mail"]
domains = ["example.org"]
username = "{{email}}"

[[rule]]
name = "example-net"
provider = "dev"
audiences = ["mail"]
domains = ["example.net"]
username = "{{email}}"
"""


@pytest.fixture(scope="module")
def stack(dovecot_ready: None, issuer: DevIssuer) -> Iterator[tuple[Daemon, DovecotInstance]]:
    with behind_dovecot(providers_and_rules(issuer.issuer or "")) as stack:
        yield stack


@pytest.mark.parametrize("mech", ["XOAUTH2", "OAUTHBEARER"])
def test_rule_with_domains_serves_imap(
    stack: tuple[Daemon, DovecotInstance], issuer: DevIssuer, mech: str
) -> None:
    daemon, dc = stack
    token = issuer.mint(email="alice@example.org", audience="mail")
    typ, text = imap_authenticate(dc.host, dc.port, mech, "alice@example.org", token)
    assert typ == "OK", (typ, text, daemon.log()[-2000:])
    event = daemon.event(token)
    assert (event["rule"], event["account"]) == ("example-org", "alice@example.org")


def test_the_rule_of_the_accounts_domain_is_chosen(
    stack: tuple[Daemon, DovecotInstance], issuer: DevIssuer
) -> None:
    """The first rule maps the token outside its domain; the second rule's domain fits."""
    daemon, dc = stack
    token = issuer.mint(email="bob@example.net", audience="mail")
    typ, text = imap_authenticate(dc.host, dc.port, "XOAUTH2", "bob@example.net", token)
    assert typ == "OK", (typ, text, daemon.log()[-2000:])
    event = daemon.event(token)
    assert (event["rule"], event["account"]) == ("example-net", "bob@example.net")


def test_an_account_in_no_rules_domain_is_refused(
    stack: tuple[Daemon, DovecotInstance], issuer: DevIssuer
) -> None:
    daemon, dc = stack
    token = issuer.mint(email="carol@example.com", audience="mail")
    typ, text = imap_authenticate(dc.host, dc.port, "XOAUTH2", "carol@example.com", token)
    assert typ == "NO"
    assert "AUTHENTICATIONFAILED" in text
    event = daemon.event(token)
    assert event["outcome"] == "fail"
    assert event["reason"] == "no_rule_for_context"
