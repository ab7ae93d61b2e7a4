"""The Postfix harness against a real Postfix, with a tiny fake Dovecot auth server.

This proves tests/peers/postfix.py (start, AUTH via smtplib and curl, log,
stop); the daemon's own Postfix tests use the same harness.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_peer
from tests.peers.postfix import (
    PostfixInstance,
    curl_available,
    curl_smtp_auth,
    make_shared_tmpdir,
    smtp_auth,
    smtp_ehlo,
)

pytestmark = pytest.mark.peer

GOOD = "good-token-0123456789"
BAD = "bad-token-9876543210"
USER = "alice@example.org"
CHALLENGE = base64.b64encode(json.dumps({"status": "invalid_token"}).encode()).decode()


class FakeAuthServer:
    """Dovecot auth-client protocol, server side, just enough for Postfix.

    A response containing b"good" succeeds; anything else gets the RFC 7628
    JSON challenge and FAIL after the client's next CONT.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o666)  # smtpd connects as user postfix
        self._sock.listen(16)
        self._stopping = False
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            f.write(
                b"VERSION\t1\t2\nMECH\tOAUTHBEARER\tplaintext\nMECH\tXOAUTH2\tplaintext\n"
                b"SPID\t1\nCUID\t1\nCOOKIE\t" + os.urandom(16).hex().encode() + b"\nDONE\n"
            )
            f.flush()
            waiting: dict[str, str] = {}  # id -> "response" | "ack"
            for raw in f:
                line = raw.decode().rstrip("\n")
                self.received.append(line)
                verb, _, rest = line.partition("\t")
                if verb == "AUTH":
                    rid, params = rest.split("\t")[0], rest.split("\t")[2:]
                    resp = next((p[5:] for p in params if p.startswith("resp=")), None)
                    if resp is None:
                        waiting[rid] = "response"
                        reply = f"CONT\t{rid}\t"
                    else:
                        reply = self._judge(rid, resp, waiting)
                elif verb == "CONT":
                    rid, _, data = rest.partition("\t")
                    state = waiting.pop(rid, None)
                    if state == "response":
                        reply = self._judge(rid, data, waiting)
                    else:
                        reply = f"FAIL\t{rid}\tuser={USER}"
                else:
                    continue
                f.write(reply.encode() + b"\n")
                f.flush()

    @staticmethod
    def _judge(rid: str, b64: str, waiting: dict[str, str]) -> str:
        if b"good" in base64.b64decode(b64 + "==="):
            return f"OK\t{rid}\tuser={USER}"
        waiting[rid] = "ack"
        return f"CONT\t{rid}\t{CHALLENGE}"

    def close(self) -> None:
        self._stopping = True
        self._sock.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def postfix(postfix_ready: None) -> Iterator[PostfixInstance]:
    sock_dir = make_shared_tmpdir()
    server = FakeAuthServer(sock_dir / "auth-client")
    try:
        with PostfixInstance(str(server.path)) as pf:
            pf.fake = server  # type: ignore[attr-defined]
            yield pf
    finally:
        server.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def oauthbearer(token: str) -> bytes:
    return f"n,a={USER},\x01auth=Bearer {token}\x01\x01".encode()


def xoauth2(token: str) -> bytes:
    return f"user={USER}\x01auth=Bearer {token}\x01\x01".encode()


def test_ehlo_advertises_the_auth_servers_mechanisms(postfix: PostfixInstance) -> None:
    assert smtp_ehlo(postfix.host, postfix.port)["auth"] == "OAUTHBEARER XOAUTH2"
    # Postfix's side of the handshake, as the reference describes it.
    assert "VERSION\t1\t0" in postfix.fake.received  # type: ignore[attr-defined]


@pytest.mark.parametrize("mech", ["OAUTHBEARER", "XOAUTH2"])
def test_good_initial_response_is_235(postfix: PostfixInstance, mech: str) -> None:
    ir = oauthbearer(GOOD) if mech == "OAUTHBEARER" else xoauth2(GOOD)
    replies = smtp_auth(postfix.host, postfix.port, mech, ir)
    assert [code for code, _ in replies] == [235]


def test_bad_token_gets_challenge_then_535(postfix: PostfixInstance) -> None:
    replies = smtp_auth(
        postfix.host, postfix.port, "OAUTHBEARER", oauthbearer(BAD), continuation=b"\x01"
    )
    assert replies[0] == (334, CHALLENGE)
    assert replies[1][0] == 535
    # debug_peer_list logs the auth server's replies (TABs shown as "?").
    postfix.wait_for_log(r"auth reply: FAIL\?\d+\?user=")
    assert any(
        re.fullmatch(rf"CONT\?\d+\?{re.escape(CHALLENGE)}", r) for r in postfix.auth_replies()
    )


def test_token_via_334_continuation(postfix: PostfixInstance) -> None:
    # Tokens too long for line_length_limit (2048) travel this way.
    replies = smtp_auth(
        postfix.host, postfix.port, "XOAUTH2", None, continuation=xoauth2(GOOD + "x" * 3000)
    )
    assert [code for code, _ in replies] == [334, 235]
    assert replies[0][1] == ""


def test_unanswered_challenge_is_cancelled(postfix: PostfixInstance) -> None:
    replies = smtp_auth(postfix.host, postfix.port, "OAUTHBEARER", oauthbearer(BAD))
    assert [code for code, _ in replies] == [334, 501]


@pytest.mark.parametrize("mech", ["OAUTHBEARER", "XOAUTH2"])
@pytest.mark.parametrize("good", [True, False], ids=["good", "bad"])
def test_curl(postfix: PostfixInstance, mech: str, good: bool) -> None:
    require_peer("curl", curl_available())
    rc, verbose = curl_smtp_auth(postfix.host, postfix.port, USER, GOOD if good else BAD, mech)
    if good:
        assert rc == 0, verbose
        assert "< 235 " in verbose
    else:
        assert rc != 0
        assert "< 535 " in verbose


def test_stop_leaves_nothing_running(postfix_ready: None, shared_tmp_path: Path) -> None:
    server = FakeAuthServer(shared_tmp_path / "auth-client")
    try:
        with PostfixInstance(str(server.path)) as pf:
            directory, port = pf.directory, pf.port
            assert directory is not None
            pids = (directory / "spool" / "pid" / "master.pid").read_text().split()
            master = int(pids[0])
            assert smtp_ehlo(pf.host, pf.port)["auth"] == "OAUTHBEARER XOAUTH2"
        assert not directory.exists()
        with pytest.raises(ProcessLookupError):
            os.kill(master, 0)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        server.close()
