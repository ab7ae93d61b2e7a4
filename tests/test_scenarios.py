"""Two deployments end to end over the daemon's real socket: Kanidm with several clients
(scenario 1) and Authentik with a shared issuer and two mail domains (scenario 2).

Configs are the files in etc/examples/, pointed at loopback DevIssuers (URLs
swapped, ``allow_http`` added; rules untouched). Tokens have the shapes real
IdPs issue (tests/idp_shapes.py). Every case asserts the Dovecot-protocol
reply (``OK user=`` or FAIL after the exact RFC 7628 / XOAUTH2 challenge)
AND which rule won and why, read from the daemon's one JSON log line per
authentication.
"""

from __future__ import annotations

import base64
import io
import json
import tomllib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import trio

from saslauthd_oidc.config import LoggingConfig, load_config
from saslauthd_oidc.core.request import token_fingerprint
from saslauthd_oidc.core.rules import config_warnings, ordered
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.service.logs import configure_logging
from saslauthd_oidc.tools.cli import main
from saslauthd_oidc.tools.devissuer import DevIssuer
from tests.idp_shapes import ALICE, BOB, authentik, kanidm, keycloak, localize_example
from tests.peers.dovecot_client import LineClient
from tests.support_issuer import FaultIssuer

EXAMPLES = Path(__file__).resolve().parent.parent / "etc" / "examples"
KANIDM = EXAMPLES / "kanidm-several-clients.toml"
AUTHENTIK = EXAMPLES / "authentik-shared-issuer.toml"

Issuers = dict[str, DevIssuer]

# --------------------------------------------------------------------------- the examples load


def test_examples_are_all_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.toml")) == [
        "authentik-per-application.toml",  # these four: tests/test_examples_idps.py
        "authentik-shared-issuer.toml",
        "entra-id.toml",
        "google.toml",
        "kanidm-several-clients.toml",
        "keycloak.toml",
    ]


KANIDM_WARNINGS = [
    "rules 'webmail' (kanidm-webmail) and 'legacy-keycloak' (legacy-keycloak) both produce "
    "accounts in example.org: either IdP can log in as any user there; keep each domain to "
    "one provider unless both really manage its users"
]


def test_kanidm_example_loads_as_documented() -> None:
    cfg = load_config(KANIDM)
    # the migration fallback's account_domains is an explicit, reported choice
    assert config_warnings(cfg) == KANIDM_WARNINGS
    assert [(p.name, p.issuer, p.algorithms, p.token_types) for p in cfg.providers] == [
        (
            f"kanidm-{c}",
            f"https://idm.example.org/oauth2/openid/{client}",
            ("ES256",),
            ("at+jwt",),
        )
        for c, client in [
            ("webmail", "webmail"),
            ("jmap", "jmap-app"),
            ("thunderbird", "thunderbird"),
        ]
    ] + [("legacy-keycloak", "https://sso.example.org/realms/mail", ("RS256",), ())]
    assert [r.name for r in ordered(cfg.rules)] == [
        "webmail",
        "jmap-app",
        "thunderbird",
        "legacy-keycloak",
    ]
    assert [(r.audiences, r.authorized_parties, r.services) for r in cfg.rules] == [
        (("webmail",), ("webmail",), ("smtp", "imap")),
        (("jmap-app",), ("jmap-app",), ("imap",)),
        (("thunderbird",), ("thunderbird",), ("smtp", "imap")),
        ((), ("thunderbird",), ()),
    ]
    assert [r.fallback for r in cfg.rules] == [False, False, False, True]
    assert cfg.server.auth_socket_group == "postfix"


