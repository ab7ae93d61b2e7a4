"""The daemon under ``systemd-socket-activate``: the sockets are systemd's, not ours.

``systemd-socket-activate`` listens on the auth and HTTP sockets (named
``auth`` and ``http`` with ``--fdname``) and starts ``saslauthd-oidc serve``
on the first connection, passing them as LISTEN_FDS — the way the .socket
unit in contrib/systemd/ does. The test is systemd's notification socket
(NOTIFY_SOCKET): it receives READY=1, RELOADING=1, STATUS= and STOPPING=1.

While two connections authenticate without pause, SIGHUP swaps in a config
with a new rule (which then works) and later a broken config (logged, and
ignored): not one authentication fails. SIGTERM ends the daemon with exit
status 0 and leaves systemd's socket file in place.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from saslauthd_oidc.tools.devissuer import JWKS_PATH, DevIssuerThread
from tests.conftest import require_peer
from tests.peers.dovecot_client import LineClient
from tests.support_issuer import FaultIssuer

pytestmark = pytest.mark.peer

USER = "alice@example.org"


def socket_activate_available() -> str | None:
    if shutil.which("systemd-socket-activate") is None:
        return "systemd-socket-activate is not installed (Debian: systemd)"
    return None


def config_text(issuer: str, sockdir: Path, *, second_rule: bool = False) -> str:
    text = f"""
[server]
auth_socket = "{sockdir}/auth"
http_socket = "{sockdir}/http"
request_timeout = 3.0

[http]
auth = "open"

[logging]
level = "info"
format = "json"

[[provider]]
name = "dev"
issuer = "{issuer}"
allow_http = true
algorithms = ["ES256"]
jwks_cooldown = 0

[[rule]]
name = "mail"
provider = "dev"
audiences = ["mail"]
"""
    if second_rule:
        text += """
