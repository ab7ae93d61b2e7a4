"""bench/ runs and prints its table (a tiny load; nothing here measures speed)."""

from __future__ import annotations

import signal
from pathlib import Path

from bench.loadgen import LoadResult, auth_suffix, run_load
from bench.run_all import Row, render
from saslauthd_oidc.tools.devissuer import DevIssuer
from tests.support import accepts, start, wait_for


def test_load_generator_against_the_daemon(issuer: DevIssuer, workdir: Path) -> None:
    proc, sock = start(workdir, issuer, 1)
    try:
        wait_for(lambda: accepts(sock))
        suffixes = [auth_suffix(issuer.mint(), "alice@example.org") for _ in range(12)]
        result = run_load(str(sock), suffixes, connections=3, requests=12, server_pid=proc.pid)
        assert (result.requests, result.failures) == (12, 0)
        assert result.server_cpu_us >= 0 and result.p50_ms <= result.p99_ms
        refused = run_load(
            str(sock),
            [auth_suffix("not-a-token", "alice@example.org")],
            connections=2,
            requests=4,
            server_pid=proc.pid,
            procs=2,
        )
        assert (refused.requests, refused.failures) == (4, 4)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def _result(rate: float, cpu: float, p99: float = 1.0) -> LoadResult:
    return LoadResult(
        requests=100,
        failures=0,
        seconds=1.0,
        auths_per_s=rate,
        p50_ms=0.5,
        p95_ms=0.9,
        p99_ms=p99,
        server_cpu_us=cpu,
        client_cpu_us=10.0,
        server_rss_kib=1000,
        other_cpu_cores=0.0,
    )


def test_render_prints_the_table_and_the_targets() -> None:
    rows = [
        Row("unique RS256, 8 conns", "dovecot", [_result(1000, 60)] * 3),
        Row("unique RS256, 8 conns", "ours w=1", [_result(500, 120)] * 3),
        Row("unique RS256, 8 conns", "ours w=2", [_result(900, 125)] * 3),
        Row("repeated token, 8 conns", "dovecot", [_result(1000, 60)] * 3),
        Row("repeated token, 8 conns", "ours w=1", [_result(3500, 45)] * 3),
        Row("repeated token, 64 conns", "dovecot", [_result(1000, 60, p99=5.0)] * 3),
        Row("repeated token, 64 conns", "ours w=1", [_result(3500, 40, p99=4.0)] * 3),
    ]
    memory = {
        "cached": 10,
        "idle_connections": 5,
        "rss_mib": 50.0,
        "rss_started_mib": 49.0,
        "rss_cache_filled_mib": 49.5,
        "fill_failures": 0,
    }
    log_cost = {"warning_us": 40.0, "info_us": 70.0, "paired_us": 30.0}
    extra = {"openssl": {"rsa2048": 50000.0}, "memory": memory, "log_cost": log_cost}
    text = render(rows, {**extra, "machine": {}})
    assert text.startswith("| scenario | server | auths/s |")
    assert "| unique RS256, 8 conns | ours w=1 | 500 |" in text
    assert "repeated token, 8 conns: server CPU/auth ours/dovecot (target <= 1.0): 0.75 MET" in text
    assert "unique RS256, 8 conns: server CPU/auth ours/dovecot (target <= 2.0): 2.00 MET" in text
    assert "p99 repeated token, 64 conns, ours w=1 / dovecot's 5.00 ms (target <= 1): 0.80 MET" in (
        text
    )
    assert "(target >= 0.85): 0.90 MET" in text  # 900/s / (2 x 500/s)
    assert "RSS, 5 idle conns + 10 cached (target <= 80): 50.00 MiB MET" in text
    assert "extra CPU per auth, repeated token (target <= 25): 30.00 µs MISSED" in text
    assert "overhead above one openssl signature check, RS256: 100 µs" in text


def test_render_survives_a_run_too_short_to_read_cpu_ticks() -> None:
    rows = [
        Row("unique RS256, 8 conns", "dovecot", [_result(1000, 0.0)]),
        Row("unique RS256, 8 conns", "ours w=1", [_result(500, 0.0)]),
    ]
    text = render(rows, {"openssl": {"rsa2048": 50000.0}, "machine": {}})
    assert "| unique RS256, 8 conns | dovecot | 1000 |" in text
    assert "CPU/auth ours/dovecot" not in text


def test_compare_renders_both_ratios() -> None:
    from bench.compare import SCENARIOS, Side
    from bench.compare import render as render_compare

    base, head = Side("base", "/x"), Side("head", None)
    base.runs["repeated8"] = [_result(1000, 100), _result(1000, 120)]
    head.runs["repeated8"] = [_result(2000, 50), _result(2000, 66)]
    text = render_compare(["repeated8"], base, head)
    label = SCENARIOS["repeated8"][0]
    # medians 110 vs 58 (0.53); paired 0.50 and 0.55 -> 0.525
    assert f"| {label} | 110 | 58 | 0.53 | 0.53 |" in text
    assert "failed" not in text


def test_compare_exports_a_revision(tmp_path: Path) -> None:
    from bench.compare import export, resolve

    commit = resolve("HEAD")
    out = export(commit, tmp_path / "rev")
    assert (out / "saslauthd_oidc" / "__main__.py").is_file()
