"""The configuration's shape: frozen dataclasses, one per section, and their defaults.

A field's default here is the setting's default: the parser (:mod:`.parse`) falls
back on these, and ``tests/test_config_defaults.py`` holds the reference config
and README's table to them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Literal
from urllib.parse import urlsplit

DEFAULT_CONFIG_PATH = "/etc/saslauthd-oidc/saslauthd-oidc.toml"
CONFIG_ENV = "SASLAUTHD_OIDC_CONFIG"

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
SYMMETRIC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
KNOWN_MECHANISMS = ("OAUTHBEARER", "XOAUTH2", "PLAIN", "LOGIN")
# Rules may also name BEARER: a bare token over HTTP (introspection, userinfo).
RULE_MECHANISMS = (*KNOWN_MECHANISMS, "BEARER")
USERNAME_FILTERS = ("localpart", "domain", "lower")
IntrospectionAuth = Literal["client_secret_basic", "client_secret_post"]
INTROSPECTION_AUTH_METHODS: tuple[IntrospectionAuth, ...] = (
    "client_secret_basic",
    "client_secret_post",
)
TENANT_PLACEHOLDER = "{tenantid}"
# Default seconds an introspection answer for a JWT is trusted (force_introspection).
FORCE_INTROSPECTION_TTL = 30.0
#: A ``{claim}`` or ``{claim|filter}`` placeholder of a username template.
PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    auth_socket: str | None = "/run/saslauthd-oidc/auth"
    auth_socket_mode: int = 0o660
    auth_socket_group: str | None = None
    saslauthd_socket: str | None = None
    saslauthd_socket_mode: int = 0o660
    saslauthd_socket_group: str | None = None
    http_listen: tuple[tuple[str, int], ...] = ()  # (host, port); loopback unless http.auth
    http_socket: str | None = None
    http_socket_mode: int = 0o660
    http_socket_group: str | None = None
    mechanisms: tuple[str, ...] = ("OAUTHBEARER", "XOAUTH2")
    request_timeout: float = 5.0
    tempfail: Literal["fail", "disconnect"] = "fail"
    workers: int = 1
    # Connections at once on the auth socket (and on the saslauthd socket);
    # None: 4096, within the file-descriptor budget (saslauthd_oidc.service.limits).
    max_connections: int | None = None
    max_token_bytes: int = 16384
    # Seconds a Dovecot-protocol client may take to send one line (and its
    # first line after connecting), or to read our replies; idle connections
    # between lines are kept (Postfix holds them open between logins).
    line_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_entries: int = 100_000
    ttl: float = 300.0
    negative_ttl: float = 30.0


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The HTTP listener's behaviour (where it listens is in ``[server]``)."""

    auth: Literal["required", "open"] = "required"
    users_file: str | None = None  # "name:password" lines, for HTTP Basic
    secret_file: str | None = None  # one shared secret, for "Authorization: Bearer <secret>"
    readyz_grace: float = 30.0
    metrics: bool = True
    stalwart_issuer: str | None = None  # the issuer URL of the Stalwart userinfo facade
    # Reverse proxies whose X-Forwarded-Host / X-Forwarded-Proto are believed:
    # addresses or networks, and "unix" for the Unix-socket listener. None by default.
    trusted_proxies: tuple[IPv4Network | IPv6Network | Literal["unix"], ...] = ()
    # Claims /introspect copies from a token besides the standard ones and those
    # rules read (core.engine.EXPOSED_CLAIMS), e.g. for Dovecot's %{oauth2:groups}.
    introspect_claims: tuple[str, ...] = ()
    # Denial-of-service bounds of the HTTP listener (saslauthd_oidc.service.limits).
    max_connections: int | None = None  # None: 256, within the descriptor budget
    read_timeout: float = 10.0  # seconds for a request's body to arrive once its head has
    write_timeout: float = 10.0  # seconds for a client to take each answer
    keepalive_timeout: float = 15.0  # seconds an idle keep-alive connection is kept
    max_requests_per_connection: int = 100  # then "Connection: close"

    @property
    def trust_unix_proxies(self) -> bool:
        """Callers on the Unix-socket listener are trusted proxies (``"unix"``)."""
        return "unix" in self.trusted_proxies

    @property
    def stalwart_path(self) -> str | None:
        """The URL path under which the Stalwart endpoints are served (no trailing /)."""
        if not self.stalwart_issuer:
            return None
        return urlsplit(self.stalwart_issuer).path.rstrip("/")


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: Literal["json", "console"] = "json"


