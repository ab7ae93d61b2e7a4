"""Rule selection: which configured rules fit a request, and which one a verified token satisfies.

Selection is deterministic (README "How a rule is chosen"):

1. context conditions narrow the rules: mechanism, service, host and port
   (what the server says — TLS SNI, the local port — else OAUTHBEARER
   ``host=``/``port=``), the
   user's domain (authzid / XOAUTH2 ``user=`` / login), the remote address,
   whether the connection is secured;
2. the *unverified* token's ``iss`` may only narrow them further (exact match);
3. the token is verified by each remaining rule's provider (once per provider);
4. the first rule in file order whose claim conditions hold on the verified
   claims wins; fallback rules are tried only after every other rule.

Pure: no I/O, no clock. Also owns the load-time analysis (shadowed rules,
overlapping fallbacks) that ``check-config`` reports.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING, Any

from saslauthd_oidc.core.identity import template_claims as _template_claims
from saslauthd_oidc.core.outcome import DiscoveryHint, Reason, Refusal
from saslauthd_oidc.core.request import AuthRequest, unreachable_condition_warnings
from saslauthd_oidc.core.resource_metadata import discovery_warnings

if TYPE_CHECKING:
    from saslauthd_oidc.config import Config, ProviderConfig, RuleConfig


def ordered(rules: Iterable[RuleConfig]) -> list[RuleConfig]:
    """File order, with fallback rules moved behind all others."""
    rules = list(rules)
    return [r for r in rules if not r.fallback] + [r for r in rules if r.fallback]


def request_host(request: AuthRequest) -> str | None:
    """The server's TLS SNI (``local_name=``), else the client's OAUTHBEARER ``host=``."""
    host = request.context.local_name or request.credentials.host
    return host.lower().rstrip(".") if host else None


def request_port(request: AuthRequest) -> int | None:
    """The server's own ``lport``, else the client's OAUTHBEARER ``port=`` (docs/SECURITY.md)."""
    return request.context.local_port or request.credentials.port


def context_mismatch(rule: RuleConfig, request: AuthRequest) -> Refusal | None:
    """Why ``rule`` cannot serve this request, judged on the request alone (no token)."""
    ctx = request.context
    if rule.mechanisms and request.mechanism.value not in rule.mechanisms:
        return Refusal(Reason.NO_RULE_FOR_CONTEXT, f"mechanism {request.mechanism} not in rule")
    if rule.services and (ctx.service or "") not in rule.services:
        shown = f"service {ctx.service!r} not in rule" if ctx.service else "no service given"
        return Refusal(Reason.NO_RULE_FOR_CONTEXT, f"{shown} (services: {_listed(rule.services)})")
    if rule.hosts:
        host = request_host(request)
        if host not in rule.hosts:
            shown = f"host {host!r} not in rule" if host else "no host given (host=, TLS SNI)"
            return Refusal(Reason.HOST_MISMATCH, f"{shown} (hosts: {_listed(rule.hosts)})")
    if rule.ports:
        port = request_port(request)
        if port not in rule.ports:
            shown = f"port {port} not in rule" if port else "no port given"
            return Refusal(Reason.HOST_MISMATCH, f"{shown} (ports: {_listed(rule.ports)})")
    if rule.require_secured and not ctx.secured:
        return Refusal(Reason.NO_RULE_FOR_CONTEXT, "connection is not secured (TLS)")
    if rule.remote_networks and not _in_networks(ctx.remote_ip, rule.remote_networks):
        shown = (
            f"remote address {ctx.remote_ip} not in rule"
            if ctx.remote_ip
            else "no remote address given"
        )
        return Refusal(Reason.NO_RULE_FOR_CONTEXT, f"{shown} (remote_networks)")
    # A request that names no user (Dovecot's passdb oauth2, Stalwart, OAUTHBEARER
    # without a=) logs in the account we answer: its domain is checked instead
    # (account_domain_mismatch), once the token has named the account.
    if rule.domains and request.credentials.authzid:
        domain = request.credentials.user_domain
        if domain not in rule.domains:
            shown = f"user domain {domain!r} not in rule" if domain else "no user@domain given"
            return Refusal(
                Reason.NO_RULE_FOR_CONTEXT, f"{shown} (domains: {_listed(rule.domains)})"
            )
    return None


def account_domain_mismatch(rule: RuleConfig, request: AuthRequest, account: str) -> Refusal | None:
    """``domains`` judged on the mapped account, for a request that names no user."""
    if not rule.domains or request.credentials.authzid:
        return None
    local, at, domain = account.rpartition("@")
    if at and local and domain.lower() in rule.domains:
        return None
    return Refusal(
        Reason.NO_RULE_FOR_CONTEXT,
        f"no user named, and the account {account!r} is not in the rule's domains",
    )


def _listed(values: Sequence[object]) -> str:
    return ", ".join(repr(v) if isinstance(v, str) else str(v) for v in values)


def _in_networks(address: str | None, networks: Sequence[IPv4Network | IPv6Network]) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def _as_list(value: Any) -> list[Any] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    return None


def token_scopes(claims: Mapping[str, Any]) -> set[str] | None:
    """``scope`` as a space-separated string (RFC 9068) or an array; Entra uses ``scp``."""
    for key in ("scope", "scp"):
        value = claims.get(key)
        if isinstance(value, str):
            return set(value.split())
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return set(value)
    return None


def condition_claims(rule: RuleConfig) -> frozenset[str]:
    """The claims :func:`claim_mismatch` reads for ``rule`` (what a cache entry must keep)."""
    names = {"aud", "azp", "client_id", *rule.claims}
    if rule.required_scopes:
        names |= {"scope", "scp"}
    return frozenset(names)


def claim_mismatch(rule: RuleConfig, claims: Mapping[str, Any]) -> Refusal | None:
    """Why the verified ``claims`` do not satisfy ``rule``'s claim conditions."""
    aud = claims.get("aud")
    single = type(aud) is str  # the usual case: one audience, no sets to build
    audiences = [aud] if single else _as_list(aud)
    if not single and audiences is not None and not all(isinstance(a, str) for a in audiences):
        return Refusal(Reason.BAD_CLAIM, "aud is not a string or a list of strings")
    azp = claims.get("azp")
    party = azp if azp is not None else claims.get("client_id")
    if party is not None and not isinstance(party, str):
        return Refusal(Reason.BAD_CLAIM, "azp/client_id is not a string")
    if rule.audiences:
        if not audiences:
            return Refusal(Reason.WRONG_AUDIENCE, "token has no aud")
        if (aud not in rule.audiences) if single else not set(audiences) & set(rule.audiences):
            return Refusal(Reason.WRONG_AUDIENCE, f"aud {audiences!r} not in rule")
    if not single and audiences and len(set(audiences)) > 1:
        # OIDC Core 3.1.3.7: with several audiences, azp must name a party we trust.
        trusted = rule.authorized_parties or rule.audiences
        if not isinstance(azp, str) or azp not in trusted:
            return Refusal(
                Reason.UNTRUSTED_AUTHORIZED_PARTY,
                f"token has {len(audiences)} audiences and "
                + (f"azp {azp!r} is not trusted by the rule" if azp is not None else "no azp"),
            )
    if rule.authorized_parties and party not in rule.authorized_parties:
        shown = f"azp/client_id {party!r} not in rule" if party else "token has no azp or client_id"
        return Refusal(
            Reason.UNTRUSTED_AUTHORIZED_PARTY,
            f"{shown} (authorized_parties: {_listed(rule.authorized_parties)})",
        )
    if rule.required_scopes:
        scopes = token_scopes(claims) or set()
        missing = [s for s in rule.required_scopes if s not in scopes]
        if missing:
            return Refusal(Reason.INSUFFICIENT_SCOPE, f"scope {missing[0]!r} missing")
    for name, expected in rule.claims.items():
        actual = claims.get(name)
        if isinstance(actual, list):
            ok = expected in actual
        else:
            ok = actual == expected and type(actual) is type(expected)
        if not ok:
            return Refusal(Reason.CLAIM_MISMATCH, f"claim {name!r} is not {expected!r}")
    return None