[[rule]]
name = "calendar"
provider = "dev"
audiences = ["calendar"]
"""
    return text


@dataclass
class Notifications:
    """The NOTIFY_SOCKET end: every datagram the daemon sent, parsed."""

    sock: trio.socket.SocketType
    received: list[dict[str, str]] = field(default_factory=list)

    async def next(self) -> dict[str, str]:
        with trio.fail_after(20):
            data = await self.sock.recv(4096)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.received.append(fields)
        return fields

    async def until(self, key: str) -> dict[str, str]:
        while True:
            fields = await self.next()
            if key in fields:
                return fields


@dataclass
class Activated:
    proc: subprocess.Popen[bytes]
    sockdir: Path
    config: Path
    log_path: Path
    notify: Notifications
    issuer: FaultIssuer

    def log_events(self) -> list[dict[str, object]]:
        text = self.log_path.read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def issuer() -> Iterator[FaultIssuer]:
    require_peer("systemd-socket-activate", socket_activate_available())
    with DevIssuerThread(FaultIssuer(algorithms=("ES256",))) as iss:
        yield iss


@pytest.fixture
async def activated(tmp_path: Path, issuer: FaultIssuer) -> AsyncIterator[Activated]:
    sockdir = tmp_path / "run"
    sockdir.mkdir()
    config = tmp_path / "saslauthd-oidc.toml"
    assert issuer.issuer
    config.write_text(config_text(issuer.issuer, sockdir))
    notify_path = str(tmp_path / "notify")
    notify_sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify_sock.bind(notify_path)
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                "systemd-socket-activate",
                "-l",
                str(sockdir / "auth"),
                "-l",
                str(sockdir / "http"),
                "--fdname=auth:http",
                "-E",
                f"NOTIFY_SOCKET={notify_path}",
                sys.executable,
                "-m",
                "saslauthd_oidc",
                "serve",
                "--config",
                str(config),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        with trio.fail_after(20):
            while not (sockdir / "auth").exists():
                assert proc.poll() is None, log_path.read_text()
                await trio.sleep(0.02)
        yield Activated(proc, sockdir, config, log_path, Notifications(notify_sock), issuer)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify_sock.close()


def ob(token: str) -> str:
    return base64.b64encode(f"n,a={USER},\x01auth=Bearer {token}\x01\x01".encode()).decode()


async def authenticate(client: LineClient, rid: int, token: str) -> str:
    await client.send(f"AUTH\t{rid}\tOAUTHBEARER\tservice=smtp\tresp={ob(token)}")
    reply = await client.line()
    if reply.startswith(f"CONT\t{rid}\t"):  # a failure challenge: finish it
        await client.send(f"CONT\t{rid}\tAQ==")
        reply = await client.line()
    return reply


@dataclass
class Stream:
    """Authentications one after another on one connection, counted."""

    ok: int = 0
    failed: list[str] = field(default_factory=list)
    progress: trio.Event = field(default_factory=trio.Event)

    async def run(self, client: LineClient, issuer: FaultIssuer, stop: trio.Event) -> None:
        rid = 0
        while not stop.is_set():
            rid += 1
            reply = await authenticate(client, rid, issuer.mint(email=USER))
            if reply == f"OK\t{rid}\tuser={USER}":
                self.ok += 1
                self.progress.set()
            else:
                self.failed.append(reply)

    async def more(self, count: int) -> None:
        """Wait until ``count`` more authentications have succeeded."""
        target = self.ok + count
        while self.ok < target:
            self.progress = trio.Event()
            await self.progress.wait()


async def test_socket_activation_reload_and_stop(activated: Activated) -> None:
    d = activated
    # The first connection starts the daemon; it is answered once the daemon is up.
    first = LineClient(await trio.open_unix_socket(str(d.sockdir / "auth")), timeout=20)
    handshake = await first.handshake()
    assert any(line.startswith("MECH\tOAUTHBEARER") for line in handshake)
    ready = await d.notify.until("READY")
    assert ready["READY"] == "1" and "STATUS" in ready
    assert d.proc.poll() is None
    started = [e for e in d.log_events() if e.get("event") == "started"]
    assert started and started[0]["socket_activation"] == ["auth", "http"]

    # The passed HTTP socket serves too.
    transport = httpx.AsyncHTTPTransport(uds=str(d.sockdir / "http"))
    async with httpx.AsyncClient(transport=transport, base_url="http://daemon") as http:
        assert (await http.get("/healthz")).status_code == 200

    second = LineClient(await trio.open_unix_socket(str(d.sockdir / "auth")))
    await second.handshake()
    assert await authenticate(first, 1, d.issuer.mint(audience="calendar")) != f"OK\t1\tuser={USER}"

    streams = [Stream(), Stream()]
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(streams[0].run, first, d.issuer, stop)
        nursery.start_soon(streams[1].run, second, d.issuer, stop)
        await streams[0].more(20)

        # 1. A new rule: taken into service, connections kept.
        assert d.issuer.issuer
        d.config.write_text(config_text(d.issuer.issuer, d.sockdir, second_rule=True))
        d.proc.send_signal(signal.SIGHUP)
        assert (await d.notify.until("RELOADING"))["RELOADING"] == "1"
        await d.notify.until("READY")
        await streams[0].more(20)
        await streams[1].more(20)
        third = LineClient(await trio.open_unix_socket(str(d.sockdir / "auth")))
        await third.handshake()
        assert await authenticate(third, 1, d.issuer.mint(audience="calendar")) == (
            f"OK\t1\tuser={USER}"
        )

        # 2. A broken config: logged with its key, the running one stays.
        d.config.write_text(
            config_text(d.issuer.issuer, d.sockdir, second_rule=True).replace(
                'audiences = ["calendar"]', 'audiences = ["calendar"]\nusername = "no-placeholder"'
            )
        )
        d.proc.send_signal(signal.SIGHUP)
        await d.notify.until("RELOADING")
        after_broken = await d.notify.until("READY")
        assert "reload failed" in after_broken["STATUS"]
        await streams[0].more(20)
        await streams[1].more(20)
        assert await authenticate(third, 2, d.issuer.mint(audience="calendar")) == (
            f"OK\t2\tuser={USER}"
        )
        stop.set()

    assert streams[0].failed == [] and streams[1].failed == []
    events = d.log_events()
    failures = [e for e in events if e.get("event") == "reload_failed"]
    assert len(failures) == 1
    assert failures[0]["key"] == "rule[1].username"
    assert [e["rules"] for e in events if e.get("event") == "reloaded"] == [["mail", "calendar"]]
    # The provider's keys survived the reload: fetched once, at start.
    assert len([e for e in events if e.get("event") == "jwks loaded"]) == 1

    # 3. SIGTERM while an authentication waits for the issuer (a new key, slow JWKS):
    # that one is still answered; a request sent after SIGTERM is not (its
    # connection closes: Postfix says 454, not 535); STOPPING=1; exit status 0.
    d.issuer.add_key("ES256")
    d.issuer.delay = 1.0
    fetches = d.issuer.requests[JWKS_PATH]
    await first.send(f"AUTH\t9001\tOAUTHBEARER\tservice=smtp\tresp={ob(d.issuer.mint(email=USER))}")
    with trio.fail_after(10):
        while d.issuer.requests[JWKS_PATH] == fetches:
            await trio.sleep(0.01)
    d.proc.send_signal(signal.SIGTERM)
    assert (await d.notify.until("STOPPING"))["STOPPING"] == "1"
    await second.send(f"AUTH\t9002\tOAUTHBEARER\tservice=smtp\tresp={ob(d.issuer.mint())}")
    assert await first.line() == f"OK\t9001\tuser={USER}"
    with pytest.raises(AssertionError, match="closed the connection"):
        await second.line()
    status = await trio.to_thread.run_sync(d.proc.wait, 20)
    assert status == 0, d.log_path.read_text()
    assert (d.sockdir / "auth").exists()
    assert "stopped" in [e.get("event") for e in d.log_events()]
    assert not any("eyJ" in line for line in d.log_path.read_text().splitlines())


async def test_wrong_kind_of_passed_socket_is_a_config_error(tmp_path: Path) -> None:
    require_peer("systemd-socket-activate", socket_activate_available())
    config = tmp_path / "c.toml"
    config.write_text(config_text("http://127.0.0.1:1", tmp_path))
    dgram = tmp_path / "dgram"
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "--datagram",
            "-l",
            str(dgram),
            "--fdname=auth",
            sys.executable,
            "-m",
            "saslauthd_oidc",
            "serve",
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(20):
            while not dgram.exists():
                await trio.sleep(0.02)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"hello", str(dgram))  # a datagram socket starts its service on data
        out, _ = await trio.to_thread.run_sync(proc.communicate, None, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2
    assert b"config error: server.auth_socket: systemd passed 'auth' (fd 3) as AF_UNIX" in out
