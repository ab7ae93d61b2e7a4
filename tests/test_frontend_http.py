"""Contract tests of the HTTP surface, in process (ASGI) with a scripted authenticator.

Dovecot's passdb oauth2 (RFC 7662, ``introspection_mode = post``), Stalwart's
OIDC directory (v0.15 introspect/userinfo, v0.16 userinfo facade with its own
discovery document), RFC 9728 protected-resource metadata, health and
readiness. Stalwart cannot be installed here: its documented contract (reference
§5) is what these tests hold the daemon to.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from saslauthd_oidc.config import Config, ConfigError, parse_config
from saslauthd_oidc.core.outcome import Reason, Verdict
from saslauthd_oidc.core.request import AuthRequest, Mechanism
from saslauthd_oidc.frontends.http import HttpFrontend
from saslauthd_oidc.frontends.http_callers import CallerAuth, load_caller_auth

TOKEN = "opaque-token-0123456789"
ISSUER = "https://idm.example.org/oauth2/openid/mail"
AK_ISSUER = "https://auth.example.com/application/o/mail/"


def make_config(http: dict[str, Any] | None = None) -> Config:
    return parse_config(
        {
            "server": {"http_listen": "127.0.0.1:8480", "request_timeout": 2.0},
            "http": http if http is not None else {"auth": "open"},
            "provider": [
                {"name": "kanidm", "issuer": ISSUER},
                {"name": "authentik", "issuer": AK_ISSUER},
            ],
            "rule": [
                {
                    "name": "jmap",
                    "audiences": ["mail"],
                    "provider": "authentik",
                    "hosts": ["mail.example.com"],
                    "resource_paths": ["/jmap"],
                    "scopes_supported": ["openid", "email", "urn:ietf:params:oauth:scope:mail"],
                },
                {
                    "name": "webmail",
                    "audiences": ["mail"],
                    "provider": "kanidm",
                    "hosts": ["mail.example.com"],
                    "referers": ["https://webmail.example.com/"],
                    "required_scopes": ["email"],
                },
                {
                    "name": "default",
                    "audiences": ["mail"],
                    "provider": "kanidm",
                    "hosts": ["mail.example.com"],
                    "challenge_scope": "openid",
                },
            ],
        }
    )


class Scripted:
    """An authenticator that records requests and answers with a fixed Verdict."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.requests: list[AuthRequest] = []

    async def __call__(self, request: AuthRequest) -> Verdict:
        self.requests.append(request)
        return self.verdict


OK = Verdict(
    reason=Reason.OK,
    account="alice@example.org",
    rule="default",
    claims={
        "iss": ISSUER,
        "sub": "alice",
        "aud": "mail",
        "scope": "openid email",
        "exp": 2000000000,
        "name": "Alice",
        "token_type": "Bearer",  # would make Dovecot fail the answer: never copied
        "username": "not-this",
        "nested": {"x": 1},
    },
)
REFUSED = Verdict(reason=Reason.BAD_SIGNATURE, detail="signature does not verify")
DOWN = Verdict(reason=Reason.PROVIDER_UNAVAILABLE, detail="jwks fetch failed")


def client(
    verdict: Verdict = OK,
    *,
    config: Config | None = None,
    caller: CallerAuth | None = None,
    ready: Callable[[], bool] = lambda: True,
) -> tuple[httpx.AsyncClient, Scripted]:
    cfg = config or make_config()
    auth = Scripted(verdict)
    app = HttpFrontend(cfg, auth, caller or CallerAuth(open=True), ready=ready)
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8480"), auth


def form(token: str = TOKEN) -> dict[str, Any]:
    # Exactly what Dovecot 2.3 sends in post mode.
    return {
        "content": f"token={token}&client_id=&client_secret=".encode(),
        "headers": {"content-type": "application/x-www-form-urlencoded"},
    }


# --------------------------------------------------------------------------- /introspect


