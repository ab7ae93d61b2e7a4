"""RFC 9728 protected-resource metadata: which rule a discovery request selects, and its document.

A JMAP or web client asks ``https://HOST/.well-known/oauth-protected-resource[/PATH]``
(routed to us by the reverse proxy) which authorization server to use for
the resource ``https://HOST[/PATH]``. The answer comes from the first rule, in
evaluation order (fallback rules last), whose ``hosts`` contain HOST, whose
``resource_paths`` contain a prefix of /PATH and whose ``referers`` contain a
prefix of the request's Referer; a condition left out accepts anything.

Pure: values in, a JSON-ready dict out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from saslauthd_oidc.config import ProviderConfig, RuleConfig
from saslauthd_oidc.rules import ordered

WELL_KNOWN = "/.well-known/oauth-protected-resource"


@dataclass(frozen=True, slots=True)
class ResourceRequest:
    """What a discovery request says: ``host`` as sent (may carry a port), the resource path."""

    host: str
    path: str = "/"
    referer: str | None = None
    scheme: str = "https"

    @property
    def hostname(self) -> str:
        host = self.host
        if host.startswith("["):
            host = host[1 : host.find("]")]
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        return host.lower().rstrip(".")

    @property
    def resource(self) -> str:
        """The resource identifier the client used (RFC 9728 §3.3: byte-equal)."""
        return f"{self.scheme}://{self.host}{'' if self.path == '/' else self.path}"


def resource_path(url_path: str) -> str | None:
    """``/.well-known/oauth-protected-resource/jmap`` → ``/jmap``; the bare one → ``/``."""
    if url_path == WELL_KNOWN or url_path == WELL_KNOWN + "/":
        return "/"
    if url_path.startswith(WELL_KNOWN + "/"):
        return url_path[len(WELL_KNOWN) :]
    return None


def _path_matches(prefixes: Iterable[str], path: str) -> bool:
    return any(p in ("/", path) or path.startswith(p + "/") for p in prefixes)


def select_rule(rules: Iterable[RuleConfig], request: ResourceRequest) -> RuleConfig | None:
    for rule in ordered(rules):
        if rule.hosts and request.hostname not in rule.hosts:
            continue
        if rule.resource_paths and not _path_matches(rule.resource_paths, request.path):
            continue
        if rule.referers and not (
            request.referer and any(request.referer.startswith(r) for r in rule.referers)
        ):
            continue
        return rule
    return None


def scopes_for(rule: RuleConfig) -> list[str]:
    """``scopes_supported``, else the rule's required scopes and challenge scope."""
    if rule.scopes_supported:
        return list(rule.scopes_supported)
    scopes = list(rule.required_scopes)
    if rule.challenge_scope and rule.challenge_scope not in scopes:
        scopes.append(rule.challenge_scope)
    return scopes


def protected_resource_metadata(
    rule: RuleConfig, provider: ProviderConfig, request: ResourceRequest
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "resource": request.resource,
        "authorization_servers": [provider.issuer],
        "bearer_methods_supported": ["header"],
    }
    scopes = scopes_for(rule)
    if scopes:
        doc["scopes_supported"] = scopes
    return doc
