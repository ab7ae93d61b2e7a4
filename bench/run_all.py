"""Side-by-side benchmark: a private Dovecot 2.3 auth process vs saslauthd-oidc, one run.

What it does (``bench/run-all`` calls it; ``--quick`` shrinks everything to a smoke test):

1. Makes a work directory with one RS256, one ES256 and one EdDSA key (the
   :class:`~saslauthd_oidc.tools.devissuer.DevIssuer`'s), mints pools of unique
   tokens (RFC 9068 claims, two hours valid), writes ``jwks.json`` and serves
   it with ``python -m http.server`` on loopback, and writes the public keys as
   PEM into a Dovecot ``fs:posix`` dict as ``<prefix>/default/<alg>/<kid>``
   (Dovecot's ``src/lib-oauth2/oauth2-jwt.c``: ``shared/<azp or default>/<alg>/<kid>``).
2. Starts a private Dovecot (``dovecot -F -c conf``, own ``base_dir``, no
   protocols, ``passdb oauth2`` with ``introspection_mode = local``) and
   saslauthd-oidc (``serve``), checks that both accept the same token, then
   runs every scenario 3 times against each and keeps the median.
3. Prints the table and the ratios (and ``--json`` writes everything).

``--package-from VENV`` runs saslauthd-oidc from the package installed in
another venv (e.g. ``.venv-compiled``, the mypyc build) instead of this
checkout's; the report names the build that ran.

Server CPU is read from ``/proc/<pid>/stat``: for Dovecot its ``auth``
process, for saslauthd-oidc the whole process tree (parent and workers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from bench.loadgen import LoadResult, auth_suffix, process_tree, rss_kib, run_load
from saslauthd_oidc.tools.devissuer import DevIssuer

ISSUER = "https://issuer.bench.invalid"
USER = "alice@example.org"
DOVECOT = os.environ.get("SASLAUTHD_OIDC_DOVECOT", "/usr/sbin/dovecot")

_issuer: DevIssuer | None = None  # inherited by the forked minting processes


def _mint_batch(args: tuple[str, int]) -> list[str]:
    alg, count = args
    assert _issuer is not None
    return [_issuer.mint(alg=alg, lifetime=7200, email=USER, typ="JWT") for _ in range(count)]


def mint(alg: str, count: int, procs: int = 2) -> list[str]:
    chunks = [(alg, count // procs + (i < count % procs)) for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        return [t for batch in pool.map(_mint_batch, chunks) for t in batch]


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if path.exists():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {path}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_DOVECOT_CONF = """\
# Private benchmark instance (bench/run_all.py)
base_dir = {d}/run
state_dir = {d}/state
instance_name = saslo-bench-{tag}
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
protocols = none
ssl = no
disable_plaintext_auth = no
auth_mechanisms = oauthbearer xoauth2
auth_verbose = no
auth_debug = {debug}
auth_failure_delay = 0
auth_cache_size = 0
default_login_user = dovenull
default_internal_user = dovecot
passdb {{
  driver = oauth2
  mechanisms = oauthbearer xoauth2
  args = {d}/dovecot-oauth2.conf.ext
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  unix_listener auth-client {{
    mode = 0666
  }}
}}
"""

_DOVECOT_OAUTH2 = """\
introspection_mode = local
local_validation_key_dict = fs:posix:prefix={d}/keys/
issuers = {issuer}
username_attribute = email
"""


@contextlib.contextmanager
def dovecot(workdir: Path, issuer: DevIssuer) -> Iterator[tuple[Path, int]]:
    """A private Dovecot; yields (auth-client socket, auth process pid)."""
    d = workdir / "dovecot"
    d.mkdir()
    os.chmod(workdir, 0o755)
    os.chmod(d, 0o755)
    for alg in ("RS256", "ES256"):
        kid = issuer.kid(alg)
        key_dir = d / "keys" / "default" / alg
        key_dir.mkdir(parents=True)
        pem = (
            _private_key(issuer, kid)
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        (key_dir / kid).write_bytes(pem)
    for sub in ("keys", "keys/default", "keys/default/RS256", "keys/default/ES256"):
        os.chmod(d / sub, 0o755)
    debug = os.environ.get("BENCH_DOVECOT_DEBUG", "no")
    (d / "dovecot.conf").write_text(_DOVECOT_CONF.format(d=d, tag=os.getpid(), debug=debug))
    (d / "dovecot-oauth2.conf.ext").write_text(_DOVECOT_OAUTH2.format(d=d, issuer=ISSUER))
    with open(d / "dovecot-F.out", "wb") as out:
        proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(d / "dovecot.conf")],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        sock = d / "run" / "auth-client"
        _wait_socket(sock, proc, "dovecot")
        # The auth process starts on the first connection.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(b"VERSION\t1\t2\nCPID\t1\n")
            s.recv(4096)
        auth_pid = _find_child(proc.pid, "/auth")
        yield sock, auth_pid
    finally:
        _stop(proc)


def _private_key(issuer: DevIssuer, kid: str) -> Any:
    return issuer._keys[kid].private_key


def _find_child(root: int, suffix: str) -> int:
    for _ in range(100):
        for pid in process_tree(root):
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                if cmd.endswith(suffix):
                    return pid
        time.sleep(0.05)
    raise RuntimeError(f"no {suffix} process under {root}")


_OURS_CONF = """\
[server]
auth_socket = "{sock}"
auth_socket_mode = "0666"
mechanisms = ["OAUTHBEARER", "XOAUTH2"]
workers = {workers}
max_connections = 4096

