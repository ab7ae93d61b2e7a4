"""contrib/systemd: the units pass ``systemd-analyze verify`` and say what the daemon expects."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_peer

UNITS = Path(__file__).resolve().parents[1] / "contrib" / "systemd"
INSTALLED_AT = "/usr/local/bin/saslauthd-oidc"


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    require_peer("systemd-analyze", None if analyze else "not installed (Debian: systemd)")
    assert analyze
    # verify checks that ExecStart= exists: point it at this checkout's command.
    command = Path(sys.executable).parent / "saslauthd-oidc"
    assert command.exists()
    for path in UNITS.iterdir():
        text = path.read_text()
        (tmp_path / path.name).write_text(text.replace(INSTALLED_AT, str(command)))
    files = sorted(str(p) for p in tmp_path.iterdir())
    # verify also looks up Documentation=man:saslauthd-oidc(8): the pages
    # the package builds (contrib/manpages.py), on MANPATH.
    man = tmp_path / "man"
    subprocess.run(
        [sys.executable, str(UNITS.parent / "manpages.py"), "--outdir", str(man / "pages")],
        check=True,
    )
    for page in (man / "pages").iterdir():
        section = man / f"man{page.suffix[1:]}"
        section.mkdir(exist_ok=True)
        page.rename(section / page.name)
    result = subprocess.run(
        [analyze, "verify", *files],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
        env={**os.environ, "MANPATH": f"{man}:"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""


def test_service_is_type_notify_unprivileged_and_hardened() -> None:
    service = unit("saslauthd-oidc.service")["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"].startswith(f"{INSTALLED_AT} serve --config ")
    # No /bin/kill (procps is not in minimal images): the command itself
    # signals the daemon and waits for its answer.
    assert service["ExecReload"].startswith(f"{INSTALLED_AT} reload --pid $MAINPID --config ")
    assert "ExecStartPre" not in service  # RestartPreventExitStatus= sees only ExecStart=
    assert service["User"] == "saslauthd-oidc"
    assert service["CapabilityBoundingSet"] == ""
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }.items():
        assert service[key] == value, key
    assert "@system-service" in (UNITS / "saslauthd-oidc.service").read_text()
    assert "WatchdogSec" in service


@pytest.mark.parametrize(
    ("name", "fdname"),
    [
        ("saslauthd-oidc.socket", "auth"),
        ("saslauthd-oidc-saslauthd.socket", "saslauthd"),
        ("saslauthd-oidc-http.socket", "http"),
    ],
)
def test_socket_units_name_their_sockets(name: str, fdname: str) -> None:
    socket = unit(name)["Socket"]
    assert socket["FileDescriptorName"] == fdname
    assert socket["Service"] == "saslauthd-oidc.service"


def test_a_config_error_is_final_and_stops_the_sockets() -> None:
    """Exit 2 is not restarted; ExecStopPost stops the sockets (no re-trigger loop)."""
    service = unit("saslauthd-oidc.service")
    assert service["Service"]["Restart"] == "on-failure"
    assert service["Service"]["RestartPreventExitStatus"] == "2"
    stop_post = service["Service"]["ExecStopPost"]
    assert stop_post.startswith("+/bin/sh -c ")  # as root: it stops units
    assert '"$$EXIT_STATUS" = 2' in stop_post
    for name in (
        "saslauthd-oidc.socket",
        "saslauthd-oidc-saslauthd.socket",
        "saslauthd-oidc-http.socket",
    ):
        assert name in stop_post
    assert service["Unit"]["Requires"] == "saslauthd-oidc.socket"  # restart starts it again


@pytest.mark.parametrize("name", ["saslauthd-oidc.socket", "saslauthd-oidc-saslauthd.socket"])
def test_unix_sockets_use_the_packages_own_client_group(name: str) -> None:
    """Not postfix (absent on Exim/Cyrus hosts: 216/GROUP), not saslauthd-oidc (reads secrets)."""
    assert unit(name)["Socket"]["SocketGroup"] == "saslauthd-oidc-clients"
