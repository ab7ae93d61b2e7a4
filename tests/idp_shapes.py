"""Realistic access-token shapes of real identity providers, minted by a DevIssuer,
and the rewriting that points an example config at loopback DevIssuers.

The shapes follow /work/shared/reference/oauth-sasl-discovery-stalwart.md §6
(Kanidm, Authentik) and Keycloak's documented access-token layout. DevIssuer
defaults that the real IdP does not send are dropped (``None``):

* Kanidm: per-client issuer, header typ ``at+jwt``, ES256, ``aud`` = client_id
  (a string), ``client_id``, ``scope`` string, ``sub`` = UUID, no ``azp``,
  no ``email``, no ``preferred_username``. The issuer's ``/userinfo`` then
  answers the account's SPN (``preferred_username``) and e-mail, as Kanidm's
  does; ``kanidm(..., enriched=True)`` puts ``preferred_username`` in the
  token itself (a token as it looks after enrichment).
* Authentik: RS256, header typ ``JWT`` (PyJWT's default: Authentik's
  ``OAuth2Provider.encode`` passes only ``kid``), the ID token's claims plus
  ``azp`` and ``uid`` (``IDToken.to_access_token``): ``aud`` = ``azp`` =
  client_id, no ``scope``, no ``client_id``, ``email`` and
  ``preferred_username`` present (``include_claims_in_id_token``, the
  default). The issuer is per application by default, or shared ("global").
* Entra ID (v2.0 access token for your own API): RS256, header typ ``JWT``,
  ``aud`` = the API's application ID, ``azp`` = the client's, ``scp``
  (space-separated), ``tid``, ``oid``, ``preferred_username``, ``ver``
  ``2.0``; no ``scope``, no ``email`` (an optional claim).
* Keycloak: RS256, header typ ``JWT`` and claim ``typ: Bearer``, ``aud``
  ``"account"`` (or a list), ``azp`` = the client, ``scope`` string, ``email``,
  ``email_verified``, ``preferred_username``, no ``client_id``.
"""

from __future__ import annotations

import time
import tomllib
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from saslauthd_oidc.tools.devissuer import DevIssuer

ALICE = "alice@example.org"
BOB = "bob@example.net"


def _session() -> dict[str, Any]:
    now = int(time.time())
    return {"auth_time": now - 30, "sid": uuid.uuid4().hex}


def kanidm(
    issuer: DevIssuer,
    client: str,
    *,
    scope: str = "openid email profile",
    enriched: bool = False,
    name: str = "alice",
    typ: str = "at+jwt",
    extra: Mapping[str, Any] | None = None,
) -> str:
    claims: dict[str, Any] = {
        "sub": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
        "aud": client,
        "client_id": client,
        "scope": scope,
        "session_id": uuid.uuid4().hex,
        "auth_time": int(time.time()) - 30,
        "email": None,
        "preferred_username": f"{name}@idm.example.org" if enriched else None,
        **(extra or {}),
    }
    # What Kanidm's userinfo endpoint answers for this account (SPN and e-mail).
    issuer.profiles[claims["sub"]] = {
        "preferred_username": f"{name}@idm.example.org",
        "email": f"{name}@example.org",
        "email_verified": True,
        "name": name.title(),
    }
    return issuer.mint(claims, alg="ES256", typ=typ)


def authentik(
    issuer: DevIssuer,
    client: str,
    *,
    email: str = ALICE,
    azp: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    claims: dict[str, Any] = {
        "sub": uuid.uuid4().hex,
        "aud": client,
        "azp": azp or client,
        "uid": uuid.uuid4().hex,
        "acr": "goauthentik.io/providers/oauth2/default",
        "amr": ["pwd"],
        **_session(),
        "email": email,
        "email_verified": True,
        "preferred_username": email.split("@")[0],
        "scope": None,
        "client_id": None,
        **(extra or {}),
    }
    return issuer.mint(claims, alg="RS256", typ="JWT")


def entra(
    issuer: DevIssuer,
    api: str,
    client: str,
    *,
    upn: str = ALICE,
    scp: str = "Mail.Send",
    tenant: str = "72f988bf-86f1-41af-91ab-2d7cd011db47",
    extra: Mapping[str, Any] | None = None,
) -> str:
    claims: dict[str, Any] = {
        "sub": uuid.uuid4().hex,
        "aud": api,
        "azp": client,
        "azpacr": "0",
        "scp": scp,
        "tid": tenant,
        "oid": str(uuid.uuid4()),
        "preferred_username": upn,
        "name": "Alice",
        "ver": "2.0",
        "uti": uuid.uuid4().hex[:22],
        "rh": "0.A" + uuid.uuid4().hex,
        "email": None,
        "scope": None,
        "client_id": None,
        **(extra or {}),
    }
    return issuer.mint(claims, alg="RS256", typ="JWT")


def keycloak(
    issuer: DevIssuer,
    client: str | None,
    *,
    email: str = BOB,
    scope: str = "openid email profile",
    audience: str | list[str] = "account",
    extra: Mapping[str, Any] | None = None,
) -> str:
    claims: dict[str, Any] = {
        "sub": str(uuid.uuid4()),
        "aud": audience,
        "azp": client,
        "typ": "Bearer",
        "scope": scope,
        "session_state": str(uuid.uuid4()),
        **_session(),
        "email": email,
        "email_verified": True,
        "preferred_username": email.split("@")[0],
        "realm_access": {"roles": ["default-roles-mail"]},
        "client_id": None,
        **(extra or {}),
    }
    return issuer.mint(claims, alg="RS256", typ="JWT")


# --------------------------------------------------------------------------- configs


def _rewrite(value: Any, urls: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):
        for old, new in urls:
            if value.startswith(old):
                return new + value[len(old) :]
        return value
    if isinstance(value, list):
        return [_rewrite(v, urls) for v in value]
    if isinstance(value, dict):
        return {k: _rewrite(v, urls) for k, v in value.items()}
    return value


def localize_example(
    example: Path,
    dest: Path,
    urls: Mapping[str, str],
    *,
    auth_socket: Path,
    server: Mapping[str, Any] | None = None,
    providers: list[str] | None = None,
    rules: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``example`` to ``dest`` pointed at loopback: URLs swapped, http allowed.

    ``urls`` maps URL prefixes of the example (issuer, discovery and hint URLs)
    to their DevIssuer replacements; every URL of the example must be covered,
    so an example URL that nobody serves is caught here rather than as a
    confusing tempfail. The socket goes to ``auth_socket`` (mode 0666, no
    group); everything else, rules included, is the example's own unless
    ``providers`` (names to keep) or ``rules`` (replacements) say otherwise.
    """
    data = tomllib.loads(example.read_text())
    if providers is not None:
        data["provider"] = [p for p in data["provider"] if p["name"] in providers]
    if rules is not None:
        data["rule"] = rules
    ordered = sorted(urls.items(), key=lambda kv: -len(kv[0]))
    data = _rewrite(data, ordered)
    leftover = [u for u in _strings(data) if u.startswith("https://")]
    assert not leftover, f"example URLs with no DevIssuer: {leftover}"
    data["server"] = {
        **data["server"],
        "auth_socket": str(auth_socket),
        "auth_socket_mode": "0666",
        "request_timeout": 3.0,
        **(server or {}),
    }
    data["server"].pop("auth_socket_group", None)
    for provider in data["provider"]:
        provider["allow_http"] = True
    dest.write_text(tomli_w.dumps(data))
    return dest


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []
