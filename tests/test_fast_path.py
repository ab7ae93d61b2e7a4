"""The fast path: Engine.start/finish, the cache in front of parsing, inline replies.

Two kinds of tests. Equivalence: the synchronous step decides exactly as the
full (I/O) path does, and asks for I/O (a Pending) whenever an answer needs
it: opaque tokens, keys not loaded or stale, an unknown kid (which may
refetch), userinfo enrichment not cached yet, a verification already in
flight. Structure: counts of what the hot path does per request — no task
spawned, no cancel scope entered, one recv and one send on a ready socket,
no token parsing (base64/JSON) for a cached token, no ``labels()`` lookup —
so that a change that puts work back on it fails here (timing is for bench/).
"""

from __future__ import annotations

import collections
import functools
import json
import socket
import sys
import unicodedata
from typing import Any

import pytest
import trio
import trio.testing

from saslauthd_oidc.config import ProviderConfig, parse_config
from saslauthd_oidc.core.engine import Engine, Pending, unanswered
from saslauthd_oidc.core.outcome import Outcome, Reason, Refusal, Verdict
from saslauthd_oidc.core.request import AuthRequest
from saslauthd_oidc.providers import verification_cache as vcache
from saslauthd_oidc.providers.http import make_http_client
from saslauthd_oidc.providers.jwt import UnverifiedToken, VerifiedClaims, peek
from saslauthd_oidc.providers.oidc import OidcProvider
from saslauthd_oidc.providers.verification_cache import (
    Lookup,
    VerificationCache,
    cache_key,
    token_digest,
)
from saslauthd_oidc.service.metrics import Metrics
from saslauthd_oidc.tools.devissuer import DevIssuer
from tests.support import MECHS, Client, FakeClock, Stub
from tests.test_engine import CONFIG, A, B, FakeLookup, FakeVerifier, request, token


class SyncVerifier(FakeVerifier):
    """FakeVerifier that can also answer synchronously (as a provider with fresh keys)."""

    def __init__(self, issuer: str, verdicts: dict[str, Refusal]) -> None:
        super().__init__(issuer, verdicts)
        self.now_calls = 0
        self.blocking = False

    def verify_now(
        self, tok: str, unverified: UnverifiedToken | None
    ) -> VerifiedClaims | Refusal | None:
        self.now_calls += 1
        if self.blocking or unverified is None:
            return None
        if unverified.claims.get("iss") != self.issuer:
            return Refusal(Reason.WRONG_ISSUER, "iss")
        rejection = self.verdicts.get(str(unverified.claims.get("jti")))
        if rejection:
            return rejection
        return VerifiedClaims(dict(unverified.claims), dict(unverified.header), 2e9)


REJECTIONS = {
    "sig": Refusal(Reason.BAD_SIGNATURE, "sig"),
    "down": Refusal(Reason.PROVIDER_UNAVAILABLE, "down"),
}

REQUESTS = [
    request(token(iss=A, aud="web", email="alice@example.org")),
    request(token(iss=A, aud="desk", preferred_username="bob", scope="mail")),
    request(token(iss=A, aud="desk", preferred_username="bob", scope="other")),
    request(token(iss=A, aud="web", jti="sig", email="alice@example.org")),
    request(token(iss=A, aud="web", jti="down", email="alice@example.org")),
    request(token(iss=B, aud="any", email="carol@b.example")),
    request(token(iss="https://unknown", aud="web")),
    request(token(iss=A, aud="web", email="alice@example.org"), user="mallory@example.org"),
    request("not a jwt at all"),
    request(token(iss=A, aud="web", email="alice@example.org"), service="imap"),
]


def _engine(verifier: type[FakeVerifier]) -> tuple[Engine, FakeLookup]:
    lookup = FakeLookup(a=verifier(A, REJECTIONS), b=verifier(B, REJECTIONS))
    return Engine(parse_config(CONFIG), lookup), lookup


def _summary(v: Verdict) -> tuple[Any, ...]:
    return (v.reason, v.account, v.rule, v.provider, v.hint, v.trace)


@pytest.mark.parametrize("index", range(len(REQUESTS)))
async def test_fast_path_decides_as_the_async_path(index: int) -> None:
    req = REQUESTS[index]
    slow, _ = _engine(FakeVerifier)
    fast, _ = _engine(SyncVerifier)
    expected = await slow.authenticate(req)
    now = fast.start(req)
    assert isinstance(now, Verdict)  # every verifier answers synchronously here
    assert _summary(now) == _summary(expected)


async def test_fast_path_uses_and_fills_the_cache() -> None:
    engine, lookup = _engine(SyncVerifier)
    req = REQUESTS[0]
    first = engine.start(req)
    assert isinstance(first, Verdict) and first.ok
    second = engine.start(req)
    assert isinstance(second, Verdict) and second.account == first.account
    verifier = lookup.verifiers["a"]
    assert isinstance(verifier, SyncVerifier)
    assert verifier.now_calls == 1
    assert engine.cache.hits == 1
    # The async path sees the fast path's cache entry too.
    assert (await engine.authenticate(req)).ok
    assert verifier.calls == 0