def discovery_hint(rule: RuleConfig | None, provider: ProviderConfig | None) -> DiscoveryHint:
    """What the failure challenge tells the client: the IdP serving the rule that fits."""
    if rule is None:
        return DiscoveryHint()
    url = rule.discovery_hint or (provider.effective_discovery_url if provider else None)
    # RFC 7628 §3.2.2 / RFC 6749 §3.3: one space-separated string of every scope needed.
    scope = rule.challenge_scope or (" ".join(rule.required_scopes) or None)
    return DiscoveryHint(openid_configuration=url, scope=scope)


# --------------------------------------------------------------------------- load-time analysis

_CONTEXT_FIELDS = ("mechanisms", "services", "hosts", "ports", "domains", "remote_networks")
_CLAIM_FIELDS = ("audiences", "authorized_parties")


def _covers(wide: Sequence[Any], narrow: Sequence[Any]) -> bool:
    """A condition list ``wide`` accepts everything ``narrow`` accepts (empty = anything)."""
    return not wide or (bool(narrow) and set(narrow) <= set(wide))


def shadows(earlier: RuleConfig, later: RuleConfig) -> bool:
    """Every request and token ``later`` accepts, ``earlier`` accepts first."""
    if earlier.provider != later.provider:
        return False
    for name in _CONTEXT_FIELDS + _CLAIM_FIELDS:
        if not _covers(getattr(earlier, name), getattr(later, name)):
            return False
    if not set(earlier.required_scopes) <= set(later.required_scopes):
        return False
    if earlier.require_secured and not later.require_secured:
        return False
    return all(later.claims.get(k) == v for k, v in earlier.claims.items())


