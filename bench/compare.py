"""Two revisions of saslauthd-oidc, interleaved in one run: ``bench/run-all --compare REV``.

The machine this runs on is shared and its load drifts, so two benchmark runs
made minutes apart do not compare. This runs both revisions side by side
instead: the package at ``REV`` (``git archive REV saslauthd_oidc`` into a
temporary directory, run with that directory on ``PYTHONPATH``) and this
checkout's (or ``--head REV2``'s), both daemons up at once with the same
config, and every scenario alternates between them run by run (A B, B A, A B…)
so that drift hits both alike. It prints, per scenario, the median server CPU
per authentication of each side and two ratios head/base: the ratio of the
medians and the median of the per-run (paired) ratios.

CPU per authentication (``utime + stime`` of the daemon's process tree) is
what to read on a busy machine; throughput and latency move with the load of
everyone else. Usage::

    bench/run-all --compare main                   # this checkout vs main
    bench/run-all --compare 060a916 --head HEAD    # two commits
    bench/run-all --compare main --scenarios repeated8 --runs 9 --log-level info
    bench/run-all --compare main --scenarios memory   # RSS: 100,000 cached tokens, 1,000 idle conns
    bench/run-all --compare main --quick           # smoke test: the numbers mean nothing
    bench/run-all --compare HEAD --head-package-from .venv-compiled   # compiled vs interpreted

The dependencies come from this checkout's venv for both sides. With
``--head-package-from VENV`` the head daemon imports the package installed in
another venv of the same Python (its site-packages on ``PYTHONPATH``, ahead of
this checkout's editable install): ``scripts/test-compiled`` builds one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import run_all
from bench.loadgen import LoadResult, auth_suffix, run_load
from saslauthd_oidc.tools.devissuer import DevIssuer

ROOT = Path(__file__).resolve().parent.parent

#: name -> (label, token kind, connections, requests multiplier)
SCENARIOS: dict[str, tuple[str, str, int, int]] = {
    "unique8": ("unique RS256, 8 conns", "unique", 8, 1),
    "repeated8": ("repeated token, 8 conns", "repeated", 8, 2),
    "repeated64": ("repeated token, 64 conns", "repeated", 64, 2),
    "unique64": ("unique RS256, 64 conns", "unique", 64, 1),
}


def resolve(rev: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"bench --compare: {rev!r} is not a revision of {ROOT}")
    return out.stdout.strip()


def export(commit: str, into: Path) -> Path:
    """The package ``saslauthd_oidc`` at ``commit``, unpacked under ``into``; returns the dir."""
    into.mkdir(parents=True)
    archive = subprocess.Popen(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "saslauthd_oidc"],
        stdout=subprocess.PIPE,
    )
    assert archive.stdout is not None
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    archive.stdout.close()
    if archive.wait() != 0:
        raise SystemExit(f"git archive {commit} failed")
    return into


def describe_worktree() -> str:
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "saslauthd_oidc"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{head}{'+dirty' if dirty else ''} (working tree)"


@dataclass
class Side:
    label: str
    pythonpath: str | None  # None: this checkout
    runs: dict[str, list[LoadResult]] = field(default_factory=dict)


def _installed(venv: Path) -> tuple[str, str]:
    """The label and the site-packages of the package installed in ``venv``."""
    build, site = run_all.installed_package(venv)
    return f"{venv} ({build})", site


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(scenarios: list[str], base: Side, head: Side) -> str:
    lines = [
        f"base: {base.label}",
        f"head: {head.label}",
        "",
        "| scenario | base µs/auth | head µs/auth | head/base (medians) | head/base (paired) "
        "| base p99 ms | head p99 ms | base auths/s | head auths/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in scenarios:
        label = SCENARIOS[name][0]
        b, h = base.runs[name], head.runs[name]
        bc = median([r.server_cpu_us for r in b])
        hc = median([r.server_cpu_us for r in h])
        paired = median(
            [
                y.server_cpu_us / x.server_cpu_us
                for x, y in zip(b, h, strict=True)
                if x.server_cpu_us
            ]
        )
        lines.append(
            f"| {label} | {bc:.0f} | {hc:.0f} | {hc / bc if bc else float('nan'):.2f} "
            f"| {paired:.2f} | {median([r.p99_ms for r in b]):.2f} "
            f"| {median([r.p99_ms for r in h]):.2f} | {median([r.auths_per_s for r in b]):.0f} "
            f"| {median([r.auths_per_s for r in h]):.0f} |"
        )
    failed = sum(r.failures for s in (base, head) for rs in s.runs.values() for r in rs)
    if failed:
        lines.append(f"\n{failed} authentications failed: the numbers above are not comparable")
    return "\n".join(lines)


@contextlib.contextmanager
def _jwks_server(workdir: Path, issuer: DevIssuer) -> Iterator[str]:
    www = workdir / "www"
    www.mkdir()
    (www / "jwks.json").write_text(json.dumps(issuer.jwks()))
    port = run_all._free_port()
    http = subprocess.Popen(
        [sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", str(www), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        run_all._wait_http(port)
        yield f"http://127.0.0.1:{port}/jwks.json"
    finally:
        run_all._stop(http)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--compare", metavar="REV", required=True, help="the base revision")
    p.add_argument("--head", metavar="REV", help="the other revision (default: this checkout)")
    p.add_argument(
        "--head-package-from",
        metavar="VENV",
        type=Path,
        help="the head daemon runs the package installed in VENV (e.g. .venv-compiled)",
    )
    p.add_argument("--runs", type=int, default=5, help="runs per side and scenario")
    p.add_argument("--requests", type=int, default=4000, help="per run (repeated: twice this)")
    p.add_argument("--log-level", default="warning", help="logging.level of both daemons")
    p.add_argument(
        "--head-log-level",
        help="logging.level of the head daemon only: with --compare HEAD, what a level costs",
    )
    p.add_argument(
        "--scenarios",
        default="unique8,repeated8",
        help=f"comma-separated, from {', '.join(SCENARIOS)}, memory",
    )
    p.add_argument("--cached", type=int, default=100_000, help="memory: cached tokens")
    p.add_argument("--idle", type=int, default=1000, help="memory: idle connections")
    p.add_argument("--quick", action="store_true", help="tiny loads: checks it runs, not speed")
    p.add_argument("--json", type=Path, help="write all runs here")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.requests, args.cached, args.idle = 2, 40, 50, 20
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    memory = "memory" in scenarios
    scenarios = [s for s in scenarios if s != "memory"]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"--scenarios: unknown {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    log = sys.stderr
    workdir = Path(tempfile.mkdtemp(prefix="saslo-compare-", dir="/tmp"))
    try:
        base_commit = resolve(args.compare)
        base = Side(
            f"{args.compare} = {base_commit[:10]}",
            str(export(base_commit, workdir / "base")),
        )
        if args.head_package_from:
            head = Side(*_installed(args.head_package_from))
        elif args.head:
            head_commit = resolve(args.head)
            head = Side(
                f"{args.head} = {head_commit[:10]}", str(export(head_commit, workdir / "head"))
            )
        else:
            head = Side(describe_worktree(), None)
        base.label += f", logging {args.log_level}"
        head.label += f", logging {args.head_log_level or args.log_level}"
        n, runs = args.requests, args.runs
        issuer = DevIssuer(algorithms=("RS256", "ES256", "EdDSA"))
        issuer.issuer = run_all.ISSUER
        run_all._issuer = issuer
        needs_unique = any(SCENARIOS[s][1] == "unique" for s in scenarios)
        # Both daemons see the same unique tokens in run i (each its own cache).
        per_scenario = {
            s: i for i, s in enumerate(x for x in scenarios if SCENARIOS[x][1] == "unique")
        }
        pool = run_all.mint("RS256", n * runs * len(per_scenario)) if needs_unique else []
        unique = [auth_suffix(t, run_all.USER) for t in pool]
        check = auth_suffix(
            issuer.mint(alg="RS256", lifetime=7200, email=run_all.USER, typ="JWT"), run_all.USER
        )
        with contextlib.ExitStack() as stack:
            jwks = stack.enter_context(_jwks_server(workdir, issuer))
            daemons: dict[str, tuple[Path, int]] = {}
            for key, side in (("base", base), ("head", head)):
                level = args.head_log_level if key == "head" and args.head_log_level else None
                sock, pid = stack.enter_context(
                    run_all.ours(
                        workdir,
                        jwks,
                        workers=1,
                        level=level or args.log_level,
                        pythonpath=side.pythonpath,
                    )
                )
                for _ in range(4):  # keys loaded, code paths warm
                    run_all.check_accepts(sock, pid, check, f"{key} ({side.label})")
                daemons[key] = (sock, pid)
            print(f"both accept the check token; base {base.label}, head {head.label}", file=log)

            def load(name: str, i: int, key: str) -> LoadResult:
                _label, kind, conns, mult = SCENARIOS[name]
                sock, pid = daemons[key]
                if kind == "unique":
                    start = (per_scenario[name] * runs + i) * n
                    suffixes, requests = unique[start : start + n], n
                else:
                    suffixes, requests = [check], n * mult
                return run_load(
                    str(sock), suffixes, connections=conns, requests=requests, server_pid=pid
                )

            sides = {"base": base, "head": head}
            for name in scenarios:
                for i in range(runs):
                    order = ("base", "head") if i % 2 == 0 else ("head", "base")
                    for key in order:
                        r = load(name, i, key)
                        sides[key].runs.setdefault(name, []).append(r)
                        print(
                            f"  {SCENARIOS[name][0]} [{key}] run {i + 1}: "
                            f"cpu {r.server_cpu_us:.0f}us p99 {r.p99_ms:.2f}ms "
                            f"{r.auths_per_s:.0f}/s fail {r.failures}",
                            file=log,
                        )
            mem: dict[str, dict[str, float]] = {}
            if memory:
                cached = [auth_suffix(t, run_all.USER) for t in run_all.mint("EdDSA", args.cached)]
                for key, side in (("base", base), ("head", head)):
                    with run_all.ours(
                        workdir, jwks, workers=1, level=args.log_level, pythonpath=side.pythonpath
                    ) as (sock, pid):
                        run_all.check_accepts(sock, pid, check, key)
                        mem[key] = run_all.memory_scenario(sock, pid, cached, args.idle)
                        print(f"  memory [{key}]: {mem[key]}", file=log)
        report = render(scenarios, base, head)
        if mem:
            report += "\n\n| RSS MiB | at start | cache filled | + idle connections |\n"
            report += "|---|---:|---:|---:|\n"
            for key in ("base", "head"):
                m = mem[key]
                report += (
                    f"| {key} | {m['rss_started_mib']:.1f} | {m['rss_cache_filled_mib']:.1f} "
                    f"| {m['rss_mib']:.1f} |\n"
                )
            report += f"({args.cached} cached tokens, {args.idle} idle connections)"
        if args.quick:
            report += "\n\n--quick: tiny loads to check that it runs; the numbers mean nothing"
        print(report)
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        side: {
                            "label": s.label,
                            "runs": {k: [asdict(r) for r in v] for k, v in s.runs.items()},
                        }
                        for side, s in (("base", base), ("head", head))
                    },
                    indent=2,
                )
            )
        failed = sum(r.failures for s in (base, head) for rs in s.runs.values() for r in rs)
        return 1 if failed else 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
