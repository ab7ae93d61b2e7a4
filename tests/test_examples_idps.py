"""The IdP examples in etc/examples/ (Authentik per application, Keycloak, Entra ID,
Google) against loopback DevIssuers that mint tokens shaped as each IdP emits
them (tests/idp_shapes.py), over the daemon's Dovecot-protocol socket.

Each example is used as written, with only its URLs pointed at loopback
(``localize_example``): what the comments in the file say the IdP sends is
what is minted here, and the rules must take the real shape and refuse its
near misses (an ID token, another client's token, a token of another tenant
or Workspace).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from saslauthd_oidc.config import LoggingConfig, load_config
from saslauthd_oidc.core.rules import config_warnings
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.service.logs import configure_logging
from saslauthd_oidc.tools.devissuer import DevIssuer
from tests.idp_shapes import ALICE, authentik, entra, keycloak, localize_example
from tests.test_scenarios import Case, Stack, run_case

EXAMPLES = Path(__file__).resolve().parent.parent / "etc" / "examples"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
API = "6f4c1d2e-0b7a-4e1b-9c55-3a1f0d2b7c11"
THUNDERBIRD = "b1a2c3d4-5e6f-4a7b-8c9d-0e1f2a3b4c5d"

Issuers = dict[str, DevIssuer]


async def start(
    nursery: trio.Nursery,
    tmp_path: Path,
    example: str,
    issuers: Issuers,
    urls: Callable[[Issuers], dict[str, str]],
    *,
    trailing_slash: tuple[str, ...] = (),
) -> Stack:
    for key, iss in issuers.items():
        await nursery.start(iss.serve)
        if key in trailing_slash:  # Authentik's issuers end with "/"
            iss.issuer = f"{iss.issuer}/"
    config_path = localize_example(
        EXAMPLES / example, tmp_path / example, urls(issuers), auth_socket=tmp_path / "auth"
    )
    config = load_config(config_path)
    log = io.StringIO()
    configure_logging(LoggingConfig(level="info", format="json"), stream=log)
    await nursery.start(
        lambda task_status: run_daemon(config, task_status=task_status, handle_signals=False)
    )
    return Stack(str(tmp_path / "auth"), log, issuers)


def challenge(
    key: str, scope: str | None = None, status: str = "invalid_token"
) -> Callable[[Issuers], dict[str, str]]:
    def make(iss: Issuers) -> dict[str, str]:
        out = {"status": status}
        if scope:
            out["scope"] = scope
        out["openid-configuration"] = iss[key].discovery_url
        return out

    return make


# --------------------------------------------------------------------------- the files load


@pytest.mark.parametrize(
    ("example", "warnings"),
    [
        ("authentik-per-application.toml", 0),
        ("keycloak.toml", 0),
        ("entra-id.toml", 0),
        # userinfo proves no audience: check-config says so, twice
        ("google.toml", 2),
    ],
)
def test_example_loads(example: str, warnings: int) -> None:
    cfg = load_config(EXAMPLES / example)
    assert len(config_warnings(cfg)) == warnings, config_warnings(cfg)


# --------------------------------------------------------------------------- Authentik


@pytest.fixture
async def authentik_stack(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Stack]:
    issuers = {
        "webmail": DevIssuer(algorithms=("RS256",), issuer_path="/application/o/webmail/"),
        "thunderbird": DevIssuer(algorithms=("RS256",), issuer_path="/application/o/thunderbird/"),
    }

    def urls(iss: Issuers) -> dict[str, str]:
        base = "https://auth.example.org/application/o/"
        return {base + k + "/": iss[k].issuer or "" for k in iss}

    yield await start(
        nursery,
        tmp_path,
        "authentik-per-application.toml",
        issuers,
        urls,
        trailing_slash=("webmail", "thunderbird"),
    )
    nursery.cancel_scope.cancel()


AUTHENTIK_CASES = [
    Case(
        "webmail",
        lambda i: authentik(i["webmail"], "webmail-client-id"),
        "webmail",
        "ok",
        account=ALICE,
    ),
    Case(
        "thunderbird",
        lambda i: authentik(i["thunderbird"], "thunderbird-client-id"),
        "thunderbird",
        "ok",
        account=ALICE,
    ),
    Case(
        # Thunderbird's client_id in a token of the webmail application's issuer
        "client-of-another-application",
        lambda i: authentik(i["webmail"], "thunderbird-client-id"),
        None,
        "wrong_audience",
        challenge=challenge("webmail"),
    ),
    Case(
        # an Authentik ID token: the access token's claims without azp and uid
        "id-token",
        lambda i: authentik(i["webmail"], "webmail-client-id", extra={"azp": None, "uid": None}),
        None,
        "id_token",
        challenge=challenge("webmail"),
    ),
]


@pytest.mark.parametrize("case", AUTHENTIK_CASES, ids=lambda c: c.id)
async def test_authentik_per_application(authentik_stack: Stack, case: Case) -> None:
    await run_case(authentik_stack, case)


# --------------------------------------------------------------------------- Keycloak


@pytest.fixture
async def keycloak_stack(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Stack]:
    issuers = {"keycloak": DevIssuer(algorithms=("RS256",), issuer_path="/realms/mail/")}
    yield await start(
        nursery,
        tmp_path,
        "keycloak.toml",
        issuers,
        lambda iss: {"https://sso.example.org/realms/mail": iss["keycloak"].issuer or ""},
    )
    nursery.cancel_scope.cancel()


KEYCLOAK_CASES = [
    Case(
        "thunderbird-with-audience-mapper",
        lambda i: keycloak(i["keycloak"], "thunderbird", email=ALICE, audience=["mail", "account"]),
        "thunderbird",
        "ok",
        account=ALICE,
    ),
    Case(
        "roundcube-short-name",
        lambda i: keycloak(i["keycloak"], "roundcube", email=ALICE, audience=["mail", "account"]),
        "webmail",
        "ok",
        account=ALICE,
    ),
    Case(
        # no Audience mapper: aud is only "account"
        "no-audience-mapper",
        lambda i: keycloak(i["keycloak"], "thunderbird", email=ALICE),
        None,
        "wrong_audience",
        challenge=challenge("keycloak", "email"),
    ),
    Case(
        "id-token",
        lambda i: keycloak(
            i["keycloak"],
            "thunderbird",
            email=ALICE,
            audience="mail",
            extra={"typ": "ID", "scope": None, "azp": "thunderbird"},
        ),
        None,
        "id_token",
        challenge=challenge("keycloak", "email"),
    ),
]


@pytest.mark.parametrize("case", KEYCLOAK_CASES, ids=lambda c: c.id)
async def test_keycloak(keycloak_stack: Stack, case: Case) -> None:
    await run_case(keycloak_stack, case)


# --------------------------------------------------------------------------- Entra ID


@pytest.fixture
async def entra_stack(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Stack]:
    issuers = {"entra": DevIssuer(algorithms=("RS256",), issuer_path=f"/{TENANT}/v2.0/")}
    yield await start(
        nursery,
        tmp_path,
        "entra-id.toml",
        issuers,
        lambda iss: {f"https://login.microsoftonline.com/{TENANT}/v2.0": iss["entra"].issuer or ""},
    )
    nursery.cancel_scope.cancel()


ENTRA_CASES = [
    Case(
        "v2-token-for-the-api",
        lambda i: entra(i["entra"], API, THUNDERBIRD),
        "mail-api",
        "ok",
        account=ALICE,
    ),
    Case(
        "token-for-another-api",
        lambda i: entra(i["entra"], "00000003-0000-0000-c000-000000000000", THUNDERBIRD),
        None,
        "wrong_audience",
        challenge=challenge("entra", "Mail.Send"),
    ),
    Case(
        "another-client",
        lambda i: entra(i["entra"], API, "0e1f2a3b-4c5d-4e6f-8a7b-9c0d1e2f3a4b"),
        None,
        "untrusted_authorized_party",
        challenge=challenge("entra", "Mail.Send"),
    ),
    Case(
        "scope-missing",
        lambda i: entra(i["entra"], API, THUNDERBIRD, scp="User.Read"),
        None,
        "insufficient_scope",
        challenge=challenge("entra", "Mail.Send", "insufficient_scope"),
    ),
]


@pytest.mark.parametrize("case", ENTRA_CASES, ids=lambda c: c.id)
async def test_entra_id(entra_stack: Stack, case: Case) -> None:
    await run_case(entra_stack, case)


# --------------------------------------------------------------------------- Google


@pytest.fixture
async def google_stack(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Stack]:
    issuers = {"google": DevIssuer(algorithms=("RS256",))}
    yield await start(
        nursery,
        tmp_path,
        "google.toml",
        issuers,
        lambda iss: {"https://accounts.google.com": iss["google"].issuer or ""},
    )
    nursery.cancel_scope.cancel()


def google(issuer: DevIssuer, *, hd: str | None = "example.org", email: str = ALICE) -> str:
    """An opaque Google access token; Google's userinfo answers sub, email, hd..."""
    token = issuer.mint_opaque(email=email, claims={"email_verified": True})
    sub = next(r["sub"] for t, r in issuer._opaque.items() if t == token)
    if hd is not None:
        issuer.profiles[str(sub)] = {"hd": hd}
    return token


GOOGLE_CASES = [
    Case(
        "workspace-account", lambda i: google(i["google"]), "google-workspace", "ok", account=ALICE
    ),
    Case(
        # a consumer (gmail.com) account, or another Workspace, claiming an example.org name
        "not-this-workspace",
        lambda i: google(i["google"], hd=None),
        None,
        "claim_mismatch",
        challenge=challenge("google"),
    ),
]


@pytest.mark.parametrize("case", GOOGLE_CASES, ids=lambda c: c.id)
async def test_google(google_stack: Stack, case: Case) -> None:
    await run_case(google_stack, case)
