"""README recipes: the extraction helper, and that every marked recipe is run by a test."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.peers.groups import CLIENT_GROUP
from tests.recipes import (
    README,
    RecipeError,
    main_cf_settings,
    recipe,
    recipe_names,
    substitute,
)

TESTS = Path(__file__).resolve().parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "README.md"
    p.write_text(text)
    return p


def test_recipe_is_the_fenced_block_after_its_marker(tmp_path: Path) -> None:
    readme = write(
        tmp_path,
        "intro\n<!-- recipe: a -->\n\n```toml\n[server]\nx = 1\n```\n"
        "   <!-- recipe: b -->\n   ```\n   indented\n     more\n   ```\n",
    )
    assert recipe("a", readme) == "[server]\nx = 1\n"
    assert recipe("b", readme) == "indented\n  more\n"
    assert recipe_names(readme) == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no markers here\n", "no '<!-- recipe: a -->' marker"),
        ("<!-- recipe: a -->\ntext, not a block\n", "not followed by a fenced code block"),
        ("<!-- recipe: a -->\n```\nnever closed\n", "not closed"),
        ("<!-- recipe: a -->\n```\nx\n```\n<!-- recipe: a -->\n```\ny\n```\n", "marked twice"),
    ],
)
def test_missing_or_broken_markers_fail_loudly(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(message)):
        recipe("a", write(tmp_path, text))


def test_substitute_refuses_text_the_recipe_no_longer_has() -> None:
    assert substitute("path = /var/x\n", {"/var": "/tmp"}) == "path = /tmp/x\n"
    with pytest.raises(RecipeError, match="no longer contains"):
        substitute("path = /srv/x\n", {"/var": "/tmp"})


def test_main_cf_settings() -> None:
    text = "# comment\nsmtpd_sasl_type = dovecot\nlong = a,\n  b\n\nx=1\n"
    assert main_cf_settings(text) == {"smtpd_sasl_type": "dovecot", "long": "a, b", "x": "1"}
    with pytest.raises(RecipeError):
        main_cf_settings("not a setting\n")


def test_every_readme_recipe_is_run_by_a_test() -> None:
    """A recipe nobody runs can rot: each marker's name appears in a test module."""
    names = recipe_names(README)
    assert names, "README.md marks no recipes"
    sources = "\n".join(
        p.read_text()
        for p in TESTS.rglob("*.py")
        if p.name not in {"test_recipes.py", "recipes.py"}
    )
    unused = [n for n in names if f'"{n}"' not in sources]
    assert not unused, f"recipes no test takes from README.md: {unused}"


def test_one_line_userdb_block_is_what_dovecot_refuses(tmp_path: Path) -> None:
    """Why the README's userdb recipe has one setting per line (evidence from doveconf)."""
    doveconf = shutil.which("doveconf")
    if doveconf is None:
        from tests.conftest import require_peer

        require_peer("doveconf", "not installed (dovecot-core)")
    assert doveconf is not None
    bad = tmp_path / "bad.conf"
    bad.write_text("userdb { driver = static  args = uid=vmail gid=vmail home=/var/vmail/%u }\n")
    res = subprocess.run(
        [doveconf, "-n", "-c", str(bad)], capture_output=True, text=True, check=False
    )
    assert res.returncode != 0 and "Garbage after '{'" in res.stderr, res.stderr
    good = tmp_path / "good.conf"
    good.write_text(substitute(recipe("dovecot.conf"), {"/etc/dovecot/": f"{tmp_path}/"}))
    (tmp_path / "dovecot-oauth2.conf.ext").write_text("tokeninfo_url =\n")
    res = subprocess.run(
        [doveconf, "-n", "-c", str(good)], capture_output=True, text=True, check=False
    )
    assert "Garbage" not in res.stderr, res.stderr
    assert "driver = static" in res.stdout, res.stdout + res.stderr


def _unit_value(unit: Path, key: str) -> str:
    values = [
        line.split("=", 1)[1].strip()
        for line in unit.read_text().splitlines()
        if line.split("=", 1)[0].strip() == key
    ]
    assert len(values) == 1, (unit, key, values)
    return values[0]


def test_saslauthd_socket_group_is_the_same_in_readme_and_shipped_unit() -> None:
    """One group, ``saslauthd-oidc-clients``, in the README's recipe and the socket unit."""
    import tomllib

    server = tomllib.loads(recipe("saslauthd-socket.toml"))["server"]
    unit = README.parent / "contrib" / "systemd" / "saslauthd-oidc-saslauthd.socket"
    assert server["saslauthd_socket_group"] == _unit_value(unit, "SocketGroup") == CLIENT_GROUP
    assert server["saslauthd_socket_mode"] == _unit_value(unit, "SocketMode")
    assert server["saslauthd_socket"] == _unit_value(unit, "ListenStream")