async def test_fast_path_gives_up_when_the_verifier_needs_io() -> None:
    engine, _ = _engine(FakeVerifier)  # verify_now always says "needs I/O"
    pending = engine.start(REQUESTS[0])
    assert isinstance(pending, Pending) and pending.need.lookup is Lookup.TOKEN
    assert (await engine.finish(pending)).ok  # now cached
    cached = engine.start(REQUESTS[0])
    assert isinstance(cached, Verdict) and cached.ok
    engine2, lookup2 = _engine(SyncVerifier)
    blocking = lookup2.verifiers["a"]
    assert isinstance(blocking, SyncVerifier)
    blocking.blocking = True
    assert isinstance(engine2.start(REQUESTS[0]), Pending)
    assert len(engine2.cache) == 0


async def test_fast_path_engine_error_is_internal_error() -> None:
    engine, lookup = _engine(SyncVerifier)

    def broken(*_: Any) -> None:
        raise RuntimeError("bug")

    lookup.verifiers["a"].verify_now = broken  # type: ignore[method-assign,assignment]
    verdict = engine.start(REQUESTS[0])
    assert isinstance(verdict, Verdict) and verdict.reason is Reason.INTERNAL_ERROR


USERINFO_CONFIG = {
    "provider": [{"name": "a", "issuer": A, "userinfo": True}],
    "rule": [{"name": "web", "provider": "a", "audiences": ["web"], "username": "{email}"}],
}


class UserinfoVerifier(SyncVerifier):
    async def userinfo(self, tok: str) -> VerifiedClaims | Refusal:
        return VerifiedClaims({"sub": "s", "email": "eve@example.org"}, {}, 2e9)


async def test_fast_path_waits_for_uncached_userinfo_then_uses_it() -> None:
    lookup = FakeLookup(a=UserinfoVerifier(A, {}))
    engine = Engine(parse_config(USERINFO_CONFIG), lookup)
    req = request(token(iss=A, aud="web", sub="s"), user=None)
    pending = engine.start(req)  # userinfo not cached: needs I/O
    assert isinstance(pending, Pending) and pending.need.lookup is Lookup.USERINFO
    slow = await engine.finish(pending)
    assert slow.account == "eve@example.org"
    fast = engine.start(req)
    assert isinstance(fast, Verdict) and fast.account == "eve@example.org"


# --------------------------------------------------------------------------- cache


class _Never:
    async def verify(self, token: str, unverified: UnverifiedToken | None) -> Any:
        await trio.sleep_forever()


async def test_a_flight_under_way_is_waited_for_not_redone() -> None:
    engine, lookup = _engine(SyncVerifier)
    req = REQUESTS[0]
    key = cache_key("a", Lookup.TOKEN, token_digest(req.credentials.token))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.cache.verify, "a", _Never(), req.credentials.token, None)
        await trio.testing.wait_all_tasks_blocked()
        assert engine.cache.in_flight(key)
        pending = engine.start(req)
        assert isinstance(pending, Pending) and pending.need.key == key
        assert lookup.verifiers["a"].now_calls == 0  # type: ignore[attr-defined]
        nursery.cancel_scope.cancel()
    assert isinstance(engine.start(req), Verdict)


async def test_without_a_cache_every_request_is_verified() -> None:
    lookup = FakeLookup(a=SyncVerifier(A, REJECTIONS), b=SyncVerifier(B, REJECTIONS))
    cfg = parse_config({**CONFIG, "cache": {"max_entries": 0}})
    engine = Engine(cfg, lookup)
    for _ in range(3):
        verdict = engine.start(REQUESTS[0])
        assert isinstance(verdict, Verdict) and verdict.ok
    assert lookup.verifiers["a"].now_calls == 3  # type: ignore[attr-defined]
    assert len(engine.cache) == 0


# --------------------------------------------------------------------------- provider


@pytest.fixture
async def issuer(nursery: trio.Nursery) -> DevIssuer:
    iss = DevIssuer(algorithms=("ES256", "RS256"))
    await nursery.start(iss.serve)
    return iss


async def test_provider_verify_now(issuer: DevIssuer) -> None:
    clock = FakeClock()
    async with make_http_client(timeout=2.0) as client:
        p = OidcProvider(
            ProviderConfig(
                name="dev", issuer=issuer.issuer or "", allow_http=True, jwks_refresh=3600.0
            ),
            client,
            clock=clock,
        )
        tok = issuer.mint(alg="RS256")
        unverified = peek(tok)
        assert isinstance(unverified, UnverifiedToken)
        assert p.verify_now(tok, unverified) is None  # no keys yet
        assert await p.refresh()
        result = p.verify_now(tok, unverified)
        assert isinstance(result, VerifiedClaims)
        assert result.claims == (await p.verify(tok, unverified)).claims  # type: ignore[union-attr]
        assert p.verify_now(tok, None) is None  # opaque: introspection or userinfo
        bad = tok[:-4] + ("AAAA" if not tok.endswith("AAAA") else "BBBB")
        bad_unverified = peek(bad)
        assert isinstance(bad_unverified, UnverifiedToken)
        refused = p.verify_now(bad, bad_unverified)
        assert isinstance(refused, Refusal) and refused.reason is Reason.BAD_SIGNATURE
        new_kid = issuer.add_key("ES256")
        unknown = issuer.mint(kid=new_kid)
        unknown_unverified = peek(unknown)
        assert isinstance(unknown_unverified, UnverifiedToken)
        assert p.verify_now(unknown, unknown_unverified) is None  # may refetch the JWKS
        clock.advance(3601)
        assert p.verify_now(tok, unverified) is None  # stale keys: refetch first


