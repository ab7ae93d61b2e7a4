"""Mail Autoconfig and PACC documents per mail domain, from the rules that accept its logins.

A mail client set up from only an e-mail address reads, in turn:

* Mail Autoconfig (draft-ietf-mailmaint-autoconfig-04, Thunderbird's
  ``config-v1.1.xml``): ``https://autoconfig.DOMAIN/mail/config-v1.1.xml?emailaddress=…``
  or ``https://DOMAIN/.well-known/autoconfig/mail/config-v1.1.xml`` — the
  servers, with ``<authentication>OAuth2</authentication>`` and an
  ``<oAuth2>`` element naming the issuer and scopes;
* PACC (draft-ietf-mailmaint-pacc-02):
  ``https://ua-auto-config.DOMAIN/.well-known/user-agent-configuration.json``,
  a JSON object ``{"protocols": {…}, "authentication": {"oauth-public":
  {"issuer": …}}, "info": {…}}``. Its integrity comes from DNS: a TXT record
  ``_ua-auto-config.DOMAIN`` ``v=UAAC1; a=sha256; d=<base64 SHA-256 of the
  exact body>``, so the body must be byte-stable (sorted keys, no spaces) and
  :func:`pacc_txt_record` gives the record to publish. PACC names hosts only:
  IMAP, POP3 and submission on their implicit-TLS ports (993, 995, 465);
  other endpoints are left out of it (``check-config`` says which);
* for each endpoint, RFC 9728 metadata (JMAP) or the RFC 7628 challenge
  (IMAP/SMTP/POP3), as draft-ietf-mailmaint-oauth-public describes.

One decision everywhere: an endpoint's issuer is the one of :func:`endpoint_rule`,
which for IMAP, submission and POP3 is the login path's own choice (the
rules in login order whose context conditions — service, host, port, user's
domain — hold for a login on that endpoint, :func:`saslauthd_oidc.core.rules.context_mismatch`;
the first, or the first that accepts the client's tokens), and for JMAP the
RFC 9728 choice for the session URL (:func:`saslauthd_oidc.core.resource_metadata.select_rule`).
A domain none of whose endpoints has a rule gets no document (404), never
another domain's IdP.

Pure: configuration and request facts in, document bytes out.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape, quoteattr

from saslauthd_oidc.core.outcome import DiscoveryHint
from saslauthd_oidc.core.request import AuthRequest, Credentials, Mechanism, RequestContext
from saslauthd_oidc.core.resource_metadata import (
    WELL_KNOWN,
    ResourceRequest,
    scopes_for,
    select_rule,
)
from saslauthd_oidc.core.rules import context_mismatch, discovery_hint, ordered
from saslauthd_oidc.providers.issuers import accepts_issuer

if TYPE_CHECKING:
    from saslauthd_oidc.config import Config, DomainConfig, EndpointConfig, RuleConfig

__all__ = [
    "AUTOCONFIG_PATHS",
    "PACC_PATH",
    "EndpointAnswer",
    "autoconfig_warnings",
    "autoconfig_xml",
    "discover_report",
    "domain_answers",
    "domain_for",
    "endpoint_rule",
    "login_request",
    "pacc_json",
    "pacc_txt_record",
]

AUTOCONFIG_PATHS = ("/.well-known/autoconfig/mail/config-v1.1.xml", "/mail/config-v1.1.xml")
PACC_PATH = "/.well-known/user-agent-configuration.json"
# Host prefixes a client puts before the mail domain (autoconfig, PACC).
HOST_PREFIXES = ("autoconfig.", "ua-auto-config.")

_SOCKET_TYPES = {"tls": "SSL", "starttls": "STARTTLS"}
_PACC_NAMES = {"imap": "imap", "submission": "submit", "pop3": "pop3"}
_PACC_PORTS = {"imap": 993, "submission": 465, "pop3": 995}
MAX_EMAIL_LENGTH = 320


@dataclass(frozen=True, slots=True)
class EndpointAnswer:
    """What every document says for one endpoint of a domain."""

    endpoint: EndpointConfig
    rule: RuleConfig | None
    issuer: str | None
    scopes: tuple[str, ...]
    challenge: DiscoveryHint  # RFC 7628 (SASL endpoints); empty for JMAP


# How a token reaches us from each endpoint: SASL on the auth socket, or a bare
# token over HTTP (Dovecot's passdb oauth2 for IMAP/POP3/submission, JMAP servers).
_MECHANISMS = {
    "jmap": (Mechanism.BEARER,),
    "sasl": (Mechanism.OAUTHBEARER, Mechanism.XOAUTH2, Mechanism.BEARER),
}


def login_request(
    domain: DomainConfig,
    endpoint: EndpointConfig,
    user: str = "",
    mechanism: Mechanism = Mechanism.OAUTHBEARER,
) -> AuthRequest:
    """A login on ``endpoint`` as the login path sees it: service, host (SNI), port, domain."""
    local = user or "user"
    frontend = "http" if mechanism is Mechanism.BEARER else "dovecot"
    return AuthRequest(
        mechanism,
        Credentials(
            token="",
            authzid=f"{local}@{domain.name}",
            host=endpoint.host,
            port=endpoint.port,
        ),
        RequestContext(
            service=endpoint.service,
            local_name=endpoint.host,
            local_port=endpoint.port,
            secured=True,
            frontend=frontend,
        ),
    )


def _accepts_client(rule: RuleConfig, client: str) -> bool:
    """A token issued to ``client`` (aud = azp = client_id = client) passes the rule's parties."""
    return (not rule.audiences or client in rule.audiences) and (
        not rule.authorized_parties or client in rule.authorized_parties
    )


