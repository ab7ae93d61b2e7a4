"""A cheap load generator for Dovecot auth-client servers (ours or Dovecot's ``auth``).

N connections, each doing sequential AUTHs like Postfix's smtpd (one request
in flight per connection, the next sent as soon as the reply arrives). Request
lines are pre-built before the clock starts, and the event loop is a bare
``selectors``/epoll loop, so the client spends a few microseconds per request;
``--procs`` spreads the connections over several client processes when one is
not enough. It reports auths/s, latency percentiles, the server's CPU time per
authentication (``utime + stime`` of the server's whole process tree from
``/proc/<pid>/stat``) and the client's own CPU per authentication, so a
client-bound run shows itself.

Usage::

    python -m bench.loadgen --socket /run/x/auth --tokens tokens.txt \\
        --connections 8 --requests 5000 --server-pid 1234 [--repeat] [--procs 2]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import multiprocessing as mp
import os
import selectors
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
HANDSHAKE_DONE = b"\nDONE\n"


def auth_suffix(token: str, user: str, mech: str = "XOAUTH2") -> bytes:
    """Everything after ``AUTH\\t<id>`` for one token, as Postfix would send it."""
    if mech == "XOAUTH2":
        payload = f"user={user}\x01auth=Bearer {token}\x01\x01"
    else:
        payload = f"n,a={user},\x01auth=Bearer {token}\x01\x01"
    resp = base64.b64encode(payload.encode()).decode()
    return (
        f"\t{mech}\tservice=smtp\tnologin\tlip=127.0.0.1\trip=127.0.0.1\tsecured\tresp={resp}\n"
    ).encode()


# --------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_ticks(pids: Sequence[int]) -> dict[int, int]:
    """utime + stime in clock ticks per pid (pids that vanished are left out)."""
    ticks = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


def busy_cpu_seconds() -> float:
    """CPU time all cores spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def tree_cpu_seconds(before: dict[int, int], after: dict[int, int]) -> float:
    return sum(after[p] - before.get(p, 0) for p in after) / CLK_TCK


def rss_kib(pids: Sequence[int]) -> int:
    """Sum of VmRSS over ``pids`` in KiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


# --------------------------------------------------------------------------- client


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
    buf = b""
    while HANDSHAKE_DONE not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed during handshake")
        buf += chunk
    return sock


def _client(
    path: str,
    plans: list[list[bytes]],
    start: mp.synchronize.Barrier,
    results: mp.Queue,  # type: ignore[type-arg]
) -> None:
    """Run the given connections (one pre-built request list each) to completion."""
    socks = [_connect(path) for _ in plans]
    sel = selectors.DefaultSelector()
    start.wait()
    cpu0 = os.times()
    t0 = time.monotonic()
    latencies: list[float] = []
    failures = 0
    state = []
    now = time.perf_counter
    for index, (sock, plan) in enumerate(zip(socks, plans, strict=True)):
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, index)
        state.append([0, now(), b""])
        sock.send(plan[0])
    pending = len(plans)
    while pending:
        for key, _ in sel.select():
            index = key.data
            sock, plan, st = socks[index], plans[index], state[index]
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            buf = st[2] + data
            if not buf.endswith(b"\n"):
                st[2] = buf
                continue
            st[2] = b""
            latencies.append(now() - st[1])
            if not buf.startswith(b"OK\t"):
                failures += 1
            st[0] += 1
            if st[0] == len(plan):
                sel.unregister(sock)
                pending -= 1
                continue
            st[1] = now()
            sock.send(plan[st[0]])
    t1 = time.monotonic()
    cpu1 = os.times()
    for sock in socks:
        sock.close()
    client_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    results.put((t0, t1, latencies, failures, client_cpu))


@dataclass
class LoadResult:
    requests: int
    failures: int
    seconds: float
    auths_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    server_cpu_us: float  # per authentication, server process tree
    client_cpu_us: float  # per authentication, all client processes
    server_rss_kib: int
    other_cpu_cores: float  # cores busy with anything but server and client during the run


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run_load(
    path: str,
    suffixes: Sequence[bytes],
    *,
    connections: int,
    requests: int,
    server_pid: int,
    procs: int = 1,
    first_id: int = 1,
) -> LoadResult:
    """``requests`` AUTHs over ``connections`` sequential connections.

    Request ``i`` uses ``suffixes[i % len(suffixes)]``: pass one suffix for a
    repeated token, or at least ``requests`` for all-unique tokens.
    """
    connections = max(1, min(connections, requests))
    per_conn = [requests // connections + (c < requests % connections) for c in range(connections)]
    pool = len(suffixes)
    plans = [
        [
            b"AUTH\t%d" % (first_id + k) + suffixes[(c + k * connections) % pool]
            for k in range(count)
        ]
        for c, count in enumerate(per_conn)
    ]
    procs = max(1, min(procs, connections))
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(procs + 1)
    queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    workers = [
        ctx.Process(target=_client, args=(path, plans[p::procs], barrier, queue))
        for p in range(procs)
    ]
    for w in workers:
        w.start()
    pids = process_tree(server_pid)
    before = cpu_ticks(pids)
    busy0 = busy_cpu_seconds()
    barrier.wait()
    outs = [queue.get(timeout=900) for _ in workers]
    after = cpu_ticks(pids)
    busy1 = busy_cpu_seconds()
    rss = rss_kib(pids)
    for w in workers:
        w.join()
    start = min(o[0] for o in outs)
    end = max(o[1] for o in outs)
    latencies = sorted(x for o in outs for x in o[2])
    done = len(latencies)
    seconds = end - start
    server_cpu = tree_cpu_seconds(before, after)
    client_cpu = sum(o[4] for o in outs)
    return LoadResult(
        requests=done,
        failures=sum(o[3] for o in outs),
        seconds=seconds,
        auths_per_s=done / seconds,
        p50_ms=_percentile(latencies, 0.50) * 1000,
        p95_ms=_percentile(latencies, 0.95) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        server_cpu_us=server_cpu / done * 1e6,
        client_cpu_us=client_cpu / done * 1e6,
        server_rss_kib=rss,
        other_cpu_cores=max(0.0, busy1 - busy0 - server_cpu - client_cpu) / seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--tokens", required=True, help="file with one token per line")
    p.add_argument("--user", default="alice@example.org")
    p.add_argument("--mech", default="XOAUTH2", choices=["XOAUTH2", "OAUTHBEARER"])
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--repeat", action="store_true", help="use only the first token")
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--server-pid", type=int, required=True)
    args = p.parse_args(argv)
    tokens = Path(args.tokens).read_text().split()
    if args.repeat:
        tokens = tokens[:1]
    suffixes = [auth_suffix(t, args.user, args.mech) for t in tokens]
    result = run_load(
        args.socket,
        suffixes,
        connections=args.connections,
        requests=args.requests,
        server_pid=args.server_pid,
        procs=args.procs,
    )
    json.dump(asdict(result), sys.stdout, indent=2)
    print()
    return 0 if result.failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
