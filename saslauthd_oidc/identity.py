"""Verified claims → account name, and the account's comparison with the client's authzid.

A rule's ``username`` template is literal text with ``{claim}`` placeholders;
a placeholder may carry filters: ``{preferred_username|localpart}@example.org``
(Kanidm's ``name@idm-domain``), ``{email|domain}``, ``{upn|lower}``. The result
is normalised (Unicode NFKC, lower case) unless the rule says otherwise, and
must be a single printable word: the Dovecot protocol is TAB/LF framed and
Postfix never unescapes replies. Pure functions, no I/O.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from saslauthd_oidc.config import USERNAME_FILTERS
from saslauthd_oidc.outcome import Reason

MAX_ACCOUNT_LENGTH = 255

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


@dataclass(frozen=True, slots=True)
class IdentityError:
    reason: Reason
    detail: str


def _localpart(v: str) -> str:
    return v.rsplit("@", 1)[0] if "@" in v else v


def _domain(v: str) -> str:
    return v.rsplit("@", 1)[1] if "@" in v else ""


FILTERS: dict[str, Callable[[str], str]] = {
    "localpart": _localpart,
    "domain": _domain,
    "lower": str.lower,
}
assert tuple(FILTERS) == USERNAME_FILTERS, "config validates the filters identity applies"


@functools.lru_cache(maxsize=256)
def template_claims(template: str) -> tuple[str, ...]:
    """The claims a username template reads (memoised: templates come from the config)."""
    return tuple(body.split("|")[0].strip() for body in _PLACEHOLDER.findall(template))


def render_username(
    template: str, claims: Mapping[str, Any], *, normalize: bool = True
) -> str | IdentityError:
    missing: list[str] = []

    def substitute(m: re.Match[str]) -> str:
        claim, *filters = (part.strip() for part in m.group(1).split("|"))
        value = claims.get(claim)
        if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
            missing.append(claim)
            return ""
        text = str(value)
        for f in filters:
            text = FILTERS[f](text)
        return text

    rendered = _PLACEHOLDER.sub(substitute, template)
    if missing:
        return IdentityError(
            Reason.IDENTITY_UNMAPPABLE,
            f"claim {missing[0]!r} is missing or not a string in the verified token",
        )
    if "email" in template_claims(template) and claims.get("email_verified") is False:
        return IdentityError(Reason.IDENTITY_UNMAPPABLE, "email_verified is false")
    return validate_account(rendered, normalize=normalize)


def rewrite_domain(
    account: str, domain_map: Mapping[str, str], allowed: Sequence[str]
) -> str | IdentityError:
    """Apply a rule's ``domain_map`` to the account, then its ``account_domains`` allow-list."""
    local, at, domain = account.rpartition("@")
    if at and domain in domain_map:
        domain = domain_map[domain]
        account = f"{local}@{domain}"
    if allowed and (not at or domain not in allowed):
        return IdentityError(
            Reason.INVALID_ACCOUNT, f"account {account!r} is not in an allowed domain"
        )
    return account


def normalize_name(name: str) -> str:
    return unicodedata.normalize("NFKC", name).lower()


def validate_account(name: str, *, normalize: bool = True) -> str | IdentityError:
    if normalize:
        name = normalize_name(name)
    if not name:
        return IdentityError(Reason.INVALID_ACCOUNT, "account name is empty")
    if len(name) > MAX_ACCOUNT_LENGTH:
        return IdentityError(Reason.INVALID_ACCOUNT, "account name is too long")
    if name.isascii() and name.isprintable() and " " not in name:
        return name  # printable ASCII without a space: no control or separator character
    for ch in name:
        cat = unicodedata.category(ch)
        if ch.isspace() or cat.startswith("C") or cat in ("Zl", "Zp", "Zs"):
            return IdentityError(
                Reason.INVALID_ACCOUNT,
                f"account name contains a forbidden character U+{ord(ch):04X}",
            )
    return name


def check_authzid(
    account: str, authzid: str | None, *, normalize: bool = True
) -> IdentityError | None:
    """The client's authzid must name the mapped account; an absent authzid means 'that one'."""
    if authzid is None or authzid == "":
        return None
    claimed = normalize_name(authzid) if normalize else authzid
    if claimed != account:
        return IdentityError(
            Reason.AUTHZID_MISMATCH,
            f"requested user {authzid!r} is not the account {account!r} the token maps to",
        )
    return None
