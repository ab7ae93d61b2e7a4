"""Verified-token cache: lifetime bounded by exp and ttl, stable refusals only, single-flight."""

from __future__ import annotations

import trio
import trio.testing

from saslauthd_oidc.config import CacheConfig
from saslauthd_oidc.core.outcome import Reason, Refusal
from saslauthd_oidc.providers.jwt import UnverifiedToken, VerifiedClaims
from saslauthd_oidc.providers.verification_cache import VerificationCache

UNVERIFIED = UnverifiedToken(header={}, claims={})


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class CountingVerifier:
    def __init__(self, result: VerifiedClaims | Refusal, delay: float = 0.0) -> None:
        self.result = result
        self.delay = delay
        self.calls = 0

    async def verify(
        self, token: str, unverified: UnverifiedToken | None
    ) -> VerifiedClaims | Refusal:
        self.calls += 1
        await trio.sleep(self.delay)
        return self.result


def ok(expires_at: float) -> VerifiedClaims:
    return VerifiedClaims(claims={"sub": "a"}, header={}, expires_at=expires_at)


def cache(clock: Clock, **kw: float) -> VerificationCache:
    cfg = CacheConfig(
        max_entries=int(kw.get("max_entries", 100)),
        ttl=kw.get("ttl", 300.0),
        negative_ttl=kw.get("negative_ttl", 30.0),
    )
    return VerificationCache(cfg, clock=clock)


async def test_positive_entry_lives_until_min_of_ttl_and_exp() -> None:
    clock = Clock()
    c = cache(clock, ttl=300)
    v = CountingVerifier(ok(clock.now + 60))  # exp sooner than ttl
    assert await c.verify("p", v, "tok", UNVERIFIED) == v.result
    clock.now += 59
    await c.verify("p", v, "tok", UNVERIFIED)
    assert v.calls == 1
    clock.now += 1  # at exp: never served past it
    await c.verify("p", v, "tok", UNVERIFIED)
    assert v.calls == 2

    v2 = CountingVerifier(ok(clock.now + 10_000))  # ttl sooner than exp
    await c.verify("p", v2, "tok2", UNVERIFIED)
    clock.now += 299
    await c.verify("p", v2, "tok2", UNVERIFIED)
    clock.now += 2
    await c.verify("p", v2, "tok2", UNVERIFIED)
    assert v2.calls == 2
    assert (c.hits, c.misses) == (2, 4)


async def test_keyed_by_provider_and_token() -> None:
    clock = Clock()
    c = cache(clock)
    v = CountingVerifier(ok(clock.now + 600))
    await c.verify("a", v, "tok", UNVERIFIED)
    await c.verify("b", v, "tok", UNVERIFIED)
    await c.verify("a", v, "other", UNVERIFIED)
    assert v.calls == 3


async def test_only_stable_refusals_are_cached() -> None:
    clock = Clock()
    c = cache(clock, negative_ttl=30)
    for reason, cached in [
        (Reason.BAD_SIGNATURE, True),
        (Reason.EXPIRED, True),
        (Reason.UNKNOWN_KEY, False),  # a key rotation may make it valid
        (Reason.NOT_YET_VALID, False),  # time will
        (Reason.PROVIDER_UNAVAILABLE, False),  # temporary
    ]:
        v = CountingVerifier(Refusal(reason, "x"))
        await c.verify("p", v, str(reason), UNVERIFIED)
        await c.verify("p", v, str(reason), UNVERIFIED)
        assert v.calls == (1 if cached else 2), reason
    v = CountingVerifier(Refusal(Reason.BAD_SIGNATURE, "x"))
    await c.verify("p", v, "bad", UNVERIFIED)
    clock.now += 31
    await c.verify("p", v, "bad", UNVERIFIED)
    assert v.calls == 2


async def test_lru_bound() -> None:
    clock = Clock()
    c = cache(clock, max_entries=2)
    v = CountingVerifier(ok(clock.now + 600))
    await c.verify("p", v, "t1", UNVERIFIED)
    await c.verify("p", v, "t2", UNVERIFIED)
    await c.verify("p", v, "t1", UNVERIFIED)  # t1 is now the most recent
    await c.verify("p", v, "t3", UNVERIFIED)  # evicts t2
    assert len(c) == 2
    calls = v.calls
    await c.verify("p", v, "t1", UNVERIFIED)
    assert v.calls == calls
    await c.verify("p", v, "t2", UNVERIFIED)
    assert v.calls == calls + 1


async def test_max_entries_zero_disables() -> None:
    clock = Clock()
    c = cache(clock, max_entries=0)
    v = CountingVerifier(ok(clock.now + 600))
    for _ in range(3):
        await c.verify("p", v, "t", UNVERIFIED)
    assert v.calls == 3 and len(c) == 0


async def test_single_flight_100_concurrent_verifies_one_call() -> None:
    clock = Clock()
    c = cache(clock)
    v = CountingVerifier(ok(clock.now + 600), delay=0.05)
    results = []

    async def one() -> None:
        results.append(await c.verify("p", v, "new-token", UNVERIFIED))

    async with trio.open_nursery() as n:
        for _ in range(100):
            n.start_soon(one)
    assert v.calls == 1
    assert len(results) == 100 and results[0] == v.result
    assert all(r is results[0] for r in results)


async def test_single_flight_shares_temporary_failure_without_caching_it() -> None:
    clock = Clock()
    c = cache(clock)
    v = CountingVerifier(Refusal(Reason.PROVIDER_UNAVAILABLE, "down"), delay=0.05)
    async with trio.open_nursery() as n:
        for _ in range(10):
            n.start_soon(c.verify, "p", v, "t", UNVERIFIED)
    assert v.calls == 1
    await c.verify("p", v, "t", UNVERIFIED)
    assert v.calls == 2


async def test_cancelled_leader_does_not_strand_waiters() -> None:
    clock = Clock()
    c = cache(clock)
    v = CountingVerifier(ok(clock.now + 600), delay=0.2)
    got = []

    async def leader() -> None:
        with trio.move_on_after(0.05):
            await c.verify("p", v, "t", UNVERIFIED)

    async def waiter() -> None:
        await trio.sleep(0.01)
        got.append(await c.verify("p", v, "t", UNVERIFIED))

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(leader)
            n.start_soon(waiter)
    assert got == [v.result]
    assert v.calls == 2  # the waiter verified itself after the leader gave up
