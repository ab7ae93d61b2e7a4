"""Verified claims → account name, and the account's comparison with the client's authzid.

A rule's ``username`` template is literal text with ``{claim}`` placeholders;
a placeholder may carry filters: ``{preferred_username|localpart}@example.org``
(Kanidm's ``name@idm-domain``), ``{email|domain}``, ``{upn|lower}``. The result
is normalised (Unicode NFKC, lower case) unless the rule says otherwise, and
must be a single printable word: the Dovecot protocol is TAB/LF framed and
Postfix never unescapes replies. Pure functions, no I/O.

:func:`map_account` is the whole mapping for one rule: the template, the
e-mail trust policy (an ``email`` the IdP does not vouch for names no
account, see :func:`email_problem`), ``domain_map``, and the account-domain
policy (:func:`check_account_domain`).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from saslauthd_oidc.config import USERNAME_FILTERS, ProviderConfig, RuleConfig
from saslauthd_oidc.core.outcome import Reason, Refusal

MAX_ACCOUNT_LENGTH = 255

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


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


def account_claims(rule: RuleConfig) -> frozenset[str]:
    """The claims :func:`map_account` reads for ``rule``: its template's, the e-mail policy's."""
    names = set(template_claims(rule.username))
    if "email" in names:
        names |= {"email_verified", "xms_edov"}
    return frozenset(names)


@functools.lru_cache(maxsize=256)
def _compiled(template: str) -> tuple[tuple[tuple[str, str, tuple[str, ...]], ...], str]:
    """A template as (literal text before, claim, filter names) per placeholder, and the tail."""
    parts = []
    start = 0
    for m in _PLACEHOLDER.finditer(template):
        claim, *filters = (part.strip() for part in m.group(1).split("|"))
        parts.append((template[start : m.start()], claim, tuple(filters)))
        start = m.end()
    return tuple(parts), template[start:]


def render_username(
    template: str, claims: Mapping[str, Any], *, normalize: bool = True
) -> str | Refusal:
    parts, tail = _compiled(template)
    out: list[str] = []
    missing: str | None = None
    for literal, claim, filters in parts:
        out.append(literal)
        value = claims.get(claim)
        if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
            if missing is None:
                missing = claim
            continue
        text = str(value)
        for f in filters:
            text = FILTERS[f](text)
        out.append(text)
    if missing is not None:
        return Refusal(
            Reason.IDENTITY_UNMAPPABLE,
            f"claim {missing!r} is missing or not a string in the verified token",
        )
    out.append(tail)
    return validate_account("".join(out), normalize=normalize)


def email_problem(
    claims: Mapping[str, Any], *, multi_tenant: bool, trust_unverified: bool
) -> Refusal | None:
    """Why the token's ``email`` may not name an account (nOAuth), or None.

    * ``email_verified`` present and not the JSON ``true`` (``false``,
      ``"true"``, ``1``…): the IdP says, or cannot say, that the address is
      the user's.
    * A multi-tenant issuer (Entra ``{tenantid}``): each tenant's admin sets
      ``email`` freely, so it proves nothing unless Entra itself says the
      domain's owner verified it (the optional ``xms_edov`` claim) or
      ``email_verified`` is true.

    ``trust_unverified`` (the rule's ``trust_unverified_email``) is the
    administrator's explicit choice to use it all the same.
    """
    if trust_unverified:
        return None
    verified = claims.get("email_verified")
    if "email_verified" in claims and verified is not True:
        return Refusal(
            Reason.UNVERIFIED_EMAIL,
            f"email_verified is {verified!r}, not true: the e-mail names no account "
            "(trust_unverified_email = true to use it anyway)",
        )
    if multi_tenant and verified is not True and claims.get("xms_edov") is not True:
        return Refusal(
            Reason.UNVERIFIED_EMAIL,
            "a multi-tenant issuer's email is set by each tenant's admin and is not "
            "verified (no email_verified or xms_edov true): map preferred_username or oid "
            "instead, or set trust_unverified_email = true",
        )
    return None


def check_account_domain(
    account: str, rule: RuleConfig, *, named_user: bool = True
) -> Refusal | None:
    """The account must be in a domain the rule is trusted for.

    * ``account_domains`` set: the account's domain must be one of them (an
      account without a domain is refused).
    * else ``domains`` (or the literal domain of the username template): an
      account with a domain must be in one of them.
    * else: the account may not be in a domain another issuer's rule claims
      (``rule.foreign_domains``).

    For a request that names no user (``named_user`` false: Dovecot's
    ``/introspect``, Stalwart) an account outside ``domains`` is not refused
    here: such a rule simply does not apply (rules.account_domain_mismatch),
    and the next rule is tried.
    """
    _, at, domain = account.rpartition("@")
    domain = domain.lower()  # normalize = false keeps the account's case, not the domain's
    if rule.account_domains:
        if not at or domain not in rule.account_domains:
            return Refusal(
                Reason.UNTRUSTED_ACCOUNT_DOMAIN,
                f"account {account!r} is not in the rule's account_domains",
            )
        return None
    if not at:
        return None
    trusted = rule.trusted_account_domains
    if trusted:
        if domain in trusted or (rule.domains and not named_user):
            return None
        return Refusal(
            Reason.UNTRUSTED_ACCOUNT_DOMAIN,
            f"account {account!r} is not in the rule's domains "
            "(set account_domains to allow others)",
        )
    if domain in rule.foreign_domains:
        return Refusal(
            Reason.UNTRUSTED_ACCOUNT_DOMAIN,
            f"account {account!r} is in a domain another provider's rule is trusted for "
            "(list it in this rule's account_domains to allow it)",
        )
    return None


def map_account(
    rule: RuleConfig,
    provider: ProviderConfig,
    claims: Mapping[str, Any],
    *,
    named_user: bool = True,
) -> str | Refusal:
    """The account ``rule`` maps these verified claims to, or why there is none.

    ``named_user``: the request names the user (authzid, XOAUTH2 user=, login).
    """
    account = render_username(rule.username, claims, normalize=rule.normalize)
    if isinstance(account, Refusal):
        return account
    if "email" in template_claims(rule.username):
        problem = email_problem(
            claims,
            multi_tenant=provider.multi_tenant,
            trust_unverified=rule.trust_unverified_email,
        )
        if problem is not None:
            return problem
    if rule.domain_map:
        account = rewrite_domain(account, rule.domain_map, ())
        if isinstance(account, Refusal):  # pragma: no cover - no allow-list given
            return account
    refused = check_account_domain(account, rule, named_user=named_user)
    return refused if refused is not None else account


def rewrite_domain(
    account: str, domain_map: Mapping[str, str], allowed: Sequence[str]
) -> str | Refusal:
    """Apply a rule's ``domain_map`` to the account, then its ``account_domains`` allow-list."""
    local, at, domain = account.rpartition("@")
    if at and domain in domain_map:
        domain = domain_map[domain]
        account = f"{local}@{domain}"
    if allowed and (not at or domain not in allowed):
        return Refusal(Reason.INVALID_ACCOUNT, f"account {account!r} is not in an allowed domain")
    return account