#: One tenant label in a ``{tenantid}`` issuer (providers/issuers.py) and allowed_tenants.
TENANT_RE = re.compile(r"[A-Za-z0-9-]{1,64}")


def _host(url: str) -> str:
    """The lower-cased host of an http(s) URL ("" when there is none)."""
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    issuer: str
    discovery_url: str | None = None
    jwks_uri: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")
    leeway: float = 60.0
    token_types: tuple[str, ...] = ()
    allow_http: bool = False
    ca_file: str | None = None
    # Metadata freshness: Cache-Control max-age is honoured within these bounds;
    # without one, jwks_refresh applies.
    jwks_refresh: float = 3600.0
    jwks_min_refresh: float = 60.0
    jwks_cooldown: float = 30.0  # an unknown kid refetches at most once per this many seconds
    # After a failed key fetch the next one may come this soon, doubling with
    # every further failure up to jwks_cooldown (an IdP back from an outage is
    # used again within seconds, not after a whole cooldown).
    jwks_retry: float = 1.0
    # A shared HMAC secret (only for providers that cannot sign asymmetrically).
    hmac_secret_file: str | None = None
    # RFC 7662 introspection of opaque (and JWE) tokens; the endpoint may come
    # from discovery. Enabled by client_id + client_secret_file.
    introspection_endpoint: str | None = None
    client_id: str | None = None
    client_secret_file: str | None = None
    introspection_auth: IntrospectionAuth = "client_secret_basic"
    # Userinfo: enrichment of JWTs that lack the claims the username needs; and,
    # opted into separately, validation of last resort for opaque tokens.
    userinfo: bool = False
    userinfo_validation: bool = False
    userinfo_endpoint: str | None = None
    # Multi-tenant issuers (Microsoft Entra): "{tenantid}" in issuer, and the
    # tenants (the tid claim) accepted; "*" accepts any tenant.
    allowed_tenants: tuple[str, ...] = ()
    # Hosts that URLs learnt from discovery (jwks_uri, introspection and userinfo
    # endpoints) may point to besides the issuer's and the discovery URL's own
    # (Google publishes its keys on www.googleapis.com).
    endpoint_hosts: tuple[str, ...] = ()
    # Tokens that are not plain bearer access tokens: ID tokens are refused
    # unless this says they may log in.
    accept_id_tokens: bool = False
    # Dovecot's force_introspection: JWTs are introspected too (after their
    # signature holds), so that a token revoked at the IdP stops working
    # within introspection_cache_ttl. Needs client_id.
    force_introspection: bool = False
    # Seconds an introspection answer is trusted (cached). None: 30 with
    # force_introspection, else [cache] ttl.
    introspection_cache_ttl: float | None = None

    @property
    def effective_introspection_ttl(self) -> float | None:
        """How long an introspection answer may be cached; None = the cache's own ttl."""
        if self.introspection_cache_ttl is not None:
            return self.introspection_cache_ttl
        return FORCE_INTROSPECTION_TTL if self.force_introspection else None

    @property
    def effective_discovery_url(self) -> str:
        if self.discovery_url:
            return self.discovery_url
        base = self.issuer.replace(TENANT_PLACEHOLDER, "common")
        return base.rstrip("/") + "/.well-known/openid-configuration"

    @property
    def multi_tenant(self) -> bool:
        return TENANT_PLACEHOLDER in self.issuer

    @property
    def introspects(self) -> bool:
        return self.client_id is not None

    @property
    def validates_opaque(self) -> bool:
        """Whether tokens that are not a JWS can be checked here at all."""
        return self.introspects or self.userinfo_validation

    @property
    def metadata_hosts(self) -> frozenset[str]:
        """Hosts a discovered endpoint may be on: the issuer's, discovery's, endpoint_hosts."""
        hosts = {_host(self.issuer), _host(self.effective_discovery_url)}
        return frozenset(h for h in hosts | set(self.endpoint_hosts) if h)


