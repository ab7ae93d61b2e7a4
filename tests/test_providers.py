"""OidcProvider and ProviderRegistry against a real DevIssuer served by hypercorn on loopback."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest
import trio

from saslauthd_oidc.config import Config, ConfigError, ProviderConfig, RuleConfig
from saslauthd_oidc.core.outcome import Reason, Refusal
from saslauthd_oidc.providers.http import USER_AGENT, FetchError, fetch_json
from saslauthd_oidc.providers.jwt import VerifiedClaims, peek
from saslauthd_oidc.providers.oidc import OidcProvider
from saslauthd_oidc.providers.registry import ProviderRegistry
from tests.support import FakeClock, b64u, write_tls_files
from tests.support_issuer import FaultIssuer

DISCOVERY = "/.well-known/openid-configuration"
JWKS = "/jwks.json"


@pytest.fixture
async def issuer(nursery: trio.Nursery) -> FaultIssuer:
    iss = FaultIssuer(algorithms=("ES256", "RS256"))
    await nursery.start(iss.serve)
    return iss


def provider(
    iss: FaultIssuer,
    client: httpx.AsyncClient,
    clock: FakeClock,
    *,
    fetch_timeout: float = 2.0,
    **overrides: Any,
) -> OidcProvider:
    fields: dict[str, Any] = {
        "name": "dev",
        "issuer": iss.issuer,
        "allow_http": True,
        "algorithms": ("ES256", "RS256"),
        "jwks_cooldown": 30.0,
        "jwks_refresh": 3600.0,
    }
    fields.update(overrides)
    return OidcProvider(ProviderConfig(**fields), client, clock=clock, fetch_timeout=fetch_timeout)


async def verify(p: OidcProvider, token: str) -> VerifiedClaims | Refusal:
    unverified = peek(token)
    assert not isinstance(unverified, Refusal), unverified
    return await p.verify(token, unverified)


def reason(result: VerifiedClaims | Refusal) -> Reason:
    return Reason.OK if isinstance(result, VerifiedClaims) else result.reason


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- discovery + JWKS


async def test_refresh_loads_discovery_and_jwks(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock)
    assert not p.keys_loaded
    assert p.discovery_url == f"{issuer.url}{DISCOVERY}"
    assert await p.refresh() is True
    assert p.keys_loaded
    assert p.key_count == 2
    assert p.jwks_uri == issuer.url + JWKS
    assert issuer.requests == {DISCOVERY: 1, JWKS: 1}
    result = await verify(p, issuer.mint(alg="ES256"))
    assert isinstance(result, VerifiedClaims)
    assert result.claims["sub"] == "alice"
    assert reason(await verify(p, issuer.mint(alg="RS256"))) is Reason.OK
    assert issuer.requests == {DISCOVERY: 1, JWKS: 1}  # cached


async def test_first_verify_loads_lazily(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock)
    assert reason(await verify(p, issuer.mint())) is Reason.OK
    assert issuer.requests == {DISCOVERY: 1, JWKS: 1}


async def test_fetch_sends_user_agent_and_identity_encoding(
    issuer: FaultIssuer, client: httpx.AsyncClient
) -> None:
    doc = await fetch_json(client, issuer.discovery_url, timeout=2)
    assert doc["issuer"] == issuer.issuer
    assert issuer.last_request_headers["user-agent"] == USER_AGENT
    assert USER_AGENT.startswith("saslauthd-oidc/")
    assert issuer.last_request_headers["accept-encoding"] == "identity"


async def test_issuer_path(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    iss = FaultIssuer(issuer_path="/realms/mail/")
    await nursery.start(iss.serve)
    assert iss.issuer == f"{iss.url}/realms/mail"
    p = provider(iss, client, FakeClock(), algorithms=("ES256",))
    assert p.discovery_url == f"{iss.url}/realms/mail{DISCOVERY}"
    assert await p.refresh()
    assert reason(await verify(p, iss.mint())) is Reason.OK


@pytest.mark.parametrize("suffix", ["/", "/other", "X"])
async def test_discovery_issuer_mismatch_refused(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock, suffix: str
) -> None:
    assert issuer.issuer is not None
    p = provider(
        issuer, client, clock, issuer=issuer.issuer + suffix, discovery_url=issuer.discovery_url
    )
    assert await p.refresh() is False
    assert not p.keys_loaded
    assert p.last_error is not None
    assert "issuer_mismatch" in p.last_error
    assert issuer.requests[JWKS] == 0
    token = issuer.mint(claims={"iss": issuer.issuer + suffix})
    assert reason(await verify(p, token)) is Reason.PROVIDER_UNAVAILABLE


async def test_discovery_http_jwks_uri_refused_without_allow_http(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock, allow_http=False)
    assert await p.refresh() is False
    assert p.last_error is not None
    assert "bad_jwks_uri" in p.last_error
    assert issuer.requests[JWKS] == 0


async def test_explicit_jwks_uri_skips_discovery(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock, jwks_uri=issuer.jwks_uri)
    assert await p.refresh()
    assert reason(await verify(p, issuer.mint())) is Reason.OK
    clock.advance(4000)  # stale: refetch, still without discovery
    assert reason(await verify(p, issuer.mint(lifetime=86400))) is Reason.OK
    assert issuer.requests == {JWKS: 2}


async def test_stale_keys_refreshed_with_discovery(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock, jwks_refresh=600)
    assert await p.refresh()
    clock.advance(599)
    assert reason(await verify(p, issuer.mint())) is Reason.OK
    assert issuer.requests == {DISCOVERY: 1, JWKS: 1}
    clock.advance(2)
    assert reason(await verify(p, issuer.mint(lifetime=86400))) is Reason.OK
    assert issuer.requests == {DISCOVERY: 2, JWKS: 2}


# --------------------------------------------------------------------------- unknown kid


async def _verify_many(p: OidcProvider, tokens: list[str]) -> list[Reason]:
    results: list[Reason] = []

    async def one(tok: str) -> None:
        results.append(reason(await verify(p, tok)))

    async with trio.open_nursery() as n:
        for tok in tokens:
            n.start_soon(one, tok)
    return results


async def test_unknown_kid_single_flight_refetch(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock)
    assert await p.refresh()
    clock.advance(31)  # past the cooldown of the initial fetch
    new_kid = issuer.add_key("ES256")
    issuer.delay = 0.2  # keep the fetch in flight while all 50 pile up
    tokens = [issuer.mint(kid=new_kid) for _ in range(50)]
    results = await _verify_many(p, tokens)
    assert results == [Reason.OK] * 50
    assert issuer.requests[JWKS] == 2  # initial + exactly one refetch
    assert issuer.requests[DISCOVERY] == 1  # a kid miss does not rediscover

    # A kid that does not exist, in tokens newer than the keys: within the cooldown
    # no fetch at all, and a temporary refusal (it could be a key rotation).
    bogus = [issuer.mint(header={"kid": "nope"}) for _ in range(50)]
    assert await _verify_many(p, bogus) == [Reason.KEY_REFRESH_PENDING] * 50
    assert issuer.requests[JWKS] == 2
    # After the cooldown: again exactly one fetch for all 50, which lacks the kid.
    clock.advance(31)
    assert await _verify_many(p, bogus) == [Reason.UNKNOWN_KEY] * 50
    assert issuer.requests[JWKS] == 3
    # A fetch made for that kid did not find it: permanent, and no further fetch.
    assert await _verify_many(p, bogus) == [Reason.UNKNOWN_KEY] * 50
    assert issuer.requests[JWKS] == 3


async def test_key_rotated_in_right_after_the_routine_load_is_fetched_at_once(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """The cooldown bounds unknown-kid refetches; a routine load does not start it."""
    p = provider(issuer, client, clock)
    assert await p.refresh()
    kid = issuer.add_key("ES256")
    assert reason(await verify(p, issuer.mint(kid=kid))) is Reason.OK
    assert issuer.requests[JWKS] == 2
    # another new kid within that refetch's cooldown: a refetch is due, not allowed yet
    later = issuer.add_key("ES256")
    assert reason(await verify(p, issuer.mint(kid=later))) is Reason.KEY_REFRESH_PENDING
    assert issuer.requests[JWKS] == 2
    clock.advance(30)
    assert reason(await verify(p, issuer.mint(kid=later))) is Reason.OK
    assert issuer.requests[JWKS] == 3


async def test_malformed_kid_never_triggers_fetch(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock)
    assert await p.refresh()
    clock.advance(100)
    for tok in (
        issuer.mint(header={"kid": "k" * 300}),
        issuer.mint(header={"alg": "PS256"}),  # alg not allowed: refused before lookup
    ):
        assert reason(await verify(p, tok)) in (Reason.UNKNOWN_KEY, Reason.UNSUPPORTED_ALGORITHM)
    assert issuer.requests[JWKS] == 1


async def test_key_rotation_picked_up_after_cooldown(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock)
    old_token = issuer.mint()
    assert reason(await verify(p, old_token)) is Reason.OK
    new_kid = issuer.rotate("ES256")
    new_token = issuer.mint()
    assert peek(new_token).header["kid"] == new_kid  # type: ignore[union-attr]
    # the new kid refetches at once (no unknown-kid refetch within the cooldown yet)
    assert reason(await verify(p, new_token)) is Reason.OK
    assert issuer.requests[JWKS] == 2
    # the old key is gone; the old token is about as new as the keys (within
    # leeway): a refetch is due, within the cooldown: temporary
    assert reason(await verify(p, old_token)) is Reason.KEY_REFRESH_PENDING
    clock.advance(31)
    assert reason(await verify(p, old_token)) is Reason.UNKNOWN_KEY  # rotated out
    assert reason(await verify(p, old_token)) is Reason.UNKNOWN_KEY  # and stays so
    assert reason(await verify(p, new_token)) is Reason.OK
    assert issuer.requests[JWKS] == 3


async def test_jku_in_token_is_never_fetched(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock)
    assert await p.refresh()
    clock.advance(100)
    attacker = FaultIssuer()
    attacker.issuer = issuer.issuer
    forged = attacker.mint(
        header={
            "jku": f"{issuer.url}/attacker-jwks.json",
            "x5u": f"{issuer.url}/attacker.pem",
            "jwk": attacker.jwks()["keys"][0],
        }
    )
    assert reason(await verify(p, forged)) is Reason.UNKNOWN_KEY
    assert issuer.requests["/attacker-jwks.json"] == 0
    assert issuer.requests["/attacker.pem"] == 0
    # kid collision with the genuine key: still only the genuine key is used
    forged = attacker.mint(header={"kid": issuer.kid("ES256"), "jwk": attacker.jwks()["keys"][0]})
    assert reason(await verify(p, forged)) is Reason.BAD_SIGNATURE


# --------------------------------------------------------------------------- availability


async def test_provider_unreachable_at_start(client: httpx.AsyncClient, clock: FakeClock) -> None:
    cfg = ProviderConfig(name="down", issuer=f"http://127.0.0.1:{free_port()}", allow_http=True)
    p = OidcProvider(cfg, client, clock=clock, fetch_timeout=2)
    dev = FaultIssuer()
    dev.issuer = cfg.issuer
    result = await verify(p, dev.mint())
    assert isinstance(result, Refusal)
    assert result.reason is Reason.PROVIDER_UNAVAILABLE
    assert result.reason.outcome.value == "tempfail"
    assert "down" in result.detail
    assert "unreachable" in result.detail
    assert await p.refresh() is False


async def test_provider_failing_at_start_then_recovering(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    p = provider(issuer, client, clock)
    issuer.fail_status = 503
    assert reason(await verify(p, issuer.mint())) is Reason.PROVIDER_UNAVAILABLE
    assert reason(await verify(p, issuer.mint())) is Reason.PROVIDER_UNAVAILABLE
    assert issuer.requests[DISCOVERY] == 1  # failures are rate-limited by the cooldown too
    issuer.fail_status = None
    clock.advance(31)
    assert reason(await verify(p, issuer.mint())) is Reason.OK
    assert issuer.requests[DISCOVERY] == 2


async def test_provider_down_after_keys_loaded_keeps_cached_keys(
    nursery: trio.Nursery, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    iss = FaultIssuer()
    await nursery.start(iss.serve)
    p = provider(iss, client, clock, algorithms=("ES256",), jwks_refresh=600)
    assert await p.refresh()
    token = iss.mint(lifetime=86400)
    iss.stop()
    await trio.sleep(0.2)
    clock.advance(601)  # stale: a refresh is attempted, fails, cached keys stay
    assert reason(await verify(p, token)) is Reason.OK
    assert p.keys_loaded
    assert p.last_error is not None
    assert "unreachable" in p.last_error
    assert await p.refresh() is False
    assert reason(await verify(p, token)) is Reason.OK


def _oversized_jwks() -> bytes:
    return b'{"keys": [], "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'


@pytest.mark.parametrize(
    ("knobs", "kind"),
    [
        ({"fail_status": 500}, "http_status"),
        ({"fail_status": 404}, "http_status"),
        ({"jwks_override": b"<html>oops</html>"}, "bad_json"),
        ({"jwks_override": b'{"keys": [], "keys": []}'}, "bad_json"),
        ({"jwks_override": b"[1, 2]"}, "bad_json"),
        ({"jwks_override": b"\xff\xfe{}"}, "bad_json"),
        ({"jwks_override": b"[" * 10000 + b"]" * 10000}, "bad_json"),
        ({"jwks_override": _oversized_jwks()}, "too_large"),
        ({"jwks_override": b'{"keys": {}}'}, "bad_jwks"),
        ({"jwks_override": b'{"keys": []}'}, "no_usable_keys"),
        ({"jwks_override": b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'}, "no_usable_keys"),
        ({"redirect": "http://evil.example/jwks.json"}, "redirect"),
    ],
)
async def test_bad_answers_fail_cleanly(
    issuer: FaultIssuer,
    client: httpx.AsyncClient,
    clock: FakeClock,
    knobs: dict[str, Any],
    kind: str,
) -> None:
    p = provider(issuer, client, clock, jwks_uri=issuer.jwks_uri)
    good_token = issuer.mint()
    for name, value in knobs.items():
        setattr(issuer, name, value)
    assert await p.refresh() is False
    assert not p.keys_loaded
    assert p.last_error is not None
    assert f"({kind})" in p.last_error
    assert reason(await verify(p, good_token)) is Reason.PROVIDER_UNAVAILABLE
    # With keys loaded before the fault, the same fault keeps the old keys working.
    for name in knobs:
        setattr(issuer, name, None)
    assert await p.refresh() is True
    for name, value in knobs.items():
        setattr(issuer, name, value)
    assert await p.refresh() is False
    assert reason(await verify(p, good_token)) is Reason.OK


async def test_discovery_redirect_refused(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    issuer.redirect = "http://127.0.0.2:1/.well-known/openid-configuration"
    p = provider(issuer, client, clock)
    assert await p.refresh() is False
    assert p.last_error is not None
    assert "discovery failed (redirect)" in p.last_error
    assert "127.0.0.2" in p.last_error


async def test_slow_provider_bounded_by_timeout(
    issuer: FaultIssuer, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    issuer.delay = 5.0
    p = provider(issuer, client, clock, fetch_timeout=0.5)
    start = trio.current_time()
    with trio.fail_after(3):
        assert await p.refresh() is False
        result = await verify(p, issuer.mint())
    assert trio.current_time() - start < 2.0
    assert reason(result) is Reason.PROVIDER_UNAVAILABLE
    assert p.last_error is not None
    assert "timeout" in p.last_error


async def test_fetch_json_errors(issuer: FaultIssuer, client: httpx.AsyncClient) -> None:
    with pytest.raises(FetchError) as info:
        await fetch_json(client, f"{issuer.url}/missing", timeout=2)
    assert info.value.kind == "http_status"
    with pytest.raises(FetchError) as info:
        await fetch_json(client, issuer.jwks_uri, max_bytes=10, timeout=2)
    assert info.value.kind == "too_large"
    issuer.delay = 2
    with pytest.raises(FetchError) as info:
        await fetch_json(client, issuer.jwks_uri, timeout=0.3)
    assert info.value.kind == "timeout"
    with pytest.raises(FetchError) as info:
        await fetch_json(client, f"http://127.0.0.1:{free_port()}/", timeout=2)
    assert info.value.kind == "unreachable"


# --------------------------------------------------------------------------- HMAC-only


async def test_hmac_only_provider_needs_no_fetch(
    tmp_path: Any, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("s" * 40)
    secret_file.chmod(0o600)
    cfg = ProviderConfig(
        name="hs",
        issuer="https://hs.example",
        algorithms=("HS256",),
        hmac_secret_file=str(secret_file),
    )
    p = OidcProvider(cfg, client, clock=clock)
    assert p.keys_loaded
    assert await p.refresh() is True
    import jwt as pyjwt

    tok = pyjwt.encode(
        {"iss": "https://hs.example", "exp": clock.now + 60, "sub": "a", "client_id": "c"},
        "s" * 40,
        "HS256",
    )
    assert reason(await verify(p, tok)) is Reason.OK
    forged = pyjwt.encode(
        {"iss": "https://hs.example", "exp": clock.now + 60, "sub": "a"}, "t" * 40, "HS256"
    )
    assert reason(await verify(p, forged)) is Reason.BAD_SIGNATURE


async def test_short_hmac_secret_is_config_error(tmp_path: Any, client: httpx.AsyncClient) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("short")
    secret_file.chmod(0o600)
    cfg = ProviderConfig(
        name="hs",
        issuer="https://hs.example",
        algorithms=("HS256",),
        hmac_secret_file=str(secret_file),
    )
    with pytest.raises(ConfigError, match="shorter than 32"):
        OidcProvider(cfg, client)


# --------------------------------------------------------------------------- registry


def _config(*providers: ProviderConfig) -> Config:
    rules = tuple(RuleConfig(name=f"r{i}", provider=p.name) for i, p in enumerate(providers))
    return Config(providers=providers, rules=rules)


async def test_registry_scopes_keys_by_issuer(
    nursery: trio.Nursery, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    a, b = FaultIssuer(), FaultIssuer()
    await nursery.start(a.serve)
    await nursery.start(b.serve)
    assert a.issuer is not None
    assert b.issuer is not None
    down = f"http://127.0.0.1:{free_port()}"
    cfg = _config(
        ProviderConfig(name="a", issuer=a.issuer, allow_http=True, algorithms=("ES256",)),
        ProviderConfig(name="b", issuer=b.issuer, allow_http=True, algorithms=("ES256",)),
        ProviderConfig(name="a2", issuer=a.issuer, allow_http=True, algorithms=("ES256",)),
        ProviderConfig(name="down", issuer=down, allow_http=True),
    )
    reg = ProviderRegistry(cfg, client, clock=clock)
    assert len(reg) == 4
    assert [p.name for p in reg.by_issuer(a.issuer)] == ["a", "a2"]
    assert reg.by_issuer(a.issuer + "/") == []
    assert reg.get("b").config.issuer == b.issuer
    with pytest.raises(KeyError):
        reg.get("nope")
    assert await reg.refresh_all() == {"a": True, "b": True, "a2": True, "down": False}

    token_a = a.mint()
    assert reason(await verify(reg.get("a"), token_a)) is Reason.OK
    assert reason(await verify(reg.get("b"), token_a)) is Reason.UNKNOWN_KEY
    # iss = A but signed with B's key under B's kid: A's key set has no such kid.
    cross = b.mint(claims={"iss": a.issuer})
    assert reason(await verify(reg.get("a"), cross)) is Reason.UNKNOWN_KEY
    # iss = B with B's key presented to A: refused by issuer / key scoping either way.
    assert reason(await verify(reg.get("a"), b.mint())) in (
        Reason.UNKNOWN_KEY,
        Reason.WRONG_ISSUER,
    )
    await reg.aclose()


async def test_registry_ca_file_gets_own_client(
    nursery: trio.Nursery, tmp_path: Any, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    ca_file, certfile, keyfile = write_tls_files(tmp_path)
    iss = FaultIssuer()
    await nursery.start(
        lambda task_status: iss.serve(certfile=certfile, keyfile=keyfile, task_status=task_status)
    )
    assert iss.url is not None
    assert iss.url.startswith("https://")
    assert iss.issuer is not None
    cfg = _config(
        ProviderConfig(name="private", issuer=iss.issuer, ca_file=ca_file, algorithms=("ES256",)),
        ProviderConfig(name="public", issuer=iss.issuer, algorithms=("ES256",)),
    )
    reg = ProviderRegistry(cfg, client, clock=clock)
    results = await reg.refresh_all()
    assert results == {"private": True, "public": False}
    assert "unreachable" in (reg.get("public").last_error or "")
    assert reason(await verify(reg.get("private"), iss.mint())) is Reason.OK
    await reg.aclose()


def test_registry_bad_ca_file_is_config_error(tmp_path: Any) -> None:
    cfg = _config(
        ProviderConfig(name="p", issuer="https://x.example", ca_file=str(tmp_path / "missing.pem"))
    )
    with pytest.raises(ConfigError, match=r"provider\[0\]\.ca_file"):
        ProviderRegistry(cfg, httpx.AsyncClient())


def test_b64u_helper_roundtrip() -> None:
    assert b64u(b"\xff\xfe") == "__4"
