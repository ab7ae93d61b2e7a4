"""In-process tight loop over the miss path: a new RS256 JWT through ``Engine.start``.

One provider whose JWKS is loaded without network (the bench's config: one
rule, ``audiences = ["mail"]``, ``username = "{email}"``), N unique tokens
from the dev issuer, each authenticated once; the cache keeps them, so every
request is a miss. Prints µs per auth (and, with ``--hit``, the cached path
over the same tokens). ``--profile`` runs it under cProfile.

    .venv/bin/python -m bench.micro_miss [-n 3000] [--rounds 5] [--profile]

Only ratios taken in one run (or alternating runs) mean anything on a shared
machine.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import sys
import time
from typing import Any

import httpx

from saslauthd_oidc.config import LoggingConfig, parse_config
from saslauthd_oidc.core.engine import Engine
from saslauthd_oidc.core.outcome import Verdict
from saslauthd_oidc.core.request import AuthRequest, Credentials, Mechanism, RequestContext
from saslauthd_oidc.providers.jwt import KeySet
from saslauthd_oidc.providers.oidc import OidcProvider
from saslauthd_oidc.service.logs import configure_logging
from saslauthd_oidc.tools.devissuer import DevIssuer

ISSUER = "https://idp.example.org"
USER = "alice@example.org"


class _One:
    def __init__(self, provider: OidcProvider) -> None:
        self._p = provider

    def get(self, name: str) -> OidcProvider:
        return self._p


def build(n: int) -> tuple[Engine, list[AuthRequest], OidcProvider]:
    """An engine with loaded keys and ``n`` requests with unique RS256 tokens."""
    issuer = DevIssuer(algorithms=("RS256",))
    cfg = parse_config(
        {
            "provider": [
                {
                    "name": "bench",
                    "issuer": ISSUER,
                    "jwks_uri": ISSUER + "/jwks.json",
                    "algorithms": ["RS256", "ES256", "EdDSA"],
                }
            ],
            "rule": [
                {"name": "bench", "provider": "bench", "audiences": ["mail"], "username": "{email}"}
            ],
            "cache": {"max_entries": 4 * n},
        }
    )
    provider = OidcProvider(cfg.providers[0], httpx.AsyncClient())
    keys = provider._keys
    keys.jwks = KeySet.from_jwks(issuer.jwks(), cfg.providers[0].algorithms)
    keys.loaded_at = time.time()
    keys.jwks_lifetime = 1e9
    engine = Engine(cfg, _One(provider))
    requests = [
        AuthRequest(
            Mechanism.OAUTHBEARER,
            Credentials(
                issuer.mint(
                    alg="RS256", lifetime=7200, email=USER, typ="JWT", claims={"iss": ISSUER}
                ),
                USER,
            ),
            RequestContext(service="smtp"),
        )
        for _ in range(n)
    ]
    return engine, requests, provider


def run(engine: Engine, requests: list[AuthRequest], *, collect: bool = False) -> float:
    """µs per ``start`` over ``requests`` (``collect``: with the garbage collector on)."""
    start = engine.start
    if not collect:
        gc.disable()
    try:
        t = time.perf_counter()
        for req in requests:
            verdict = start(req)
        elapsed = time.perf_counter() - t
    finally:
        gc.enable()
    assert isinstance(verdict, Verdict) and verdict.ok, verdict
    return elapsed / len(requests) * 1e6


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--hit", action="store_true", help="also time the cached path")
    ap.add_argument("--gc", action="store_true", help="keep the garbage collector on, as a daemon")
    args = ap.parse_args(argv)
    # As the bench daemon runs: level warning, cached loggers.
    configure_logging(LoggingConfig(level="warning", format="json"), sys.stderr, cache_loggers=True)
    engine, requests, _ = build(args.n)
    if args.profile:
        prof = cProfile.Profile()
        for _ in range(args.rounds):
            engine.cache.clear()
            prof.enable()
            run(engine, requests)
            prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return
    misses: list[float] = []
    hits: list[float] = []
    for _ in range(args.rounds):
        engine.cache.clear()
        misses.append(run(engine, requests, collect=args.gc))
        if args.hit:
            hits.append(run(engine, requests, collect=args.gc))
    out: dict[str, Any] = {"miss_us": sorted(misses)[len(misses) // 2]}
    if hits:
        out["hit_us"] = sorted(hits)[len(hits) // 2]
    print(" ".join(f"{k}={v:.2f}" for k, v in out.items()))


if __name__ == "__main__":
    main()
