"""The defaults the documentation states are the parser's.

The parser's defaults are the config dataclasses' field defaults (one place).
``etc/saslauthd-oidc.toml`` says "every setting below shows its default unless
it says 'example'", and README's configuration reference has a default column:
both are read here and held to what the parser gives when a key is left out.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from saslauthd_oidc.config import (
    CacheConfig,
    Config,
    ConfigError,
    DomainConfig,
    HttpConfig,
    LoggingConfig,
    ProviderConfig,
    RuleConfig,
    ServerConfig,
    parse_config,
)

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "etc" / "saslauthd-oidc.toml"
README = ROOT / "README.md"

CLASSES: dict[str, type[Any]] = {
    "server": ServerConfig,
    "cache": CacheConfig,
    "http": HttpConfig,
    "logging": LoggingConfig,
    "provider": ProviderConfig,
    "rule": RuleConfig,
    "domain": DomainConfig,
}
#: A valid configuration of the fewest keys; each checked key is set on top of it.
MINIMAL: dict[str, Any] = {
    "provider": [{"name": "p", "issuer": "https://idp.example.org"}],
    "rule": [{"provider": "p", "audiences": ["mail"]}],
    "domain": [{"name": "example.org", "imap": "imap.example.org"}],
}


def section_of(cfg: Config, section: str) -> Any:
    if section in ("provider", "rule", "domain"):
        return {"provider": cfg.providers, "rule": cfg.rules, "domain": cfg.domains}[section][0]
    return getattr(cfg, section)


def parsed_with(section: str, key: str, value: Any) -> Any:
    """The value of ``section.key`` that the parser gives for ``key = value`` alone."""
    data: dict[str, Any] = {k: [dict(v[0])] for k, v in MINIMAL.items()}
    if section in data:
        data[section][0][key] = value
    else:
        data[section] = {key: value}
    return getattr(section_of(parse_config(data), section), key)


def default_of(section: str, key: str) -> Any:
    """What the parser gives for ``section.key`` when the key is left out."""
    return getattr(section_of(parse_config(MINIMAL), section), key)


def has_default(section: str, key: str) -> bool:
    """Whether leaving ``section.key`` out gives a value the documentation can show.

    Not: required keys and those of :data:`MINIMAL`; unset ones (None, or computed
    when None: max_connections within the descriptor budget, introspection_cache_ttl
    30 s or [cache] ttl); conditions that hold when empty (``()``, ``{}``); a
    rule's generated name.
    """
    field = next((f for f in fields(CLASSES[section]) if f.name == key), None)
    if field is None or key in (MINIMAL.get(section) or [{}])[0] or key == "name":
        return False
    return default_of(section, key) not in (None, (), {})


def stated_defaults() -> list[tuple[str, str, Any, str]]:
    """``(section, key, value, line)`` of every reference line that shows a default:
    ``key = value`` set or commented out, not marked "example", whose value is TOML,
    for a key that has a default to show."""
    found = []
    section: str | None = None
    for line in REFERENCE.read_text().splitlines():
        header = re.match(r"^#?\s*\[\[?(\w+)\]\]?\s*(#.*)?$", line)
        if header and header.group(1) in CLASSES:
            section = header.group(1)
            continue
        setting = re.match(r"^(?:# ?)?(\w+)\s*=\s*(.*)$", line)
        if section is None or setting is None or "example" in line.lower():
            continue
        key, rest = setting.groups()
        if not has_default(section, key):
            continue
        try:
            value = tomllib.loads(f"v = {rest}")["v"]
        except tomllib.TOMLDecodeError:
            continue  # prose after the "=": a sentence about the key, not a setting
        found.append((section, key, value, line.strip()))
    return found


def test_the_reference_states_defaults() -> None:
    """The scan below finds the settings, so its checks are not vacuous."""
    keys = {(section, key) for section, key, _value, _line in stated_defaults()}
    assert len(keys) >= 40, sorted(keys)
    assert {("server", "request_timeout"), ("provider", "jwks_refresh")} <= keys
    assert {("rule", "authzid"), ("domain", "max_age"), ("logging", "format")} <= keys


@pytest.mark.parametrize(
    ("section", "key", "value", "line"),
    stated_defaults(),
    ids=[f"{s}.{k}" for s, k, _v, _l in stated_defaults()],
)
def test_what_the_reference_shows_is_the_default(
    section: str, key: str, value: Any, line: str
) -> None:
    assert parsed_with(section, key, value) == default_of(section, key), f"{REFERENCE.name}: {line}"


def readme_defaults() -> list[tuple[str, str, str]]:
    """``(section, key, default)`` of the README table's cells whose default is a
    backticked TOML value, paired key by key where a row lists several."""
    text = README.read_text()
    table = text[text.index("## Configuration reference") :]
    found = []
    section = ""
    rows = table.splitlines()
    start = next(i for i, row in enumerate(rows) if row.startswith("| section"))
    for row in rows[start + 2 :]:
        if not row.startswith("|"):
            break
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) < 3:
            continue
        if cells[0]:
            section = cells[0].strip("`[]")
        keys = re.findall(r"`(\w+)`", cells[1])
        defaults = [d.strip() for d in re.split(r",\s+(?=[^\]]*(?:\[|$))", cells[2])]
        if len(keys) != len(defaults):
            continue
        for key, default in zip(keys, defaults, strict=True):
            quoted = re.fullmatch(r"`([^`]+)`", default)
            if quoted and section in CLASSES and has_default(section, key):
                found.append((section, key, quoted.group(1)))
    return found


def test_the_readme_table_states_defaults() -> None:
    keys = {(section, key) for section, key, _default in readme_defaults()}
    assert len(keys) >= 25, sorted(keys)
    assert {("server", "tempfail"), ("cache", "ttl"), ("domain", "max_age")} <= keys


@pytest.mark.parametrize(
    ("section", "key", "default"),
    readme_defaults(),
    ids=[f"{s}.{k}" for s, k, _d in readme_defaults()],
)
def test_what_the_readme_table_says_is_the_default(section: str, key: str, default: str) -> None:
    try:
        value = tomllib.loads(f"v = {default}")["v"]
    except tomllib.TOMLDecodeError:
        value = default  # a bare path, as auth_socket's
    expected = default_of(section, key)
    try:
        parsed = parsed_with(section, key, value)
    except ConfigError as exc:
        pytest.fail(f"README: {section}.{key} default `{default}` does not parse: {exc}")
    assert parsed == expected, f"README: {section}.{key} default `{default}`"
