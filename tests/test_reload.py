"""Reload and stop piece by piece: the plan, the swap, the drain, kept keys, dropped entries."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from saslauthd_oidc.config import CacheConfig, parse_config
from saslauthd_oidc.core.engine import Pending, unanswered
from saslauthd_oidc.core.outcome import Reason, Refusal, Verdict
from saslauthd_oidc.core.request import AuthRequest, Credentials, Mechanism, RequestContext
from saslauthd_oidc.providers.http import make_http_client
from saslauthd_oidc.providers.jwt import UnverifiedToken, VerifiedClaims, peek
from saslauthd_oidc.providers.registry import ProviderRegistry
from saslauthd_oidc.providers.verification_cache import (
    Lookup,
    VerificationCache,
    cache_key,
    token_digest,
)
from saslauthd_oidc.service.lifecycle import Current, plan_reload
from saslauthd_oidc.tools.devissuer import JWKS_PATH, DevIssuer


def config(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "server": {"auth_socket": "/run/x/auth", "request_timeout": 5.0},
        "provider": [
            {"name": "a", "issuer": "https://a.example"},
            {"name": "b", "issuer": "https://b.example"},
        ],
        "rule": [{"name": "r", "provider": "a", "audiences": ["mail"]}],
    }
    data.update(changes)
    return data


def test_plan_reload_names_what_needs_a_restart_and_keeps_it() -> None:
    old = parse_config(config())
    new = parse_config(
        config(
            server={"auth_socket": "/run/y/auth", "request_timeout": 2.0},
            cache={"ttl": 10},
            logging={"level": "debug"},
            provider=[
                {"name": "a", "issuer": "https://a.example", "leeway": 5},
                {"name": "c", "issuer": "https://c.example"},
            ],
            rule=[
                {"name": "r", "provider": "a", "audiences": ["mail"]},
                {"name": "s", "provider": "c", "audiences": ["mail"]},
            ],
        )
    )
    plan = plan_reload(old, new)
    assert plan.restart_keys == (
        "server.auth_socket",
        "server.request_timeout",
        "cache.ttl",
    )
    assert plan.config.server == old.server and plan.config.cache == old.cache
    assert plan.config.rules == new.rules and plan.config.providers == new.providers
    assert plan.removed_providers == ("b",)
    assert plan.changed_providers == ("a",)
    assert plan.added_providers == ("c",)
    assert plan.logging_changed


def test_plan_reload_of_the_same_config_changes_nothing() -> None:
    plan = plan_reload(parse_config(config()), parse_config(config()))
    assert plan.restart_keys == () and not plan.logging_changed
    assert plan.removed_providers == plan.changed_providers == plan.added_providers == ()


class _Answer:
    def __init__(self, result: VerifiedClaims | Refusal) -> None:
        self.result = result
        self.calls = 0

    async def verify(
        self, token: str, unverified: UnverifiedToken | None
    ) -> VerifiedClaims | Refusal:
        self.calls += 1
        return self.result


async def test_cache_drops_only_the_named_providers_entries() -> None:
    cache = VerificationCache(CacheConfig(), clock=lambda: 1000.0)
    ok = _Answer(VerifiedClaims({"sub": "x"}, {}, expires_at=2000.0))
    for provider in ("a", "b", "ab"):
        await cache.verify(provider, ok, "tok", None)
    userinfo = cache_key("a", Lookup.USERINFO, token_digest("tok"))  # goes with its provider
    await cache.fetch(userinfo, "a", lambda: ok.verify("tok", None))
    assert len(cache) == 4
    assert cache.drop_providers(["a"]) == 2
    assert len(cache) == 2
    await cache.verify("b", ok, "tok", None)
    await cache.verify("ab", ok, "tok", None)
    assert ok.calls == 4  # b and ab still cached


async def test_registry_reload_keeps_keys_of_unchanged_providers() -> None:
    issuer_a = DevIssuer(algorithms=("ES256",))
    issuer_b = DevIssuer(algorithms=("ES256",))
    async with trio.open_nursery() as nursery:
        await nursery.start(issuer_a.serve)
        await nursery.start(issuer_b.serve)

        def cfg(leeway_b: float) -> dict[str, Any]:
            return config(
                provider=[
                    {"name": "a", "issuer": issuer_a.issuer, "allow_http": True},
                    {
                        "name": "b",
                        "issuer": issuer_b.issuer,
                        "allow_http": True,
                        "leeway": leeway_b,
                    },
                ]
            )

        async with make_http_client() as client:
            first = ProviderRegistry(parse_config(cfg(60)), client)
            assert all((await first.refresh_all()).values())
            second = ProviderRegistry(parse_config(cfg(30)), client, previous=first)
            assert second.adopted == ["a"]
            assert second.outbound is first.outbound
            assert second.get("a").keys_loaded and not second.get("b").keys_loaded
            token = issuer_a.mint()
            fetched = issuer_a.requests[JWKS_PATH]
            unverified = peek(token)
            assert isinstance(unverified, UnverifiedToken)
            result = await second.get("a").verify(token, unverified)
            assert isinstance(result, VerifiedClaims)
            assert issuer_a.requests[JWKS_PATH] == fetched  # no fetch: the keys were kept
            # One key cache handed over whole: a fetch made by the old registry's
            # provider (a request still in flight at the reload) serves the new one.
            issuer_a.rotate("ES256")
            rotated = issuer_a.mint()
            assert await first.get("a").refresh()
            fetched = issuer_a.requests[JWKS_PATH]
            unverified = peek(rotated)
            assert isinstance(unverified, UnverifiedToken)
            assert isinstance(second.get("a").verify_now(rotated, unverified), VerifiedClaims)
            assert issuer_a.requests[JWKS_PATH] == fetched
            await first.aclose()
            await second.aclose()
        nursery.cancel_scope.cancel()


def _request() -> AuthRequest:
    return AuthRequest(
        mechanism=Mechanism.OAUTHBEARER,
        credentials=Credentials(token="t"),
        context=RequestContext(frontend="dovecot"),
    )


class _Gate:
    """An engine whose answers wait for ``release``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.release = trio.Event()
        self.entered = 0

    def start(self, request: AuthRequest) -> Verdict | Pending:
        return unanswered(request)  # every answer waits: finish() does

    async def finish(self, pending: Pending) -> Verdict:
        return await self.authenticate(pending.request)

    async def authenticate(self, request: AuthRequest) -> Verdict:
        self.entered += 1
        await self.release.wait()
        return Verdict(reason=Reason.OK, account=self.name)


