"""Compact cache entries: a verified token keeps only the claims its configuration reads.

What is kept per provider is the union over its rules (conditions, username
template, e-mail policy) plus the claims the HTTP answers give. A cached and a
fresh answer decide, and answer ``/introspect``, alike; a configuration that
needs another claim does not meet an entry without it.
"""

from __future__ import annotations

from typing import Any

from saslauthd_oidc.config import CacheConfig, parse_config
from saslauthd_oidc.core.engine import EXPOSED_CLAIMS, Engine, kept_claims
from saslauthd_oidc.core.outcome import Outcome, Reason, Refusal
from saslauthd_oidc.frontends.http_replies import introspection_reply
from saslauthd_oidc.providers.jwt import VerifiedClaims
from saslauthd_oidc.providers.verification_cache import (
    CompactClaims,
    Lookup,
    VerificationCache,
    cache_key,
    token_digest,
)
from tests.support import FakeClock
from tests.test_engine import A, FakeLookup, FakeVerifier, request, token

CLAIMS = {
    "iss": A,
    "sub": "alice",
    "aud": "web",
    "exp": 2_000_000_000,
    "iat": 1_700_000_000,
    "nbf": 1_700_000_000,
    "jti": "unique-per-token",
    "client_id": "webmail",
    "scope": "openid mail",
    "email": "alice@example.org",
    "dept": "sales",
    "groups": ["mail", "staff"],
    "picture": "https://a.example.org/alice.png",
}


def _config(**rule: Any) -> dict[str, Any]:
    return {
        "provider": [{"name": "a", "issuer": A}, {"name": "b", "issuer": "https://b.example"}],
        "rule": [{"name": "web", "provider": "a", "audiences": ["web"], **rule}],
    }


def test_kept_claims_are_what_the_rules_and_the_answers_read() -> None:
    cfg = parse_config(
        {
            "provider": [
                {"name": "a", "issuer": A},
                {"name": "b", "issuer": "https://b.example"},
            ],
            "rule": [
                {"name": "web", "provider": "a", "audiences": ["web"], "claims": {"dept": "x"}},
                {
                    "name": "scoped",
                    "provider": "a",
                    "audiences": ["desk"],
                    "required_scopes": ["mail"],
                    "username": "{upn|lower}",
                },
                {"name": "b", "provider": "b", "audiences": ["b"], "username": "{oid}"},
            ],
        }
    )
    kept = kept_claims(cfg)
    assert kept["a"] == EXPOSED_CLAIMS | {
        "aud",
        "azp",
        "client_id",
        "dept",
        "scope",
        "scp",
        "upn",
        "email",
        "email_verified",
        "xms_edov",
    }
    assert kept["b"] == EXPOSED_CLAIMS | {"aud", "azp", "client_id", "oid"}
    assert "jti" not in kept["a"] and "iat" not in kept["a"] and "dept" not in kept["b"]


def test_an_entry_keeps_only_the_kept_claims_and_no_header() -> None:
    cache = VerificationCache(CacheConfig())
    cache.keep({"a": frozenset({"iss", "sub", "email"})})
    key = cache_key("a", Lookup.TOKEN, token_digest("t"))
    kept = cache.store(key, "a", VerifiedClaims(dict(CLAIMS), {"alg": "ES256"}, 2e9))
    entry = cache.lookup(key)
    assert entry is not None and entry.result is kept
    assert isinstance(kept, VerifiedClaims)
    assert dict(kept.claims) == {"iss": A, "sub": "alice", "email": "alice@example.org"}
    assert dict(kept.header) == {} and kept.expires_at == 2e9
    other = cache.store(  # a provider the configuration does not name keeps everything
        cache_key("z", Lookup.TOKEN, token_digest("t")), "z", VerifiedClaims(CLAIMS, {}, 2e9)
    )
    assert isinstance(other, VerifiedClaims) and dict(other.claims) == CLAIMS


def test_one_users_tokens_share_one_claims_object() -> None:
    cache = VerificationCache(CacheConfig())
    cache.keep({"a": frozenset({"iss", "sub", "aud", "email"})})
    results = [
        cache.store(
            cache_key("a", Lookup.TOKEN, token_digest(f"t{i}")),
            "a",
            VerifiedClaims({**CLAIMS, "jti": f"j{i}"}, {}, 2e9),
        )
        for i in range(3)
    ]
    assert all(isinstance(r, VerifiedClaims) for r in results)
    first = results[0]
    assert isinstance(first, VerifiedClaims) and isinstance(first.claims, CompactClaims)
    assert all(r is first for r in results)  # same kept claims, same expiry: one object
    later = cache.store(
        cache_key("a", Lookup.TOKEN, token_digest("t9")), "a", VerifiedClaims(CLAIMS, {}, 3e9)
    )
    assert isinstance(later, VerifiedClaims) and later.claims is first.claims
    assert later.expires_at == 3e9 and first.expires_at == 2e9


