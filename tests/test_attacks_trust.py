"""Accounts across trust boundaries, tokens that are not what they seem, and logins
recovering as soon as an IdP is back from an outage — each through the daemon's real socket.

Each test runs the assembled daemon in-process (``run_daemon``) against real
loopback issuers (DevIssuer) and speaks the Dovecot auth protocol to its Unix
socket, as Postfix does. The reason is read from the daemon's one JSON
"authentication" log line per login. Every attack here was answered OK (or a
permanent FAIL, for the key rotation and the outage) before the fix.

Tokens from a real OpenID server (an ID token, a DPoP-bound token) are in
tests/test_peer_trust.py.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from saslauthd_oidc.config import LoggingConfig, parse_config
from saslauthd_oidc.core.request import token_fingerprint
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.service.logs import configure_logging
from saslauthd_oidc.tools.cli import main
from tests.idp_shapes import authentik, keycloak
from tests.peers.dovecot_client import LineClient
from tests.support_issuer import FaultIssuer

README = Path(__file__).resolve().parent.parent / "README.md"
ALICE = "alice@example.org"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def oauthbearer(token: str, user: str | None = ALICE, host: str | None = None) -> bytes:
    gs2 = f"n,a={user}," if user is not None else "n,,"
    extra = f"host={host}\x01" if host else ""
    return f"{gs2}\x01{extra}auth=Bearer {token}\x01\x01".encode()


@dataclass
class Daemon:
    sock: str
    log: io.StringIO
    client: LineClient
    rid: int = 0
    issuers: dict[str, FaultIssuer] = field(default_factory=dict)

    async def login(self, payload: bytes, mech: str = "OAUTHBEARER") -> str:
        """One authentication, following a failure challenge; the final reply line."""
        self.rid += 1
        rid = self.rid
        await self.client.send(f"AUTH\t{rid}\t{mech}\tservice=smtp\tresp={b64(payload)}")
        reply = await self.client.line()
        if reply.startswith(f"CONT\t{rid}\t"):
            await self.client.send(f"CONT\t{rid}\tAQ==")
            reply = await self.client.line()
        return reply

    def reason(self, token: str) -> str:
        fp = token_fingerprint(token)
        events = [json.loads(line) for line in self.log.getvalue().splitlines() if line]
        found = [
            e["reason"]
            for e in events
            if e.get("event") == "authentication" and e.get("token") == fp
        ]
        assert found, f"no authentication logged for token {fp}"
        return str(found[-1])

    async def ok(self, token: str, account: str = ALICE, **kw: Any) -> None:
        kw.setdefault("user", account)
        reply = await self.login(oauthbearer(token, **kw))
        assert reply == f"OK\t{self.rid}\tuser={account}", (reply, self.reason(token))

    async def refused(self, token: str, reason: str, *, temporary: bool = False, **kw: Any) -> None:
        reply = await self.login(oauthbearer(token, **kw))
        assert reply.startswith(f"FAIL\t{self.rid}\t") and "user=" not in reply, reply
        assert ("temp_fail" in reply) is temporary, reply
        assert self.reason(token) == reason


Start = Callable[[dict[str, Any]], Awaitable[Daemon]]


@pytest.fixture
async def start(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Start]:
    """Start the daemon on a config dict (its server/logging parts are filled in)."""
    clients: list[LineClient] = []

    async def run(config: dict[str, Any]) -> Daemon:
        sock = str(tmp_path / "auth")
        config.setdefault("server", {})
        config["server"] = {"auth_socket": sock, "request_timeout": 3.0, **config["server"]}
        config.setdefault("cache", {"negative_ttl": 0})
        cfg = parse_config(config)
        log = io.StringIO()
        configure_logging(LoggingConfig(level="info", format="json"), stream=log)
        await nursery.start(
            lambda task_status: run_daemon(cfg, task_status=task_status, handle_signals=False)
        )
        client = LineClient(await trio.open_unix_socket(sock))
        await client.handshake()
        clients.append(client)
        return Daemon(sock, log, client)

    yield run
    for c in clients:
        await c.stream.aclose()
    nursery.cancel_scope.cancel()


async def issuer(nursery: trio.Nursery, **kw: Any) -> FaultIssuer:
    iss = FaultIssuer(**kw)
    await nursery.start(iss.serve)
    return iss


def provider(name: str, iss: FaultIssuer, **kw: Any) -> dict[str, Any]:
    return {"name": name, "issuer": iss.issuer, "allow_http": True, **kw}


# --------------------------------------------------------------------------- account domains


async def test_another_provider_cannot_mint_accounts_in_a_domain_it_is_not_trusted_for(
    nursery: trio.Nursery, start: Start
) -> None:
    """Rule a (provider A) is for example.org; provider B's token says email=alice@example.org."""
    a, b = await issuer(nursery), await issuer(nursery)
    d = await start(
        {
            "provider": [provider("a", a), provider("b", b)],
            "rule": [
                {"name": "a", "provider": "a", "domains": ["example.org"], "audiences": ["mail"]},
                {"name": "b", "provider": "b", "audiences": ["mail-b"]},
            ],
        }
    )
    forged = b.mint(email=ALICE, audience="mail-b")
    await d.refused(forged, "untrusted_account_domain")  # with authzid alice@example.org
    await d.refused(forged, "untrusted_account_domain", user=None)  # and without one
    # B's own users, in a domain no other provider's rule claims, still log in
    await d.ok(b.mint(email="bob@example.net", audience="mail-b"), "bob@example.net")
    await d.ok(a.mint(email=ALICE))