def normalize_name(name: str) -> str:
    return unicodedata.normalize("NFKC", name).lower()


def validate_account(name: str, *, normalize: bool = True) -> str | Refusal:
    if normalize:
        name = normalize_name(name)
    if not name:
        return Refusal(Reason.INVALID_ACCOUNT, "account name is empty")
    if len(name) > MAX_ACCOUNT_LENGTH:
        return Refusal(Reason.INVALID_ACCOUNT, "account name is too long")
    if name.isascii() and name.isprintable() and " " not in name:
        return name  # printable ASCII without a space: no control or separator character
    for ch in name:
        cat = unicodedata.category(ch)
        if ch.isspace() or cat.startswith("C") or cat in ("Zl", "Zp", "Zs"):
            return Refusal(
                Reason.INVALID_ACCOUNT,
                f"account name contains a forbidden character U+{ord(ch):04X}",
            )
    return name


def check_authzid(account: str, authzid: str | None, *, normalize: bool = True) -> Refusal | None:
    """The client's authzid must name the mapped account; an absent authzid means 'that one'."""
    if authzid is None or authzid == "":
        return None
    claimed = normalize_name(authzid) if normalize else authzid
    if claimed != account:
        return Refusal(
            Reason.AUTHZID_MISMATCH,
            f"requested user {authzid!r} is not the account {account!r} the token maps to",
        )
    return None