def test_unhashable_kept_values_are_kept_unshared() -> None:
    cache = VerificationCache(CacheConfig())
    cache.keep({"a": frozenset({"sub", "groups"})})
    a, b = (
        cache.store(
            cache_key("a", Lookup.TOKEN, token_digest(t)), "a", VerifiedClaims(CLAIMS, {}, 2e9)
        )
        for t in ("t1", "t2")
    )
    assert isinstance(a, VerifiedClaims) and isinstance(b, VerifiedClaims)
    assert dict(a.claims) == dict(b.claims) == {"sub": "alice", "groups": ["mail", "staff"]}


def test_refusals_are_kept_as_they_are() -> None:
    cache = VerificationCache(CacheConfig())
    cache.keep({"a": frozenset({"sub"})})
    refusal = Refusal(Reason.BAD_SIGNATURE, "sig")
    assert cache.store(cache_key("a", Lookup.TOKEN, token_digest("t")), "a", refusal) is refusal


class ClaimsVerifier(FakeVerifier):
    """Verifies every token of its issuer with the token's own claims."""

    async def verify(self, tok: str, unverified: Any) -> VerifiedClaims | Refusal:
        self.calls += 1
        return VerifiedClaims(dict(unverified.claims), dict(unverified.header), 2e9)


async def test_a_cached_token_decides_and_introspects_as_a_fresh_one() -> None:
    cfg = parse_config(_config(claims={"dept": "sales"}))
    lookup = FakeLookup(a=ClaimsVerifier(A, {}), b=ClaimsVerifier("https://b.example", {}))
    engine = Engine(cfg, lookup)
    req = request(token(**CLAIMS))
    fresh = await engine.authenticate(req)
    cached = await engine.authenticate(req)
    assert lookup.verifiers["a"].calls == 1
    assert fresh.outcome is Outcome.OK and fresh.account == "alice@example.org"
    assert (cached.reason, cached.account, cached.claims) == (
        fresh.reason,
        fresh.account,
        fresh.claims,
    )
    assert introspection_reply(cached) == introspection_reply(fresh)
    assert fresh.claims == {
        "iss": A,
        "sub": "alice",
        "aud": "web",
        "exp": 2_000_000_000,
        "client_id": "webmail",
        "scope": "openid mail",
        "email": "alice@example.org",
        "dept": "sales",
    }


async def test_without_a_cache_the_answer_is_the_same() -> None:
    cfg = parse_config({**_config(), "cache": {"max_entries": 0}})
    with_cache = parse_config(_config())
    answers = []
    for c in (cfg, with_cache):
        lookup = FakeLookup(a=ClaimsVerifier(A, {}), b=ClaimsVerifier("https://b.example", {}))
        answers.append((await Engine(c, lookup).authenticate(request(token(**CLAIMS)))).claims)
    assert answers[0] == answers[1] and answers[0] is not None and "jti" not in answers[0]


async def test_a_reload_that_needs_another_claim_verifies_again() -> None:
    """An entry made for rules that did not read ``dept`` does not answer rules that do."""
    clock = FakeClock()
    cache = VerificationCache(parse_config(_config()).cache, clock=clock)
    lookup = FakeLookup(a=ClaimsVerifier(A, {}), b=ClaimsVerifier("https://b.example", {}))
    req = request(token(**CLAIMS))
    before = await Engine(parse_config(_config()), lookup, cache=cache).authenticate(req)
    assert before.outcome is Outcome.OK and before.claims and "dept" not in before.claims
    assert lookup.verifiers["a"].calls == 1

    same = Engine(parse_config(_config(username="{email}")), lookup, cache=cache)
    assert (await same.authenticate(req)).outcome is Outcome.OK
    assert lookup.verifiers["a"].calls == 1  # the same claims kept: the entry stays

    needs_dept = Engine(parse_config(_config(claims={"dept": "sales"})), lookup, cache=cache)
    after = await needs_dept.authenticate(req)
    assert after.outcome is Outcome.OK and after.claims and after.claims["dept"] == "sales"
    assert lookup.verifiers["a"].calls == 2


