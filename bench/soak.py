"""Soak run: N authentications against ``saslauthd-oidc serve``; flat memory, no errors.

    python bench/soak.py [--total 1000000] [--connections 8] [--window 32]
                         [--unique 0.05] [--refused 0.01] [--sample 20000]
                         [--warmup 0.2] [--max-growth-mb 16]

What it does:

* starts a DevIssuer (ES256) on loopback in a thread;
* writes a config (cache ``max_entries`` small enough that warm-up fills it,
  logging at ``warning`` so the run measures authentication, not log I/O) and
  runs ``python -m saslauthd_oidc serve`` as a subprocess, as an operator would;
* opens ``--connections`` Dovecot auth-protocol connections, each keeping
  ``--window`` requests in flight, with a mix of tokens: repeated good tokens
  (cache hits), unique good tokens (full signature checks, cache churn), and
  refused tokens (wrong audience: CONT challenge, client's %x01, FAIL);
* checks every reply (OK with the right ``user=``, or FAIL after the
  challenge for refused ones) and counts anything else as an error;
* samples the daemon's RSS (``VmRSS`` from /proc) every ``--sample``
  authentications and prints a table.

Exit status: 0 when there were no errors and RSS after warm-up grew by at
most ``--max-growth-mb``; 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread

USER = "alice@example.org"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def write_config(path: Path, sock: Path, issuer: str, cache_entries: int, level: str) -> None:
    path.write_text(
        f"""
[server]
auth_socket = "{sock}"
auth_socket_mode = "0600"
request_timeout = 5.0

[cache]
max_entries = {cache_entries}

[logging]
level = "{level}"
format = "json"

[[provider]]
name = "dev"
issuer = "{issuer}"
allow_http = true
algorithms = ["ES256"]
token_types = ["at+jwt"]

