"""All providers share one bound on outbound requests in flight (the pool's size)."""

from __future__ import annotations

from pathlib import Path

import trio

from saslauthd_oidc.config import parse_config
from saslauthd_oidc.providers.http import MAX_OUTBOUND, make_http_client
from saslauthd_oidc.providers.registry import ProviderRegistry
from tests.support_issuer import FaultIssuer


async def test_introspections_in_flight_are_bounded_across_providers(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("saslauthd-secret\n")
    secret.chmod(0o600)
    issuers = [FaultIssuer(), FaultIssuer()]
    for iss in issuers:
        await nursery.start(iss.serve)
        iss.delay = 0.5
    config = parse_config(
        {
            "server": {"request_timeout": 5.0},
            "provider": [
                {
                    "name": f"p{i}",
                    "issuer": iss.issuer,
                    "allow_http": True,
                    "introspection_endpoint": f"{iss.url}/introspect",
                    "client_id": "saslauthd",
                    "client_secret_file": str(secret),
                }
                for i, iss in enumerate(issuers)
            ],
            "rule": [{"name": "r", "provider": "p0", "check_audience": False}],
        }
    )
    async with make_http_client() as client:
        registry = ProviderRegistry(config, client)
        in_flight: list[int] = []

        async def introspect(name: str, n: int) -> None:
            await registry.get(name).introspect(f"token{n}")

        async with trio.open_nursery() as inner:
            for n in range(MAX_OUTBOUND + 10):
                inner.start_soon(introspect, f"p{n % 2}", n)
            await trio.sleep(0.25)
            in_flight.append(registry.outbound.borrowed_tokens)
            in_flight.append(registry.outbound.statistics().tasks_waiting)
        assert in_flight == [MAX_OUTBOUND, 10]
        assert sum(iss.requests["/introspect"] for iss in issuers) == MAX_OUTBOUND + 10
        await registry.aclose()