def test_keep_drops_only_the_providers_whose_claims_changed() -> None:
    cache = VerificationCache(CacheConfig())
    cache.keep({"a": frozenset({"sub"}), "b": frozenset({"sub"})})
    for provider in ("a", "b"):
        for lookup in Lookup:
            key = cache_key(provider, lookup, token_digest("t"))
            cache.store(key, provider, VerifiedClaims(CLAIMS, {}, 2e9))
    assert len(cache) == 4
    assert cache.keep({"a": frozenset({"sub", "dept"}), "b": frozenset({"sub"})}) == 2
    assert cache.lookup(cache_key("a", Lookup.TOKEN, token_digest("t"))) is None
    assert cache.lookup(cache_key("a", Lookup.USERINFO, token_digest("t"))) is None
    assert cache.lookup(cache_key("b", Lookup.TOKEN, token_digest("t"))) is not None
    assert cache.keep({"a": frozenset({"sub", "dept"})}) == 2  # b no longer configured


def test_entries_alike_are_one_object_and_never_outlive_exp() -> None:
    clock = FakeClock(1_000_000.25)
    cache = VerificationCache(CacheConfig(ttl=300), clock=clock)
    cache.keep({"a": frozenset({"iss", "sub"})})
    exp = clock() + 100.5  # 1_000_100.75
    keys = [cache_key("a", Lookup.TOKEN, token_digest(f"t{i}")) for i in range(3)]
    for i, key in enumerate(keys):
        cache.store(key, "a", VerifiedClaims({**CLAIMS, "jti": f"j{i}"}, {}, exp), A)
    entries = [cache.lookup(key) for key in keys]
    assert entries[0] is not None and all(e is entries[0] for e in entries)
    assert entries[0].until <= exp and entries[0].iss == A
    clock.advance(99.5)
    assert cache.lookup(keys[0]) is entries[0]
    clock.advance(0.5)  # 1_000_100.25: before exp, after the whole second it was cut to
    assert cache.lookup(keys[0]) is None


def test_equal_values_of_other_types_are_not_shared() -> None:
    """1 == True == 1.0 in Python, but ``email_verified = 1`` is not the JSON ``true``."""
    cache = VerificationCache(CacheConfig())
    cache.keep({"a": frozenset({"sub", "email_verified"})})
    seen = []
    for i, value in enumerate((1, True, 1.0, "true")):
        result = cache.store(
            cache_key("a", Lookup.TOKEN, token_digest(f"t{i}")),
            "a",
            VerifiedClaims({"sub": "alice", "email_verified": value}, {}, 2e9),
        )
        assert isinstance(result, VerifiedClaims)
        seen.append(result.claims["email_verified"])
    assert [type(v) for v in seen] == [int, bool, float, str]


def test_introspect_claims_adds_claims_for_every_provider() -> None:
    cfg = parse_config({**_config(), "http": {"introspect_claims": ["groups", "jti"]}})
    kept = kept_claims(cfg)
    assert {"groups", "jti"} <= kept["a"] and {"groups", "jti"} <= kept["b"]
    assert "groups" not in kept_claims(parse_config(_config()))["a"]


async def test_a_listed_claim_is_in_the_introspection_answer_cached_or_fresh() -> None:
    cfg = parse_config({**_config(), "http": {"introspect_claims": ["groups"]}})
    lookup = FakeLookup(a=ClaimsVerifier(A, {}), b=ClaimsVerifier("https://b.example", {}))
    engine = Engine(cfg, lookup)
    req = request(token(**CLAIMS))
    replies = [introspection_reply(await engine.authenticate(req)) for _ in range(2)]
    assert lookup.verifiers["a"].calls == 1 and replies[0] == replies[1]
    assert b'"groups":["mail","staff"]' in replies[0].body and b"jti" not in replies[0].body


def test_entries_of_new_tokens_share_their_issuer_and_entry() -> None:
    """Two new tokens of one user ending in the same second: one entry, one iss string."""
    cache = VerificationCache(CacheConfig(), clock=lambda: 1000.0)
    entries = []
    for i in range(2):
        iss = "".join(["https://idp.example.org/", "tenant"])  # a new string each time
        claims = {"iss": iss, "sub": "alice", "exp": 2000, "jti": f"j{i}"}
        cache.keep({"p": frozenset({"iss", "sub", "exp"})})
        cache.store(bytes([i]) * 32 + b"tp", "p", VerifiedClaims(claims, {}, 2000.0), iss)
        entry = cache.lookup(bytes([i]) * 32 + b"tp")
        assert entry is not None
        entries.append(entry)
    assert entries[0].iss is entries[1].iss
    assert entries[0] is entries[1]