# --------------------------------------------------------------------------- frontend


class InlineStub:
    """An engine stand-in with start/finish: 'now-*' tokens are answered inline."""

    def __init__(self, stub: Stub) -> None:
        self.calls = 0
        self._stub = stub

    def start(self, req: AuthRequest) -> Verdict | Pending:
        self.calls += 1
        tok = req.credentials.token
        if tok.startswith("now-"):
            return Verdict(reason=Reason.OK, account=tok.removeprefix("now-"))
        if tok == "now:temp":
            return Verdict(reason=Reason.PROVIDER_UNAVAILABLE)
        if tok == "now:boom":
            raise RuntimeError("engine bug")
        return unanswered(req)  # a Pending: finish() asks the stub

    async def finish(self, pending: Pending) -> Verdict:
        return await self._stub(pending.request)

    async def authenticate(self, req: AuthRequest) -> Verdict:
        verdict = self.start(req)
        return verdict if isinstance(verdict, Verdict) else await self.finish(verdict)


async def _serve(nursery: trio.Nursery, path: str, inline: InlineStub, **kw: Any) -> None:
    from saslauthd_oidc.frontends.dovecot import serve_dovecot_listener

    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(16)
    await nursery.start(
        functools.partial(
            serve_dovecot_listener, trio.SocketListener(sock), inline, mechanisms=MECHS, **kw
        )
    )


async def test_inline_answers_need_no_task(nursery: trio.Nursery, socket_path: str) -> None:
    stub = Stub()
    inline = InlineStub(stub)
    await _serve(nursery, socket_path, inline)
    client = await Client.connect(socket_path)
    await client.handshake()
    assert await client.authenticate(1, "now-alice") == "OK\t1\tuser=alice"
    assert await client.authenticate(2, "good-bob") == "OK\t2\tuser=bob"
    reply = await client.authenticate(3, "now:boom")
    assert reply is not None and reply.startswith("FAIL\t3\t")
    reply = await client.authenticate(4, "now:temp")
    assert reply is not None and reply.startswith("FAIL\t4\tcode=temp_fail")
    assert [r.credentials.token for r in stub.seen] == ["good-bob"]
    assert inline.calls == 4


async def test_inline_tempfail_disconnects(nursery: trio.Nursery, socket_path: str) -> None:
    stub = Stub()
    await _serve(nursery, socket_path, InlineStub(stub), tempfail_disconnect=True)
    client = await Client.connect(socket_path)
    await client.handshake()
    assert await client.authenticate(1, "now-alice") == "OK\t1\tuser=alice"
    assert await client.authenticate(2, "now:temp") is None  # hung up instead of answering
    assert stub.seen == []


async def test_pipelined_inline_requests_all_answered(
    nursery: trio.Nursery,
    socket_path: str,
) -> None:
    from tests.support import auth_line

    await _serve(nursery, socket_path, InlineStub(Stub()))
    client = await Client.connect(socket_path)
    await client.handshake()
    await client.send(
        *(auth_line(rid, f"now-u{rid}") for rid in range(1, 11)), auth_line(11, "good-x")
    )
    replies = sorted([await client.line() or "" for _ in range(11)])
    assert replies == sorted(
        [f"OK\t{rid}\tuser=u{rid}" for rid in range(1, 11)] + ["OK\t11\tuser=x"]
    )


def test_outcome_of_inline_tempfail_is_tempfail() -> None:
    assert Verdict(reason=Reason.PROVIDER_UNAVAILABLE).outcome is Outcome.TEMPFAIL


async def test_real_engine_fast_path_with_devissuer(issuer: DevIssuer) -> None:
    async with make_http_client(timeout=2.0) as client:
        cfg = parse_config(
            {
                "provider": [{"name": "dev", "issuer": issuer.issuer, "allow_http": True}],
                "rule": [{"name": "r", "provider": "dev", "audiences": ["mail"]}],
            }
        )
        p = OidcProvider(cfg.providers[0], client)

        class Lookup:
            def get(self, name: str) -> OidcProvider:
                return p

        engine = Engine(cfg, Lookup())
        req = request(issuer.mint(alg="ES256"))
        pending = engine.start(req)  # keys not loaded yet
        assert isinstance(pending, Pending)
        slow = await engine.finish(pending)
        assert slow.ok
        engine.cache.clear()
        fast = engine.start(req)
        assert isinstance(fast, Verdict) and _summary(fast) == _summary(slow)
        forged = request(issuer.mint(alg="ES256", claims={"iss": "https://evil.example"}))
        refused = engine.start(forged)
        assert isinstance(refused, Verdict) and refused.reason is Reason.UNKNOWN_ISSUER