def fitting_rules(cfg: Config, domain: DomainConfig, endpoint: EndpointConfig) -> list[RuleConfig]:
    """The login path's candidates for a login on ``endpoint``, in login order.

    A rule fits when a login by any of the ways tokens arrive from that
    endpoint (:data:`_MECHANISMS`) satisfies its context conditions.
    """
    mechanisms = _MECHANISMS["jmap" if endpoint.protocol == "jmap" else "sasl"]
    requests = [login_request(domain, endpoint, mechanism=m) for m in mechanisms]
    return [
        r
        for r in ordered(cfg.rules)
        if any(context_mismatch(r, request) is None for request in requests)
    ]


def _jmap_logins(
    cfg: Config, domain: DomainConfig, endpoint: EndpointConfig, rule: RuleConfig
) -> list[RuleConfig]:
    """Rules of ``rule``'s issuer that accept ``domain``'s logins on the JMAP endpoint."""
    issuer = {p.name: p.issuer for p in cfg.providers}
    wanted = issuer[rule.provider]
    return [r for r in fitting_rules(cfg, domain, endpoint) if issuer[r.provider] == wanted]


def resource_request(endpoint: EndpointConfig) -> ResourceRequest:
    """The RFC 9728 request a client makes for a JMAP session URL."""
    return ResourceRequest(
        host=endpoint.host, port=None if endpoint.port == 443 else endpoint.port, path=endpoint.path
    )


def endpoint_rule(
    cfg: Config, domain: DomainConfig, endpoint: EndpointConfig, client: str | None = None
) -> RuleConfig | None:
    """THE rule for ``endpoint`` of ``domain`` (and a client): see the module docstring.

    For JMAP, the RFC 9728 rule counts only if a rule of its issuer accepts
    this domain's logins there: a JMAP host shared by several domains must
    not hand one domain's documents another domain's IdP.
    """
    if endpoint.protocol == "jmap":
        rule = select_rule(cfg.rules, resource_request(endpoint))
        if rule is None or not _jmap_logins(cfg, domain, endpoint, rule):
            return None
        return rule
    client = client or domain.client
    for rule in fitting_rules(cfg, domain, endpoint):
        if client is None or _accepts_client(rule, client):
            return rule
    return None


def _challenge(
    cfg: Config, domain: DomainConfig, endpoint: EndpointConfig, rule: RuleConfig | None
) -> DiscoveryHint:
    """What the engine's RFC 7628 failure tells a client of ``rule``'s issuer on ``endpoint``.

    The engine names the first fitting rule whose provider has the token's
    issuer (a fallback only when nothing but fallbacks fits), else the first
    fitting rule; mirrored here for a token of ``rule``'s issuer.
    """
    candidates = fitting_rules(cfg, domain, endpoint)
    if not candidates:
        return DiscoveryHint()
    providers = {p.name: p for p in cfg.providers}
    chosen = candidates[0]
    if rule is not None:
        issuer = providers[rule.provider].issuer
        only_fallbacks = candidates[0].fallback
        same = [
            r
            for r in candidates
            if accepts_issuer(providers[r.provider], issuer) and (only_fallbacks or not r.fallback)
        ]
        if same:
            chosen = same[0]
    return discovery_hint(chosen, providers[chosen.provider])


