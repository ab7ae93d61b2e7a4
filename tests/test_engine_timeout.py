"""The engine keeps ``server.request_timeout`` itself: a slow provider gives a logged,
counted TIMEOUT verdict, not a silent cancellation in the frontend."""

from __future__ import annotations

import math
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from saslauthd_oidc.config import parse_config
from saslauthd_oidc.core.engine import Engine
from saslauthd_oidc.core.outcome import Outcome, Reason, Refusal
from saslauthd_oidc.core.request import AuthRequest, Credentials, Mechanism, token_fingerprint
from saslauthd_oidc.providers.jwt import UnverifiedToken, VerifiedClaims
from saslauthd_oidc.service.metrics import Metrics
from tests.test_engine import A, token


class HangingVerifier:
    def verify_now(self, tok: str, unverified: UnverifiedToken | None) -> None:
        return None

    async def verify(
        self, tok: str, unverified: UnverifiedToken | None
    ) -> VerifiedClaims | Refusal:
        await trio.sleep(math.inf)
        raise AssertionError("unreachable")

    async def userinfo(self, tok: str) -> VerifiedClaims | Refusal:
        raise AssertionError("not used")


class Lookup:
    def get(self, name: str) -> HangingVerifier:
        return HangingVerifier()


def engine(metrics: Metrics | None = None) -> Engine:
    config: dict[str, Any] = {
        "server": {"request_timeout": 0.5},
        "provider": [{"name": "a", "issuer": A}],
        "rule": [{"name": "web", "provider": "a", "audiences": ["web"]}],
    }
    return Engine(
        parse_config(config), Lookup(), observe=metrics.observe if metrics is not None else None
    )


async def test_slow_provider_is_a_logged_timeout(autojump_clock: trio.abc.Clock) -> None:
    tok = token(iss=A, aud="web", email="alice@example.org", exp=2e9)
    request = AuthRequest(Mechanism.XOAUTH2, Credentials(tok, "alice@example.org"))
    with capture_logs() as logs, trio.fail_after(5):  # fails here if the engine has no deadline
        verdict = await engine().authenticate(request)
    assert (verdict.outcome, verdict.reason) == (Outcome.TEMPFAIL, Reason.TIMEOUT)
    [line] = [e for e in logs if e["event"] == "authentication"]
    assert (line["reason"], line["outcome"]) == ("timeout", "tempfail")
    assert line["token"] == token_fingerprint(tok)
    assert tok not in repr(logs)


async def test_timeout_is_counted_in_metrics(autojump_clock: trio.abc.Clock) -> None:
    metrics = Metrics()
    eng = engine(metrics)
    tok = token(iss=A, aud="web", email="alice@example.org", exp=2e9)
    with capture_logs(), trio.fail_after(5):
        await eng.authenticate(AuthRequest(Mechanism.OAUTHBEARER, Credentials(tok)))
    body, _ = metrics.render()
    samples = [
        s
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == "saslauthd_oidc_authentications_total"
    ]
    assert [(s.labels["reason"], s.labels["outcome"], s.value) for s in samples] == [
        ("timeout", "tempfail", 1.0)
    ]


async def test_inline_verdicts_are_counted_and_deferred_ones_when_finished(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The engine counts a verdict where it reaches it: in start, or in finish."""
    from saslauthd_oidc.core.engine import Pending
    from saslauthd_oidc.core.outcome import Verdict

    metrics = Metrics()
    eng = engine(metrics)
    bad = AuthRequest(Mechanism.XOAUTH2, Credentials("not a token"))
    assert isinstance(eng.start(bad), Verdict)  # decided inline: counted now
    tok = token(iss=A, aud="web", email="alice@example.org", exp=2e9)
    pending = eng.start(AuthRequest(Mechanism.XOAUTH2, Credentials(tok)))
    assert isinstance(pending, Pending)  # needs the (hanging) provider: not counted yet

    def counts() -> list[tuple[str, float]]:
        body, _ = metrics.render()
        return [
            (s.labels["reason"], s.value)
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
            if s.name == "saslauthd_oidc_authentications_total"
        ]

    assert counts() == [("malformed_token", 1.0)]
    with capture_logs():
        await eng.finish(pending)
    assert sorted(counts()) == [("malformed_token", 1.0), ("timeout", 1.0)]