# --------------------------------------------------------------------------- cheap checks


@pytest.mark.parametrize(
    "name", ["alice@example.org", "a b", "a\tb", "a\x7fb", "a\x00b", "Ünïcode", "a\u2028b", "~!"]
)
def test_ascii_fast_path_of_account_validation_agrees(name: str) -> None:
    from saslauthd_oidc.core.identity import validate_account

    result = validate_account(name, normalize=False)
    slow_ok = not any(
        ch.isspace()
        or unicodedata.category(ch)[0] == "C"
        or unicodedata.category(ch) in ("Zl", "Zp", "Zs")
        for ch in name
    )
    assert isinstance(result, str) is slow_ok
    if not slow_ok:
        assert isinstance(result, Refusal)


@pytest.mark.parametrize("text", ["alice", "a b", "a\x01b", "a\x7f", "é\x85", "ok é"])
def test_ascii_fast_path_of_sasl_identity_agrees(text: str) -> None:
    from saslauthd_oidc.protocol.sasl import _identity, _is_control

    result = _identity(text.encode(), "authzid")
    assert isinstance(result, Refusal) is any(_is_control(ch) for ch in text)


def test_filtered_authentication_log_is_skipped_and_warning_kept() -> None:
    import io

    from saslauthd_oidc.config import LoggingConfig
    from saslauthd_oidc.service.logs import configure_logging

    out = io.StringIO()
    configure_logging(LoggingConfig(level="warning", format="json"), stream=out)
    try:
        engine, _ = _engine(SyncVerifier)
        assert isinstance(engine.start(REQUESTS[0]), Verdict)  # OK: info, filtered out
        assert out.getvalue() == ""
        assert isinstance(engine.start(REQUESTS[4]), Verdict)  # tempfail: warning
        assert '"event": "authentication"' in out.getvalue()
        assert '"level": "warning"' in out.getvalue()
    finally:
        configure_logging(LoggingConfig(level="info", format="json"))


def test_cache_key_separates_provider_kind_and_token() -> None:
    digest = token_digest("t")
    keys = {
        cache_key("a", Lookup.TOKEN, digest),
        cache_key("a", Lookup.USERINFO, digest),
        cache_key("ab", Lookup.TOKEN, digest),
        cache_key("a", Lookup.TOKEN, token_digest("u")),
    }
    assert len(keys) == 4
    assert len(digest) == 32
    secret = "eyJsecret-token-material"
    assert secret.encode() not in cache_key("a", Lookup.TOKEN, token_digest(secret))


def test_cached_claim_names_and_short_values_are_shared() -> None:
    """What the cache keeps of two tokens shares their claim names and short values."""
    kept = []
    for jti in ("x" * 10, "y" * 10):
        peeked = peek(token(iss=A, aud="web", jti=jti))
        assert isinstance(peeked, UnverifiedToken)
        result = vcache.compact(VerifiedClaims(peeked.claims, peeked.header, 2e9))
        assert isinstance(result, VerifiedClaims)
        kept.append(result.claims)
    a, b = kept
    assert a is not b  # their jti differ: two claims objects
    assert next(k for k in a if k == "aud") is next(k for k in b if k == "aud")
    assert a["iss"] is b["iss"]
    assert a["jti"] != b["jti"]


def test_memoised_ip_parsing_agrees() -> None:
    from saslauthd_oidc.protocol.dovecot import _canonical_ip, _parse_ip

    for value in ["127.0.0.1", "::1", "0:0::1", "fe80::1%eth0", "1.2.3", "", "x" * 100]:
        expected = _canonical_ip(value) if value else None
        assert _parse_ip(value) == expected
        assert _parse_ip(value) == expected  # memoised the second time
    assert _parse_ip("0:0::1") == "::1"


# --------------------------------------------------------------------------- structure
#
# What the hot path does per request, counted. These fail when a change puts
# work back on it (a task, a timer, a parse, a labels() lookup, an extra
# syscall); how long it takes is measured by bench/, never here.


class _CountingSocket(socket.socket):
    """The stdlib socket the Dovecot reader wraps its descriptor in, counting syscalls."""

    recvs = 0
    sends = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        _CountingSocket.recvs += 1
        return super().recv(bufsize, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        _CountingSocket.sends += 1
        return super().send(data, flags)


class _TaskCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.spawned = 0
        self.steps: collections.Counter[str] = collections.Counter()

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] += 1


class _Calls:
    """Wraps a callable and counts its calls."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.count = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        return self.fn(*args, **kwargs)


class _Parses:
    """Counts the JWT payloads :func:`peek` decodes (one per token parsed).

    Counted through ``providers/jwt.py``'s module-level JSON scanner, which the
    compiled build looks up at run time too (a patched ``engine.peek`` would
    not be seen by a compiled engine, which calls ``peek`` directly). JOSE
    headers (memoised; they have ``alg``) are not counted.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:

        from saslauthd_oidc.providers import jwt as jwt_mod

        strict = jwt_mod._strict_scan
        self.count = 0

        def counting(s: str, idx: int) -> tuple[Any, int]:
            value, end = strict(s, idx)
            if not (isinstance(value, dict) and "alg" in value):
                self.count += 1
            return value, end

        monkeypatch.setattr(jwt_mod, "_strict_scan", counting)


