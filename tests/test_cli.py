"""The command line as an operator uses it: dev mode, auth-test, explain, serve, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from saslauthd_oidc.tools.cli import main
from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread

CLI = [sys.executable, "-m", "saslauthd_oidc"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, input=stdin, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def dev_mode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`saslauthd-oidc dev` as the README's quick start runs it."""
    workdir = tmp_path_factory.mktemp("dev")
    log = (workdir / "dev.log").open("wb")
    proc = subprocess.Popen(
        [*CLI, "dev", "--dir", str(workdir)], stdout=log, stderr=subprocess.STDOUT
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
    assert not (workdir / "auth").exists()


def test_dev_mode_token_is_accepted_by_auth_test(dev_mode: Path) -> None:
    r = run(
        "auth-test",
        "--socket",
        str(dev_mode / "auth"),
        "--token",
        f"@{dev_mode / 'token'}",
        "--user",
        "alice@example.org",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "result: ok user=alice@example.org" in r.stdout
    token = (dev_mode / "token").read_text().strip()
    assert token not in r.stdout
    deadline = time.monotonic() + 5
    while "outcome=ok" not in (log := (dev_mode / "dev.log").read_text()):
        assert time.monotonic() < deadline, log
        time.sleep(0.05)
    assert "reason=ok" in log and "account=alice@example.org" in log
    assert token not in log


def test_dev_mode_prints_how_to_try_it(dev_mode: Path) -> None:
    text = (dev_mode / "dev.log").read_text()
    assert f"auth-test --socket {dev_mode / 'auth'}" in text
    assert "smtpd_sasl_type = dovecot" in text
    assert "--oauth2-bearer" in text


@pytest.mark.parametrize(
    ("user", "mech", "code", "expect"),
    [
        ("bob@example.org", "OAUTHBEARER", 1, "result: fail"),
        ("alice@example.org", "xoauth2", 0, "result: ok"),
    ],
)
def test_auth_test_exit_codes(dev_mode: Path, user: str, mech: str, code: int, expect: str) -> None:
    r = run(
        "auth-test",
        "--socket",
        str(dev_mode / "auth"),
        "--token",
        "-",
        "--user",
        user,
        "--mech",
        mech,
        stdin=(dev_mode / "token").read_text(),
    )
    assert r.returncode == code, r.stdout + r.stderr
    assert expect in r.stdout


def test_auth_test_without_daemon_is_temporary(tmp_path: Path) -> None:
    r = run("auth-test", "--socket", str(tmp_path / "nothing"), "--token", "x")
    assert r.returncode == 3
    assert "auth-test" in r.stderr


def test_dev_config_written_is_a_valid_config(dev_mode: Path) -> None:
    r = run("check-config", "--config", str(dev_mode / "saslauthd-oidc.toml"), "--online")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "provider dev: keys: ok" in r.stdout
    assert "provider dev: introspection: ok" in r.stdout


def test_dev_mode_opaque_token_is_introspected(dev_mode: Path) -> None:
    r = run(
        "auth-test",
        "--socket",
        str(dev_mode / "auth"),
        "--token",
        f"@{dev_mode / 'opaque-token'}",
        "--user",
        "alice@example.org",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok user=alice@example.org" in r.stdout


@pytest.fixture(scope="module")
def issuer() -> Iterator[DevIssuer]:
    with DevIssuerThread(DevIssuer()) as iss:
        yield iss


@pytest.fixture
def config(tmp_path: Path, issuer: DevIssuer) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f"""
[[provider]]
name = "dev"
issuer = "{issuer.issuer}"
allow_http = true

[[rule]]
name = "web"
provider = "dev"
audiences = ["web"]

[[rule]]
name = "mail"
provider = "dev"
audiences = ["mail"]
services = ["smtp"]
"""
    )
    return path


def test_explain_json(config: Path, issuer: DevIssuer, capsys: pytest.CaptureFixture[str]) -> None:
    token = issuer.mint(email="alice@example.org", audience="mail")
    code = main(
        [
            "explain",
            "--config",
            str(config),
            "--token",
            token,
            "--user",
            "alice@example.org",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (out["outcome"], out["rule"], out["account"], out["reason"]) == (
        "ok",
        "mail",
        "alice@example.org",
        "ok",
    )
    assert [(r["rule"], r["matched"], r["reason"]) for r in out["rules"]] == [
        ("web", False, "wrong_audience"),
        ("mail", True, "ok"),
    ]
    assert token not in json.dumps(out)


def test_explain_text_refused(
    config: Path, issuer: DevIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    token = issuer.mint(email="alice@example.org", audience="mail")
    code = main(["explain", "--config", str(config), "--token", token, "--service", "imap"])
    out = capsys.readouterr().out
    assert code == 1
    assert "rule mail" in out and "service 'imap' not in rule" in out
    assert "outcome  fail (wrong_audience)" in out


def test_explain_provider_down_is_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with DevIssuerThread(DevIssuer()) as iss:
        token = iss.mint(email="alice@example.org", audience="mail")
        url = iss.issuer
    path = tmp_path / "c.toml"
    path.write_text(
        f'[[provider]]\nname="d"\nissuer="{url}"\nallow_http=true\n'
        '[[rule]]\nprovider="d"\naudiences=["mail"]\n'
    )
    assert main(["explain", "--config", str(path), "--token", token, "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["outcome"] == "tempfail"


def test_serve_with_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nrequest_timeout = "soon"\n')
    r = run("serve", "--config", str(path))
    assert r.returncode == 2
    assert "server.request_timeout: expected a number" in r.stderr


def test_config_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[[rule]]\nprovider = 'x'\n")
    r = subprocess.run(
        [*CLI, "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SASLAUTHD_OIDC_CONFIG": str(path)},
        check=False,
    )
    assert r.returncode == 2
    assert "rule[0].provider" in r.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run("explain").returncode == 2
    assert run("explain", "--config", "/nonexistent", "--token", "x").returncode == 2
    r = run("auth-test", "--socket", "/x", "--token", "@/nonexistent/file")
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_serve_refuses_a_socket_path_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "auth"
    target.write_text("not a socket")
    path = tmp_path / "c.toml"
    path.write_text(
        f'[server]\nauth_socket = "{target}"\n'
        '[[provider]]\nname="a"\nissuer="https://a.example"\n'
        '[[rule]]\nprovider="a"\naudiences=["x"]\n'
    )
    r = run("serve", "--config", str(path))
    assert r.returncode == 2
    assert "server.auth_socket" in r.stderr and "is not a socket" in r.stderr
    assert "Traceback" not in r.stderr
    assert target.read_text() == "not a socket"  # changed nothing


def test_dev_refuses_a_socket_in_use(dev_mode: Path) -> None:
    token = (dev_mode / "token").read_text()
    r = run("dev", "--dir", str(dev_mode))
    assert r.returncode == 2
    assert "in use by another process" in r.stderr
    assert (dev_mode / "token").read_text() == token  # the running instance is untouched
