"""etc/saslauthd-oidc.toml is the complete reference: every key the parser knows is there."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from saslauthd_oidc.config import (
    CacheConfig,
    DomainConfig,
    HttpConfig,
    LoggingConfig,
    ProviderConfig,
    RuleConfig,
    ServerConfig,
)

REFERENCE = Path(__file__).resolve().parent.parent / "etc" / "saslauthd-oidc.toml"

SECTIONS = {
    "server": ServerConfig,
    "cache": CacheConfig,
    "http": HttpConfig,
    "logging": LoggingConfig,
    "provider": ProviderConfig,
    "rule": RuleConfig,
    "domain": DomainConfig,
}


def documented_keys() -> dict[str, set[str]]:
    """Keys set or shown commented-out (``# key = …``) under each section header."""
    found: dict[str, set[str]] = {name: set() for name in SECTIONS}
    section: str | None = None
    for line in REFERENCE.read_text().splitlines():
        header = re.match(r"^#?\s*\[\[?(\w+)\]\]?\s*(#.*)?$", line)
        if header and header.group(1) in SECTIONS:
            section = header.group(1)
            continue
        key = re.match(r"^#?\s{0,1}(\w+)\s*=", line)
        if section is not None and key:
            found[section].add(key.group(1))
    return found


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_key_is_documented(section: str) -> None:
    known = {f.name for f in dataclasses.fields(SECTIONS[section]) if not f.metadata.get("derived")}
    missing = known - documented_keys()[section]
    assert not missing, f"[{section}] keys missing from {REFERENCE.name}: {sorted(missing)}"