def _overlap(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return not a or not b or bool(set(a) & set(b))


def config_warnings(cfg: Config) -> list[str]:
    warnings: list[str] = []
    rules = ordered(cfg.rules)
    index = {r.name: i for i, r in enumerate(cfg.rules)}
    for pos, later in enumerate(rules):
        for earlier in rules[:pos]:
            if earlier.fallback and not later.fallback:
                continue
            if shadows(earlier, later):
                warnings.append(
                    f"rule[{index[later.name]}] ({later.name}) can never match: "
                    f"rule[{index[earlier.name]}] ({earlier.name}) accepts everything it does first"
                )
                break
    issuer = {p.name: p.issuer for p in cfg.providers}
    fallbacks = [r for r in rules if r.fallback]
    for i, a in enumerate(fallbacks):
        for b in fallbacks[i + 1 :]:
            # Only rules whose provider has the same issuer can both accept one token.
            if issuer[a.provider] == issuer[b.provider] and all(
                _overlap(getattr(a, f), getattr(b, f)) for f in _CONTEXT_FIELDS + _CLAIM_FIELDS
            ):
                warnings.append(
                    f"fallback rules {a.name!r} and {b.name!r} overlap: "
                    f"file order decides between them"
                )
    for i, r in enumerate(cfg.rules):
        if not r.audiences and not r.authorized_parties:
            warnings.append(
                f"rule[{i}] ({r.name}) checks no audience (check_audience = false): any "
                f"token of provider {r.provider!r}, issued to any application, is accepted; "
                "set audiences or authorized_parties instead"
            )
    warnings.extend(_account_domain_warnings(cfg))
    warnings.extend(_email_warnings(cfg))
    warnings.extend(_token_kind_warnings(cfg))
    warnings.extend(_opaque_token_warnings(cfg))
    warnings.extend(discovery_warnings(cfg))
    warnings.extend(unreachable_condition_warnings(cfg))
    from saslauthd_oidc.config import claim_warnings  # noqa: PLC0415 (config imports no rules)

    warnings.extend(claim_warnings(cfg))
    from saslauthd_oidc.core.autoconfig import autoconfig_warnings  # noqa: PLC0415 (it imports rules)

    warnings.extend(autoconfig_warnings(cfg))
    return warnings


def _account_domain_warnings(cfg: Config) -> list[str]:
    """Rules whose accounts may land in domains another IdP is trusted for."""
    warnings: list[str] = []
    issuer = {p.name: p.issuer for p in cfg.providers}
    if len(set(issuer[r.provider] for r in cfg.rules)) < 2:
        return warnings  # one IdP: it is trusted for every account anyway
    for i, r in enumerate(cfg.rules):
        if not r.trusted_account_domains:
            refused = ", ".join(r.foreign_domains) or "none yet"
            warnings.append(
                f"rule[{i}] ({r.name}) names no domains or account_domains: provider "
                f"{r.provider!r} may produce accounts in any domain that no other provider's "
                f"rule claims (refused: {refused}); set account_domains to the domains it "
                "serves"
            )
    reported: set[tuple[str, str, str]] = set()
    for i, a in enumerate(cfg.rules):
        for b in cfg.rules[i + 1 :]:
            if _origin(issuer[a.provider]) == _origin(issuer[b.provider]):
                continue  # one IdP with per-client issuers (Kanidm, Authentik)
            shared = sorted(set(a.trusted_account_domains) & set(b.trusted_account_domains))
            for domain in shared:
                oa, ob = _origin(issuer[a.provider]), _origin(issuer[b.provider])
                key = (min(oa, ob), max(oa, ob), domain)
                if key in reported:
                    continue
                reported.add(key)
                warnings.append(
                    f"rules {a.name!r} ({a.provider}) and {b.name!r} ({b.provider}) both "
                    f"produce accounts in {domain}: either IdP can log in as any user there; "
                    "keep each domain to one provider unless both really manage its users"
                )
    return warnings


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0].lower()}"


