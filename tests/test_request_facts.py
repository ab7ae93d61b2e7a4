"""check-config names rule conditions that a frontend's requests can never satisfy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from saslauthd_oidc.config import parse_config
from saslauthd_oidc.core.request import unreachable_condition_warnings

PROVIDER = {"name": "idp", "issuer": "https://idp.example.org"}


def warnings(server: dict[str, Any], http: dict[str, Any], *rules: dict[str, Any]) -> list[str]:
    cfg = parse_config(
        {
            "server": server,
            "http": http,
            "provider": [PROVIDER],
            "rule": [{"provider": "idp", "audiences": ["mail"], **r} for r in rules],
        }
    )
    return unreachable_condition_warnings(cfg)


HTTP = {"http_listen": "127.0.0.1:8480"}
OPEN = {"auth": "open"}


def test_each_frontend_names_what_its_callers_never_send() -> None:
    (stalwart,) = warnings(
        HTTP,
        {**OPEN, "stalwart_issuer": "http://127.0.0.1:8480/stalwart"},
        {"name": "smtp587", "ports": [587]},
    )
    assert stalwart.startswith("rule[0] (smtp587) never serves Stalwart: ports (no port)")
    (dovecot,) = warnings(HTTP, OPEN, {"name": "named", "hosts": ["mail.example.org"]})
    assert "Dovecot's /introspect: hosts (no host name)" in dovecot
    (cyrus,) = warnings(
        {"saslauthd_socket": "/run/x/mux"}, {}, {"name": "tls", "require_secured": True}
    )
    assert "the saslauthd socket (Cyrus SASL): require_secured (no TLS flag)" in cyrus


def test_nothing_to_say_when_the_frontend_is_off_or_excluded() -> None:
    assert warnings({}, {}, {"name": "r", "hosts": ["h"], "ports": [587]}) == []
    # Dovecot sends service, ports (X-Dovecot-Auth-Local) and the client address.
    assert warnings(HTTP, OPEN, {"name": "r", "services": ["imap"], "ports": [143]}) == []
    # domains work everywhere: without a user, they are judged on the account.
    assert warnings(HTTP, OPEN, {"name": "r", "domains": ["example.org"]}) == []
    kept_off = {"name": "r", "hosts": ["h"], "mechanisms": ["OAUTHBEARER", "XOAUTH2"]}
    assert warnings(HTTP, OPEN, kept_off) == []


def test_check_config_prints_it(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        """
[server]
auth_socket = ""
http_listen = "127.0.0.1:8480"
[http]
auth = "open"
[[provider]]
name = "idp"
issuer = "https://idp.example.org"
[[rule]]
name = "submission"
provider = "idp"
audiences = ["mail"]
hosts = ["mail.example.org"]
"""
    )
    r = subprocess.run(
        [sys.executable, "-m", "saslauthd_oidc", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "rule[0] (submission) never serves Dovecot's /introspect" in r.stdout + r.stderr
