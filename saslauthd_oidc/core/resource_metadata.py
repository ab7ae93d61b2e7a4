"""RFC 9728 protected-resource metadata: which rule a discovery request selects, and its document.

A JMAP or web client asks ``https://HOST/.well-known/oauth-protected-resource[/PATH]``
(routed to us by the reverse proxy) which authorization server to use for
the resource ``https://HOST[/PATH]``. A rule answers when

* its ``hosts`` contain HOST (exact, case-insensitive, no trailing dot);
* its ``resource_paths`` contain /PATH exactly (a rule without
  ``resource_paths`` answers only the bare host, /PATH = ``/``);
* its ``referers`` contain an origin-and-path prefix of the request's
  Referer: same scheme, same host (IDNA, case-insensitive), same port,
  and the referer's path equals the configured path or continues it after
  a ``/``;

a condition left out accepts anything (except the path, see above). Among
the rules that answer, the **most specific** wins, whatever the file order:
a rule with ``hosts`` and ``resource_paths`` beats one with ``hosts``, which
beats one with ``resource_paths`` only, which beats one with ``referers``
only, which beats one with none of them; ``referers`` break ties between
otherwise equal rules (:func:`specificity`). Fallback rules answer only when
no other rule does. Equal specificity: file order, and ``check-config``
warns when that happens between rules naming different servers
(:func:`discovery_warnings`).

The answer's ``resource`` is built from what was matched — the host, the
port when the request named one, and the configured resource path — never
from anything else the request carried.

Pure: values in, a JSON-ready dict out.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from saslauthd_oidc.config import Config, ProviderConfig, RuleConfig

__all__ = [
    "WELL_KNOWN",
    "ResourceRequest",
    "discovery_warnings",
    "parse_host",
    "protected_resource_metadata",
    "referer_matches",
    "resource_path",
    "scopes_for",
    "select_rule",
    "specificity",
]

WELL_KNOWN = "/.well-known/oauth-protected-resource"

# RFC 3986 reg-name restricted to what a DNS name can hold (unreserved characters);
# sub-delims, "@", "/", "%" and anything non-ASCII make a Host invalid.
_REG_NAME = re.compile(r"[A-Za-z0-9._~-]{1,253}")
_PORT = re.compile(r"[0-9]{1,5}")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_host(value: str) -> tuple[str, int | None] | None:
    """An HTTP ``Host`` (RFC 9110 §7.2: RFC 3986 ``host [":" port]``) → (host, port), or None.

    ``host`` is lower-cased without a trailing dot; an IPv6 literal keeps its
    brackets. IPvFuture, user info, paths, lists and empty names are invalid.
    """
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        try:
            address = ipaddress.IPv6Address(value[1:end])
        except ValueError:
            return None
        host, rest = f"[{address.compressed}]", value[end + 1 :]
    else:
        name, sep, port_text = value.partition(":")
        if _REG_NAME.fullmatch(name) is None:
            return None
        host = name.lower().rstrip(".")
        if not host or host.startswith("."):
            return None
        rest = sep + port_text
    if not rest or rest == ":":
        return host, None
    if rest[0] != ":" or _PORT.fullmatch(rest[1:]) is None:
        return None
    port = int(rest[1:])
    if not 0 < port < 65536:
        return None
    return host, port


@dataclass(frozen=True, slots=True)
class ResourceRequest:
    """What a discovery request says, already validated (see :func:`parse_host`)."""

    host: str
    port: int | None = None
    path: str = "/"
    referer: str | None = None
    scheme: str = "https"

    @property
    def hostname(self) -> str:
        """The host as rules name it: lower case, IPv6 without brackets."""
        return self.host[1:-1] if self.host.startswith("[") else self.host

    def resource(self, path: str) -> str:
        """The resource identifier for ``path`` (a configured resource path or ``/``)."""
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.scheme}://{self.host}{port}{'' if path == '/' else path}"


def resource_path(url_path: str) -> str | None:
    """``/.well-known/oauth-protected-resource/jmap`` → ``/jmap``; the bare one → ``/``."""
    if url_path == WELL_KNOWN or url_path == WELL_KNOWN + "/":
        return "/"
    if url_path.startswith(WELL_KNOWN + "/"):
        return url_path[len(WELL_KNOWN) :].rstrip("/") or "/"
    return None


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int
    path: str  # no trailing "/"; "" for the root


def _idna(host: str) -> str | None:
    try:
        return host.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None


def _origin(url: str) -> _Origin | None:
    """scheme, IDNA host, effective port and path of an http(s) URL without user info."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
        return None
    host = _idna(parts.hostname)
    if host is None:
        return None
    return _Origin(scheme, host, port or _DEFAULT_PORTS[scheme], parts.path.rstrip("/"))