def domain_answers(
    cfg: Config, domain: DomainConfig, client: str | None = None
) -> list[EndpointAnswer]:
    providers = {p.name: p for p in cfg.providers}
    answers: list[EndpointAnswer] = []
    for endpoint in domain.endpoints:
        rule = endpoint_rule(cfg, domain, endpoint, client)
        issuer = providers[rule.provider].issuer if rule is not None else None
        scopes = tuple(scopes_for(rule)) if rule is not None else ()
        challenge = (
            DiscoveryHint()
            if endpoint.protocol == "jmap"
            else _challenge(cfg, domain, endpoint, rule)
        )
        answers.append(EndpointAnswer(endpoint, rule, issuer, scopes, challenge))
    return answers


def _document_oauth(answers: Sequence[EndpointAnswer]) -> tuple[str, tuple[str, ...]] | None:
    """The one issuer (and the scopes) a whole document can name, when the endpoints agree."""
    issuers = {a.issuer for a in answers if a.issuer is not None}
    if len(issuers) != 1:
        return None
    scopes: list[str] = []
    for answer in answers:
        scopes.extend(s for s in answer.scopes if s not in scopes)
    return issuers.pop(), tuple(scopes)


# --------------------------------------------------------------------------- request facts


def email_domain(address: str) -> str | None:
    """The lower-case domain of ``local@domain``, or None when it is not an address."""
    if not address or len(address) > MAX_EMAIL_LENGTH or not address.isprintable():
        return None
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or any(c in address for c in ' <>"\\'):
        return None
    try:
        return domain.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None


def domain_for(cfg: Config, host: str, emailaddress: str | None = None) -> DomainConfig | None:
    """The configured domain a request names: its ``emailaddress``'s, else its Host's.

    The Host is the domain itself or ``autoconfig.``/``ua-auto-config.``
    before it. Request values only choose among configured domains.
    """
    by_name = {d.name: d for d in cfg.domains}
    if emailaddress is not None:
        wanted = email_domain(emailaddress)
        return by_name.get(wanted) if wanted else None
    host = host.lower().rstrip(".")
    if host in by_name:
        return by_name[host]
    for prefix in HOST_PREFIXES:
        if host.startswith(prefix) and host[len(prefix) :] in by_name:
            return by_name[host[len(prefix) :]]
    return None


# --------------------------------------------------------------------------- documents


def autoconfig_xml(cfg: Config, domain: DomainConfig, client: str | None = None) -> bytes | None:
    """The ``config-v1.1.xml`` for ``domain``, or None when no endpoint has a rule (404).

    Endpoints no rule accepts are left out (a client could not log in there).
    The ``<oAuth2>`` element names the issuer when every endpoint has the same
    one; otherwise it is left out and clients learn each endpoint's issuer
    from RFC 9728 / the RFC 7628 challenge (``check-config`` warns).
    """
    answers = [a for a in domain_answers(cfg, domain, client) if a.rule is not None]
    if not answers:
        return None
    name = domain.display_name or domain.name
    short = domain.short_name or domain.name.split(".")[0]
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<clientConfig version="1.1">',
        f"  <emailProvider id={quoteattr(domain.name)}>",
        f"    <domain>{escape(domain.name)}</domain>",
        f"    <displayName>{escape(name)}</displayName>",
        f"    <displayShortName>{escape(short)}</displayShortName>",
    ]
    for answer in answers:
        e = answer.endpoint
        if e.protocol == "jmap":
            out += [
                '    <incomingServer type="jmap">',
                f"      <url>{escape(e.url or '')}</url>",
                "      <username>%EMAILADDRESS%</username>",
                "      <authentication>OAuth2</authentication>",
                "    </incomingServer>",
            ]
            continue
        element = "outgoingServer" if e.protocol == "submission" else "incomingServer"
        kind = "smtp" if e.protocol == "submission" else e.protocol
        out += [
            f'    <{element} type="{kind}">',
            f"      <hostname>{escape(e.host)}</hostname>",
            f"      <port>{e.port}</port>",
            f"      <socketType>{_SOCKET_TYPES[e.tls]}</socketType>",
            "      <username>%EMAILADDRESS%</username>",
            "      <authentication>OAuth2</authentication>",
            f"    </{element}>",
        ]
    out.append("  </emailProvider>")
    oauth = _document_oauth(answers)
    if oauth is not None:
        issuer, scopes = oauth
        out += ["  <oAuth2>", f"    <issuer>{escape(issuer)}</issuer>"]
        if scopes:
            out.append(f"    <scope>{escape(' '.join(scopes))}</scope>")
        out.append("  </oAuth2>")
    out.append("</clientConfig>")
    return ("\n".join(out) + "\n").encode("utf-8")


