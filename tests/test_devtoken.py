"""Trying rules before the IdP is wired: dev-token mints, explain and auth-test judge.

``saslauthd-oidc dev --kanidm webmail --authentik mail`` serves one dev issuer
with per-client issuers shaped like Kanidm's and Authentik's; ``dev-token``
mints tokens with its keys from another process, as an admin would.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CLI = [sys.executable, "-m", "saslauthd_oidc"]
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_recipe(name: str) -> list[list[str]]:
    """The commands of the README's ``<!-- recipe: name -->`` block, continuation lines joined."""
    text = README.read_text("utf-8")
    marker = f"<!-- recipe: {name} -->"
    assert marker in text, marker
    block = text.split(marker, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        assert words[0] == "saslauthd-oidc", line
        commands.append(words[1:])
    return commands


def recipe_command(name: str) -> list[str]:
    [command] = [c for c in readme_recipe("dev-token") if c[0] == name]
    return command


def in_dir(command: list[str], workdir: Path) -> list[str]:
    """A README command with its paths moved from /tmp/saslauthd-oidc-dev to ``workdir``."""
    return [a.replace("/tmp/saslauthd-oidc-dev", str(workdir)) for a in command]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, input=stdin, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    workdir = tmp_path_factory.mktemp("devtoken")
    log = (workdir / "dev.log").open("wb")
    command = recipe_command("dev")
    # The README's fixed --issuer-port would collide with parallel runs: any free port.
    port = command.index("--issuer-port")
    command[port + 1] = "0"
    proc = subprocess.Popen(
        [*CLI, *command, "--dir", str(workdir)], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while not ((workdir / "token").exists() and (workdir / "auth").exists()):
        assert proc.poll() is None, (workdir / "dev.log").read_text()
        assert time.monotonic() < deadline, (workdir / "dev.log").read_text()
        time.sleep(0.05)
    yield workdir
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 0
    log.close()
    assert not (workdir / "issuer.json").exists()  # its keys died with it
    r = run("dev-token", "--dir", str(workdir))
    assert r.returncode == 2 and "start `saslauthd-oidc dev" in r.stderr


def mint(dev: Path, *args: str) -> str:
    r = run("dev-token", "--dir", str(dev), *args)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.count(".") == 2
    return token


def explain(dev: Path, token: str, *args: str) -> tuple[int, dict[str, Any]]:
    r = run(
        "explain",
        "--config",
        str(dev / "saslauthd-oidc.toml"),
        "--token",
        "-",
        "--json",
        *args,
        stdin=token,
    )
    assert r.returncode in (0, 1, 3), r.stderr
    assert token not in r.stdout + r.stderr
    return r.returncode, json.loads(r.stdout)


def test_the_readme_recipe_as_written(dev: Path, tmp_path: Path) -> None:
    mint_command = recipe_command("dev-token")
    assert mint_command[-2] == ">"  # "> bob.token"
    r = run(*mint_command[:-2], "--dir", str(dev))
    assert r.returncode == 0, r.stderr
    (tmp_path / "bob.token").write_text(r.stdout)
    for name in ("explain", "auth-test"):
        command = [
            a.replace("@bob.token", f"@{tmp_path / 'bob.token'}")
            for a in in_dir(recipe_command(name), dev)
        ]
        r = run(*command)
        assert r.returncode == 0, (name, r.stdout, r.stderr)
        assert "bob@example.org" in r.stdout


def test_the_keys_file_is_private(dev: Path) -> None:
    assert (dev / "issuer.json").stat().st_mode & 0o077 == 0


def test_dev_config_has_the_kanidm_and_authentik_shaped_issuers(dev: Path) -> None:
    r = run("check-config", "--config", str(dev / "saslauthd-oidc.toml"), "--online")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "provider kanidm-webmail: keys: ok" in r.stdout
    assert "provider authentik-mail: keys: ok" in r.stdout
    text = (dev / "dev.log").read_text()
    assert "dev-token --dir" in text


@pytest.mark.parametrize(
    ("issuer", "aud", "rule", "iss_tail"),
    [
        ("kanidm:webmail", "webmail", "kanidm-webmail", "/oauth2/openid/webmail"),
        ("authentik:mail", "mail", "authentik-mail", "/application/o/mail/"),
        (None, "mail", "dev", ""),
    ],
)
def test_minted_tokens_pass_explain_and_auth_test(
    dev: Path, issuer: str | None, aud: str, rule: str, iss_tail: str
) -> None:
    args = ["--sub", "bob", "--email", "bob@example.org", "--aud", aud]
    if issuer:
        args += ["--issuer", issuer]
    token = mint(dev, *args)
    code, data = explain(dev, token, "--user", "bob@example.org")
    assert code == 0, data
    assert (data["rule"], data["account"]) == (rule, "bob@example.org")
    assert data["token_facts"]["iss"].endswith(iss_tail)
    assert data["token_facts"]["sub"] == "bob"
    r = run(
        "auth-test",
        "--socket",
        str(dev / "auth"),
        "--token",
        "-",
        "--user",
        "bob@example.org",
        stdin=token,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "result: ok user=bob@example.org" in r.stdout


def test_minted_claims_reach_the_rules(dev: Path) -> None:
    token = mint(
        dev,
        "--issuer",
        "kanidm:webmail",
        "--aud",
        "webmail",
        "--aud",
        "other",
        "--azp",
        "stranger",
        "--scope",
        "openid",
        "--typ",
        "none",
        "--claim",
        'groups=["mail"]',
    )
    code, data = explain(dev, token)
    assert code == 1
    assert data["reason"] == "untrusted_authorized_party"
    facts = data["token_facts"]
    assert facts["aud"] == ["webmail", "other"]
    assert (facts["azp"], facts["scope"]) == ("stranger", "openid")
    assert "typ" not in facts


def test_expired_and_wrong_audience_tokens_are_refused(dev: Path) -> None:
    r = run("dev-token", "--dir", str(dev), "--issuer", "authentik:mail", "--expires-in", "-180")
    assert r.returncode == 0 and "expired 180 s ago" in r.stderr
    code, data = explain(dev, r.stdout.strip())
    assert (code, data["reason"]) == (1, "expired")
    assert "expired 3 min ago" in data["token_facts"]["exp_relative"]
    code, data = explain(dev, mint(dev, "--issuer", "kanidm:webmail", "--aud", "calendar"))
    assert (code, data["reason"]) == (1, "wrong_audience")


def test_issuer_not_served_by_the_dev_issuer_is_noted(dev: Path) -> None:
    r = run(
        "dev-token",
        "--dir",
        str(dev),
        "--issuer",
        "https://idm.example.com/oauth2/openid/webmail",
        "--aud",
        "webmail",
    )
    assert r.returncode == 0
    assert "not served by the dev issuer" in r.stderr
    code, data = explain(dev, r.stdout.strip())
    assert (code, data["reason"]) == (1, "unknown_issuer")
    assert "host idm.example.com vs configured 127.0.0.1" in data["hint"]


def test_dev_token_without_a_dev_issuer_is_a_usage_error(tmp_path: Path) -> None:
    r = run("dev-token", "--dir", str(tmp_path))
    assert r.returncode == 2
    assert "saslauthd-oidc dev --dir" in r.stderr and "Traceback" not in r.stderr
    r = run("dev-token", "--dir", str(tmp_path), "--claim", "novalue")
    assert r.returncode == 2 and "NAME=VALUE" in r.stderr