def _count_timers(monkeypatch: pytest.MonkeyPatch) -> list[_Calls]:
    calls = []
    for name in ("CancelScope", "move_on_after", "move_on_at", "fail_after", "fail_at"):
        wrapper = _Calls(getattr(trio, name))
        monkeypatch.setattr(trio, name, wrapper)
        calls.append(wrapper)
    return calls


def _count_labels(monkeypatch: pytest.MonkeyPatch) -> _Calls:
    from prometheus_client.metrics import MetricWrapperBase

    labels = _Calls(MetricWrapperBase.labels)
    monkeypatch.setattr(MetricWrapperBase, "labels", labels)
    return labels


def _auth_counts(metrics: Metrics) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    body, _ = metrics.render()
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == "saslauthd_oidc_authentications_total"
    }


async def test_hot_path_per_request_on_a_ready_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached token over a real socket: 1 wake-up, 1 recv, 1 send, no task, no timer, no parse."""
    from saslauthd_oidc.frontends import dovecot
    from tests.support import auth_line

    monkeypatch.setattr(dovecot, "_RawSocket", _CountingSocket)
    metrics = Metrics()
    lookup = FakeLookup(a=SyncVerifier(A, REJECTIONS), b=SyncVerifier(B, REJECTIONS))
    engine = Engine(parse_config(CONFIG), lookup, observe=metrics.observe)
    tok = token(iss=A, aud="web", email="alice@example.org")
    left, right = trio.socket.socketpair()
    server, client = trio.SocketStream(left), trio.SocketStream(right)
    requests = 5
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(
                dovecot.handle_dovecot_stream, server, engine, mechanisms=MECHS, spid=1, cuid=1
            ),
            name="session",
        )
        reader = Client(client)
        await reader.handshake()
        await reader.send(auth_line(1, tok))  # verified (verify_now) and cached
        assert await reader.line() == "OK\t1\tuser=alice@example.org"
        await trio.testing.wait_all_tasks_blocked()

        counter = _TaskCounter()
        timers = _count_timers(monkeypatch)
        parses = _Parses(monkeypatch)
        labels = _count_labels(monkeypatch)
        _CountingSocket.recvs = _CountingSocket.sends = 0
        trio.lowlevel.add_instrument(counter)
        try:
            for rid in range(2, 2 + requests):
                await reader.send(auth_line(rid, tok))
                assert await reader.line() == f"OK\t{rid}\tuser=alice@example.org"
                await trio.testing.wait_all_tasks_blocked()
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert (_CountingSocket.recvs, _CountingSocket.sends) == (requests, requests)
        assert counter.spawned == 0
        assert counter.steps["session"] == requests  # woken once per request, by its data
        assert [t.count for t in timers] == [0] * len(timers)
        assert parses.count == 0  # the cache knew the token: no base64, no JSON
        assert labels.count == 0
        await client.aclose()
    assert _auth_counts(metrics) == {"ok": requests + 1.0}


async def test_cached_token_is_not_parsed_and_keeps_the_cache_semantics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Positive and negative entries answer without peek; expiry and a reload bring it back."""
    clock = FakeClock()
    cfg = parse_config({**CONFIG, "cache": {"ttl": 60, "negative_ttl": 30}})
    lookup = FakeLookup(a=SyncVerifier(A, REJECTIONS), b=SyncVerifier(B, REJECTIONS))
    engine = Engine(cfg, lookup, cache=VerificationCache(cfg.cache, clock=clock))
    parses = _Parses(monkeypatch)
    good, forged = REQUESTS[0], REQUESTS[3]  # OK; BAD_SIGNATURE (a stable refusal)

    def decide(req: AuthRequest) -> tuple[Any, ...]:
        verdict = engine.start(req)
        assert isinstance(verdict, Verdict)
        return _summary(verdict)

    first_good, first_forged = decide(good), decide(forged)
    assert parses.count == 2
    assert (decide(good), decide(forged)) == (first_good, first_forged)
    assert parses.count == 2  # both from the cache, neither parsed
    clock.advance(31)  # the negative entry is gone, the positive one lives
    assert (decide(good), decide(forged)) == (first_good, first_forged)
    assert parses.count == 3
    engine.cache.drop_providers(["a"])  # a reload that changed provider a
    assert decide(good) == first_good
    assert parses.count == 4