@dataclass(frozen=True, slots=True)
class RuleConfig:
    name: str
    provider: str
    audiences: tuple[str, ...] = ()
    authorized_parties: tuple[str, ...] = ()
    required_scopes: tuple[str, ...] = ()
    claims: Mapping[str, str | int | bool] = field(default_factory=dict)
    domains: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    mechanisms: tuple[str, ...] = ()
    remote_networks: tuple[IPv4Network | IPv6Network, ...] = ()
    require_secured: bool = False
    username: str = "{email}"
    domain_map: Mapping[str, str] = field(default_factory=dict)  # account domain rewriting
    account_domains: tuple[str, ...] = ()  # the mapped account's domain must be one of these
    normalize: bool = True  # NFKC + lower case
    authzid: Literal["match", "ignore"] = "match"
    fallback: bool = False
    discovery_hint: str | None = None
    challenge_scope: str | None = None
    # RFC 9728 protected-resource metadata (HTTP discovery) selection and content.
    resource_paths: tuple[str, ...] = ()
    referers: tuple[str, ...] = ()
    scopes_supported: tuple[str, ...] = ()
    # A rule that checks neither audiences nor authorized_parties must say so.
    check_audience: bool = True
    # The username may use an e-mail the IdP does not vouch for (nOAuth).
    trust_unverified_email: bool = False
    # Not a setting: the account domains other issuers' rules claim (their
    # trusted_account_domains), which this rule may not produce accounts in
    # unless it names domains of its own. Filled in by parse_config.
    foreign_domains: tuple[str, ...] = field(default=(), metadata={"derived": True})

    @property
    def template_domain(self) -> str | None:
        """The literal domain the username template ends in ("{name}@example.org"), if any."""
        _, at, tail = self.username.rpartition("@")
        if not at or not tail or "{" in tail or "}" in tail:
            return None
        domain = tail.lower()
        return self.domain_map.get(domain, domain)

    @property
    def trusted_account_domains(self) -> tuple[str, ...]:
        """The domains this rule may produce accounts in: ``account_domains``, else
        ``domains``, else the literal domain of its ``username`` template."""
        if self.account_domains or self.domains:
            return self.account_domains or self.domains
        return (self.template_domain,) if self.template_domain else ()


# Mail endpoints a [[domain]] publishes (autoconfig, PACC): protocol -> (rule service,
# {port: TLS mode} of its registered ports, the port used when none is given).
TlsMode = Literal["tls", "starttls"]
TLS_MODES: tuple[TlsMode, ...] = ("tls", "starttls")

ENDPOINT_PROTOCOLS: Mapping[str, tuple[str, Mapping[int, TlsMode], int]] = {
    "imap": ("imap", {993: "tls", 143: "starttls"}, 993),
    "submission": ("smtp", {465: "tls", 587: "starttls"}, 465),
    "pop3": ("pop3", {995: "tls", 110: "starttls"}, 995),
}


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """One mail endpoint of a [[domain]]: where clients connect, and how."""

    protocol: str  # "imap" | "submission" | "pop3" | "jmap"
    host: str  # lower case, IDNA A-labels
    port: int
    tls: TlsMode  # jmap: always "tls" (https)
    service: str  # the service name the mail server passes (rules' services)
    url: str | None = None  # jmap: the session URL
    path: str = "/"  # jmap: the URL's path (RFC 9728 resource path)


@dataclass(frozen=True, slots=True)
class DomainConfig:
    """A mail domain whose autoconfig and PACC documents the HTTP listener serves."""

    name: str
    imap: EndpointConfig | None = None
    submission: EndpointConfig | None = None
    pop3: EndpointConfig | None = None
    jmap: EndpointConfig | None = None
    submission_service: str = "smtp"
    client: str | None = None
    display_name: str | None = None
    short_name: str | None = None
    max_age: int = 3600

    @property
    def endpoints(self) -> tuple[EndpointConfig, ...]:
        found = (self.imap, self.submission, self.pop3, self.jmap)
        return tuple(e for e in found if e is not None)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    providers: tuple[ProviderConfig, ...] = ()
    rules: tuple[RuleConfig, ...] = ()
    domains: tuple[DomainConfig, ...] = ()
    source: str = "<built-in>"

    def provider(self, name: str) -> ProviderConfig:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)
