"""`saslauthd-oidc reload` (systemd's ExecReload=): it fails when the reload was refused.

A real ``serve`` process answers each SIGHUP in ``$RUNTIME_DIRECTORY/reload``
(lifecycle.ReloadReporter); the command checks the file first, signals the
daemon and waits for that answer: exit 0 applied, 2 refused (naming the key),
3 no answer. The same under a real systemd: tests/test_systemd_deb.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from saslauthd_oidc.service.lifecycle import ReloadReport, ReloadReporter, read_reload_report
from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread

COMMAND = [sys.executable, "-m", "saslauthd_oidc"]


def config_text(issuer: str, sock: Path, rule: str = "mail", audiences: str = '["mail"]') -> str:
    return (
        f'[server]\nauth_socket = "{sock}"\n\n'
        f'[[provider]]\nname = "dev"\nissuer = "{issuer}"\nallow_http = true\n\n'
        f'[[rule]]\nname = "{rule}"\nprovider = "dev"\naudiences = {audiences}\n'
    )


def test_report_round_trips_and_garbage_is_no_report(tmp_path: Path) -> None:
    report = ReloadReport(
        generation=3, ok=False, key="rule[0].audiences", message="expected a list"
    )
    assert ReloadReport.parse(report.render()) == report
    for garbage in ("", "{", "[]", '{"generation": true, "ok": true}', '{"generation": 1}'):
        assert ReloadReport.parse(garbage) is None, garbage
    reporter = ReloadReporter(str(tmp_path))
    assert reporter.started()
    assert read_reload_report(str(tmp_path)) == ReloadReport(0, True, None, "started")
    assert reporter.report(True, None, "serving").generation == 1
    assert read_reload_report(str(tmp_path)) == ReloadReport(1, True, None, "serving")
    assert not ReloadReporter(None).started()  # nowhere to write: no error either
    assert read_reload_report(str(tmp_path / "absent")) is None


@pytest.fixture
def issuer() -> Iterator[DevIssuer]:
    with DevIssuerThread(DevIssuer()) as running:
        yield running


@pytest.fixture
def daemon(
    tmp_path: Path, issuer: DevIssuer
) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    assert issuer.issuer
    conf = tmp_path / "daemon.toml"
    conf.write_text(config_text(issuer.issuer, tmp_path / "auth"))
    state = tmp_path / "state"
    state.mkdir()
    proc = subprocess.Popen(
        [*COMMAND, "serve", "--config", str(conf)],
        env={**os.environ, "RUNTIME_DIRECTORY": str(state)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while read_reload_report(str(state)) is None:
        assert proc.poll() is None, "serve exited"
        assert time.monotonic() < deadline, "serve did not start"
        time.sleep(0.05)
    try:
        yield proc, conf, state
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def reload(conf: Path, pid: int, state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *COMMAND,
            "reload",
            "--config",
            str(conf),
            "--pid",
            str(pid),
            "--state-dir",
            str(state),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_good_reload_exits_0_after_the_daemon_applied_it(
    daemon: tuple[subprocess.Popen[bytes], Path, Path], issuer: DevIssuer, tmp_path: Path
) -> None:
    proc, conf, state = daemon
    assert issuer.issuer
    conf.write_text(config_text(issuer.issuer, tmp_path / "auth", rule="renamed"))
    result = reload(conf, proc.pid, state)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("reloaded: serving 1 rules")
    assert read_reload_report(str(state)) == ReloadReport(1, True, None, result.stdout[10:].strip())
    assert proc.poll() is None


def test_broken_file_exits_2_naming_the_key_and_sends_nothing(
    daemon: tuple[subprocess.Popen[bytes], Path, Path], issuer: DevIssuer, tmp_path: Path
) -> None:
    proc, conf, state = daemon
    assert issuer.issuer
    conf.write_text(config_text(issuer.issuer, tmp_path / "auth", audiences="5"))
    result = reload(conf, proc.pid, state)
    assert result.returncode == 2
    assert "rule[0].audiences" in result.stderr
    report = read_reload_report(str(state))
    assert report is not None and report.generation == 0  # the daemon was not asked
    assert proc.poll() is None


def test_reload_the_daemon_refuses_exits_2_with_the_daemons_reason(
    daemon: tuple[subprocess.Popen[bytes], Path, Path], issuer: DevIssuer, tmp_path: Path
) -> None:
    """The file changed between the check and the daemon reading it."""
    proc, conf, state = daemon
    assert issuer.issuer
    good = tmp_path / "checked.toml"
    good.write_text(config_text(issuer.issuer, tmp_path / "auth"))
    conf.write_text(config_text(issuer.issuer, tmp_path / "auth", audiences="5"))
    result = reload(good, proc.pid, state)
    assert result.returncode == 2
    assert "reload refused: rule[0].audiences" in result.stderr
    assert "still serving the previous configuration" in result.stderr
    assert read_reload_report(str(state)) == ReloadReport(
        1, False, "rule[0].audiences", "expected a list of non-empty strings"
    )
    assert proc.poll() is None


def test_no_answer_exits_3(tmp_path: Path, issuer: DevIssuer) -> None:
    assert issuer.issuer
    conf = tmp_path / "c.toml"
    conf.write_text(config_text(issuer.issuer, tmp_path / "auth"))
    deaf = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time\n"
            "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
            "print(flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert deaf.stdout is not None
        deaf.stdout.readline()  # SIGHUP is ignored from here on
        result = reload(conf, deaf.pid, tmp_path, "--timeout", "0.5")
        assert result.returncode == 3
        assert f"no answer from pid {deaf.pid}" in result.stderr
    finally:
        deaf.kill()
        deaf.wait()


def test_without_a_pid_it_is_a_usage_error(tmp_path: Path, issuer: DevIssuer) -> None:
    assert issuer.issuer
    conf = tmp_path / "c.toml"
    conf.write_text(config_text(issuer.issuer, tmp_path / "auth"))
    result = subprocess.run(
        [*COMMAND, "reload", "--config", str(conf)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "--pid" in result.stderr
