"""Username templates naming a claim no IdP is known to send: ``check-config``'s typo hints."""

from __future__ import annotations

from saslauthd_oidc.config.errors import suggest
from saslauthd_oidc.config.schema import PLACEHOLDER_RE, Config

# Claims that OpenID Connect (Core §5.1), JWT access tokens (RFC 9068, RFC 7662)
# and the IdPs the README covers (Kanidm, Authentik, Keycloak, Entra ID, Google)
# put in tokens or userinfo answers. A username template naming something close
# to one of these, but not it, is probably a typo ({emial}).
KNOWN_CLAIMS = frozenset(
    {
        # OIDC Core standard claims
        "sub", "name", "given_name", "family_name", "middle_name", "nickname",
        "preferred_username", "profile", "picture", "website", "email",
        "email_verified", "gender", "birthdate", "zoneinfo", "locale", "phone_number",
        "phone_number_verified", "updated_at",
        # JWT / access tokens / introspection
        "iss", "aud", "azp", "client_id", "scope", "jti", "username", "groups", "roles",
        # Entra ID, Google, Kanidm, Authentik, Keycloak
        "oid", "tid", "upn", "unique_name", "hd", "spn", "uid", "uuid", "mail", "ak_username",
        "entitlements",
    }
)  # fmt: skip


def claim_warnings(cfg: Config) -> list[str]:
    """Username templates naming a claim no IdP is known to send (a typo, like {emial}?)."""
    warnings: list[str] = []
    for i, rule in enumerate(cfg.rules):
        for body in PLACEHOLDER_RE.findall(rule.username):
            claim = body.split("|")[0].strip()
            if claim in KNOWN_CLAIMS:
                continue
            guess = suggest(claim, KNOWN_CLAIMS)
            head = (
                f"rule[{i}] ({rule.name}).username: {{{claim}}} is not a claim OpenID "
                "Connect or the usual IdPs send"
            )
            if guess:
                warnings.append(
                    f"{head}; did you mean {{{guess}}}? (explain shows a token's claims)"
                )
            else:
                warnings.append(
                    f"{head}: make sure your IdP adds it to its tokens or userinfo "
                    "(explain shows a token's claims)"
                )
    return warnings
