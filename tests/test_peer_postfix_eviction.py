"""A real Postfix whose idle auth connection is closed to make room at the cap.

At ``server.max_connections`` the daemon closes the longest-idle connection
of the peer holding the most (frontends/accept.py). Postfix's smtpd keeps
one auth connection open between sessions; this checks that when that idle
connection is closed under it, the next SMTP AUTH still succeeds (smtpd's
write fails and it reconnects), and that the other local client that took
the slot loses it in turn when Postfix comes back: the cap never locks
Postfix out.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread
from tests.peers.daemon import README_MAIN_CF, Daemon
from tests.peers.postfix import PostfixInstance, smtp_auth

pytestmark = pytest.mark.peer

USER = "alice@example.org"


def xoauth2(token: str) -> bytes:
    return f"user={USER}\x01auth=Bearer {token}\x01\x01".encode()


def _events(daemon: Daemon, name: str) -> list[dict[str, object]]:
    return [
        json.loads(line)
        for line in daemon.log().splitlines()
        if line.startswith("{") and json.loads(line).get("event") == name
    ]


def _wait_for(daemon: Daemon, name: str, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 10
    while len(found := _events(daemon, name)) < count:
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        time.sleep(0.05)
    return found


def test_postfix_comes_back_after_its_idle_auth_connection_was_closed(
    postfix_ready: None, shared_tmp_path: Path
) -> None:
    with DevIssuerThread(DevIssuer()) as issuer:
        sock = shared_tmp_path / "auth"
        config = shared_tmp_path / "c.toml"
        config.write_text(
            f'[server]\nauth_socket = "{sock}"\nauth_socket_mode = "0666"\n'
            "max_connections = 1\n"
            '[logging]\nlevel = "info"\nformat = "json"\n'
            f'[[provider]]\nname = "dev"\nissuer = "{issuer.issuer}"\nallow_http = true\n'
            '[[rule]]\nname = "mail"\nprovider = "dev"\naudiences = ["mail"]\n'
            'username = "{email}"\n'
        )
        daemon = Daemon(config, sock, shared_tmp_path / "daemon.log")
        try:
            with PostfixInstance(str(sock), extra_main_cf=README_MAIN_CF) as pf:
                first = smtp_auth(pf.host, pf.port, "XOAUTH2", xoauth2(issuer.mint(email=USER)))
                assert first[-1][0] == 235, first
                # smtpd now holds the one auth slot, idle. Another local client connects:
                # it is served, and Postfix's idle connection is closed for it.
                with socket.socket(socket.AF_UNIX) as other:
                    other.settimeout(10)
                    other.connect(str(sock))
                    got = b""
                    while b"DONE\n" not in got:
                        chunk = other.recv(65536)
                        assert chunk, daemon.log()[-3000:]
                        got += chunk
                    limit = _wait_for(daemon, "connection_limit", 1)
                    assert limit[0]["max_connections"] == 1
                    # Postfix's next session authenticates all the same.
                    token = issuer.mint(email=USER)
                    again = smtp_auth(pf.host, pf.port, "XOAUTH2", xoauth2(token))
                    assert again[-1][0] == 235, (again, pf.maillog()[-3000:])
                    assert daemon.event(token)["outcome"] == "ok"
                    # ...and the other client gave its slot back to Postfix.
                    other.settimeout(10)
                    assert other.recv(65536) == b""
                # smtpd connected again (observed: the same smtpd process, on its next AUTH)
                assert pf.maillog().count("xsasl_dovecot_server_connect: Connecting") >= 2
        finally:
            assert daemon.stop() == 0, daemon.log()