# Configured referers only: a cache keyed by client-sent Referers would hold what they send.
_configured_origin = functools.lru_cache(maxsize=256)(_origin)


def referer_matches(configured: str, referer: str) -> bool:
    """``referer`` is at or under ``configured``: same scheme, host, port; path by segments."""
    want, got = _configured_origin(configured), _origin(referer)
    if want is None or got is None:
        return False
    if (want.scheme, want.host, want.port) != (got.scheme, got.host, got.port):
        return False
    return not want.path or got.path == want.path or got.path.startswith(want.path + "/")


def _rule_answers(rule: RuleConfig, request: ResourceRequest) -> bool:
    if rule.hosts and request.hostname not in rule.hosts:
        return False
    if request.path not in (rule.resource_paths or ("/",)):
        return False
    if rule.referers:
        referer = request.referer
        return referer is not None and any(referer_matches(r, referer) for r in rule.referers)
    return True


def specificity(rule: RuleConfig) -> tuple[bool, bool, bool]:
    """Greater is more specific: (has ``hosts``, has ``resource_paths``, has ``referers``)."""
    return bool(rule.hosts), bool(rule.resource_paths), bool(rule.referers)


def _discovery_order(rules: Iterable[RuleConfig]) -> list[RuleConfig]:
    """Non-fallback before fallback, then most specific first, then file order (stable sort)."""
    ranked = list(rules)
    return sorted(ranked, key=lambda r: (r.fallback, tuple(not s for s in specificity(r))))


def select_rule(rules: Iterable[RuleConfig], request: ResourceRequest) -> RuleConfig | None:
    for rule in _discovery_order(rules):
        if _rule_answers(rule, request):
            return rule
    return None


def scopes_for(rule: RuleConfig) -> list[str]:
    """``scopes_supported``, else the rule's required scopes and challenge scope's scopes.

    Each element is one scope (RFC 9728 §2): a ``challenge_scope`` of
    ``"openid email"`` contributes ``openid`` and ``email``.
    """
    entries = rule.scopes_supported or (*rule.required_scopes, rule.challenge_scope or "")
    scopes: list[str] = []
    for scope in (s for entry in entries for s in entry.split()):
        if scope not in scopes:
            scopes.append(scope)
    return scopes


def protected_resource_metadata(
    rule: RuleConfig, provider: ProviderConfig, request: ResourceRequest
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "resource": request.resource(request.path),
        "authorization_servers": [provider.issuer],
        "bearer_methods_supported": ["header"],
    }
    scopes = scopes_for(rule)
    if scopes:
        doc["scopes_supported"] = scopes
    return doc


# --------------------------------------------------------------------------- check-config


def _meet(a: Sequence[str], b: Sequence[str]) -> bool:
    return not a or not b or bool(set(a) & set(b))


def _referers_meet(a: Sequence[str], b: Sequence[str]) -> bool:
    if not a or not b:
        return True
    return any(referer_matches(x, y) or referer_matches(y, x) for x in a for y in b)


def discovery_warnings(cfg: Config) -> list[str]:
    """Pairs of rules that answer the same discovery request with equal specificity.

    Only pairs that set discovery conditions (``hosts``, ``resource_paths``,
    ``referers``) and would answer differently (another issuer or other
    scopes) are reported: between them, file order decides. Rules without
    any discovery condition answer in file order, like the SASL challenge.
    """
    issuer = {p.name: p.issuer for p in cfg.providers}
    index = {r.name: i for i, r in enumerate(cfg.rules)}
    ordered_rules = _discovery_order(cfg.rules)
    warnings: list[str] = []
    for pos, first in enumerate(ordered_rules):
        for later in ordered_rules[pos + 1 :]:
            if (first.fallback, specificity(first)) != (later.fallback, specificity(later)):
                continue
            if not any(specificity(first)):
                continue  # no discovery condition at all: file order, as for the SASL challenge
            if issuer[first.provider] == issuer[later.provider] and scopes_for(first) == scopes_for(
                later
            ):
                continue
            if not (
                _meet(first.hosts, later.hosts)
                and _meet(first.resource_paths or ("/",), later.resource_paths or ("/",))
                and _referers_meet(first.referers, later.referers)
            ):
                continue
            warnings.append(
                f"rule[{index[later.name]}] ({later.name}) is never chosen for some discovery "
                f"requests: rule[{index[first.name]}] ({first.name}) is as specific "
                "(hosts, resource_paths, referers) and comes first; tell them apart by "
                "hosts, resource_paths or referers"
            )
    return warnings
