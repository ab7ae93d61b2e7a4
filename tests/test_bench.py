"""bench/ runs and prints its table (a tiny load; nothing here measures speed)."""

from __future__ import annotations

import signal
from pathlib import Path

from bench.loadgen import LoadResult, auth_suffix, run_load
from bench.run_all import Row, render
from saslauthd_oidc.devissuer import DevIssuer
from tests.test_workers import _accepts, issuer, start, wait_for, workdir  # noqa: F401


def test_load_generator_against_the_daemon(issuer: DevIssuer, workdir: Path) -> None:  # noqa: F811
    proc, sock = start(workdir, issuer, 1)
    try:
        wait_for(lambda: _accepts(sock))
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


def test_render_prints_the_table_and_ratios() -> None:
    rows = [
        Row("unique RS256, 8 conns", "dovecot", [_result(1000, 60)] * 3),
        Row("unique RS256, 8 conns", "ours w=1", [_result(500, 120)] * 3),
        Row("unique RS256, 8 conns", "ours w=2", [_result(900, 125)] * 3),
        Row("repeated token, 8 conns", "dovecot", [_result(1000, 60)] * 3),
        Row("repeated token, 8 conns", "ours w=1", [_result(3500, 40)] * 3),
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
    text = render(rows, {"openssl": {"rsa2048": 50000.0}, "memory": memory, "machine": {}})
    assert text.startswith("| scenario | server | auths/s |")
    assert "| unique RS256, 8 conns | ours w=1 | 500 |" in text
    assert "unique RS256 CPU/auth ours/dovecot (target <= 1): 2.00 MISSED" in text
    assert "repeated token throughput ours/dovecot (target >= 3): 3.50 MET" in text
    assert "p99 ms, repeated token, 64 conns, ours w=1 (target < 5): 4.00 MET" in text
    assert (
        "workers=2 / workers=1 throughput, unique RS256, 8 conns (target >= 1.7): 1.80 MET" in text
    )
    assert "RSS MiB" in text


def test_render_survives_a_run_too_short_to_read_cpu_ticks() -> None:
    rows = [
        Row("unique RS256, 8 conns", "dovecot", [_result(1000, 0.0)]),
        Row("unique RS256, 8 conns", "ours w=1", [_result(500, 0.0)]),
    ]
    text = render(rows, {"openssl": {"rsa2048": 50000.0}, "machine": {}})
    assert "unique RS256 throughput ours/dovecot (target >= 1): 0.50 MISSED" in text
    assert "CPU/auth ours/dovecot" not in text