[[rule]]
name = "mail"
provider = "dev"
audiences = ["mail"]
username = "{{email}}"
"""
    )


@dataclass
class Stats:
    done: int = 0
    ok: int = 0
    refused: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    samples: list[tuple[int, float, int]] = field(default_factory=list)  # (done, elapsed, rss)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(text)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def oauthbearer(token: str) -> str:
    return b64(f"n,a={USER},\x01auth=Bearer {token}\x01\x01".encode())


class Workload:
    """Hands out (payload, expect_ok) pairs in a fixed pseudo-random mix."""

    def __init__(self, issuer: DevIssuer, args: argparse.Namespace) -> None:
        self.issuer = issuer
        self.rng = random.Random(8)
        self.unique = args.unique
        self.refused = args.refused
        self.pool = [oauthbearer(issuer.mint(email=USER, lifetime=7200)) for _ in range(100)]
        self.bad = [
            oauthbearer(issuer.mint(email=USER, audience="other", lifetime=7200)) for _ in range(10)
        ]

    def next(self) -> tuple[str, bool]:
        r = self.rng.random()
        if r < self.refused:
            return self.rng.choice(self.bad), False
        if r < self.refused + self.unique:
            return oauthbearer(self.issuer.mint(email=USER, lifetime=7200)), True
        return self.rng.choice(self.pool), True


async def connection(
    sock: str,
    work: Workload,
    quota: list[int],
    stats: Stats,
    window: int,
    on_done: trio.MemorySendChannel[None],
) -> None:
    stream = await trio.open_unix_socket(sock)
    async with stream:
        await stream.send_all(b"VERSION\t1\t2\nCPID\t4242\n")
        buf = b""
        while b"DONE\n" not in buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise RuntimeError("daemon closed the connection during the handshake")
            buf += chunk
        buf = buf.split(b"DONE\n", 1)[1]
        pending: dict[int, bool] = {}
        rid = 0

        async def fill() -> None:
            nonlocal rid
            out = []
            while len(pending) < window and quota[0] > 0:
                quota[0] -= 1
                rid += 1
                payload, expect_ok = work.next()
                pending[rid] = expect_ok
                out.append(f"AUTH\t{rid}\tOAUTHBEARER\tservice=smtp\tresp={payload}\n")
            if out:
                await stream.send_all("".join(out).encode())

        await fill()
        while pending:
            while b"\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    stats.error(f"connection closed with {len(pending)} pending")
                    stats.errors += len(pending) - 1
                    return
                buf += chunk
            raw, buf = buf.split(b"\n", 1)
            line = raw.decode()
            verb, _, rest = line.partition("\t")
            rid_text, _, tail = rest.partition("\t")
            try:
                r = int(rid_text)
            except ValueError:
                stats.error(line[:200])
                continue
            if r not in pending:
                stats.error(f"reply for unknown id: {line[:200]}")
                continue
            expect_ok = pending[r]
            if verb == "CONT" and not expect_ok:
                await stream.send_all(f"CONT\t{r}\tAQ==\n".encode())
                continue
            del pending[r]
            if verb == "OK" and expect_ok and tail == f"user={USER}":
                stats.ok += 1
            elif verb == "FAIL" and not expect_ok:
                stats.refused += 1
            else:
                stats.error(line[:200])
            stats.done += 1
            on_done.send_nowait(None)
            await fill()


async def run(args: argparse.Namespace, issuer: DevIssuer, sock: str, pid: int) -> Stats:
    stats = Stats()
    work = Workload(issuer, args)
    quota = [args.total]
    start = time.monotonic()
    stats.samples.append((0, 0.0, rss_kib(pid)))
    send, receive = trio.open_memory_channel[None](args.total + 1)

    async def sampler() -> None:
        bucket = 0
        async for _ in receive:
            if stats.done // args.sample > bucket or stats.done == args.total:
                bucket = stats.done // args.sample
                stats.samples.append((stats.done, time.monotonic() - start, rss_kib(pid)))
                d, t, r = stats.samples[-1]
                print(
                    f"{d:>9} {t:8.1f}s {d / t if t else 0:8.0f}/s rss {r / 1024:7.1f} MiB"
                    f" errors {stats.errors}",
                    flush=True,
                )
            if stats.done >= args.total:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler)
        async with trio.open_nursery() as clients:
            for _ in range(args.connections):
                clients.start_soon(connection, sock, work, quota, stats, args.window, send)
        if stats.done < args.total:
            nursery.cancel_scope.cancel()
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--total", type=int, default=1_000_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--unique", type=float, default=0.05)
    parser.add_argument("--refused", type=float, default=0.01)
    parser.add_argument("--sample", type=int, default=20_000)
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--max-growth-mb", type=float, default=16.0)
    parser.add_argument("--cache-entries", type=int, default=5_000)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, DevIssuerThread(DevIssuer()) as issuer:
        assert issuer.issuer
        sock = Path(tmp) / "auth"
        config = Path(tmp) / "soak.toml"
        write_config(config, sock, issuer.issuer, args.cache_entries, args.log_level)
        log = (Path(tmp) / "daemon.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "saslauthd_oidc", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print((Path(tmp) / "daemon.log").read_text(), file=sys.stderr)
                    return 1
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(str(sock))
                        break
                    except OSError:
                        time.sleep(0.05)
            print(
                f"soak: {args.total} authentications, {args.connections} connections x "
                f"{args.window} in flight, unique {args.unique:.0%}, refused {args.refused:.0%}"
            )
            print(f"{'done':>9} {'elapsed':>9} {'rate':>10}")
            stats = trio.run(run, args, issuer, str(sock), proc.pid)
            alive = proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        daemon_log = (Path(tmp) / "daemon.log").read_text(errors="replace")
        issuer_requests = dict(issuer.requests)

    elapsed = stats.samples[-1][1]
    warm = [s for s in stats.samples if s[0] >= args.total * args.warmup]
    base = warm[0][2] if warm else stats.samples[0][2]
    peak = max(s[2] for s in warm) if warm else base
    growth_mb = (peak - base) / 1024
    error_lines = [ln for ln in daemon_log.splitlines() if '"level": "error"' in ln]
    print()
    print(f"authentications   {stats.done} ({stats.ok} OK, {stats.refused} refused as expected)")
    print(f"errors            {stats.errors}; daemon error log lines {len(error_lines)}")
    print(f"elapsed           {elapsed:.1f} s, {stats.done / elapsed:.0f} auth/s")
    print(f"RSS start         {stats.samples[0][2] / 1024:.1f} MiB")
    print(f"RSS after warm-up {base / 1024:.1f} MiB (at {args.warmup:.0%})")
    print(f"RSS peak after    {peak / 1024:.1f} MiB (growth {growth_mb:+.1f} MiB)")
    print(f"RSS end           {stats.samples[-1][2] / 1024:.1f} MiB")
    print(f"daemon alive      {alive}; issuer requests {issuer_requests}")
    for text in stats.error_samples:
        print(f"  error: {text}")
    for text in error_lines[:5]:
        print(f"  daemon: {text}")
    failed = (
        stats.errors
        or error_lines
        or stats.done != args.total
        or growth_mb > args.max_growth_mb
        or not alive
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