async def test_introspect_active_answer_carries_username_and_scalar_claims() -> None:
    c, auth = client(OK)
    async with c:
        r = await c.post("/introspect", **form())
    assert r.status_code == 200
    doc = r.json()
    assert doc["active"] is True
    assert doc["username"] == "alice@example.org"
    assert doc["scope"] == "openid email"
    assert doc["iss"] == ISSUER
    assert "token_type" not in doc
    assert "nested" not in doc
    assert r.headers["cache-control"] == "no-store"
    (request,) = auth.requests
    assert request.mechanism is Mechanism.BEARER
    assert request.credentials.token == TOKEN
    assert request.credentials.authzid is None
    assert request.context.frontend == "http"


async def test_introspect_refusal_is_active_false_and_nothing_else() -> None:
    c, _ = client(REFUSED)
    async with c:
        r = await c.post("/introspect", **form())
    assert r.status_code == 200
    assert r.json() == {"active": False}


async def test_introspect_missing_token_is_inactive_without_asking_the_engine() -> None:
    c, auth = client(OK)
    async with c:
        r = await c.post("/introspect", content=b"client_id=x", headers=form()["headers"])
    assert r.json() == {"active": False}
    assert auth.requests == []


async def test_introspect_temporary_failure_is_503() -> None:
    """Dovecot treats anything but 2xx/4xx as an internal failure: a temporary one."""
    c, _ = client(DOWN)
    async with c:
        r = await c.post("/introspect", **form())
    assert r.status_code == 503
    assert "active" not in r.json()


async def test_introspect_only_by_post() -> None:
    c, auth = client(OK)
    async with c:
        r = await c.get("/introspect", params={"token": TOKEN})
    assert r.status_code == 405
    assert auth.requests == []


async def test_introspect_body_size_is_bounded() -> None:
    c, auth = client(OK)
    async with c:
        r = await c.post("/introspect", **form("x" * 70000))
    assert r.status_code == 413
    assert auth.requests == []


async def test_dovecot_auth_headers_feed_the_request_context() -> None:
    c, auth = client(OK)
    headers = {
        **form()["headers"],
        "X-Dovecot-Auth-Service": "IMAP",
        "X-Dovecot-Auth-Local": "[2001:db8::1]:993",
        "X-Dovecot-Auth-Remote": "192.0.2.7:51234",
    }
    async with c:
        await c.post("/introspect", content=form()["content"], headers=headers)
    ctx = auth.requests[0].context
    assert (ctx.service, ctx.local_ip, ctx.local_port) == ("imap", "2001:db8::1", 993)
    assert (ctx.remote_ip, ctx.remote_port) == ("192.0.2.7", 51234)


async def test_introspect_without_dovecot_headers_says_what_to_set() -> None:
    cfg = parse_config(
        {
            "server": {"http_listen": "127.0.0.1:8480"},
            "http": {"auth": "open"},
            "provider": [{"name": "kanidm", "issuer": ISSUER}],
            "rule": [
                {"name": "imap", "provider": "kanidm", "services": ["imap"], "audiences": ["m"]},
                {
                    "name": "smtp",
                    "provider": "kanidm",
                    "ports": [587],
                    "mechanisms": ["XOAUTH2"],
                    "audiences": ["m"],
                },
            ],
        }
    )
    c, _ = client(OK, config=cfg)
    with capture_logs() as logs:
        async with c:
            for _ in range(2):
                await c.post("/introspect", **form())
    hints = [e for e in logs if e["event"] == "introspect_without_auth_headers"]
    assert len(hints) == 1  # once, not per request
    assert hints[0]["rules"] == ["imap"]  # "smtp" never serves HTTP anyway
    assert "send_auth_headers = yes" in hints[0]["hint"]


def basic(user: str, password: str) -> dict[str, str]:
    value = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"authorization": f"Basic {value}"}


@pytest.fixture
def caller_files(tmp_path: Path) -> Config:
    users = tmp_path / "users"
    users.write_text("# name:password\ndovecot:pa:ss\n\nstalwart:other\n")
    users.chmod(0o600)
    secret = tmp_path / "secret"
    secret.write_text("shared-secret\n")
    secret.chmod(0o600)
    return make_config({"users_file": str(users), "secret_file": str(secret)})


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        (basic("dovecot", "pa:ss"), 200),  # a colon in the password is the password's
        (basic("dovecot", "pa"), 401),
        (basic("nobody", "pa:ss"), 401),
        (basic("stalwart", "other"), 200),
        ({"authorization": "Basic !!!"}, 401),
        ({"authorization": "Bearer shared-secret"}, 200),
        ({"authorization": "bearer shared-secret"}, 200),
        ({"authorization": "Bearer shared-secre"}, 401),
        ({"authorization": "Digest shared-secret"}, 401),
    ],
)
async def test_introspect_callers_authenticate(
    caller_files: Config, headers: dict[str, str], status: int
) -> None:
    c, auth = client(OK, config=caller_files, caller=load_caller_auth(caller_files.http))
    async with c:
        r = await c.post(
            "/introspect", content=form()["content"], headers={**form()["headers"], **headers}
        )
    assert r.status_code == status
    assert len(auth.requests) == (1 if status == 200 else 0)
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Basic")