def test_a_cache_hit_is_not_compacted_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compaction happens once, when an answer is stored; a hit hands out the entry as it is."""
    cfg = parse_config(CONFIG)
    lookup = FakeLookup(a=SyncVerifier(A, REJECTIONS), b=SyncVerifier(B, REJECTIONS))
    engine = Engine(cfg, lookup)
    req = request(token(iss=A, aud="web", email="alice@example.org", jti="j1", iat=1))
    first = engine.start(req)
    assert isinstance(first, Verdict) and first.ok
    # What compaction fills (module-level tables the compiled build reads at run
    # time too); emptied, they stay empty unless a hit is compacted again.
    tables = (vcache._shapes, vcache._shared_claims, vcache._shared_results)
    assert all(tables)
    for table in tables:
        table.clear()
    for _ in range(5):
        again = engine.start(req)
        assert isinstance(again, Verdict) and again.claims == first.claims
    assert not any(tables)
    assert first.claims is not None and "jti" not in first.claims and "iat" not in first.claims


async def test_repeated_token_parsed_only_for_a_provider_without_an_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Per-provider entries: one provider's entry gives the issuer, the other still verifies."""
    cfg = parse_config(
        {
            "provider": [{"name": "a1", "issuer": A}, {"name": "a2", "issuer": A}],
            "rule": [
                {"name": "other", "provider": "a1", "audiences": ["other"]},
                {"name": "web", "provider": "a2", "audiences": ["web"]},
            ],
        }
    )
    lookup = FakeLookup(a1=SyncVerifier(A, {}), a2=SyncVerifier(A, {}))
    engine = Engine(cfg, lookup)
    req = request(token(iss=A, aud="web", email="alice@example.org"))
    first = engine.start(req)
    assert isinstance(first, Verdict) and first.rule == "web"
    parses = _Parses(monkeypatch)
    engine.cache.drop_providers(["a2"])
    again = engine.start(req)
    assert isinstance(again, Verdict) and _summary(again) == _summary(first)
    assert parses.count == 1  # parsed for a2's verification only
    assert lookup.verifiers["a1"].now_calls == 1  # type: ignore[attr-defined]
    assert lookup.verifiers["a2"].now_calls == 2  # type: ignore[attr-defined]


def test_metrics_observe_needs_no_labels_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    labels = _count_labels(monkeypatch)
    metrics = Metrics()
    ok = Verdict(reason=Reason.OK, account="a@b", rule="web")
    for _ in range(3):
        metrics.observe(REQUESTS[0], ok, 0.002)
    metrics.observe(REQUESTS[0], Verdict(reason=Reason.EXPIRED), 7.0)
    assert labels.count == 0
    assert _auth_counts(metrics) == {"ok": 3.0, "expired": 1.0}
    from prometheus_client.parser import text_string_to_metric_families

    body, _ = metrics.render()
    buckets = {
        s.labels["le"]: s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == "saslauthd_oidc_authentication_duration_seconds_bucket"
    }
    assert (buckets["0.001"], buckets["0.0025"], buckets["5.0"], buckets["+Inf"]) == (0, 3, 3, 4)


def test_json_log_line_is_what_the_standard_processors_render(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """observability's one-step JSON line == add_log_level, TimeStamper, format_exc_info,
    redact_secrets and JSONRenderer one after the other (the timestamp aside)."""
    import datetime
    import json
    import time

    import structlog

    from saslauthd_oidc.service.logs import _JsonLine, redact_secrets

    def standard(method: str, event: dict[str, Any]) -> dict[str, Any]:
        for proc in (
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            redact_secrets,
        ):
            event = dict(proc(None, method, event))
        rendered = structlog.processors.JSONRenderer()(None, method, event)
        doc: dict[str, Any] = json.loads(rendered)
        return doc

    try:
        raise ValueError("boom")
    except ValueError:
        exc = sys.exc_info()
    jwt = token(iss=A, aud="web")
    events: list[dict[str, Any]] = [
        {"account": "alice@example.org", "latency_ms": 0.12, "remote": None, "event": "x"},
        {"detail": f"Bearer {jwt}", "rule": "r", "event": "y", "odd": object.__new__(object)},
        {"event": "engine error", "exc_info": exc, "token": jwt},
    ]
    line = _JsonLine()
    for method in ("info", "warning", "exception"):
        for event in events:
            got = json.loads(line(None, method, dict(event)))
            stamp = got.pop("timestamp")
            want = standard(method, dict(event))
            if "odd" in want:  # repr() of an object: its address differs
                want["odd"] = got["odd"]
            assert got == want
            assert list(got) == list(want)
            assert jwt not in json.dumps(got)
            parsed = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            assert abs(parsed.timestamp() - time.time()) < 5
    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000 * 10**9)  # a whole second
    stamp = json.loads(_JsonLine()(None, "info", {"event": "z"}))["timestamp"]
    whole = datetime.datetime.fromtimestamp(1_700_000_000, tz=datetime.UTC)
    assert stamp == whole.isoformat().replace("+00:00", "Z")


