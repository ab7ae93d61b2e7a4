"""The assembled daemon's HTTP listener (hypercorn, trio) on a Unix socket and on loopback.

Real tokens from a real issuer on loopback; ``/metrics`` scraped and parsed
with prometheus-client's own parser; readiness follows the provider keys.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from saslauthd_oidc.config import ConfigError, parse_config
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.tools.devissuer import DevIssuer
from tests.peers.postfix import free_tcp_port

USER = "alice@example.org"
FORM = {"content-type": "application/x-www-form-urlencoded"}


def daemon_config(issuer: str, sock: Path, port: int, **http: Any) -> dict[str, Any]:
    return {
        "server": {
            "auth_socket": "",
            "http_socket": str(sock),
            "http_listen": [f"127.0.0.1:{port}"],
            "request_timeout": 2.0,
        },
        "http": {"auth": "open", **http},
        "provider": [
            {"name": "dev", "issuer": issuer, "allow_http": True, "token_types": ["at+jwt"]}
        ],
        "rule": [{"name": "mail", "provider": "dev", "audiences": ["mail"]}],
    }


@pytest.fixture
async def stack(
    nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, DevIssuer, int]]:
    issuer = DevIssuer()
    await nursery.start(issuer.serve)
    assert issuer.issuer
    sock = tmp_path / "http"
    port = free_tcp_port()
    config = parse_config(daemon_config(issuer.issuer, sock, port))
    await nursery.start(
        lambda task_status: run_daemon(config, task_status=task_status, handle_signals=False)
    )
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        yield c, issuer, port
    nursery.cancel_scope.cancel()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def test_metrics_after_real_authentications(
    stack: tuple[httpx.AsyncClient, DevIssuer, int],
) -> None:
    c, issuer, _ = stack
    good = issuer.mint(email=USER, audience="mail")
    other_aud = issuer.mint(email=USER, audience="calendar")
    for token in (good, good, other_aud):
        r = await c.post("/introspect", content=f"token={token}".encode(), headers=FORM)
        assert r.status_code == 200
    r = await c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    got = samples(r.text)

    def auth(outcome: str, reason: str, rule: str) -> float:
        labels = {
            "outcome": outcome,
            "reason": reason,
            "rule": rule,
            "mechanism": "BEARER",
            "frontend": "http",
        }
        return got.get(("saslauthd_oidc_authentications_total", frozenset(labels.items())), 0.0)

    assert auth("ok", "ok", "mail") == 2
    assert auth("fail", "wrong_audience", "") == 1
    latency = (
        "saslauthd_oidc_authentication_duration_seconds_count",
        frozenset({("frontend", "http")}),
    )
    assert got[latency] == 3
    provider = frozenset({("provider", "dev")})
    assert got[("saslauthd_oidc_provider_fetches_total", provider)] >= 1
    assert got[("saslauthd_oidc_provider_fetch_errors_total", provider)] == 0
    assert got[("saslauthd_oidc_provider_keys_loaded", provider)] == 1
    # the second use of `good` came from the verified-token cache
    assert got[("saslauthd_oidc_cache_lookups_total", frozenset({("result", "hit")}))] >= 1
    assert good not in r.text
    assert USER not in r.text


async def test_loopback_listener_and_readiness(
    stack: tuple[httpx.AsyncClient, DevIssuer, int],
) -> None:
    c, issuer, port = stack
    with trio.fail_after(10):
        while (await c.get("/readyz")).status_code != 200:
            await trio.sleep(0.05)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as tcp:
        assert (await tcp.get("/healthz")).text == "ok\n"
        token = issuer.mint(email=USER, audience="mail")
        r = await tcp.post("/introspect", content=f"token={token}".encode(), headers=FORM)
        assert r.json()["username"] == USER


async def test_not_ready_until_keys_or_grace(nursery: trio.Nursery, tmp_path: Path) -> None:
    sock = tmp_path / "http"
    port = free_tcp_port()
    # Nothing listens on port 9: the provider's keys never load.
    cfg = daemon_config("http://127.0.0.1:9", sock, port, readyz_grace=3600)
    await nursery.start(
        lambda task_status: run_daemon(
            parse_config(cfg), task_status=task_status, handle_signals=False
        )
    )
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        assert (await c.get("/readyz")).status_code == 503
        assert (await c.get("/healthz")).status_code == 200
        r = await c.post("/introspect", content=b"token=a.b.c", headers=FORM)
        assert r.json() == {"active": False}  # malformed token: a refusal, not an outage
    nursery.cancel_scope.cancel()


async def test_busy_port_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = parse_config(daemon_config("http://127.0.0.1:9", tmp_path / "h", port))
        with pytest.raises(ConfigError) as info:
            await run_daemon(cfg, handle_signals=False)
    assert info.value.key == "server.http_listen"
    assert not (tmp_path / "h").exists()
