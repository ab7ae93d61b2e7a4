"""Stopping: SIGTERM while requests wait on a slow IdP; every client gets its reply.

The daemon's stop waits (bounded by ``request_timeout`` and its margin) until
every request in flight is decided and its reply written, as the frontends
report it; it needs no testing helper for that.
"""

from __future__ import annotations

import ast
import base64
import os
import signal
import socket
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

import saslauthd_oidc
from saslauthd_oidc.config import parse_config
from saslauthd_oidc.service.daemon import FRONTEND_DEADLINE_MARGIN, run_daemon
from saslauthd_oidc.tools.devissuer import DevIssuer
from tests.peers.dovecot_client import LineClient
from tests.support import oauthbearer

USER = "alice@example.org"
FORM = {"content-type": "application/x-www-form-urlencoded"}
REQUEST_TIMEOUT = 4.0
IDP_DELAY = 1.0  # per IdP answer: discovery, then the keys


class SlowIssuer(DevIssuer):
    """The development issuer, answering each HTTP request after ``IDP_DELAY`` seconds."""

    def __init__(self) -> None:
        super().__init__(algorithms=("ES256",))
        self.asked = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.asked += 1
            await trio.sleep(IDP_DELAY)
        await super().__call__(scope, receive, send)


def counted(*fields: str) -> bytes:
    return b"".join(struct.pack("!H", len(f.encode())) + f.encode() for f in fields)


async def saslauthd_reply(stream: trio.SocketStream) -> bytes:
    data = b""
    while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data[2:]


async def start_daemon(
    nursery: trio.Nursery, issuer: DevIssuer, server: dict[str, Any]
) -> trio.Event:
    """The daemon (signals handled) on ``server``'s sockets; the event is set once it returned."""
    config = parse_config(
        {
            "server": {**server, "request_timeout": REQUEST_TIMEOUT},
            "http": {"auth": "open"},
            "provider": [{"name": "dev", "issuer": issuer.issuer, "allow_http": True}],
            "rule": [
                {"name": "mail", "provider": "dev", "audiences": ["mail"], "username": "{email}"}
            ],
        }
    )
    stopped = trio.Event()

    async def daemon(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await run_daemon(config, task_status=task_status, handle_signals=True)
        stopped.set()

    await nursery.start(daemon)
    return stopped


@pytest.mark.parametrize("dovecot_clients", [1, 4])
async def test_sigterm_with_requests_in_flight_answers_them_all_then_exits(
    nursery: trio.Nursery, dovecot_clients: int
) -> None:
    issuer = SlowIssuer()  # the keys are not there when the requests arrive
    await nursery.start(issuer.serve)
    assert issuer.issuer
    directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"sd{os.getpid()}-{dovecot_clients}"
    directory.mkdir(exist_ok=True)
    auth, sasl, http = (str(directory / name) for name in ("auth", "sasl", "http"))
    stopped = await start_daemon(
        nursery, issuer, {"auth_socket": auth, "saslauthd_socket": sasl, "http_socket": http}
    )
    token = issuer.mint({"aud": "mail", "email": USER})
    resp = base64.b64encode(oauthbearer(token, USER)).decode()
    clients = []
    for _ in range(dovecot_clients):
        client = LineClient(await trio.open_unix_socket(auth))
        await client.handshake()
        await client.send(f"AUTH\t1\tOAUTHBEARER\tservice=smtp\tresp={resp}")
        clients.append(client)
    cyrus = await trio.open_unix_socket(sasl)
    await cyrus.send_all(counted(USER, token, "imap", ""))
    introspected: list[httpx.Response] = []

    async def introspect() -> None:
        transport = httpx.AsyncHTTPTransport(uds=http)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as web:
            introspected.append(
                await web.post("/introspect", content=f"token={token}".encode(), headers=FORM)
            )

    nursery.start_soon(introspect)
    await trio.testing.wait_all_tasks_blocked()  # every request waits on the IdP
    assert issuer.asked  # the first fetch is under way, not answered yet

    os.kill(os.getpid(), signal.SIGTERM)
    with trio.fail_after(REQUEST_TIMEOUT + FRONTEND_DEADLINE_MARGIN + 1):
        for client in clients:
            assert await client.line() == f"OK\t1\tuser={USER}"
        assert await saslauthd_reply(cyrus) == b"OK ok"
        await stopped.wait()
    [response] = introspected
    assert response.status_code == 200 and response.json()["active"] is True
    for client in clients:  # and then the connection closes
        assert client.buffer == b"" and await client.stream.receive_some(4096) == b""
    for path in (auth, sasl, http):
        Path(path).unlink(missing_ok=True)
    directory.rmdir()


async def test_sigterm_waits_for_a_reply_the_client_has_not_taken_yet(
    nursery: trio.Nursery, socket_path: str
) -> None:
    """A verdict decided while the client's socket is full is owed until the client reads it."""
    issuer = SlowIssuer()  # the keys are not there when the requests arrive
    await nursery.start(issuer.serve)
    assert issuer.issuer
    stopped = await start_daemon(nursery, issuer, {"auth_socket": socket_path})
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(socket_path)
    raw.setblocking(False)
    client = LineClient(trio.SocketStream(trio.socket.from_stdlib_socket(raw)))
    await client.handshake()
    resp = base64.b64encode(oauthbearer(issuer.mint({"aud": "mail", "email": USER}), USER))
    await client.send(f"AUTH\t1\tOAUTHBEARER\tservice=smtp\tresp={resp.decode()}")
    await trio.testing.wait_all_tasks_blocked()
    # Requests refused at once, their replies never read, till the daemon's sends block
    # and it stops reading from us.
    rid, unsent = 2, b""
    while True:
        if not unsent:
            unsent = "".join(
                f"AUTH\t{r}\tNOPE\tservice=smtp\n" for r in range(rid, rid + 100)
            ).encode()
            rid += 100
        try:
            unsent = unsent[raw.send(unsent) :]
            continue
        except BlockingIOError:
            await trio.testing.wait_all_tasks_blocked()
        try:
            unsent = unsent[raw.send(unsent) :]
        except BlockingIOError:
            break

    os.kill(os.getpid(), signal.SIGTERM)
    # The slow IdP answers meanwhile and request 1 is decided; its reply waits behind
    # those we did not read.
    await trio.sleep(2 * IDP_DELAY + 0.5)
    assert not stopped.is_set()
    with trio.fail_after(REQUEST_TIMEOUT + FRONTEND_DEADLINE_MARGIN + 1):
        while (line := await client.line()).startswith("FAIL"):
            pass
        assert line == f"OK\t1\tuser={USER}"
        await stopped.wait()
    raw.close()


def test_the_package_never_imports_trio_testing() -> None:
    """A helper for tests only (it pulls in pytest when installed): never the daemon's."""
    root = Path(saslauthd_oidc.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            if any(n == "trio.testing" or n.startswith("trio.testing.") for n in names):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found == []
    assert "trio.testing" not in (root / "service" / "daemon.py").read_text()
