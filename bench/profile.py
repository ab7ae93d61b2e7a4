"""Profile saslauthd-oidc under load with py-spy (``pip install -e .[bench]``).

    .venv/bin/python -m bench.profile --alg RS256 --requests 20000 [--repeat] [--out prof.txt]

Starts the daemon as ``bench.run_all`` does, attaches ``py-spy record`` to it
for the duration of the load, and prints the top functions by own time and by
total time (py-spy's ``raw`` collapsed-stack output is kept in ``--out``).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import run_all
from bench.loadgen import auth_suffix, run_load
from saslauthd_oidc.tools.devissuer import DevIssuer


def summarize(raw: Path, top: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    out = [f"{samples} samples", "", "own time:"]
    out += [f"{100 * n / samples:5.1f}% {f}" for f, n in own.most_common(top)]
    out += ["", "total time:"]
    out += [f"{100 * n / samples:5.1f}% {f}" for f, n in total.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--alg", default="RS256")
    p.add_argument("--requests", type=int, default=10000)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--repeat", action="store_true")
    p.add_argument("--out", type=Path, default=Path("profile.raw"))
    p.add_argument("--log-level", default="warning")
    p.add_argument(
        "--gil",
        action="store_true",
        help="only samples holding the GIL: leaves out time blocked in syscalls (closer to CPU)",
    )
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="saslo-prof-", dir="/tmp"))
    issuer = DevIssuer(algorithms=("RS256", "ES256", "EdDSA"))
    issuer.issuer = run_all.ISSUER
    run_all._issuer = issuer
    count = 1 if args.repeat else args.requests
    tokens = run_all.mint(args.alg, count)
    (workdir / "www").mkdir()
    (workdir / "www" / "jwks.json").write_text(json.dumps(issuer.jwks()))
    port = run_all._free_port()
    http = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=workdir / "www",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        run_all._wait_http(port)
        jwks = f"http://127.0.0.1:{port}/jwks.json"
        suffixes = [auth_suffix(t, run_all.USER) for t in tokens]
        with run_all.ours(workdir, jwks, workers=1, level=args.log_level) as (sock, pid):
            run_load(str(sock), suffixes[:1], connections=1, requests=5, server_pid=pid)
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "--pid",
                    str(pid),
                    "--format",
                    "raw",
                    "-o",
                    str(args.out),
                    "--rate",
                    "500",
                    "--nonblocking",
                    *(["--gil"] if args.gil else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
            result = run_load(
                str(sock),
                suffixes,
                connections=args.connections,
                requests=args.requests,
                server_pid=pid,
            )
            spy.send_signal(2)
            spy.wait(30)
        print(result)
        print(summarize(args.out))
    finally:
        http.terminate()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
