"""`server.workers = N`: N workers forked on one socket; the dead restarted; SIGTERM stops all."""

from __future__ import annotations

import base64
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from saslauthd_oidc.service.workers import BalancedListener, LoadTable, _describe
from saslauthd_oidc.tools.devissuer import DevIssuer
from tests.support import accepts, start, wait_for


def children(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    return {int(x) for x in text.split()}


def authenticate(path: Path, token: str) -> tuple[int, str]:
    """One AUTH on a fresh connection: (the server's SPID, its reply line)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        buf = b""
        while b"DONE\n" not in buf:
            buf += s.recv(4096)
        spid = next(
            int(x.split("\t")[1]) for x in buf.decode().splitlines() if x.startswith("SPID")
        )
        ir = base64.b64encode(f"user=alice@example.org\x01auth=Bearer {token}\x01\x01".encode())
        s.sendall(b"VERSION\t1\t2\nCPID\t1\nAUTH\t1\tXOAUTH2\tservice=smtp\tresp=" + ir + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            reply += s.recv(4096)
        return spid, reply.decode().strip()


def test_workers_share_the_socket_restart_and_stop(issuer: DevIssuer, workdir: Path) -> None:
    proc, sock = start(workdir, issuer, 2)
    try:
        wait_for(lambda: len(children(proc.pid)) == 2 and sock.exists())
        workers = children(proc.pid)
        token = issuer.mint()
        spids = set()
        for _ in range(20):
            spid, reply = authenticate(sock, token)
            assert reply == "OK\t1\tuser=alice@example.org"
            spids.add(spid)
        assert spids <= workers  # every connection was served by a worker

        # Connections held open at once spread evenly over the workers.
        held = [socket.socket(socket.AF_UNIX) for _ in range(8)]
        try:
            per_worker: dict[int, int] = {}
            for s in held:
                s.settimeout(10)
                s.connect(str(sock))
                buf = b""
                while b"DONE\n" not in buf:
                    buf += s.recv(4096)
                spid = int(buf.split(b"SPID\t")[1].split(b"\n")[0])
                per_worker[spid] = per_worker.get(spid, 0) + 1
                time.sleep(0.01)
            assert sorted(per_worker.values()) == [4, 4], per_worker
        finally:
            for s in held:
                s.close()

        victim = next(iter(workers))
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(children(proc.pid)) == 2 and victim not in children(proc.pid))
        assert authenticate(sock, issuer.mint())[1].startswith("OK\t1\t")
        log = (workdir / "log").read_text()
        assert "worker_died" in log and "SIGKILL" in log

        current = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        for pid in current:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_one_worker_runs_in_process(issuer: DevIssuer, workdir: Path) -> None:
    proc, sock = start(workdir, issuer, 1)
    try:
        wait_for(sock.exists)
        wait_for(lambda: accepts(sock))
        spid, reply = authenticate(sock, issuer.mint())
        assert spid == proc.pid and reply.startswith("OK\t1\t")
        assert children(proc.pid) == set()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_describe_status() -> None:
    assert _describe(9) == "killed by SIGKILL"
    assert _describe(3 << 8) == "exit 3"


def test_load_table() -> None:
    table = LoadTable(3)
    table.alive[0] = table.alive[1] = 1
    table.connections[0] = 2
    table.connections[1] = 1
    table.connections[2] = 0  # dead: does not count
    assert table.busier_than_a_sibling(0)
    assert not table.busier_than_a_sibling(1)
    table.alive[1] = 0
    assert not table.busier_than_a_sibling(0)


async def test_busier_listener_leaves_the_connection_to_its_sibling(workdir: Path) -> None:
    path = str(workdir / "s")
    raw = socket.socket(socket.AF_UNIX)
    raw.bind(path)
    raw.listen(8)
    table = LoadTable(2)
    table.alive[0] = table.alive[1] = 1
    table.connections[0] = 3
    twin = raw.dup()  # as a forked worker has it: another fd, the same socket
    busy, idle = BalancedListener(raw, table, 0), BalancedListener(twin, table, 1)
    winners: list[int] = []

    async def take(slot: int, listener: BalancedListener) -> None:
        stream = await listener.accept()
        winners.append(slot)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, 0, busy)
        nursery.start_soon(take, 1, idle)
        await trio.testing.wait_all_tasks_blocked()
        client = await trio.open_unix_socket(path)
        while not winners:
            await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    await client.aclose()
    raw.close()
    twin.close()
    assert winners == [1]
    assert table.connections[1] == 0  # counted on accept, released on close
    assert table.connections[0] == 3


def test_workers_refuse_sockets_they_cannot_share_yet(tmp_path: Path) -> None:
    from saslauthd_oidc.config import ConfigError, parse_config
    from saslauthd_oidc.service.workers import serve_workers

    base = {
        "provider": [{"name": "p", "issuer": "https://idp.example"}],
        "rule": [{"name": "r", "provider": "p", "audiences": ["mail"]}],
    }
    for server in (
        {"workers": 2, "auth_socket": str(tmp_path / "a"), "http_socket": str(tmp_path / "h")},
        {"workers": 2, "auth_socket": str(tmp_path / "a"), "saslauthd_socket": "/tmp/x"},
        {"workers": 2, "auth_socket": ""},
    ):
        with pytest.raises(ConfigError) as info:
            serve_workers(parse_config({**base, "server": server, "http": {"auth": "open"}}))
        assert info.value.key == "server.workers"
    assert not (tmp_path / "a").exists()