async def test_a_rules_domains_are_its_account_domains(nursery: trio.Nursery, start: Start) -> None:
    """A rule with domains produces accounts in those domains only (authzid = "ignore")."""
    a = await issuer(nursery)
    d = await start(
        {
            "provider": [provider("a", a)],
            "rule": [
                {
                    "name": "org",
                    "provider": "a",
                    "domains": ["example.org"],
                    "audiences": ["mail"],
                    "authzid": "ignore",
                }
            ],
        }
    )
    await d.refused(a.mint(email="root@example.com"), "untrusted_account_domain")
    await d.ok(a.mint(email=ALICE))


async def test_an_explicit_account_domains_list_shares_a_domain(
    nursery: trio.Nursery, start: Start
) -> None:
    a, b = await issuer(nursery), await issuer(nursery)
    d = await start(
        {
            "provider": [provider("a", a), provider("b", b)],
            "rule": [
                {"name": "a", "provider": "a", "domains": ["example.org"], "audiences": ["mail"]},
                {
                    "name": "b",
                    "provider": "b",
                    "audiences": ["mail-b"],
                    "account_domains": ["example.org"],
                },
            ],
        }
    )
    await d.ok(b.mint(email=ALICE, audience="mail-b"))


# --------------------------------------------------------------------------- nOAuth


async def test_a_foreign_tenants_email_names_no_account(
    nursery: trio.Nursery, start: Start
) -> None:
    """Entra multi-tenant, allowed_tenants = ["*"]: any tenant's admin sets email freely."""
    entra = await issuer(nursery, issuer_path="/{tenantid}/v2.0")
    assert entra.url is not None
    base = {
        "provider": [
            provider("entra", entra, allowed_tenants=["*"], discovery_url=entra.discovery_url)
        ],
    }
    rule = {"name": "entra", "provider": "entra", "audiences": ["api://mail"]}

    def tenant_token(tenant: str, **claims: Any) -> str:
        iss = f"{entra.url}/{tenant}/v2.0"
        return entra.mint({"iss": iss, "tid": tenant, **claims}, audience="api://mail")

    evil = str(uuid.uuid4())
    d = await start({**base, "rule": [rule]})
    await d.refused(tenant_token(evil, email=ALICE), "unverified_email")
    await d.refused(tenant_token(evil, email=ALICE), "unverified_email", user=None)
    # Entra's own word that the domain's owner verified the address (xms_edov)
    await d.ok(tenant_token(evil, email=ALICE, xms_edov=True))


async def test_trust_unverified_email_is_the_explicit_opt_in(
    nursery: trio.Nursery, start: Start
) -> None:
    entra = await issuer(nursery, issuer_path="/{tenantid}/v2.0")
    assert entra.url is not None
    tenant = str(uuid.uuid4())
    d = await start(
        {
            "provider": [
                provider(
                    "entra", entra, allowed_tenants=[tenant], discovery_url=entra.discovery_url
                )
            ],
            "rule": [
                {
                    "name": "entra",
                    "provider": "entra",
                    "audiences": ["api://mail"],
                    "trust_unverified_email": True,
                }
            ],
        }
    )
    iss = f"{entra.url}/{tenant}/v2.0"
    await d.ok(entra.mint({"iss": iss, "tid": tenant, "email": ALICE}, audience="api://mail"))


@pytest.mark.parametrize("verified", [False, "true", 1, "yes"])
async def test_an_email_the_idp_does_not_call_verified_names_no_account(
    nursery: trio.Nursery, start: Start, verified: object
) -> None:
    a = await issuer(nursery)
    d = await start(
        {"provider": [provider("a", a)], "rule": [{"provider": "a", "audiences": ["mail"]}]}
    )
    await d.refused(a.mint({"email_verified": verified}), "unverified_email")
    await d.ok(a.mint({"email_verified": True}))
    await d.ok(a.mint())  # an IdP that does not send email_verified at all