async def test_reactor_per_request_on_ready_sockets(
    monkeypatch: pytest.MonkeyPatch, socket_path: str
) -> None:
    """The listener's reactor, cached tokens on several sockets: per request 1 recv and
    1 send; no task, no timer; one wait per round for all the connections ready."""
    from saslauthd_oidc.frontends import dovecot
    from tests.support import auth_line

    monkeypatch.setattr(dovecot, "_RawSocket", _CountingSocket)
    metrics = Metrics()
    lookup = FakeLookup(a=SyncVerifier(A, REJECTIONS), b=SyncVerifier(B, REJECTIONS))
    engine = Engine(parse_config(CONFIG), lookup, observe=metrics.observe)
    tok = token(iss=A, aud="web", email="alice@example.org")
    line = (auth_line(1, tok) + "\n").encode()
    listening = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listening.bind(socket_path)
    listening.listen(16)
    connections, rounds = 3, 4

    def replies(sock: socket.socket) -> bytes:
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        return data

    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                dovecot.serve_dovecot_listener,
                trio.SocketListener(listening),
                engine,
                mechanisms=MECHS,
            )
        )
        clients = []
        for _ in range(connections):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(socket_path)
            clients.append(sock)
        await trio.testing.wait_all_tasks_blocked()
        for sock in clients:
            assert replies(sock).endswith(b"DONE\n")
            sock.sendall(b"VERSION\t1\t2\nCPID\t1\n" + line)  # verified and cached
        await trio.testing.wait_all_tasks_blocked()
        for sock in clients:
            assert replies(sock) == b"OK\t1\tuser=alice@example.org\n"

        counter = _TaskCounter()
        timers = _count_timers(monkeypatch)
        parses = _Parses(monkeypatch)
        _CountingSocket.recvs = _CountingSocket.sends = 0
        trio.lowlevel.add_instrument(counter)
        try:
            for _ in range(rounds):
                for sock in clients:  # all ready before the reactor looks: one round
                    sock.sendall(line)
                await trio.testing.wait_all_tasks_blocked()
                for sock in clients:
                    assert replies(sock) == b"OK\t1\tuser=alice@example.org\n"
        finally:
            trio.lowlevel.remove_instrument(counter)
        requests = connections * rounds
        assert (_CountingSocket.recvs, _CountingSocket.sends) == (requests, requests)
        assert counter.spawned == 0
        assert counter.steps["dovecot-reactor"] == rounds  # one wake-up for all connections
        assert [t.count for t in timers] == [0] * len(timers)
        assert parses.count == 0
        for sock in clients:
            sock.close()
        nursery.cancel_scope.cancel()
    assert _auth_counts(metrics) == {"ok": requests + connections}


async def test_reactor_writes_the_log_lines_of_a_round_at_once(socket_path: str) -> None:
    """At ``info``, one line per authentication: the lines of one reactor round go out
    in one write of the log stream, at the round's end, all of them and in order."""
    import io

    from saslauthd_oidc.config import LoggingConfig
    from saslauthd_oidc.frontends import dovecot
    from saslauthd_oidc.service.logs import configure_logging
    from tests.support import auth_line

    class Raw(io.RawIOBase):  # the descriptor under sys.stderr's layers: write(2)s
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            self.writes.append(bytes(data))
            return len(data)

    raw = Raw()
    stream = io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8", line_buffering=True)
    configure_logging(LoggingConfig(level="info", format="json"), stream=stream)
    lookup = FakeLookup(a=SyncVerifier(A, REJECTIONS), b=SyncVerifier(B, REJECTIONS))
    engine = Engine(parse_config(CONFIG), lookup)
    toks = [token(iss=A, aud="web", email="alice@example.org", jti=f"j{i}") for i in range(3)]
    listening = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listening.bind(socket_path)
    listening.listen(16)
    rounds = 4
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    dovecot.serve_dovecot_listener,
                    trio.SocketListener(listening),
                    engine,
                    mechanisms=MECHS,
                )
            )
            clients = []
            for tok in toks:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(10)
                sock.connect(socket_path)
                sock.sendall(b"VERSION\t1\t2\nCPID\t1\n" + (auth_line(1, tok) + "\n").encode())
                clients.append(sock)
            await trio.testing.wait_all_tasks_blocked()
            for sock in clients:
                assert sock.recv(65536)  # the handshake and the first (verifying) answer
            del raw.writes[:]
            for _ in range(rounds):
                for rid, (sock, tok) in enumerate(zip(clients, toks, strict=True), 2):
                    sock.sendall((auth_line(rid, tok) + "\n").encode())
                await trio.testing.wait_all_tasks_blocked()  # one round for the three
                for sock in clients:
                    assert sock.recv(65536).startswith(b"OK\t")
            assert len(raw.writes) == rounds
            for sock in clients:
                sock.close()
            nursery.cancel_scope.cancel()
    finally:
        configure_logging(LoggingConfig(level="info", format="json"))
    from saslauthd_oidc.core.request import token_fingerprint

    for chunk in raw.writes:
        lines = [json.loads(x) for x in chunk.decode().splitlines()]
        # (the connections of a round in the order epoll reports them)
        assert sorted((e["event"], e["outcome"], e["token"]) for e in lines) == sorted(
            ("authentication", "ok", token_fingerprint(tok)) for tok in toks
        )