[cache]
max_entries = 100000

[logging]
level = "{level}"
format = "json"

[[provider]]
name = "bench"
issuer = "{issuer}"
jwks_uri = "{jwks}"
allow_http = true
algorithms = ["RS256", "ES256", "EdDSA"]

[[rule]]
name = "bench"
provider = "bench"
audiences = ["mail"]
username = "{{email}}"
"""


@contextlib.contextmanager
def ours(
    workdir: Path, jwks: str, *, workers: int, level: str, pythonpath: str | None = None
) -> Iterator[tuple[Path, int]]:
    """saslauthd-oidc serve; yields (auth socket, parent pid).

    ``pythonpath`` runs the package found there (another revision) instead of
    ``BENCH_DAEMON_PYTHONPATH`` or this checkout's.
    """
    d = Path(tempfile.mkdtemp(prefix=f"ours-w{workers}-", dir=workdir))
    sock = d / "auth"
    conf = d / "saslauthd-oidc.toml"
    conf.write_text(
        _OURS_CONF.format(sock=sock, workers=workers, level=level, issuer=ISSUER, jwks=jwks)
    )
    with open(d / "daemon.log", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "saslauthd_oidc", "serve", "--config", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=_daemon_env(pythonpath),
            cwd=d,  # not the checkout: ``-m`` would import the package from the cwd first
        )
    try:
        _wait_socket(sock, proc, "saslauthd-oidc")
        if workers > 1:  # wait until every worker is up
            deadline = time.monotonic() + 30
            while len(process_tree(proc.pid)) < workers + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        yield sock, proc.pid
    finally:
        _stop(proc)


def installed_package(venv: Path) -> tuple[str, str]:
    """The build (``--version``'s words) and the site-packages of the package in ``venv``."""
    python = venv.resolve() / "bin" / "python"
    code = (
        "import sysconfig, saslauthd_oidc.service.build as b;"
        "print(sysconfig.get_paths()['purelib']); print(b.describe())"
    )
    out = subprocess.run(
        [python, "-P", "-c", code], capture_output=True, text=True, check=True, cwd="/"
    ).stdout.split("\n")
    return out[1], out[0]


def _daemon_env(pythonpath: str | None = None) -> dict[str, str]:
    """The daemon's environment: ``BENCH_DAEMON_PYTHONPATH`` runs another copy of the package.

    E.g. ``git archive <commit> saslauthd_oidc | tar -x -C /tmp/old`` and
    ``BENCH_DAEMON_PYTHONPATH=/tmp/old`` to measure an older revision
    (``bench/run-all --compare REV`` does this for you, interleaved).
    """
    env = dict(os.environ)
    other = env.pop("BENCH_DAEMON_PYTHONPATH", None)
    other = pythonpath or other
    if other:
        env["PYTHONPATH"] = other
    return env


# --------------------------------------------------------------------------- scenarios


@dataclass
class Row:
    name: str
    server: str
    runs: list[LoadResult] = field(default_factory=list)

    @property
    def median(self) -> dict[str, float]:
        keys = [k for k in asdict(self.runs[0]) if k != "requests"]
        return {k: statistics.median(getattr(r, k) for r in self.runs) for k in keys}


def check_accepts(sock: Path, pid: int, suffix: bytes, what: str) -> None:
    result = run_load(str(sock), [suffix], connections=1, requests=1, server_pid=pid)
    if result.failures:
        raise RuntimeError(f"{what} refused the check token")


def openssl_speed(seconds: int) -> dict[str, float]:
    """Verifies per second for one core, from ``openssl speed``."""
    out = subprocess.run(
        ["openssl", "speed", "-seconds", str(seconds), "rsa2048", "ecdsap256", "ed25519"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    speeds = {}
    if m := re.search(r"^rsa 2048 bits\s+\S+\s+\S+\s+\S+\s+(\S+)", out, re.M):
        speeds["rsa2048"] = float(m.group(1))
    if m := re.search(r"^\s*256 bits ecdsa \(nistp256\)\s+\S+\s+\S+\s+\S+\s+(\S+)", out, re.M):
        speeds["ecdsap256"] = float(m.group(1))
    if m := re.search(r"^\s*253 bits EdDSA \(Ed25519\)\s+\S+\s+\S+\s+\S+\s+(\S+)", out, re.M):
        speeds["ed25519"] = float(m.group(1))
    return speeds


def machine() -> dict[str, str]:
    def sh(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return "n/a"

    lscpu = sh("lscpu")
    model = re.search(r"Model name:\s*(.*)", lscpu)
    return {
        "cpu": model.group(1) if model else "?",
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dovecot": sh(DOVECOT, "--version"),
        "openssl": sh("openssl", "version"),
        "load": Path("/proc/loadavg").read_text().strip(),
    }


def memory_scenario(sock: Path, pid: int, suffixes: list[bytes], idle: int) -> dict[str, float]:
    """Fill the cache with ``len(suffixes)`` tokens, open ``idle`` idle connections, read RSS."""
    rss_start = rss_kib(process_tree(pid))
    fill = run_load(str(sock), suffixes, connections=8, requests=len(suffixes), server_pid=pid)
    rss_filled = rss_kib(process_tree(pid))
    conns = []
    try:
        for _ in range(idle):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sock))
            s.sendall(b"VERSION\t1\t2\nCPID\t1\n")
            conns.append(s)
        for s in conns:
            buf = b""
            while b"DONE\n" not in buf:
                buf += s.recv(4096)
        time.sleep(0.5)
        rss = rss_kib(process_tree(pid))
    finally:
        for s in conns:
            s.close()
    return {
        "cached": len(suffixes),
        "idle_connections": idle,
        "rss_mib": rss / 1024,
        "rss_started_mib": rss_start / 1024,
        "rss_cache_filled_mib": rss_filled / 1024,
        "fill_failures": fill.failures,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="saslauthd-oidc vs Dovecot 2.3 auth, side by side")
    p.add_argument("--quick", action="store_true", help="tiny loads: checks it runs, not speed")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--requests", type=int, default=6000, help="per run and scenario")
    p.add_argument("--procs", type=int, default=1, help="load generator processes")
    p.add_argument("--log-level", default="warning", help="saslauthd-oidc logging.level")
    p.add_argument("--no-dovecot", action="store_true")
    p.add_argument("--cached", type=int, default=100_000, help="memory scenario: cached tokens")
    p.add_argument("--idle", type=int, default=1000, help="memory scenario: idle connections")
    p.add_argument("--workers", default="1,2", help="worker counts to run, e.g. 1,2")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument(
        "--package-from",
        metavar="VENV",
        type=Path,
        help="run the daemon with the package installed in VENV (e.g. .venv-compiled)",
    )
    p.add_argument(
        "--compare",
        metavar="REV",
        help="instead: this checkout against revision REV, interleaved (see bench/compare.py)",
    )
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--compare" or a.startswith("--compare=") for a in argv):
        from bench import compare  # noqa: PLC0415 - compare imports this module

        return compare.main(argv)
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.requests, args.cached, args.idle = 1, 40, 50, 20
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    use_dovecot = not args.no_dovecot and Path(DOVECOT).exists() and os.geteuid() == 0
    if use_dovecot:
        try:
            pwd.getpwnam("dovenull")
        except KeyError:
            use_dovecot = False

    build, pythonpath = "interpreted (this checkout)", None
    if args.package_from:
        build, pythonpath = installed_package(args.package_from)
        build = f"{build} ({args.package_from})"

    def daemon(
        workers: int, level: str = args.log_level
    ) -> contextlib.AbstractContextManager[tuple[Path, int]]:
        return ours(workdir, jwks, workers=workers, level=level, pythonpath=pythonpath)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="saslo-bench-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = sys.stderr
    n, runs = args.requests, args.runs
    global _issuer  # noqa: PLW0603
    issuer = DevIssuer(algorithms=("RS256", "ES256", "EdDSA"))
    issuer.issuer = ISSUER
    _issuer = issuer
    t = time.monotonic()
    pools = {alg: mint(alg, n * runs) for alg in ("RS256", "ES256", "EdDSA")}
    check = issuer.mint(alg="RS256", lifetime=7200, email=USER, typ="JWT")
    print(f"minted {3 * n * runs} tokens in {time.monotonic() - t:.1f}s", file=log)
    www = workdir / "www"
    www.mkdir()
    (www / "jwks.json").write_text(json.dumps(issuer.jwks()))
    port = _free_port()
    http = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "--directory",
            str(www),
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    jwks = f"http://127.0.0.1:{port}/jwks.json"
    suffix = {alg: [auth_suffix(tok, USER) for tok in pool] for alg, pool in pools.items()}
    check_suffix = auth_suffix(check, USER)
    rows: list[Row] = []
    extra: dict[str, Any] = {"build": build}

    def series(name: str, server: str, fn: Callable[[int], LoadResult]) -> Row:
        row = Row(name, server)
        for i in range(runs):
            row.runs.append(fn(i))
            r = row.runs[-1]
            print(
                f"  {name} [{server}] run {i + 1}: {r.auths_per_s:.0f}/s p99 {r.p99_ms:.2f}ms "
                f"cpu {r.server_cpu_us:.0f}us client {r.client_cpu_us:.0f}us "
                f"fail {r.failures}",
                file=log,
            )
        rows.append(row)
        return row

    def unique(sock: Path, pid: int, alg: str, conns: int = 8) -> Callable[[int], LoadResult]:
        return lambda i: run_load(
            str(sock),
            suffix[alg][i * n : (i + 1) * n],
            connections=conns,
            requests=n,
            server_pid=pid,
            procs=args.procs,
        )

    def repeated(sock: Path, pid: int, conns: int, mult: int = 2) -> Callable[[int], LoadResult]:
        return lambda i: run_load(
            str(sock),
            [check_suffix],
            connections=conns,
            requests=n * mult,
            server_pid=pid,
            procs=args.procs,
        )

    try:
        _wait_http(port)
        if use_dovecot:
            with dovecot(workdir, issuer) as (sock, pid):
                check_accepts(sock, pid, check_suffix, "dovecot")
                print("dovecot accepts the check token", file=log)
                series("unique RS256, 8 conns", "dovecot", unique(sock, pid, "RS256"))
                series("repeated token, 8 conns", "dovecot", repeated(sock, pid, 8))
                series("repeated token, 64 conns", "dovecot", repeated(sock, pid, 64))
                series("unique RS256, 64 conns", "dovecot", unique(sock, pid, "RS256", 64))
        for workers in [int(w) for w in args.workers.split(",")]:
            w = f"ours w={workers}"
            with daemon(workers) as (sock, pid):
                for _ in range(workers * 4):  # every worker loads its keys
                    check_accepts(sock, pid, check_suffix, "saslauthd-oidc")
                print(f"{w} accepts the check token", file=log)
                series("unique RS256, 8 conns", w, unique(sock, pid, "RS256"))
                series("repeated token, 8 conns", w, repeated(sock, pid, 8))
                series("repeated token, 64 conns", w, repeated(sock, pid, 64))
                if workers == 1:
                    series("unique ES256, 8 conns", w, unique(sock, pid, "ES256"))
                    series("unique EdDSA, 8 conns", w, unique(sock, pid, "EdDSA"))
                # reuses the RS256 slices: they are cached by now, so restart first
            with daemon(workers) as (sock, pid):
                for _ in range(workers * 4):
                    check_accepts(sock, pid, check_suffix, "saslauthd-oidc")
                series("unique RS256, 64 conns", w, unique(sock, pid, "RS256", 64))
        with daemon(1) as (sock, pid):
            check_accepts(sock, pid, check_suffix, "saslauthd-oidc")
            mem_pool = [auth_suffix(tok, USER) for tok in mint("EdDSA", args.cached)]
            extra["memory"] = memory_scenario(sock, pid, mem_pool, args.idle)
            print(f"  memory: {extra['memory']}", file=log)
        # What the shipped default (info: one line per authentication) costs: a
        # daemon at info beside one at warning, runs alternating between them.
        with (
            daemon(1, "warning") as (quiet, quiet_pid),
            daemon(1, "info") as (loud, loud_pid),
        ):
            for sock, pid in ((quiet, quiet_pid), (loud, loud_pid)):
                check_accepts(sock, pid, check_suffix, "saslauthd-oidc")
            pairs = []
            for i in range(runs):
                order = [(quiet, quiet_pid, 0), (loud, loud_pid, 1)][:: 1 if i % 2 == 0 else -1]
                pair: list[float] = [0.0, 0.0]
                for sock, pid, slot in order:
                    pair[slot] = repeated(sock, pid, 8)(i).server_cpu_us
                pairs.append(pair)
                print(
                    f"  log cost run {i + 1}: warning {pair[0]:.0f}us info {pair[1]:.0f}us",
                    file=log,
                )
            extra["log_cost"] = {
                "warning_us": statistics.median(p[0] for p in pairs),
                "info_us": statistics.median(p[1] for p in pairs),
                "paired_us": statistics.median(p[1] - p[0] for p in pairs),
            }
    finally:
        _stop(http)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    extra["openssl"] = openssl_speed(1 if args.quick else 3)
    extra["machine"] = machine()
    report = render(rows, extra)
    if args.quick:
        report += "\n\n--quick: tiny loads to check that everything runs; the numbers mean nothing"
    print(report)
    failed = sum(r.failures for row in rows for r in row.runs)
    if failed:
        print(f"\n{failed} authentications failed: the numbers above are not comparable")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": [
                        {
                            "name": r.name,
                            "server": r.server,
                            "median": r.median,
                            "runs": [asdict(x) for x in r.runs],
                        }
                        for r in rows
                    ],
                    **extra,
                },
                indent=2,
            )
        )
    return 1 if failed else 0


