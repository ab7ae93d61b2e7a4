"""TOML data → :class:`~.schema.Config`: every section's parser, and the checks across them.

Each parser reads its table through :class:`_Section` (typed accessors that name
the key on error and spot misspelt keys) and falls back on the dataclass's own
defaults. No I/O: the file is read by :mod:`.load`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from saslauthd_oidc.config.errors import ConfigError, suggest, unknown_message
from saslauthd_oidc.config.schema import (
    ASYMMETRIC_ALGORITHMS,
    ENDPOINT_PROTOCOLS,
    INTROSPECTION_AUTH_METHODS,
    KNOWN_MECHANISMS,
    LOG_LEVELS,
    PLACEHOLDER_RE,
    RULE_MECHANISMS,
    SYMMETRIC_ALGORITHMS,
    TENANT_PLACEHOLDER,
    TENANT_RE,
    TLS_MODES,
    USERNAME_FILTERS,
    CacheConfig,
    Config,
    DomainConfig,
    EndpointConfig,
    HttpConfig,
    LoggingConfig,
    ProviderConfig,
    RuleConfig,
    ServerConfig,
    TlsMode,
)

# The defaults the parser falls back on are the dataclasses' own: one place each.
# (The required fields get placeholders; only the defaulted ones are read.)
_PROVIDER_DEFAULTS = ProviderConfig(name="", issuer="")
_RULE_DEFAULTS = RuleConfig(name="", provider="")
_DOMAIN_DEFAULTS = DomainConfig(name="")


T = TypeVar("T")
C = TypeVar("C", bound=str)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Section:
    """Typed accessors over one TOML table that name the key on error and spot typos."""

    def __init__(self, key: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(key, "expected a table")
        self.key = key
        self.data: dict[str, Any] = data
        self.seen: set[str] = set()

    def _k(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def _get(self, name: str) -> Any:
        self.seen.add(name)
        return self.data.get(name)

    def text(self, name: str, default: T) -> str | T:
        v = self._get(name)
        if v is None:
            return default
        if not isinstance(v, str):
            raise ConfigError(self._k(name), "expected a string")
        return v

    def required_str(self, name: str) -> str:
        v = self.text(name, None)
        if not v:
            raise ConfigError(self._k(name), "required, expected a non-empty string")
        return v

    def flag(self, name: str, default: bool) -> bool:
        v = self._get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ConfigError(self._k(name), "expected true or false")
        return v

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        v = self._get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(self._k(name), "expected a number")
        if v < minimum:
            raise ConfigError(self._k(name), f"must be at least {minimum:g}")
        return float(v)

    def whole(self, name: str, default: int, *, minimum: int = 0) -> int:
        v = self._get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(self._k(name), "expected a whole number")
        if v < minimum:
            raise ConfigError(self._k(name), f"must be at least {minimum}")
        return v

    def texts(
        self, name: str, default: Sequence[str] = (), *, single: bool = False
    ) -> tuple[str, ...]:
        """A list of non-empty strings; a lone string only where ``single`` allows it."""
        v = self._get(name)
        if v is None:
            return tuple(default)
        if isinstance(v, str) and single:
            v = [v]
        if isinstance(v, str):
            # "openid email" would silently be one scope, "a, b" one host.
            raise ConfigError(
                self._k(name),
                f"expected a list of non-empty strings, not a string: {name} = {_toml_list(v)}",
            )
        if not isinstance(v, list) or not all(isinstance(i, str) and i for i in v):
            raise ConfigError(self._k(name), "expected a list of non-empty strings")
        return tuple(v)

    def choice(self, name: str, default: C, choices: Sequence[C]) -> C:
        """One of ``choices`` (typed as narrowly as they are: a Literal stays one)."""
        v = self.text(name, default)
        for choice in choices:
            if v == choice:
                return choice
        raise ConfigError(self._k(name), f"expected one of {', '.join(map(repr, choices))}")

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            name = unknown[0]
            raise ConfigError(self._k(name), unknown_message(name, self.data[name], self.seen))


def _toml_list(value: str) -> str:
    items = value.replace(",", " ").split() or [value]
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def _parse_mode(key: str, v: Any) -> int:
    if isinstance(v, str) and re.fullmatch(r"0?[0-7]{3,4}", v):
        return int(v, 8)
    if isinstance(v, int) and not isinstance(v, bool):
        raise ConfigError(
            key,
            f'expected an octal string such as "0660": {v} is read as a decimal number '
            f'(write "0{v}" or 0o{v})',
        )
    raise ConfigError(key, 'expected an octal string such as "0660"')


# RFC 6749 §3.3 scope-token: NQCHAR, i.e. printable ASCII except '"' and '\\'.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


def _scope_list(key: str, value: str | None) -> str | None:
    """A space-separated scope list (the RFC 7628 challenge's ``scope``), normalised."""
    if not value:
        return None
    scopes = value.split()
    bad = [s for s in scopes if _SCOPE_TOKEN.fullmatch(s) is None]
    if not scopes or bad:
        raise ConfigError(key, 'expected space-separated scopes (printable ASCII, no " or \\)')
    return " ".join(scopes)


def _a_label_host(key: str, host: str) -> str:
    """A host name as requests carry it: lower case, no trailing dot, IDNA A-labels."""
    host = host.lower().rstrip(".")
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ConfigError(key, f"{host!r} is not a valid internationalised host name") from None


def _check_url(key: str, url: str, *, allow_http: bool) -> str:
    if url.startswith("https://") or (allow_http and url.startswith("http://")):
        return url
    hint = "" if allow_http else " (plain http needs allow_http = true)"
    raise ConfigError(key, f"expected an https:// URL{hint}")


def _parse_server(data: Any) -> ServerConfig:
    s = _Section("server", data)
    d = ServerConfig()
    mode_raw = s._get("auth_socket_mode")
    saslauthd_mode_raw = s._get("saslauthd_socket_mode")
    http_mode_raw = s._get("http_socket_mode")
    mechanisms = tuple(m.upper() for m in s.texts("mechanisms", d.mechanisms))
    for m in mechanisms:
        if m not in KNOWN_MECHANISMS:
            raise ConfigError("server.mechanisms", f"unknown mechanism {m!r}")
    if not mechanisms:
        raise ConfigError("server.mechanisms", "at least one mechanism is needed")
    auth_socket = s.text("auth_socket", d.auth_socket)
    cfg = ServerConfig(
        auth_socket=auth_socket or None,
        auth_socket_mode=d.auth_socket_mode
        if mode_raw is None
        else _parse_mode("server.auth_socket_mode", mode_raw),
        auth_socket_group=s.text("auth_socket_group", None),
        saslauthd_socket=s.text("saslauthd_socket", None) or None,
        saslauthd_socket_mode=d.saslauthd_socket_mode
        if saslauthd_mode_raw is None
        else _parse_mode("server.saslauthd_socket_mode", saslauthd_mode_raw),
        saslauthd_socket_group=s.text("saslauthd_socket_group", None),
        http_listen=tuple(_parse_listen(a) for a in s.texts("http_listen", single=True)),
        http_socket=s.text("http_socket", None) or None,
        http_socket_mode=d.http_socket_mode
        if http_mode_raw is None
        else _parse_mode("server.http_socket_mode", http_mode_raw),
        http_socket_group=s.text("http_socket_group", None),
        mechanisms=mechanisms,
        request_timeout=s.number("request_timeout", d.request_timeout, minimum=0.1),
        tempfail=s.choice("tempfail", d.tempfail, ("fail", "disconnect")),
        workers=s.whole("workers", d.workers, minimum=1),
        max_connections=_optional_whole(s, "max_connections"),
        max_token_bytes=s.whole("max_token_bytes", d.max_token_bytes, minimum=256),
        line_timeout=s.number("line_timeout", d.line_timeout, minimum=0.1),
    )
    if cfg.saslauthd_socket and cfg.saslauthd_socket == cfg.auth_socket:
        raise ConfigError("server.saslauthd_socket", "must differ from server.auth_socket")
    if cfg.request_timeout >= 10:
        raise ConfigError(
            "server.request_timeout",
            "must be below 10 seconds: Postfix gives up on the auth server after 10 s",
        )
    s.reject_unknown()
    return cfg


def _optional_whole(s: _Section, name: str) -> int | None:
    """A whole number of at least 1, or None when unset."""
    return None if s._get(name) is None else s.whole(name, 1, minimum=1)


def _parse_listen(address: str) -> tuple[str, int]:
    """``"127.0.0.1:8480"`` or ``"[::1]:8480"`` → (host, port)."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not 0 < number < 65536:
        raise ConfigError(
            "server.http_listen",
            f'{address!r}: expected an IP address and port, e.g. "127.0.0.1:8480"',
        )
    return host, number


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def _parse_http(data: Any, server: ServerConfig) -> HttpConfig:
    s = _Section("http", data)
    d = HttpConfig()
    stalwart_issuer = s.text("stalwart_issuer", None)
    if stalwart_issuer:
        _check_url("http.stalwart_issuer", stalwart_issuer, allow_http=True)
        if not urlsplit(stalwart_issuer).path.strip("/"):
            raise ConfigError(
                "http.stalwart_issuer",
                "needs a path of its own, e.g. http://127.0.0.1:8480/stalwart",
            )
    proxies: list[IPv4Network | IPv6Network | Literal["unix"]] = []
    for entry in s.texts("trusted_proxies"):
        if entry == "unix":
            proxies.append("unix")
            continue
        try:
            proxies.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError(
                "http.trusted_proxies",
                f'{entry!r} is not an address, a network or "unix"',
            ) from None
    cfg = HttpConfig(
        auth=s.choice("auth", d.auth, ("required", "open")),
        users_file=s.text("users_file", None),
        secret_file=s.text("secret_file", None),
        readyz_grace=s.number("readyz_grace", d.readyz_grace),
        metrics=s.flag("metrics", d.metrics),
        stalwart_issuer=stalwart_issuer or None,
        trusted_proxies=tuple(proxies),
        introspect_claims=s.texts("introspect_claims"),
        max_connections=_optional_whole(s, "max_connections"),
        read_timeout=s.number("read_timeout", d.read_timeout, minimum=0.1),
        write_timeout=s.number("write_timeout", d.write_timeout, minimum=0.1),
        keepalive_timeout=s.number("keepalive_timeout", d.keepalive_timeout, minimum=0.1),
        max_requests_per_connection=s.whole(
            "max_requests_per_connection", d.max_requests_per_connection, minimum=1
        ),
    )
    s.reject_unknown()
    enabled = bool(server.http_listen or server.http_socket)
    if enabled and cfg.auth == "open":
        for host, port in server.http_listen:
            if not is_loopback(host):
                raise ConfigError(
                    "http.auth",
                    f'"open" is only allowed on loopback and Unix sockets, not {host}:{port}',
                )
    if enabled and cfg.auth == "required" and not (cfg.users_file or cfg.secret_file):
        raise ConfigError(
            "http.auth",
            "callers must authenticate: set http.users_file or http.secret_file, "
            'or auth = "open" (loopback and Unix sockets only)',
        )
    return cfg


def _parse_cache(data: Any) -> CacheConfig:
    s = _Section("cache", data)
    d = CacheConfig()
    cfg = CacheConfig(
        max_entries=s.whole("max_entries", d.max_entries),
        ttl=s.number("ttl", d.ttl),
        negative_ttl=s.number("negative_ttl", d.negative_ttl),
    )
    s.reject_unknown()
    return cfg


def _parse_logging(data: Any) -> LoggingConfig:
    s = _Section("logging", data)
    d = LoggingConfig()
    cfg = LoggingConfig(
        level=s.choice("level", d.level, LOG_LEVELS),
        format=s.choice("format", d.format, ("json", "console")),
    )
    s.reject_unknown()
    return cfg


def _parse_provider(index: int, data: Any) -> ProviderConfig:
    key = f"provider[{index}]"
    s = _Section(key, data)
    d = _PROVIDER_DEFAULTS
    name = s.required_str("name")
    if not _NAME_RE.match(name):
        raise ConfigError(f"{key}.name", "use letters, digits, '.', '_' and '-' only")
    allow_http = s.flag("allow_http", d.allow_http)
    issuer = _check_url(f"{key}.issuer", s.required_str("issuer"), allow_http=allow_http)
    discovery_url = s.text("discovery_url", None)
    if discovery_url:
        _check_url(f"{key}.discovery_url", discovery_url, allow_http=allow_http)
    jwks_uri = s.text("jwks_uri", None)
    if jwks_uri:
        _check_url(f"{key}.jwks_uri", jwks_uri, allow_http=allow_http)
    algorithms = s.texts("algorithms", d.algorithms)
    hmac_secret_file = s.text("hmac_secret_file", None)
    for alg in algorithms:
        if alg in SYMMETRIC_ALGORITHMS:
            if not hmac_secret_file:
                raise ConfigError(
                    f"{key}.algorithms",
                    f"{alg} is a shared-secret algorithm; it needs hmac_secret_file",
                )
        elif alg not in ASYMMETRIC_ALGORITHMS:
            guess = suggest(alg, ASYMMETRIC_ALGORITHMS | SYMMETRIC_ALGORITHMS)
            raise ConfigError(
                f"{key}.algorithms",
                f"unsupported algorithm {alg!r}"
                + (f" (did you mean {guess!r}?)" if guess else "")
                + f"; supported: {', '.join(sorted(ASYMMETRIC_ALGORITHMS))}, "
                f"and {', '.join(sorted(SYMMETRIC_ALGORITHMS))} with hmac_secret_file",
            )
    if not algorithms:
        raise ConfigError(f"{key}.algorithms", "at least one algorithm is needed")
    introspection_endpoint = s.text("introspection_endpoint", None)
    if introspection_endpoint:
        _check_url(f"{key}.introspection_endpoint", introspection_endpoint, allow_http=allow_http)
    userinfo_endpoint = s.text("userinfo_endpoint", None)
    if userinfo_endpoint:
        _check_url(f"{key}.userinfo_endpoint", userinfo_endpoint, allow_http=allow_http)
    client_id = s.text("client_id", None) or None
    client_secret_file = s.text("client_secret_file", None) or None
    if client_id and not client_secret_file:
        raise ConfigError(f"{key}.client_secret_file", "client_id needs client_secret_file")
    if client_secret_file and not client_id:
        raise ConfigError(f"{key}.client_id", "client_secret_file needs client_id")
    if introspection_endpoint and not client_id:
        raise ConfigError(
            f"{key}.client_id",
            "introspection_endpoint needs client_id and client_secret_file "
            "(introspection endpoints authenticate their callers)",
        )
    allowed_tenants = tuple(t.lower() for t in s.texts("allowed_tenants"))
    if TENANT_PLACEHOLDER in issuer:
        if not allowed_tenants:
            raise ConfigError(
                f"{key}.allowed_tenants",
                'an issuer with {tenantid} needs the tenants it accepts (["*"] for any)',
            )
        for t in allowed_tenants:
            if t != "*" and not TENANT_RE.fullmatch(t):
                raise ConfigError(f"{key}.allowed_tenants", f"{t!r} is not a tenant id")
    elif allowed_tenants:
        raise ConfigError(f"{key}.allowed_tenants", "only for an issuer containing {tenantid}")
    cfg = ProviderConfig(
        name=name,
        issuer=issuer,
        discovery_url=discovery_url,
        jwks_uri=jwks_uri,
        algorithms=algorithms,
        leeway=s.number("leeway", d.leeway),
        token_types=s.texts("token_types"),
        allow_http=allow_http,
        ca_file=s.text("ca_file", None),
        jwks_refresh=s.number("jwks_refresh", d.jwks_refresh, minimum=10.0),
        jwks_min_refresh=s.number("jwks_min_refresh", d.jwks_min_refresh, minimum=0.0),
        jwks_cooldown=s.number("jwks_cooldown", d.jwks_cooldown, minimum=0.0),
        jwks_retry=s.number("jwks_retry", d.jwks_retry, minimum=0.1),
        hmac_secret_file=hmac_secret_file,
        introspection_endpoint=introspection_endpoint,
        client_id=client_id,
        client_secret_file=client_secret_file,
        introspection_auth=s.choice(
            "introspection_auth", d.introspection_auth, INTROSPECTION_AUTH_METHODS
        ),
        userinfo=s.flag("userinfo", d.userinfo),
        userinfo_validation=s.flag("userinfo_validation", d.userinfo_validation),
        userinfo_endpoint=userinfo_endpoint,
        allowed_tenants=allowed_tenants,
        endpoint_hosts=tuple(h.lower() for h in s.texts("endpoint_hosts")),
        accept_id_tokens=s.flag("accept_id_tokens", d.accept_id_tokens),
        force_introspection=s.flag("force_introspection", d.force_introspection),
        introspection_cache_ttl=_optional_number(s, "introspection_cache_ttl"),
    )
    if cfg.force_introspection and not cfg.introspects:
        raise ConfigError(
            f"{key}.force_introspection",
            "introspecting JWTs needs client_id and client_secret_file",
        )
    if cfg.introspection_cache_ttl is not None and not cfg.introspects:
        raise ConfigError(
            f"{key}.introspection_cache_ttl",
            "this provider does not introspect (no client_id)",
        )
    if cfg.userinfo_validation and cfg.introspects:
        raise ConfigError(
            f"{key}.userinfo_validation",
            "this provider introspects opaque tokens (client_id); userinfo_validation is "
            "only for providers that cannot",
        )
    if cfg.jwks_min_refresh > cfg.jwks_refresh:
        raise ConfigError(f"{key}.jwks_min_refresh", "must not exceed jwks_refresh")
    if cfg.leeway > 600:
        raise ConfigError(f"{key}.leeway", "at most 600 seconds")
    s.reject_unknown()
    return cfg


def _optional_number(s: _Section, name: str) -> float | None:
    if s.data.get(name) is None:
        s.seen.add(name)
        return None
    return s.number(name, 0.0)


def _parse_rule(
    index: int,
    data: Any,
    provider_names: set[str],
    userinfo_only: frozenset[str] = frozenset(),
) -> RuleConfig:
    key = f"rule[{index}]"
    s = _Section(key, data)
    r = _RULE_DEFAULTS
    name = s.text("name", f"rule{index}")
    if not _NAME_RE.match(name):
        raise ConfigError(f"{key}.name", "use letters, digits, '.', '_' and '-' only")
    provider = s.required_str("provider")
    if provider not in provider_names:
        known = ", ".join(sorted(provider_names)) or "none defined"
        guess = suggest(provider, provider_names)
        hint = f"; did you mean {guess!r}?" if guess else ""
        raise ConfigError(f"{key}.provider", f"no [[provider]] named {provider!r} ({known}){hint}")
    ports_raw = s._get("ports")
    ports: tuple[int, ...] = ()
    if ports_raw is not None:
        if not isinstance(ports_raw, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports_raw
        ):
            raise ConfigError(f"{key}.ports", "expected a list of port numbers")
        ports = tuple(ports_raw)
    claims_raw = s._get("claims")
    claims: dict[str, str | int | bool] = {}
    if claims_raw is not None:
        if not isinstance(claims_raw, dict):
            raise ConfigError(f"{key}.claims", "expected a table of claim = value")
        for ck, cv in claims_raw.items():
            if not isinstance(cv, str | int | bool):
                raise ConfigError(f"{key}.claims.{ck}", "expected a string, number or boolean")
            claims[ck] = cv
    username = s.text("username", r.username)
    placeholders = PLACEHOLDER_RE.findall(username)
    if not placeholders or any(not p.strip() for p in placeholders):
        raise ConfigError(f"{key}.username", 'expected a template with a "{claim}" placeholder')
    if username.count("{") != len(placeholders) or username.count("}") != len(placeholders):
        raise ConfigError(f"{key}.username", "unbalanced braces in template")
    for body in placeholders:
        claim, *filters = (part.strip() for part in body.split("|"))
        if not claim:
            raise ConfigError(f"{key}.username", f"empty claim name in {{{body}}}")
        for f in filters:
            if f not in USERNAME_FILTERS:
                known = ", ".join(USERNAME_FILTERS)
                raise ConfigError(f"{key}.username", f"unknown filter {f!r} (known: {known})")
    mechanisms = tuple(m.upper() for m in s.texts("mechanisms"))
    for m in mechanisms:
        if m not in RULE_MECHANISMS:
            raise ConfigError(f"{key}.mechanisms", f"unknown mechanism {m!r}")
    resource_paths = s.texts("resource_paths")
    for path in resource_paths:
        if not path.startswith("/"):
            raise ConfigError(f"{key}.resource_paths", f"{path!r}: expected a path starting with /")
    referers = s.texts("referers")
    for referer in referers:
        _check_url(f"{key}.referers", referer, allow_http=True)
        try:
            parts = urlsplit(referer)
            valid = bool(parts.hostname) and (parts.port or 0) >= 0  # .port checks the port
        except ValueError:
            valid = False
        if not valid or "@" in parts.netloc or parts.query or parts.fragment:
            raise ConfigError(
                f"{key}.referers",
                f"{referer!r}: expected scheme://host[:port][/path], no user, query or fragment",
            )
    remote_networks = []
    for net in s.texts("remote_networks"):
        try:
            remote_networks.append(ipaddress.ip_network(net, strict=False))
        except ValueError:
            raise ConfigError(
                f"{key}.remote_networks", f"{net!r} is not an address or network"
            ) from None
    domain_map_raw = s._get("domain_map")
    domain_map: dict[str, str] = {}
    if domain_map_raw is not None:
        if not isinstance(domain_map_raw, dict) or not all(
            isinstance(v, str) and v for v in domain_map_raw.values()
        ):
            raise ConfigError(
                f"{key}.domain_map", 'expected a table of "from.domain" = "to.domain"'
            )
        domain_map = {k.lower(): v.lower() for k, v in domain_map_raw.items()}
    discovery_hint = s.text("discovery_hint", None)
    if discovery_hint:
        _check_url(f"{key}.discovery_hint", discovery_hint, allow_http=True)
    cfg = RuleConfig(
        name=name,
        provider=provider,
        audiences=s.texts("audiences"),
        authorized_parties=s.texts("authorized_parties"),
        required_scopes=s.texts("required_scopes"),
        claims=claims,
        domains=tuple(d.lower().lstrip("@") for d in s.texts("domains")),
        services=tuple(v.lower() for v in s.texts("services")),
        hosts=tuple(_a_label_host(f"{key}.hosts", h) for h in s.texts("hosts")),
        ports=ports,
        mechanisms=mechanisms,
        remote_networks=tuple(remote_networks),
        require_secured=s.flag("require_secured", r.require_secured),
        username=username,
        domain_map=domain_map,
        account_domains=tuple(d.lower().lstrip("@") for d in s.texts("account_domains")),
        normalize=s.flag("normalize", r.normalize),
        authzid=s.choice("authzid", r.authzid, ("match", "ignore")),
        fallback=s.flag("fallback", r.fallback),
        discovery_hint=discovery_hint,
        challenge_scope=_scope_list(f"{key}.challenge_scope", s.text("challenge_scope", None)),
        resource_paths=tuple(p.rstrip("/") or "/" for p in resource_paths),
        referers=referers,
        scopes_supported=s.texts("scopes_supported"),
        check_audience=s.flag("check_audience", r.check_audience),
        trust_unverified_email=s.flag("trust_unverified_email", r.trust_unverified_email),
    )
    s.reject_unknown()
    if cfg.check_audience and not (cfg.audiences or cfg.authorized_parties):
        if provider in userinfo_only:
            raise ConfigError(
                f"{key}.audiences",
                f"checks neither audiences nor authorized_parties; provider {provider!r} "
                "checks opaque tokens by userinfo, whose answers name no audience: give the "
                "provider client_id and client_secret_file (introspection), or say "
                "check_audience = false to accept any of its tokens",
            )
        raise ConfigError(
            f"{key}.audiences",
            "checks neither audiences nor authorized_parties, so a token provider "
            f"{provider!r} issued to any other application would log in here; "
            "set audiences (the aud of your mail clients' tokens) or authorized_parties "
            "(their azp/client_id), or check_audience = false to accept that",
        )
    if not cfg.check_audience and (cfg.audiences or cfg.authorized_parties):
        raise ConfigError(
            f"{key}.check_audience",
            "check_audience = false contradicts the rule's audiences / "
            "authorized_parties; remove one or the other",
        )
    return cfg


def _with_foreign_domains(
    rules: tuple[RuleConfig, ...], providers: tuple[ProviderConfig, ...]
) -> tuple[RuleConfig, ...]:
    """Each rule with the account domains that rules of *other issuers* claim.

    A domain is claimed by a rule's ``account_domains``, else its ``domains``,
    else the literal domain its username template ends in. A rule that claims
    none may not produce accounts in a domain another issuer's rule claims:
    another IdP's tokens never mint accounts in a domain an IdP is trusted for.
    """
    issuer = {p.name: p.issuer for p in providers}
    claims: dict[str, set[str]] = {}
    for r in rules:
        claims.setdefault(issuer[r.provider], set()).update(r.trusted_account_domains)
    out = []
    for r in rules:
        own = issuer[r.provider]
        foreign = sorted({d for iss, ds in claims.items() if iss != own for d in ds})
        out.append(replace(r, foreign_domains=tuple(foreign)) if foreign else r)
    return tuple(out)


SECTIONS = ("server", "cache", "logging", "http", "provider", "rule", "domain")


def _known_sections() -> set[str]:
    """The top-level tables: SECTIONS and every section-valued field of Config."""
    names = {f.name for f in fields(Config)} - {"source", "providers", "rules", "domains"}
    return names | set(SECTIONS)


_ENTRY_RE = re.compile(r"^(rule|provider|domain)\[(\d+)\]")


def parse_config(data: Mapping[str, Any], *, source: str = "<memory>") -> Config:
    """Validate ``data`` (a parsed TOML document) into a :class:`Config`; ConfigError names the key.

    An error inside a ``[[rule]]`` or ``[[provider]]`` also names the entry by its
    ``name``; a misspelt section is reported as itself, before any error that
    its absence caused (``[htttp]`` is not "http.auth missing").
    """
    try:
        return _parse_config(data, source=source)
    except ConfigError as exc:
        known = _known_sections()
        misspelt = [k for k in data if k not in known and suggest(k, known) and k != exc.key]
        if misspelt:
            name = misspelt[0]
            raise ConfigError(name, unknown_message(name, data[name], known)) from None
        entry = _ENTRY_RE.match(exc.key)
        if entry and exc.label is None:
            items = data.get(entry.group(1))
            index = int(entry.group(2))
            item = items[index] if isinstance(items, list) and index < len(items) else None
            label = item.get("name") if isinstance(item, dict) else None
            if isinstance(label, str) and label:
                exc.label = f'{entry.group(1)} "{label}"'
        raise


def _parse_config(data: Mapping[str, Any], *, source: str) -> Config:
    top = _Section("", dict(data))
    server = _parse_server(top._get("server") or {})
    cache = _parse_cache(top._get("cache") or {})
    logging_cfg = _parse_logging(top._get("logging") or {})
    http = _parse_http(top._get("http") or {}, server)
    providers_raw = top._get("provider") or []
    if not isinstance(providers_raw, list):
        raise ConfigError("provider", "expected [[provider]] tables")
    providers = tuple(_parse_provider(i, p) for i, p in enumerate(providers_raw))
    names = [p.name for p in providers]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"provider[{i}].name", f"duplicate provider name {n!r}")
    rules_raw = top._get("rule") or []
    if not isinstance(rules_raw, list):
        raise ConfigError("rule", "expected [[rule]] tables")
    userinfo_only = frozenset(p.name for p in providers if p.userinfo_validation)
    rules = tuple(_parse_rule(i, r, set(names), userinfo_only) for i, r in enumerate(rules_raw))
    rule_names = [r.name for r in rules]
    for i, n in enumerate(rule_names):
        if n in rule_names[:i]:
            raise ConfigError(f"rule[{i}].name", f"duplicate rule name {n!r}")
    if not rules:
        raise ConfigError("rule", "at least one [[rule]] is needed")
    rules = _with_foreign_domains(rules, providers)
    domains = _parse_domains(top._get("domain"))
    top.reject_unknown()
    return Config(
        server=server,
        cache=cache,
        logging=logging_cfg,
        http=http,
        providers=providers,
        rules=rules,
        domains=domains,
        source=source,
    )


# --------------------------------------------------------------------------- [[domain]]

_DOMAIN_NAME_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$"
)
_DISPLAY_MAX = 60


def _parse_domains(raw: Any) -> tuple[DomainConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("domain", "expected [[domain]] tables")
    domains = tuple(_parse_domain(i, d) for i, d in enumerate(raw))
    names = [d.name for d in domains]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"domain[{i}].name", f"duplicate domain {n!r}")
    return domains


def _parse_domain(index: int, data: Any) -> DomainConfig:
    key = f"domain[{index}]"
    s = _Section(key, data)
    d = _DOMAIN_DEFAULTS
    name = _a_label_host(f"{key}.name", s.required_str("name").lstrip("@"))
    if not _DOMAIN_NAME_RE.match(name):
        raise ConfigError(f"{key}.name", f"{name!r}: expected a mail domain such as example.org")
    submission_service = s.text("submission_service", d.submission_service).lower()
    if not _NAME_RE.match(submission_service):
        raise ConfigError(f"{key}.submission_service", "expected a service name such as smtp")
    endpoints: dict[str, EndpointConfig | None] = {}
    for protocol in ENDPOINT_PROTOCOLS:
        value = s.text(protocol, None)
        endpoints[protocol] = (
            None if value is None else _parse_endpoint(f"{key}.{protocol}", protocol, value)
        )
    if endpoints["submission"] is not None and submission_service != "smtp":
        endpoints["submission"] = _replace_service(endpoints["submission"], submission_service)
    jmap_url = s.text("jmap", None)
    jmap = None if jmap_url is None else _parse_jmap(f"{key}.jmap", jmap_url)
    if not any(endpoints.values()) and jmap is None:
        raise ConfigError(
            f"{key}", f"domain {name!r} declares no endpoint: set imap, submission, pop3 or jmap"
        )
    texts: dict[str, str | None] = {}
    for field_name, limit in (("display_name", _DISPLAY_MAX), ("short_name", 20)):
        value = s.text(field_name, None)
        if value is not None and (
            not value.strip() or len(value) > limit or not value.isprintable()
        ):
            raise ConfigError(
                f"{key}.{field_name}", f"expected printable text of 1 to {limit} characters"
            )
        texts[field_name] = value
    client = s.text("client", None)
    if client is not None and (not client or not client.isprintable()):
        raise ConfigError(f"{key}.client", "expected the OAuth client_id the documents are for")
    max_age = s.whole("max_age", d.max_age, minimum=0)
    if max_age > 86400 * 7:
        raise ConfigError(f"{key}.max_age", "at most 604800 seconds (a week)")
    s.reject_unknown()
    return DomainConfig(
        name=name,
        imap=endpoints["imap"],
        submission=endpoints["submission"],
        pop3=endpoints["pop3"],
        jmap=jmap,
        submission_service=submission_service,
        client=client,
        display_name=texts["display_name"],
        short_name=texts["short_name"],
        max_age=max_age,
    )


def _replace_service(endpoint: EndpointConfig, service: str) -> EndpointConfig:
    return EndpointConfig(
        protocol=endpoint.protocol,
        host=endpoint.host,
        port=endpoint.port,
        tls=endpoint.tls,
        service=service,
    )


def _parse_endpoint(key: str, protocol: str, value: str) -> EndpointConfig:
    """``"host[:port][/tls|/starttls]"``; the TLS mode follows from a registered port."""
    service, registered, default_port = ENDPOINT_PROTOCOLS[protocol]
    example = f'{protocol} = "{protocol}.example.org:{default_port}"'
    address, slash, mode = value.partition("/")
    host_text, colon, port_text = address.rpartition(":")
    if not colon:
        host_text, port_text = address, ""
    host = _a_label_host(key, host_text)
    if not _DOMAIN_NAME_RE.match(host):
        raise ConfigError(key, f"{value!r}: expected host[:port], e.g. {example}")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(key, f"{value!r}: {port_text!r} is not a port number")
        port = int(port_text)
    else:
        port = default_port
    tls: TlsMode
    if slash:
        named = next((m for m in TLS_MODES if m == mode), None)
        if named is None:
            raise ConfigError(key, f"{value!r}: expected /tls or /starttls after the port")
        tls = named
    elif port in registered:
        tls = registered[port]
    else:
        raise ConfigError(
            key,
            f"{value!r}: port {port} is not {protocol}'s registered port; "
            f'say how clients secure it: "{host}:{port}/tls" or "{host}:{port}/starttls"',
        )
    return EndpointConfig(
        protocol=protocol,
        host=host,
        port=port,
        tls=tls,
        service=service,
    )


def _parse_jmap(key: str, url: str) -> EndpointConfig:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(key, f"{url!r} is not a URL") from None
    if parts.scheme != "https" or not parts.hostname or "@" in parts.netloc:
        raise ConfigError(key, f"{url!r}: expected the https:// URL of the JMAP session resource")
    if parts.query or parts.fragment:
        raise ConfigError(key, f"{url!r}: no query or fragment in the session URL")
    host = _a_label_host(key, parts.hostname)
    path = parts.path.rstrip("/") or "/"
    return EndpointConfig(
        protocol="jmap",
        host=host,
        port=port or 443,
        tls="tls",
        service="jmap",
        url=url,
        path=path,
    )