def test_authentik_example_loads_as_documented() -> None:
    cfg = load_config(AUTHENTIK)
    assert config_warnings(cfg) == []
    ak, kc = cfg.providers
    assert (ak.issuer, ak.algorithms, ak.token_types) == (
        "https://auth.example.org/",
        ("RS256",),
        (),
    )
    assert ak.effective_discovery_url == (
        "https://auth.example.org/application/o/webmail/.well-known/openid-configuration"
    )
    assert cfg.rules[0].discovery_hint == (
        "https://auth.example.org/application/o/jmap-app/.well-known/openid-configuration"
    )
    assert kc.effective_discovery_url == (
        "https://sso.example.net/realms/mail/.well-known/openid-configuration"
    )
    assert [(r.name, r.provider, r.domains, r.required_scopes) for r in cfg.rules] == [
        ("jmap-app", "authentik", ("example.org",), ()),
        ("webmail", "authentik", ("example.org",), ()),
        ("net-thunderbird", "keycloak-net", ("example.net",), ("email",)),
        ("net-roundcube", "keycloak-net", ("example.net",), ("email",)),
    ]


@pytest.mark.parametrize(
    ("example", "extra", "warning"),
    [
        (
            KANIDM,
            # narrower than "webmail" in every respect, and after it: dead
            '[[rule]]\nname = "webmail-smtp"\nprovider = "kanidm-webmail"\n'
            'audiences = ["webmail"]\nauthorized_parties = ["webmail"]\nservices = ["smtp"]\n'
            'username = "{preferred_username|localpart}@example.org"\n',
            "warning: rule[4] (webmail-smtp) can never match: "
            "rule[0] (webmail) accepts everything it does first",
        ),
        (
            KANIDM,
            '[[rule]]\nname = "legacy-any"\nprovider = "legacy-keycloak"\n'
            'authorized_parties = ["thunderbird", "roundcube"]\nfallback = true\n'
            'account_domains = ["example.org"]\n',
            "warning: fallback rules 'legacy-keycloak' and 'legacy-any' overlap: "
            "file order decides between them",
        ),
        (
            AUTHENTIK,
            # wider than the rules before it (no domain, no scope) and last: reachable
            '[[rule]]\nname = "net-all"\nprovider = "keycloak-net"\n'
            'authorized_parties = ["thunderbird", "roundcube"]\n'
            'account_domains = ["example.net"]\n',
            None,
        ),
    ],
    ids=["shadowed", "overlapping-fallbacks", "wider-rule-last-is-fine"],
)
def test_check_config_reports_shadowed_example_rules(
    example: Path,
    extra: str,
    warning: str | None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / example.name
    path.write_text(example.read_text() + "\n" + extra)
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    # the untouched example prints only its own, documented warnings
    baseline = [f"warning: {w}" for w in (KANIDM_WARNINGS if example == KANIDM else [])]
    assert sorted(warnings) == sorted(baseline + ([warning] if warning else []))
    assert main(["check-config", "--config", str(example)]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("warning:")] == baseline


# --------------------------------------------------------------------------- plumbing


@cache
def _issuer(key: str, algorithm: str, path: str) -> DevIssuer:
    """Key generation (RSA) is the slow part: one issuer per role, served per test."""
    return FaultIssuer(algorithms=(algorithm,), issuer_path=path)


class DovecotClient(LineClient):
    """A Postfix-like Dovecot auth client: one request at a time on one connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream, timeout=5.0)
        self.rid = 0

    async def login(
        self, mech: str, payload: bytes, service: str
    ) -> tuple[str, dict[str, Any] | None]:
        """AUTH; answer a failure challenge as a client does; (final reply, challenge JSON)."""
        self.rid += 1
        rid = self.rid
        resp = base64.b64encode(payload).decode()
        await self.send(f"AUTH\t{rid}\t{mech}\tservice={service}\tlip=127.0.0.1\tresp={resp}")
        reply = await self.line()
        challenge = None
        if reply.startswith(f"CONT\t{rid}\t"):
            challenge = json.loads(base64.b64decode(reply.split("\t", 2)[2]))
            await self.send(f"CONT\t{rid}\t{'AQ==' if mech == 'OAUTHBEARER' else ''}")
            reply = await self.line()
        parts = reply.split("\t")
        assert parts[:2] in (["OK", str(rid)], ["FAIL", str(rid)]), reply
        return reply, challenge


def sasl(
    mech: str, token: str, user: str | None, host: str | None = None, port: int | None = None
) -> bytes:
    if mech == "XOAUTH2":
        return f"user={user or ''}\x01auth=Bearer {token}\x01\x01".encode()
    gs2 = f"n,a={user}," if user else "n,,"
    extra = (f"\x01host={host}" if host else "") + (f"\x01port={port}" if port else "")
    return f"{gs2}{extra}\x01auth=Bearer {token}\x01\x01".encode()


@dataclass
class Stack:
    sock: str
    log: io.StringIO
    iss: Issuers
    _client: DovecotClient | None = None

    async def client(self) -> DovecotClient:
        if self._client is None:
            self._client = DovecotClient(await trio.open_unix_socket(self.sock))
            await self._client.handshake()
        return self._client

    def event(self, token: str) -> dict[str, Any]:
        """The daemon's one "authentication" log line for ``token``."""
        fp = token_fingerprint(token)
        events: list[dict[str, Any]] = [
            json.loads(line) for line in self.log.getvalue().splitlines() if line
        ]
        mine = [e for e in events if e.get("event") == "authentication" and e.get("token") == fp]
        assert len(mine) == 1, self.log.getvalue()
        return mine[0]


async def start_stack(
    nursery: trio.Nursery,
    tmp_path: Path,
    example: Path,
    issuers: Issuers,
    urls: Callable[[Issuers], dict[str, str]],
    **localize: Any,
) -> Stack:
    for iss in issuers.values():
        await nursery.start(iss.serve)
    if "authentik" in issuers:
        # Authentik "global" issuer mode: the issuer is the server root WITH its
        # slash, while discovery stays under /application/o/<slug>/.
        ak = issuers["authentik"]
        ak.issuer = f"{ak.url}/"
    config_path = localize_example(
        example,
        tmp_path / example.name,
        urls(issuers),
        auth_socket=tmp_path / "auth",
        **localize,
    )
    config = load_config(config_path)
    log = io.StringIO()
    configure_logging(LoggingConfig(level="info", format="json"), stream=log)
    await nursery.start(
        lambda task_status: run_daemon(config, task_status=task_status, handle_signals=False)
    )
    return Stack(str(tmp_path / "auth"), log, issuers)


def doc(iss: DevIssuer) -> str:
    return iss.discovery_url


@dataclass(frozen=True)
class Case:
    """One login: a token of some IdP shape, the request around it, what must happen.

    ``account`` set: OK with that user=. Otherwise FAIL after exactly ``challenge``.
    ``rule``/``reason`` are what the daemon's log line must say.
    """

    id: str
    mint: Callable[[Issuers], str]
    rule: str | None
    reason: str
    account: str | None = None
    challenge: Callable[[Issuers], dict[str, str]] | None = None
    user: str | None = ALICE
    mech: str = "OAUTHBEARER"
    service: str = "smtp"
    host: str | None = None
    port: int | None = None


async def run_case(stack: Stack, case: Case) -> None:
    client = await stack.client()
    token = case.mint(stack.iss)
    reply, challenge = await client.login(
        case.mech, sasl(case.mech, token, case.user, case.host, case.port), case.service
    )
    event = stack.event(token)
    assert (event["rule"], event["reason"]) == (case.rule, case.reason), event
    assert event["service"] == case.service
    if case.account is not None:
        assert reply == f"OK\t{client.rid}\tuser={case.account}"
        assert challenge is None
        assert event["account"] == case.account
    else:
        assert reply.startswith(f"FAIL\t{client.rid}\t") and "user=" not in reply
        assert case.challenge is not None, "a refusal case must say what the client is told"
        assert challenge == case.challenge(stack.iss)


# --------------------------------------------------------------------------- scenario 1: Kanidm


def kanidm_issuers() -> Issuers:
    return {
        "webmail": _issuer("kanidm-webmail", "ES256", "/oauth2/openid/webmail/"),
        "jmap-app": _issuer("kanidm-jmap", "ES256", "/oauth2/openid/jmap-app/"),
        "thunderbird": _issuer("kanidm-thunderbird", "ES256", "/oauth2/openid/thunderbird/"),
        "legacy": _issuer("legacy-keycloak", "RS256", "/realms/mail/"),
    }


def kanidm_urls(iss: Issuers) -> dict[str, str]:
    base = "https://idm.example.org/oauth2/openid/"
    urls = {base + c: iss[c].issuer for c in ("webmail", "jmap-app", "thunderbird")}
    urls["https://sso.example.org/realms/mail"] = iss["legacy"].issuer
    return {k: v for k, v in urls.items() if v}


@pytest.fixture
async def kanidm_stack(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Stack]:
    stack = await start_stack(nursery, tmp_path, KANIDM, kanidm_issuers(), kanidm_urls)
    yield stack
    nursery.cancel_scope.cancel()


def _revoked(issuer: DevIssuer, token: str) -> str:
    """``token``, after the issuer (its userinfo) stopped honouring it."""
    issuer.revoke(token)
    return token


def _nameless(issuer: DevIssuer, token: str) -> str:
    """``token``, whose account's userinfo answer carries no preferred_username."""
    for profile in issuer.profiles.values():
        if profile.get("name") == "Nameless":
            profile["preferred_username"] = None
    return token


def _tb_hint(scope: str = "openid email profile", status: str = "invalid_token") -> Any:
    """Every Kanidm rule tells refused clients the Thunderbird client's document."""
    return lambda iss: {
        "status": status,
        "scope": scope,
        "openid-configuration": doc(iss["thunderbird"]),
    }


KANIDM_CASES = [
    Case(
        "webmail-smtp",
        lambda i: kanidm(i["webmail"], "webmail"),
        "webmail",
        "ok",
        account=ALICE,
    ),
    Case(
        "webmail-imap-xoauth2",
        lambda i: kanidm(i["webmail"], "webmail"),
        "webmail",
        "ok",
        account=ALICE,
        mech="XOAUTH2",
        service="imap",
    ),
    Case(
        "jmap-app-imap",
        lambda i: kanidm(i["jmap-app"], "jmap-app"),
        "jmap-app",
        "ok",
        account=ALICE,
        service="imap",
    ),
    Case(
        "thunderbird-smtp-xoauth2",
        lambda i: kanidm(i["thunderbird"], "thunderbird", name="Alice"),
        "thunderbird",
        "ok",
        account=ALICE,  # NFKC + lower case
        mech="XOAUTH2",
    ),
    Case(
        # a valid jmap-app token, but only rules of other clients fit service=smtp
        "jmap-app-token-over-smtp",
        lambda i: kanidm(i["jmap-app"], "jmap-app"),
        None,
        "unknown_issuer",
        challenge=_tb_hint(),
    ),
    Case(
        "thunderbird-without-email-scope",
        lambda i: kanidm(i["thunderbird"], "thunderbird", scope="openid profile"),
        None,
        "insufficient_scope",
        challenge=_tb_hint(status="insufficient_scope"),
    ),
    Case(
        # the signature is good, but Kanidm's userinfo says the token is no
        # longer valid (its session was ended): refused as inactive
        "kanidm-token-revoked-at-userinfo",
        lambda i: _revoked(i["webmail"], kanidm(i["webmail"], "webmail")),
        "webmail",
        "token_inactive",
        challenge=_tb_hint(),
    ),
    Case(
        # a Kanidm access token names nobody but a UUID, and userinfo answers
        # without a name either: nothing to map
        "kanidm-userinfo-without-name",
        lambda i: _nameless(i["webmail"], kanidm(i["webmail"], "webmail", name="nameless")),
        "webmail",
        "identity_unmappable",
        challenge=_tb_hint(),
        user="nameless@example.org",
    ),
    Case(
        "webmail-id-token-typ-jwt",
        lambda i: kanidm(i["webmail"], "webmail", typ="JWT"),
        None,
        "wrong_token_type",
        challenge=_tb_hint(),
    ),
    Case(
        # per-client keys: thunderbird's key cannot sign for the webmail issuer
        # (nor can it after the refetch its unknown kid causes)
        "webmail-iss-signed-by-thunderbird-key",
        lambda i: kanidm(i["thunderbird"], "webmail", extra={"iss": i["webmail"].issuer}),
        None,
        "unknown_key",
        challenge=_tb_hint(),
    ),
    Case(
        "thunderbird-token-for-another-user",
        lambda i: kanidm(i["thunderbird"], "thunderbird"),
        "thunderbird",
        "authzid_mismatch",
        user="bob@example.org",
        challenge=_tb_hint(),
    ),
    Case(
        # the fallback: tried after every Kanidm rule refused
        "legacy-keycloak-fallback-smtp",
        lambda i: keycloak(i["legacy"], "thunderbird", email=ALICE),
        "legacy-keycloak",
        "ok",
        account=ALICE,
    ),
    Case(
        "legacy-keycloak-other-client",
        lambda i: keycloak(i["legacy"], "roundcube", email=ALICE),
        None,
        "untrusted_authorized_party",
        challenge=_tb_hint(),
    ),
    Case(
        # sieve: only the fallback fits, so refused clients are sent to it
        "kanidm-token-where-only-fallback-fits",
        lambda i: kanidm(i["thunderbird"], "thunderbird"),
        None,
        "unknown_issuer",
        service="sieve",
        challenge=lambda i: {
            "status": "invalid_token",
            "scope": "email",
            "openid-configuration": doc(i["legacy"]),
        },
    ),
]


@pytest.mark.parametrize("case", KANIDM_CASES, ids=lambda c: c.id)
async def test_kanidm_several_clients(kanidm_stack: Stack, case: Case) -> None:
    await run_case(kanidm_stack, case)


async def test_kanidm_one_connection_serves_every_client_in_turn(kanidm_stack: Stack) -> None:
    """Postfix keeps one auth connection: cases must not depend on each other's order."""
    for case in [*KANIDM_CASES, *reversed(KANIDM_CASES)]:
        await run_case(kanidm_stack, case)


async def test_kanidm_account_comes_from_userinfo_once_per_token(kanidm_stack: Stack) -> None:
    """The token has no name; userinfo has it, and is asked once however often it logs in."""
    webmail = kanidm_stack.iss["webmail"]
    assert isinstance(webmail, FaultIssuer)  # it keeps the latest request's headers
    token = kanidm(webmail, "webmail", name="frank")
    client = await kanidm_stack.client()
    before = webmail.requests["/userinfo"]
    for _ in range(3):
        reply, _challenge = await client.login(
            "XOAUTH2", sasl("XOAUTH2", token, "frank@example.org", None, None), "imap"
        )
        assert reply == f"OK\t{client.rid}\tuser=frank@example.org"
    assert webmail.requests["/userinfo"] - before == 1
    assert webmail.last_request_headers["authorization"] == f"Bearer {token}"


# --------------------------------------------------------------------------- scenario 2: Authentik


def authentik_issuers() -> Issuers:
    return {
        "authentik": _issuer("authentik", "RS256", "/application/o/webmail/"),
        "keycloak": _issuer("keycloak-net", "RS256", "/realms/mail/"),
    }


def authentik_urls(iss: Issuers) -> dict[str, str]:
    return {
        "https://auth.example.org/": f"{iss['authentik'].url}/",
        "https://sso.example.net/realms/mail": iss["keycloak"].issuer or "",
    }


@pytest.fixture
async def authentik_stack(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Stack]:
    stack = await start_stack(nursery, tmp_path, AUTHENTIK, authentik_issuers(), authentik_urls)
    yield stack
    nursery.cancel_scope.cancel()


def _ak_hint(iss: Issuers) -> dict[str, str]:
    # the jmap-app rule's discovery_hint: the JMAP app's own application, not the
    # webmail document the provider reads its keys from (and the DevIssuer serves)
    jmap_doc = f"{iss['authentik'].url}/application/o/jmap-app/.well-known/openid-configuration"
    assert jmap_doc != doc(iss["authentik"])
    return {"status": "invalid_token", "scope": "openid email", "openid-configuration": jmap_doc}


def _kc_hint(status: str = "invalid_token") -> Callable[[Issuers], dict[str, str]]:
    return lambda iss: {
        "status": status,
        "scope": "email",
        "openid-configuration": doc(iss["keycloak"]),
    }


AUTHENTIK_CASES = [
    Case(
        "authentik-jmap-app",
        lambda i: authentik(i["authentik"], "jmap-app"),
        "jmap-app",
        "ok",
        account=ALICE,
    ),
    Case(
        # same issuer, same key: told apart by aud/azp only
        "authentik-webmail",
        lambda i: authentik(i["authentik"], "webmail"),
        "webmail",
        "ok",
        account=ALICE,
        mech="XOAUTH2",
        service="imap",
    ),
    Case(
        "authentik-unknown-client",
        lambda i: authentik(i["authentik"], "nextcloud"),
        None,
        "wrong_audience",
        challenge=_ak_hint,
    ),
    Case(
        "authentik-webmail-aud-foreign-azp",
        lambda i: authentik(i["authentik"], "webmail", azp="nextcloud"),
        None,
        "untrusted_authorized_party",
        challenge=_ak_hint,
    ),
    Case(
        # an Authentik token is valid, but bob's domain is served by Keycloak
        "authentik-token-for-example-net-user",
        lambda i: authentik(i["authentik"], "jmap-app", email=BOB),
        None,
        "unknown_issuer",
        user=BOB,
        challenge=_kc_hint(),
    ),
    Case(
        "keycloak-thunderbird",
        lambda i: keycloak(i["keycloak"], "thunderbird"),
        "net-thunderbird",
        "ok",
        account=BOB,
        user=BOB,
        mech="XOAUTH2",
    ),
    Case(
        "keycloak-roundcube",
        lambda i: keycloak(i["keycloak"], "roundcube"),
        "net-roundcube",
        "ok",
        account=BOB,
        user=BOB,
    ),
    Case(
        # a valid Keycloak token, but alice's domain is served by Authentik
        "keycloak-token-for-example-org-user",
        lambda i: keycloak(i["keycloak"], "thunderbird", email=ALICE),
        None,
        "unknown_issuer",
        challenge=_ak_hint,
    ),
    Case(
        "keycloak-without-email-scope",
        lambda i: keycloak(i["keycloak"], "thunderbird", scope="openid profile"),
        None,
        "insufficient_scope",
        user=BOB,
        challenge=_kc_hint("insufficient_scope"),
    ),
    Case(
        "keycloak-without-email-scope-xoauth2",
        lambda i: keycloak(i["keycloak"], "thunderbird", scope="openid profile"),
        None,
        "insufficient_scope",
        user=BOB,
        mech="XOAUTH2",
        challenge=lambda i: {"status": "403", "schemes": "bearer", "scope": "email"},
    ),
    # OIDC Core 3.1.3.7: several audiences need an azp the rule trusts
    Case(
        "multi-audience-trusted-azp",
        lambda i: keycloak(i["keycloak"], "roundcube", audience=["account", "roundcube"]),
        "net-roundcube",
        "ok",
        account=BOB,
        user=BOB,
    ),
    Case(
        "multi-audience-untrusted-azp",
        lambda i: keycloak(i["keycloak"], "nextcloud", audience=["account", "roundcube"]),
        None,
        "untrusted_authorized_party",
        user=BOB,
        challenge=_kc_hint(),
    ),
    Case(
        "multi-audience-no-azp",
        lambda i: keycloak(i["keycloak"], None, audience=["account", "roundcube"]),
        None,
        "untrusted_authorized_party",
        user=BOB,
        challenge=_kc_hint(),
    ),
    Case(
        # no rule serves example.com: nothing to point the client at
        "unknown-domain",
        lambda i: keycloak(i["keycloak"], "thunderbird", email="carol@example.com"),
        None,
        "no_rule_for_context",
        user="carol@example.com",
        challenge=lambda i: {"status": "invalid_token"},
    ),
]


@pytest.mark.parametrize("case", AUTHENTIK_CASES, ids=lambda c: c.id)
async def test_authentik_shared_issuer_and_two_domains(authentik_stack: Stack, case: Case) -> None:
    await run_case(authentik_stack, case)


# --------------------------------------------------------------------------- one issuer, two rules

# Each entry: two rules on the Keycloak provider of the Authentik example,
# told apart by one condition, and requests that must pick each of them (or
# neither). Keycloak-shaped tokens for bob@example.net unless said otherwise.


def _rule(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "provider": "keycloak-net", "username": "{email}", **kw}


def _kc(client: str = "app", **kw: Any) -> Callable[[Issuers], str]:
    return lambda i: keycloak(i["keycloak"], client, **kw)


def _refused(status: str = "invalid_token", scope: str | None = None) -> Any:
    def hint(iss: Issuers) -> dict[str, str]:
        body = {"status": status}
        if scope:
            body["scope"] = scope
        body["openid-configuration"] = doc(iss["keycloak"])
        return body

    return hint


PAIRS: dict[str, tuple[list[dict[str, Any]], list[Case]]] = {
    "aud": (
        [_rule("a", audiences=["app-a"]), _rule("b", audiences=["app-b"])],
        [
            Case("a", _kc("app-a", audience="app-a"), "a", "ok", account=BOB, user=BOB),
            Case("b", _kc("app-b", audience="app-b"), "b", "ok", account=BOB, user=BOB),
            Case(
                "none",
                _kc("app-c", audience="app-c"),
                None,
                "wrong_audience",
                user=BOB,
                challenge=_refused(),
            ),
        ],
    ),
    "azp": (
        [_rule("a", authorized_parties=["app-a"]), _rule("b", authorized_parties=["app-b"])],
        [
            Case("a", _kc("app-a"), "a", "ok", account=BOB, user=BOB),
            Case("b", _kc("app-b"), "b", "ok", account=BOB, user=BOB),
            Case(
                "none",
                _kc("app-c"),
                None,
                "untrusted_authorized_party",
                user=BOB,
                challenge=_refused(),
            ),
        ],
    ),
    "scope": (
        [
            _rule("a", authorized_parties=["app"], required_scopes=["mail.send"]),
            _rule("b", authorized_parties=["app"], required_scopes=["mail.read"]),
        ],
        [
            Case("a", _kc(scope="openid mail.send"), "a", "ok", account=BOB, user=BOB),
            Case("b", _kc(scope="openid mail.read"), "b", "ok", account=BOB, user=BOB),
            Case(
                "none",
                _kc(scope="openid email"),
                None,
                "insufficient_scope",
                user=BOB,
                challenge=_refused("insufficient_scope", "mail.send"),
            ),
        ],
    ),
    "domain": (
        [
            _rule("a", authorized_parties=["app"], domains=["example.net"]),
            _rule("b", authorized_parties=["app"], domains=["example.com"]),
        ],
        [
            Case("a", _kc(), "a", "ok", account=BOB, user=BOB),
            Case(
                "b",
                _kc(email="carol@example.com"),
                "b",
                "ok",
                account="carol@example.com",
                user="Carol@EXAMPLE.com",
            ),
            Case(
                "none",
                _kc(email="dave@example.invalid"),
                None,
                "no_rule_for_context",
                user="dave@example.invalid",
                challenge=lambda i: {"status": "invalid_token"},
            ),
        ],
    ),
    "host": (
        [
            _rule("a", authorized_parties=["app"], hosts=["mail.example.net"]),
            _rule("b", authorized_parties=["app"], hosts=["mx.example.com"]),
        ],
        [
            Case("a", _kc(), "a", "ok", account=BOB, user=BOB, host="MAIL.example.net."),
            Case("b", _kc(), "b", "ok", account=BOB, user=BOB, host="mx.example.com"),
            Case(
                "none",
                _kc(),
                None,
                "no_rule_for_context",
                user=BOB,
                host="other.example.net",
                challenge=lambda i: {"status": "invalid_token"},
            ),
        ],
    ),
    "port": (
        [
            _rule("a", authorized_parties=["app"], ports=[587]),
            _rule("b", authorized_parties=["app"], ports=[465]),
        ],
        [
            Case("a", _kc(), "a", "ok", account=BOB, user=BOB, host="mail.example.net", port=587),
            Case("b", _kc(), "b", "ok", account=BOB, user=BOB, host="mail.example.net", port=465),
            Case(
                "none",
                _kc(),
                None,
                "no_rule_for_context",
                user=BOB,
                port=25,
                challenge=lambda i: {"status": "invalid_token"},
            ),
        ],
    ),
    "service": (
        [
            _rule("a", authorized_parties=["app"], services=["smtp"]),
            _rule("b", authorized_parties=["app"], services=["imap"]),
        ],
        [
            Case("a", _kc(), "a", "ok", account=BOB, user=BOB, service="smtp"),
            Case("b", _kc(), "b", "ok", account=BOB, user=BOB, service="imap", mech="XOAUTH2"),
            Case(
                "none",
                _kc(),
                None,
                "no_rule_for_context",
                user=BOB,
                service="pop3",
                challenge=lambda i: {"status": "invalid_token"},
            ),
        ],
    ),
    # The fallback is written FIRST and still only used when the other rule refuses.
    "fallback": (
        [
            _rule("any", authorized_parties=["app"], fallback=True),
            _rule("scoped", authorized_parties=["app"], required_scopes=["email"]),
        ],
        [
            Case("scoped", _kc(scope="openid email"), "scoped", "ok", account=BOB, user=BOB),
            Case("any", _kc(scope="openid"), "any", "ok", account=BOB, user=BOB),
            Case(
                "none",
                _kc("other"),
                None,
                "untrusted_authorized_party",
                user=BOB,
                # the challenge comes from the non-fallback rule, although it is second
                challenge=_refused(scope="email"),
            ),
        ],
    ),
}


@pytest.mark.parametrize("dimension", list(PAIRS))
async def test_two_rules_on_one_issuer(
    nursery: trio.Nursery, tmp_path: Path, dimension: str
) -> None:
    rules, cases = PAIRS[dimension]
    stack = await start_stack(
        nursery,
        tmp_path,
        AUTHENTIK,
        {"keycloak": authentik_issuers()["keycloak"]},
        lambda i: {"https://sso.example.net/realms/mail": i["keycloak"].issuer or ""},
        providers=["keycloak-net"],
        rules=rules,
    )
    for case in cases:
        await run_case(stack, case)
    nursery.cancel_scope.cancel()


def test_pair_configs_are_what_the_table_says(tmp_path: Path) -> None:
    """The pair rules parse, and check-config sees no rule shadowing another."""
    for dimension, (rules, _) in PAIRS.items():
        path = localize_example(
            AUTHENTIK,
            tmp_path / f"{dimension}.toml",
            {
                "https://sso.example.net/realms/mail": "http://127.0.0.1:1/realms/mail",
                "https://auth.example.org/": "http://127.0.0.1:1/",
            },
            auth_socket=tmp_path / "auth",
            providers=["keycloak-net"],
            rules=rules,
        )
        cfg = load_config(path)
        assert [r.name for r in cfg.rules] == [r["name"] for r in rules]
        assert len(tomllib.loads(AUTHENTIK.read_text())["rule"]) == 4  # example untouched
        assert config_warnings(cfg) == [], dimension
