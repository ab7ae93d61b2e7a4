"""Configuration: TOML parsed once into frozen dataclasses, with errors that name the key.

``load_config(path)`` / ``parse_config(dict)`` return a :class:`Config` or raise
:class:`ConfigError`, whose message starts with the dotted key that is wrong
(``rule[2].audiences: expected a list of strings``). What is legal but probably
not meant is listed by :func:`saslauthd_oidc.core.rules.config_warnings` (and
:func:`claim_warnings` here), which ``check-config`` prints. No I/O other than
reading the file; the secret files it names are read by :mod:`..secret_files`.

By job: :mod:`.schema` (the dataclasses, whose defaults are the settings'),
:mod:`.parse` (each section's parser and the checks across sections),
:mod:`.errors` (:class:`ConfigError`, where a key is in the file, TOML syntax
hints), :mod:`.load` (the file), :mod:`.claims` (typo hints for username
templates). Everything is imported from here: ``from saslauthd_oidc.config import …``.
"""

from __future__ import annotations

from saslauthd_oidc.config.claims import KNOWN_CLAIMS, claim_warnings
from saslauthd_oidc.config.errors import ConfigError, KeyLines, suggest, unknown_message
from saslauthd_oidc.config.load import load_config, resolve_config_path
from saslauthd_oidc.config.parse import SECTIONS, is_loopback, parse_config
from saslauthd_oidc.config.schema import (
    ASYMMETRIC_ALGORITHMS,
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    ENDPOINT_PROTOCOLS,
    FORCE_INTROSPECTION_TTL,
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
    IntrospectionAuth,
    LoggingConfig,
    ProviderConfig,
    RuleConfig,
    ServerConfig,
    TlsMode,
)

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "ENDPOINT_PROTOCOLS",
    "FORCE_INTROSPECTION_TTL",
    "INTROSPECTION_AUTH_METHODS",
    "KNOWN_CLAIMS",
    "KNOWN_MECHANISMS",
    "LOG_LEVELS",
    "PLACEHOLDER_RE",
    "RULE_MECHANISMS",
    "SECTIONS",
    "SYMMETRIC_ALGORITHMS",
    "TENANT_PLACEHOLDER",
    "TENANT_RE",
    "TLS_MODES",
    "USERNAME_FILTERS",
    "CacheConfig",
    "Config",
    "ConfigError",
    "DomainConfig",
    "EndpointConfig",
    "HttpConfig",
    "IntrospectionAuth",
    "KeyLines",
    "LoggingConfig",
    "ProviderConfig",
    "RuleConfig",
    "ServerConfig",
    "TlsMode",
    "claim_warnings",
    "is_loopback",
    "load_config",
    "parse_config",
    "resolve_config_path",
    "suggest",
    "unknown_message",
]
