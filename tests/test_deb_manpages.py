"""saslauthd-oidc(8) and saslauthd-oidc.toml(5) come from --help's parser and the reference config.

contrib/manpages.py writes them at package build time (debian/rules); these
tests check that every subcommand, every option and every key is in them,
that an option or key added later shows up without touching the generator,
and that groff reads the pages without a warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from saslauthd_oidc.config import (
    CacheConfig,
    HttpConfig,
    LoggingConfig,
    ProviderConfig,
    RuleConfig,
    ServerConfig,
)
from saslauthd_oidc.tools import cli
from tests.conftest import require_peer

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "etc" / "saslauthd-oidc.toml"
SECTIONS = {
    "server": ServerConfig,
    "cache": CacheConfig,
    "http": HttpConfig,
    "logging": LoggingConfig,
    "provider": ProviderConfig,
    "rule": RuleConfig,
}


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("manpages", ROOT / "contrib" / "manpages.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["manpages"] = module
    spec.loader.exec_module(module)
    return module


manpages = load_generator()


def unroff(text: str) -> str:
    """The words of a page, without the font escapes."""
    return text.replace("\\-", "-").replace("\\fB", "").replace("\\fI", "").replace("\\fR", "")


def every_option(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: [s for a in p._actions for s in a.option_strings if s not in ("-h", "--help")]
        for name, p in sub.choices.items()
    }


def test_page8_has_every_subcommand_and_option() -> None:
    parser = cli.build_parser()
    page = unroff(manpages.page8(parser, "1.0", "2026-01-01"))
    options = every_option(parser)
    assert {"serve", "check-config", "explain", "auth-test", "reload"} <= set(options)
    for command, flags in options.items():
        assert f".SS {command}\n" in page, command
        section = page.split(f".SS {command}\n", 1)[1].split(".SS ", 1)[0].split(".SH ", 1)[0]
        for flag in flags:
            assert flag in section, f"{command} {flag}"
    assert "--version" in page


def test_an_option_added_later_is_picked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    original = cli.build_parser

    def extended() -> argparse.ArgumentParser:
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices["serve"].add_argument("--brand-new-option", help="added by another engineer")
        extra = sub.add_parser("brand-new-command", help="also new")
        extra.add_argument("--its-flag", metavar="X")
        return parser

    monkeypatch.setattr(cli, "build_parser", extended)
    page = unroff(manpages.page8(cli.build_parser(), "1.0", "2026-01-01"))
    assert "--brand-new-option" in page and "added by another engineer" in page
    assert ".SS brand-new-command" in page and "--its-flag X" in page


def documented(page: str) -> dict[str, set[str]]:
    """Section -> keys a page lists (``.TP`` entries ``key = value``) under its ``.SH`` header."""
    found: dict[str, set[str]] = {}
    section = None
    lines = page.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(".SH ["):
            section = line[4:].strip("[]")
            found[section] = set()
        elif line == ".TP" and section is not None:
            entry = unroff(lines[i + 1])
            found[section].add(entry.split(" = ", 1)[0].strip())
    return found


def test_page5_has_every_key_of_every_section() -> None:
    page = manpages.page5(REFERENCE.read_text(), "1.0", "2026-01-01")
    listed = documented(page)
    for section, cls in SECTIONS.items():
        known = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
        missing = known - listed.get(section, set())
        assert not missing, (
            f"[{section}] keys missing from saslauthd-oidc.toml(5): {sorted(missing)}"
        )
    # Prose that merely contains "=" is not taken for a key.
    assert "smtpd_sasl_type" not in listed["server"]


def test_a_key_added_to_the_reference_is_picked_up() -> None:
    text = REFERENCE.read_text().replace(
        "[cache]\n", "[cache]\n# What the new key does.\nbrand_new_key = 7   # example\n", 1
    )
    page = manpages.page5(text, "1.0", "2026-01-01")
    assert "brand_new_key" in documented(page)["cache"]
    assert "What the new key does." in unroff(page)


def test_groff_reads_both_pages_without_warnings(tmp_path: Path) -> None:
    groff = shutil.which("groff")
    require_peer("groff", None if groff else "not installed (Debian: groff-base)")
    assert groff
    assert (
        manpages.main(["--outdir", str(tmp_path), "--version", "1.0", "--date", "2026-01-01"]) == 0
    )
    for name in ("saslauthd-oidc.8", "saslauthd-oidc.toml.5"):
        result = subprocess.run(
            [groff, "-man", "-Tutf8", "-ww", "-z", str(tmp_path / name)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0 and result.stderr == "", (name, result.stderr)