def _email_warnings(cfg: Config) -> list[str]:
    """nOAuth: e-mail addresses that the IdP does not vouch for."""
    warnings: list[str] = []
    for i, r in enumerate(cfg.rules):
        p = cfg.provider(r.provider)
        uses_email = "email" in _template_claims(r.username)
        if uses_email and r.trust_unverified_email:
            who = "any allowed tenant's admin" if p.multi_tenant else "the IdP's users or admins"
            warnings.append(
                f"rule[{i}] ({r.name}) trusts unverified e-mail (trust_unverified_email): "
                f"an address {who} can set names the account; map a claim the IdP "
                "guarantees (sub, oid, preferred_username) instead"
            )
        elif uses_email and p.multi_tenant:
            warnings.append(
                f"rule[{i}] ({r.name}) maps {{email}} of the multi-tenant issuer of provider "
                f"{p.name!r}: each tenant's admin sets email freely, so tokens without "
                "email_verified or xms_edov true are refused (unverified_email); use username = "
                '"{preferred_username}" (a UPN in a domain the tenant verified) with '
                'account_domains, or "{oid}@example.org"'
            )
        if p.multi_tenant and "*" in p.allowed_tenants and not r.trusted_account_domains:
            warnings.append(
                f"rule[{i}] ({r.name}): provider {p.name!r} accepts every tenant "
                '(allowed_tenants = ["*"]) and the rule names no account_domains: any '
                "organisation's users log in; list the tenants, or set account_domains"
            )
    return warnings


def _token_kind_warnings(cfg: Config) -> list[str]:
    warnings: list[str] = []
    used = {r.provider for r in cfg.rules}
    for i, p in enumerate(cfg.providers):
        if p.accept_id_tokens and p.name in used:
            warnings.append(
                f"provider[{i}] ({p.name}) accepts ID tokens (accept_id_tokens): a token the "
                "IdP gave any client to identify the user to that client logs in here too; "
                "keep it only for an IdP whose access tokens look like ID tokens (Dex), "
                "with audiences naming only your mail clients"
            )
    return warnings


def token_policy(cfg: Config) -> list[str]:
    """Per provider, in words: which tokens count as access tokens and how long a
    revoked one keeps working (``check-config`` prints these)."""
    lines: list[str] = []
    for p in cfg.providers:
        kinds = f"JWT typ must be {' or '.join(p.token_types)}" if p.token_types else "any JWT typ"
        if p.accept_id_tokens:
            kinds += "; ID tokens accepted (accept_id_tokens)"
        else:
            kinds += "; ID tokens (nonce, at_hash, c_hash, s_hash, typ ID, no client) refused"
        kinds += "; cnf-bound (DPoP, mTLS) refused"
        if p.force_introspection:
            ttl = p.effective_introspection_ttl
            revoked = f"a revoked JWT works for up to {ttl:g}s (force_introspection)"
        else:
            revoked = "a revoked JWT works until its exp"
        if p.introspects:
            ttl = p.effective_introspection_ttl
            shown = f"{ttl:g}s" if ttl is not None else f"{cfg.cache.ttl:g}s ([cache] ttl)"
            revoked += f", a revoked opaque token for up to {shown}"
        lines.append(f"provider {p.name}: {kinds}; {revoked}")
    return lines


def _opaque_token_warnings(cfg: Config) -> list[str]:
    warnings: list[str] = []
    used = {r.provider for r in cfg.rules}
    for i, p in enumerate(cfg.providers):
        if p.userinfo_validation and p.name in used:
            warnings.append(
                f"provider[{i}] ({p.name}) checks opaque tokens by userinfo, which proves a "
                "token valid but not for whom it was issued (no audience, no client): "
                "set client_id and client_secret_file to introspect them instead"
            )
    # An opaque token says nothing of its issuer: it is shown to each introspecting
    # provider whose rule fits the request, in turn, until one knows it.
    opaque = [r for r in ordered(cfg.rules) if cfg.provider(r.provider).validates_opaque]
    reported: set[frozenset[str]] = set()
    for i, a in enumerate(opaque):
        for b in opaque[i + 1 :]:
            pair = frozenset({a.provider, b.provider})
            if len(pair) < 2 or pair in reported:
                continue
            if all(_overlap(getattr(a, f), getattr(b, f)) for f in _CONTEXT_FIELDS):
                reported.add(pair)
                warnings.append(
                    f"opaque tokens for rules {a.name!r} and {b.name!r} go to both "
                    f"{a.provider!r} and {b.provider!r} (in that order) until one knows them: "
                    "each IdP sees the other's tokens; tell the rules apart by "
                    "services, hosts, ports or domains"
                )
    return warnings