@pytest.mark.parametrize(
    "fields",
    [
        ["service=smtp", "nologin", "lip=127.0.0.1", "rip=::1", "secured", "resp=QUJD"],
        [
            "service=imap",
            "resp=",
        ],
        ["service=smtp", "resp=QQ==", "rip=1.2.3.4"],  # a parameter after resp=
        ["resp=QQ==", "service=smtp", "resp=Qg=="],  # resp= twice
        ["service=smtp", "lport=587", "rport=99999", "local_name=mx", "resp=Qg=="],
        ["protocol=SMTP", "rip=" + "1" * 600, "resp=Qg=="],  # too long to memoise
        ["service=smtp", "nologin"],  # no resp= at all
        [],
    ],
)
def test_memoised_auth_params_agree(fields: list[str]) -> None:
    from saslauthd_oidc.protocol.dovecot import _auth_params, _parse_auth_params

    for _ in range(2):  # the second time from the memo
        assert _auth_params(fields) == _parse_auth_params(fields)


async def test_current_answers_inline_finishes_on_its_engine_and_holds_when_draining(
    autojump_clock: trio.abc.Clock,
) -> None:
    from saslauthd_oidc.service.lifecycle import Current

    old, _ = _engine(FakeVerifier)  # every token needs the (async) provider
    new, _ = _engine(SyncVerifier)
    current = Current(old)
    pending = current.start(REQUESTS[0])
    assert isinstance(pending, Pending) and pending.engine is old
    current.swap(new)  # a reload: the pending request still finishes on the old engine
    assert isinstance(current.start(REQUESTS[1]), Verdict)  # the new one answers inline
    assert (await current.finish(pending)).ok
    assert current.in_flight == 0
    await current.drain(timeout=1)
    held = current.start(REQUESTS[0])
    assert isinstance(held, Pending) and held.engine is None
    with trio.move_on_after(3600) as waited:
        await current.finish(held)  # never answered while stopping
    assert waited.cancelled_caught


async def test_a_finish_that_raises_fails_that_request_only(
    nursery: trio.Nursery,
    socket_path: str,
) -> None:
    class Broken(InlineStub):
        async def finish(self, pending: Pending) -> Verdict:
            raise RuntimeError("bug in finish")

    await _serve(nursery, socket_path, Broken(Stub()))
    client = await Client.connect(socket_path)
    await client.handshake()
    reply = await client.authenticate(1, "good-x")  # not inline: goes to finish
    assert reply is not None and reply.startswith("FAIL\t1\tcode=temp_fail")
    assert await client.authenticate(2, "now-alice") == "OK\t2\tuser=alice"


def test_unique_tokens_sharing_a_header_decode_its_json_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    from saslauthd_oidc.providers import jwt as jwt_mod
    from tests.support import token as signed_token

    decoded: list[str] = []
    strict = jwt_mod._strict_scan

    def counting(s: str, idx: int) -> tuple[Any, int]:
        decoded.append(s)
        return strict(s, idx)

    monkeypatch.setattr(jwt_mod, "_strict_scan", counting)
    jwt_mod._header_memo.clear()
    tokens = [signed_token("RS256", jti=f"unique-{i}") for i in range(10)]
    assert len(set(tokens)) == 10
    for tok in tokens:
        assert isinstance(peek(tok), UnverifiedToken)
    headers = [text for text in decoded if '"alg"' in text]
    assert len(headers) == 1
    assert len(decoded) == 11  # one header, ten payloads


class _Calls64:
    """Counts ``binascii.a2b_base64`` calls (looked up at run time by both builds)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import binascii

        real = binascii.a2b_base64
        self.count = 0

        def counting(data: Any, *args: Any, **kwargs: Any) -> bytes:
            self.count += 1
            return real(data, *args, **kwargs)

        monkeypatch.setattr(binascii, "a2b_base64", counting)


async def test_a_new_jwt_is_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new JWT through the engine and a provider with keys: payload and signature
    base64-decoded once each, the payload JSON-scanned once (the header is memoised)."""
    import time

    from saslauthd_oidc.providers.jwt import KeySet

    issuer = DevIssuer(algorithms=("RS256",))
    iss = "https://idp.example.org"
    cfg = parse_config(
        {
            "provider": [{"name": "p", "issuer": iss, "jwks_uri": iss + "/jwks.json"}],
            "rule": [{"name": "r", "provider": "p", "audiences": ["mail"]}],
        }
    )
    async with make_http_client(timeout=2.0) as client:
        p = OidcProvider(cfg.providers[0], client)
        p._keys.jwks = KeySet.from_jwks(issuer.jwks(), cfg.providers[0].algorithms)
        p._keys.loaded_at = time.time()

        class One:
            def get(self, name: str) -> OidcProvider:
                return p

        engine = Engine(cfg, One())
        tokens = [issuer.mint(alg="RS256", claims={"iss": iss}) for _ in range(4)]
        first = engine.start(request(tokens[0]))
        assert isinstance(first, Verdict) and first.ok  # the header is memoised now
        decodes, parses = _Calls64(monkeypatch), _Parses(monkeypatch)
        for tok in tokens[1:]:
            verdict = engine.start(request(tok))
            assert isinstance(verdict, Verdict) and verdict.ok
        assert decodes.count == 2 * 3  # payload and signature, once each
        assert parses.count == 3
        assert isinstance(engine.start(request(tokens[1])), Verdict)  # cached: nothing decoded
        assert (decodes.count, parses.count) == (6, 3)