async def test_current_swaps_for_new_requests_and_finishes_old_ones() -> None:
    old, new = _Gate("old"), _Gate("new")
    current = Current(old)
    results: list[str] = []

    async def one() -> None:
        results.append(str((await current.authenticate(_request())).account))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        current.swap(new)
        nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        assert (old.entered, new.entered, current.in_flight) == (1, 1, 2)
        new.release.set()
        old.release.set()
    assert sorted(results) == ["new", "old"]


async def test_drain_waits_for_in_flight_and_holds_new_requests() -> None:
    gate = _Gate("e")
    current = Current(gate)
    answered: list[str | None] = []

    async def one() -> None:
        answered.append((await current.authenticate(_request())).account)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        drained: list[int] = []

        async def drain() -> None:
            drained.append(await current.drain(timeout=60))

        nursery.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(one)  # arrives while draining: held, never answered
        await trio.testing.wait_all_tasks_blocked()
        assert gate.entered == 1 and drained == []
        gate.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert drained == [0] and answered == ["e"]
        nursery.cancel_scope.cancel()


async def test_drain_gives_up_after_its_bound() -> None:
    gate = _Gate("e")
    current = Current(gate)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(current.authenticate, _request())
        await trio.testing.wait_all_tasks_blocked()
        assert await current.drain(timeout=0) == 1
        nursery.cancel_scope.cancel()