def pacc_json(cfg: Config, domain: DomainConfig, client: str | None = None) -> bytes | None:
    """The PACC document for ``domain`` (byte-stable), or None when no endpoint has a rule."""
    answers = [a for a in domain_answers(cfg, domain, client) if a.rule is not None]
    if not answers:
        return None
    protocols: dict[str, dict[str, str]] = {}
    for answer in answers:
        e = answer.endpoint
        if e.protocol == "jmap":
            protocols["jmap"] = {"url": e.url or ""}
        elif e.tls == "tls" and e.port == _PACC_PORTS[e.protocol]:
            protocols[_PACC_NAMES[e.protocol]] = {"host": e.host}
    if not protocols:
        return None
    authentication: dict[str, object] = {"password": False}
    oauth = _document_oauth(answers)
    if oauth is not None:
        authentication["oauth-public"] = {"issuer": oauth[0]}
    provider = {"name": domain.display_name or domain.name}
    if domain.short_name:
        provider["shortName"] = domain.short_name
    document = {
        "protocols": protocols,
        "authentication": authentication,
        "info": {"provider": provider},
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def pacc_txt_record(body: bytes) -> str:
    """The ``_ua-auto-config.DOMAIN`` TXT record that vouches for ``body``."""
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
    return f"v=UAAC1; a=sha256; d={digest}"


# --------------------------------------------------------------------------- check-config


def _label(domain: DomainConfig, endpoint: EndpointConfig) -> str:
    where = endpoint.url if endpoint.protocol == "jmap" else f"{endpoint.host}:{endpoint.port}"
    return f"domain {domain.name!r} {endpoint.protocol} ({where})"


def _names_issuer(url: str | None, issuer: str) -> bool:
    return url is not None and url.startswith(issuer.rstrip("/") + "/.well-known/")


def autoconfig_warnings(cfg: Config) -> list[str]:
    """Endpoints whose documents would name no issuer, or not the same one."""
    warnings: list[str] = []
    providers = {p.name: p for p in cfg.providers}
    for domain in cfg.domains:
        answers = domain_answers(cfg, domain)
        for a in answers:
            label = _label(domain, a.endpoint)
            if a.rule is None or a.issuer is None:
                prm = None
                if a.endpoint.protocol == "jmap":
                    prm = select_rule(cfg.rules, resource_request(a.endpoint))
                if prm is not None:
                    warnings.append(
                        f"{label}: RFC 9728 names {providers[prm.provider].issuer} (rule "
                        f"{prm.name!r}) but no rule of that issuer accepts this domain's logins "
                        "there (service 'jmap', host, port, domain): left out of autoconfig "
                        "and PACC"
                    )
                elif a.endpoint.protocol == "jmap":
                    warnings.append(
                        f"{label}: no rule answers RFC 9728 discovery for it, so no document "
                        f"names an issuer: give a rule hosts = [{a.endpoint.host!r}] and "
                        f"resource_paths = [{a.endpoint.path!r}]"
                    )
                else:
                    client = f", client {domain.client!r}" if domain.client else ""
                    warnings.append(
                        f"{label}: no rule accepts logins there (service "
                        f"{a.endpoint.service!r}, host, port, domain{client}), so no document "
                        "names an issuer and the endpoint is left out of autoconfig and PACC"
                    )
                continue
            challenge = a.challenge.openid_configuration
            if a.endpoint.protocol != "jmap" and not _names_issuer(challenge, a.issuer):
                warnings.append(
                    f"{label}: autoconfig and PACC name {a.issuer} (rule {a.rule.name!r}) but "
                    "the RFC 7628 challenge names "
                    f"{a.challenge.openid_configuration or 'no discovery URL'} (discovery_hint)"
                )
            if a.endpoint.protocol != "jmap" and (a.endpoint.tls, a.endpoint.port) != (
                "tls",
                _PACC_PORTS[a.endpoint.protocol],
            ):
                warnings.append(
                    f"{label}: PACC names only implicit-TLS endpoints on port "
                    f"{_PACC_PORTS[a.endpoint.protocol]}; this one is in autoconfig only"
                )
        issuers = sorted({a.issuer for a in answers if a.issuer is not None})
        if len(issuers) > 1:
            warnings.append(
                f"domain {domain.name!r}: its endpoints name different issuers "
                f"({', '.join(issuers)}): autoconfig and PACC leave out the issuer and clients "
                "must learn it per endpoint (RFC 9728, RFC 7628)"
            )
    return warnings


# --------------------------------------------------------------------------- discover (CLI)


def resource_metadata_url(endpoint: EndpointConfig) -> str:
    """Where RFC 9728 metadata for a JMAP session URL is (§3.1: well-known before the path)."""
    request = resource_request(endpoint)
    base = request.resource("/")
    return base + WELL_KNOWN + ("" if endpoint.path == "/" else endpoint.path)


def www_authenticate(endpoint: EndpointConfig) -> str:
    """The RFC 9728 §5.1 challenge a 401 from the JMAP server should carry."""
    return f'Bearer resource_metadata="{resource_metadata_url(endpoint)}"'


def discover_report(cfg: Config, address: str, client: str | None = None) -> dict[str, Any]:
    """What every document says for ``address`` (and a client): ``saslauthd-oidc discover``."""
    domain_name = email_domain(address)
    domain = domain_for(cfg, "", address) if domain_name else None
    report: dict[str, Any] = {
        "address": address,
        "domain": domain_name,
        "client": client or (domain.client if domain else None),
        "configured": domain is not None,
        "endpoints": [],
        "autoconfig": None,
        "pacc": None,
        "agree": False,
    }
    if domain is None:
        return report
    answers = domain_answers(cfg, domain, client)
    for a in answers:
        e = a.endpoint
        entry: dict[str, Any] = {
            "protocol": e.protocol,
            "rule": a.rule.name if a.rule else None,
            "issuer": a.issuer,
            "scopes": list(a.scopes),
        }
        if e.protocol == "jmap":
            entry["url"] = e.url
            entry["resource_metadata"] = resource_metadata_url(e)
            entry["www_authenticate"] = www_authenticate(e)
            logins = _jmap_logins(cfg, domain, e, a.rule) if a.rule is not None else []
            entry["login_rule"] = logins[0].name if logins else None
        else:
            entry.update(host=e.host, port=e.port, socket_type=_SOCKET_TYPES[e.tls])
            entry["service"] = e.service
            entry["login_rule"] = a.rule.name if a.rule else None
            entry["challenge"] = {
                "openid-configuration": a.challenge.openid_configuration,
                "scope": a.challenge.scope,
            }
        report["endpoints"].append(entry)
    xml = autoconfig_xml(cfg, domain, client)
    oauth = _document_oauth([a for a in answers if a.rule is not None])
    if xml is not None:
        report["autoconfig"] = {
            "urls": [
                f"https://autoconfig.{domain.name}/mail/config-v1.1.xml?emailaddress={address}",
                f"https://{domain.name}{AUTOCONFIG_PATHS[0]}",
            ],
            "issuer": oauth[0] if oauth else None,
            "scope": " ".join(oauth[1]) if oauth else None,
            "document": xml.decode(),
        }
    body = pacc_json(cfg, domain, client)
    if body is not None:
        report["pacc"] = {
            "url": f"https://ua-auto-config.{domain.name}{PACC_PATH}",
            "issuer": oauth[0] if oauth else None,
            "dns_txt": f'_ua-auto-config.{domain.name}. TXT "{pacc_txt_record(body)}"',
            "document": body.decode(),
        }
    # Every endpoint names an issuer (a JMAP one only when its login rule exists),
    # every challenge names it too, and the documents can name the one issuer.
    report["agree"] = (
        oauth is not None
        and all(a.issuer is not None for a in answers)
        and all(
            _names_issuer(a.challenge.openid_configuration, a.issuer or "")
            for a in answers
            if a.endpoint.protocol != "jmap"
        )
    )
    return report