# --------------------------------------------------------------------------- audience-less rules


def readme_block(marker: str) -> str:
    """The fenced block after ``<!-- recipe: marker -->`` in README.md."""
    text = README.read_text()
    found = re.search(rf"<!-- recipe: {re.escape(marker)} -->\s*```\w*\n(.*?)```", text, re.S)
    assert found, f"README.md has no recipe marked {marker!r}"
    return found.group(1)


async def test_the_readme_discovery_rule_is_safe_as_pasted(
    nursery: trio.Nursery, start: Start
) -> None:
    """Over SMTP with OAUTHBEARER host=, the discovery rule is a login rule too."""
    import tomllib

    idp = await issuer(nursery)
    rules = tomllib.loads(readme_block("discovery-rule"))["rule"]
    d = await start({"provider": [provider("authentik", idp)], "rule": rules})
    host = rules[0]["hosts"][0]
    grafana = idp.mint(audience="grafana")  # another application of the same IdP
    await d.refused(grafana, "wrong_audience", host=host)
    await d.ok(idp.mint(audience=rules[0]["audiences"][0]), host=host)


def test_a_rule_checking_no_audience_is_refused_unless_explicit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    head = '[[provider]]\nname = "idp"\nissuer = "https://idp.example.org"\n'
    path.write_text(head + '[[rule]]\nname = "jmap"\nprovider = "idp"\nhosts = ["mail.x"]\n')
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "rule[0].audiences" in err and '"jmap"' in err and "check_audience = false" in err
    path.write_text(head + '[[rule]]\nname = "any"\nprovider = "idp"\ncheck_audience = false\n')
    assert main(["check-config", "--config", str(path)]) == 0
    assert "rule[0] (any) checks no audience (check_audience = false)" in capsys.readouterr().out


# --------------------------------------------------------------------------- ID tokens


async def test_id_tokens_do_not_log_in(nursery: trio.Nursery, start: Start) -> None:
    """No token_types (the default): an ID token (typ JWT, aud = azp = the client)."""
    a = await issuer(nursery, algorithms=("ES256", "RS256"))
    d = await start(
        {
            "provider": [provider("a", a, algorithms=["ES256", "RS256"])],
            "rule": [{"provider": "a", "audiences": ["webmail"]}],
        }
    )
    now = int(time.time())
    id_claims = {"azp": "webmail", "auth_time": now, "scope": None, "client_id": None}
    for marker in (
        {"nonce": "n-0S6_WzA2Mj", "at_hash": "77QmUPtjPfzWtF2AnpK9RQ"},
        {"nonce": "n-0S6_WzA2Mj"},
        {"at_hash": "77QmUPtjPfzWtF2AnpK9RQ"},
        {"c_hash": "LDktKdoQak3Pk0cnXxCltA"},
        {"s_hash": "5Ex3bB6R6Fbw3fNjnQXyHQ"},
        {"typ": "ID"},  # Keycloak names its token kinds in a claim
        {"azp": None},  # no marker, but the client only in aud (oidc-provider's ID tokens)
    ):
        token = a.mint({**id_claims, **marker}, audience="webmail", typ="JWT")
        await d.refused(token, "id_token")
    # real access tokens carrying auth_time (and aud = azp = the client) still log in
    await d.ok(authentik(a, "webmail"))
    await d.ok(keycloak(a, "webmail", email=ALICE, audience="webmail"))
    # a Keycloak (< 24) access token with the nonce of its login: typ "Bearer" says access
    await d.ok(keycloak(a, "webmail", email=ALICE, audience="webmail", extra={"nonce": "n"}))


async def test_accept_id_tokens_is_the_explicit_opt_in(nursery: trio.Nursery, start: Start) -> None:
    a = await issuer(nursery)
    d = await start(
        {
            "provider": [provider("a", a, accept_id_tokens=True)],
            "rule": [{"provider": "a", "audiences": ["webmail"]}],
        }
    )
    await d.ok(a.mint({"nonce": "n", "at_hash": "h"}, audience="webmail", typ="JWT"))


# --------------------------------------------------------------------------- sender-constrained


async def test_sender_constrained_tokens_are_refused(nursery: trio.Nursery, start: Start) -> None:
    a = await issuer(nursery)
    d = await start(
        {
            "provider": [provider("a", a)],
            "rule": [{"provider": "a", "audiences": ["mail"]}],
        }
    )
    jkt = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
    await d.refused(a.mint({"cnf": {"jkt": jkt}}), "sender_constrained")
    x5t = "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"
    await d.refused(a.mint({"cnf": {"x5t#S256": x5t}}), "sender_constrained")
    await d.ok(a.mint())