def test_caller_files_must_be_private(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("dovecot:secret\n")
    users.chmod(0o644)
    cfg = make_config({"users_file": str(users)})
    with pytest.raises(ConfigError) as info:
        load_caller_auth(cfg.http)
    assert info.value.key == "http.users_file"
    users.chmod(0o600)
    users.write_text("no colon here\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_caller_auth(cfg.http)


# --------------------------------------------------------------------------- Stalwart


def stalwart_config(**http: Any) -> Config:
    return make_config(
        {"auth": "open", "stalwart_issuer": "http://127.0.0.1:8480/stalwart/", **http}
    )


async def test_stalwart_v015_introspect_contract() -> None:
    """endpoint.method = "introspect": 200 + fields.email on success, 401 on failure."""
    for verdict, status in ((OK, 200), (REFUSED, 401)):
        c, auth = client(verdict, config=stalwart_config())
        async with c:
            r = await c.post(
                "/stalwart/introspect",
                content=f"token={TOKEN}&token_type_hint=access_token".encode(),
                headers=form()["headers"],
            )
        assert r.status_code == status
        assert auth.requests[0].credentials.token == TOKEN
        if status == 200:
            doc = r.json()
            assert doc["email"] == "alice@example.org"
            assert doc["username"] == "alice@example.org"
            assert doc["preferred_username"] == "alice@example.org"
            assert doc["name"] == "Alice"
        else:
            assert "email" not in r.json()


async def test_stalwart_userinfo_contract() -> None:
    """v0.15 endpoint.method = "userinfo" and v0.16 non-JWT tokens: GET with the user's Bearer."""
    c, auth = client(OK, config=stalwart_config())
    async with c:
        r = await c.get("/stalwart/userinfo", headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
        assert r.json()["email"] == "alice@example.org"
        assert auth.requests[0].credentials.token == TOKEN
        r = await c.get("/stalwart/userinfo")
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert len(auth.requests) == 1
    for verdict, status in ((REFUSED, 401), (DOWN, 503)):
        c, _ = client(verdict, config=stalwart_config())
        async with c:
            r = await c.get("/stalwart/userinfo", headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == status


async def test_stalwart_v016_discovery_document() -> None:
    """What Stalwart v0.16 requires of issuerUrl's discovery document."""
    c, _ = client(OK, config=stalwart_config())
    async with c:
        doc = (await c.get("/stalwart/.well-known/openid-configuration")).json()
        jwks = (await c.get("/stalwart/jwks")).json()
    issuer = "http://127.0.0.1:8480/stalwart"
    assert doc["issuer"] == issuer  # == issuerUrl with the trailing "/" trimmed
    for required in ("jwks_uri", "userinfo_endpoint", "token_endpoint", "authorization_endpoint"):
        assert doc[required].startswith(issuer + "/")
    assert doc["userinfo_endpoint"] == issuer + "/userinfo"
    assert jwks == {"keys": []}  # no JWT can verify against the facade: they go elsewhere


async def test_stalwart_endpoints_off_unless_configured() -> None:
    c, auth = client(OK)
    async with c:
        r = await c.get("/stalwart/userinfo", headers={"authorization": f"Bearer {TOKEN}"})
        r2 = await c.get("/stalwart/.well-known/openid-configuration")
    assert (r.status_code, r2.status_code) == (404, 404)
    assert auth.requests == []


async def test_stalwart_introspect_needs_caller_auth(caller_files: Config) -> None:
    cfg = make_config(
        {
            "users_file": caller_files.http.users_file,
            "stalwart_issuer": "http://127.0.0.1:8480/stalwart",
        }
    )
    c, _ = client(OK, config=cfg, caller=load_caller_auth(cfg.http))
    async with c:
        r = await c.post("/stalwart/introspect", **form())
        assert r.status_code == 401
        r = await c.post(
            "/stalwart/introspect",
            content=form()["content"],
            headers={**form()["headers"], **basic("stalwart", "other")},
        )
        assert r.status_code == 200
        # userinfo: the user's token is the credential, as at any OIDC userinfo endpoint
        r = await c.get("/stalwart/userinfo", headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200


# --------------------------------------------------------------------------- RFC 9728


async def prm(path: str, **headers: str) -> httpx.Response:
    c, _ = client(OK)
    async with c:
        return await c.get(path, headers={"host": "mail.example.com", **headers})


async def test_protected_resource_metadata_by_path() -> None:
    r = await prm("/.well-known/oauth-protected-resource/jmap")
    assert r.status_code == 200
    assert r.json() == {
        "resource": "https://mail.example.com/jmap",
        "authorization_servers": [AK_ISSUER],
        "bearer_methods_supported": ["header"],
        "scopes_supported": ["openid", "email", "urn:ietf:params:oauth:scope:mail"],
    }
    # Only configured resources are answered: nothing of the request path is reflected.
    for other in ("/jmap/session", "/jmapx", "/" + "x" * 30000):
        r = await prm("/.well-known/oauth-protected-resource" + other)
        assert r.status_code == 404, other
        assert other.encode() not in r.content
    r = await prm("/.well-known/oauth-protected-resource/jmap/")
    assert r.json()["resource"] == "https://mail.example.com/jmap"


async def test_protected_resource_metadata_by_referer() -> None:
    r = await prm("/.well-known/oauth-protected-resource", referer="https://webmail.example.com/x")
    assert r.json()["scopes_supported"] == ["email"]
    assert r.json()["resource"] == "https://mail.example.com"
    r = await prm("/.well-known/oauth-protected-resource", referer="https://evil.example.net/")
    assert r.json()["scopes_supported"] == ["openid"]  # rule "default"


async def test_protected_resource_metadata_by_host_and_scheme() -> None:
    r = await prm("/.well-known/oauth-protected-resource", host="other.example.com")
    assert r.status_code == 404
    r = await prm(
        "/.well-known/oauth-protected-resource",
        host="MAIL.example.com:8443",
        **{"x-forwarded-proto": "http"},  # from no trusted proxy: ignored
    )
    assert r.status_code == 200
    assert r.json()["resource"] == "https://mail.example.com:8443"  # RFC 3986 §6.2.2.1 case
    cfg = make_config({"auth": "open", "trusted_proxies": ["127.0.0.1"]})
    c, _ = client(OK, config=cfg)
    async with c:
        r = await c.get(
            "/.well-known/oauth-protected-resource",
            headers={
                "host": "127.0.0.1:8480",
                "x-forwarded-proto": "http",
                "x-forwarded-host": "mail.example.com",
            },
        )
    assert r.json()["resource"] == "http://mail.example.com"


async def test_protected_resource_metadata_is_get_only() -> None:
    c, _ = client(OK)
    async with c:
        r = await c.post(
            "/.well-known/oauth-protected-resource", headers={"host": "mail.example.com"}
        )
    assert r.status_code == 405


# --------------------------------------------------------------------------- health


async def test_healthz_and_readyz() -> None:
    state = {"ready": False}
    c, _ = client(OK, ready=lambda: state["ready"])
    async with c:
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/readyz")).status_code == 503
        state["ready"] = True
        assert (await c.get("/readyz")).status_code == 200
        assert (await c.get("/nowhere")).status_code == 404
        assert (await c.get("/metrics")).status_code == 404  # no Metrics given


def test_bearer_is_no_sasl_mechanism() -> None:
    """BEARER exists for HTTP only: the Dovecot socket's parser never yields it."""
    assert Mechanism.parse("BEARER") is None
    assert Mechanism.parse("bearer") is None
    assert Mechanism.parse("xoauth2") is Mechanism.XOAUTH2
    assert not Mechanism.BEARER.is_sasl