def _wait_http(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError("http.server did not start")


def render(rows: list[Row], extra: dict[str, Any]) -> str:
    lines = [
        "| scenario | server | auths/s | p50 ms | p95 ms | p99 ms | server CPU µs/auth "
        "| client CPU µs/auth | other busy cores |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r.median
        lines.append(
            f"| {r.name} | {r.server} | {m['auths_per_s']:.0f} | {m['p50_ms']:.2f} "
            f"| {m['p95_ms']:.2f} | {m['p99_ms']:.2f} | {m['server_cpu_us']:.0f} "
            f"| {m['client_cpu_us']:.0f} | {m['other_cpu_cores']:.2f} |"
        )
    by = {(r.name, r.server): r.median for r in rows}
    ssl = extra.get("openssl", {})
    verify_us = {k: 1e6 / v for k, v in ssl.items() if v}
    out = ["\n".join(lines), "", "Targets (ratios against Dovecot in this run):"]

    def ratio(label: str, value: float | None, ok: bool | None, unit: str = "") -> None:
        if value is None:
            out.append(f"- {label}: n/a")
        else:
            out.append(f"- {label}: {value:.2f}{unit} {'MET' if ok else 'MISSED'}")

    def cpu_ratio(name: str, target: float) -> None:
        ours1, dc = by.get((name, "ours w=1")), by.get((name, "dovecot"))
        if ours1 and dc and dc["server_cpu_us"] > 0:  # a tiny (--quick) run may read 0 ticks
            x = ours1["server_cpu_us"] / dc["server_cpu_us"]
            ratio(f"{name}: server CPU/auth ours/dovecot (target <= {target})", x, x <= target)

    u8 = "unique RS256, 8 conns"
    r8 = "repeated token, 8 conns"
    cpu_ratio(r8, 1.0)
    cpu_ratio(u8, 2.0)
    for name in ("repeated token, 64 conns", "unique RS256, 64 conns"):
        dc = by.get((name, "dovecot"))
        for w in ("ours w=1", "ours w=2"):
            at = by.get((name, w))
            if at and dc:
                x = at["p99_ms"] / dc["p99_ms"]
                ratio(f"p99 {name}, {w} / dovecot's {dc['p99_ms']:.2f} ms (target <= 1)", x, x <= 1)
    mem = extra.get("memory")
    if mem:
        ratio(
            f"RSS, {mem['idle_connections']} idle conns + {mem['cached']} cached (target <= 80)",
            mem["rss_mib"],
            mem["rss_mib"] <= 80,
            " MiB",
        )
        out.append(
            f"  (RSS at start {mem['rss_started_mib']:.1f} MiB, after filling the cache "
            f"{mem['rss_cache_filled_mib']:.1f} MiB, then {mem['idle_connections']} idle "
            f"connections: {mem['rss_mib']:.1f} MiB)"
        )
    for name in (u8, r8):
        a, b = by.get((name, "ours w=1")), by.get((name, "ours w=2"))
        if a and b:
            x = b["auths_per_s"] / a["auths_per_s"] / 2
            ratio(f"workers=2 throughput / (2 x workers=1), {name} (target >= 0.85)", x, x >= 0.85)
    cost = extra.get("log_cost")
    if cost:
        ratio(
            "logging.level info: extra CPU per auth, repeated token (target <= 25)",
            cost["paired_us"],
            cost["paired_us"] <= 25,
            " µs",
        )
        out.append(
            f"  (warning {cost['warning_us']:.0f} µs, info {cost['info_us']:.0f} µs per auth; "
            "median of the paired differences)"
        )
    ours1 = by.get((u8, "ours w=1"))
    rsa = ours1["server_cpu_us"] if ours1 else None
    if rsa and "rsa2048" in verify_us:
        base = rsa - verify_us["rsa2048"]
        out.append(f"- overhead above one openssl signature check, RS256: {base:.0f} µs")
        for name, key in (
            ("unique ES256, 8 conns", "ecdsap256"),
            ("unique EdDSA, 8 conns", "ed25519"),
        ):
            at = by.get((name, "ours w=1"))
            if at and key in verify_us:
                over = at["server_cpu_us"] - verify_us[key]
                out.append(f"- overhead above one openssl signature check, {name}: {over:.0f} µs")
    out.append("")
    out.append("openssl speed verify/s: " + ", ".join(f"{k} {v:.0f}" for k, v in ssl.items()))
    out.append("saslauthd-oidc build: " + str(extra.get("build", "?")))
    out.append("machine: " + json.dumps(extra.get("machine", {})))
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