async def test_introspected_sender_constrained_tokens_are_refused(
    nursery: trio.Nursery, start: Start, tmp_path: Path
) -> None:
    a = await issuer(nursery)
    secret = tmp_path / "secret"
    secret.write_text(a.clients["saslauthd"] + "\n")
    secret.chmod(0o600)
    d = await start(
        {
            "provider": [provider("a", a, client_id="saslauthd", client_secret_file=str(secret))],
            "rule": [{"provider": "a", "audiences": ["mail"]}],
        }
    )
    jkt = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
    await d.refused(a.mint_opaque({"cnf": {"jkt": jkt}}), "sender_constrained")
    await d.refused(a.mint_opaque({"token_type": "DPoP"}), "sender_constrained")
    await d.ok(a.mint_opaque())


# --------------------------------------------------------------------------- revocation


async def test_force_introspection_sees_a_revoked_jwt(
    nursery: trio.Nursery, start: Start, tmp_path: Path
) -> None:
    a = await issuer(nursery)
    secret = tmp_path / "secret"
    secret.write_text(a.clients["saslauthd"] + "\n")
    secret.chmod(0o600)
    creds = {"client_id": "saslauthd", "client_secret_file": str(secret)}
    d = await start(
        {
            "provider": [
                provider("a", a, force_introspection=True, introspection_cache_ttl=0, **creds)
            ],
            "rule": [{"provider": "a", "audiences": ["mail"]}],
        }
    )
    token = a.mint()
    await d.ok(token)
    before = a.requests["/introspect"]
    await d.ok(token)
    assert a.requests["/introspect"] == before + 1  # every login asks (ttl 0)
    a.revoke(token)
    await d.refused(token, "token_inactive")
    # a JWT that does not verify is never sent to introspection
    head, body, sig = a.mint().split(".")
    asked = a.requests["/introspect"]
    await d.refused(f"{head}.{body}.{sig[:-4]}AAAA", "bad_signature")
    assert a.requests["/introspect"] == asked


# --------------------------------------------------------------------------- key rotation


async def test_a_rotated_key_is_not_a_forgery(nursery: trio.Nursery, start: Start) -> None:
    a = await issuer(nursery)
    d = await start(
        {
            "provider": [provider("a", a, jwks_cooldown=30)],
            "rule": [{"provider": "a", "audiences": ["mail"]}],
        }
    )
    await d.ok(a.mint())  # keys loaded
    a.rotate("ES256")
    await d.ok(a.mint())  # the new kid is fetched at once
    # a second rotation within the cooldown of that refetch: temporary, never 535
    a.rotate("ES256")
    rotated = a.mint()
    await d.refused(rotated, "key_refresh_pending", temporary=True)
    # a never-published kid within the cooldown is temporary too, and fetches nothing
    fetched = a.requests["/jwks.json"]
    await d.refused(
        a.mint(header={"kid": "never-published"}), "key_refresh_pending", temporary=True
    )
    assert a.requests["/jwks.json"] == fetched


async def test_a_due_refetch_is_awaited_within_the_request_deadline(
    nursery: trio.Nursery, start: Start
) -> None:
    a = await issuer(nursery)
    d = await start(
        {
            "server": {"request_timeout": 5.0},
            "provider": [provider("a", a, jwks_cooldown=1.0)],
            "rule": [{"provider": "a", "audiences": ["mail"]}],
        }
    )
    await d.ok(a.mint())
    a.rotate("ES256")
    await d.ok(a.mint())  # unknown-kid refetch #1
    a.rotate("ES256")
    await d.ok(a.mint())  # within 1 s of it: waits for the cooldown, then fetches
    unknown = a.mint(header={"kid": "never-published"})
    await d.refused(unknown, "unknown_key")  # waited, fetched: still unknown


# --------------------------------------------------------------------------- IdP outage


async def test_logins_work_again_as_soon_as_the_idp_is_back(
    nursery: trio.Nursery, start: Start
) -> None:
    """The first login after an outage works: no jwks_cooldown (30 s) of failures after it."""
    a = await issuer(nursery)
    a.fail_status = 503  # down when the daemon needs its keys
    d = await start(
        {"provider": [provider("a", a)], "rule": [{"provider": "a", "audiences": ["mail"]}]}
    )
    down = a.mint()
    await d.refused(down, "provider_unavailable", temporary=True)
    a.fail_status = None  # back
    await d.ok(a.mint())  # the next retry is a second away, within the request deadline
