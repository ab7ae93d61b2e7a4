"""check-config sees what serve will be passed: an enabled saslauthd-oidc-http.socket.

With the shipped [http] defaults (auth required, no users or secret file)
that socket would refuse every /introspect caller, so check-config fails
naming http.auth while the unit is enabled, and passes while it is not.
systemctl is replaced by a stand-in on PATH that answers for that unit;
under a real systemd: tests/test_systemd_deb.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = """
[[provider]]
name = "p"
issuer = "https://idp.example.org"

[[rule]]
name = "r"
provider = "p"
audiences = ["mail"]
"""


def fake_systemctl(bin_dir: Path, enabled: bool) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "systemctl"
    answer = 0 if enabled else 1
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1" = is-enabled ] && [ "$3" = saslauthd-oidc-http.socket ] && '
        f"exit {answer}\n"
        "exit 1\n"
    )
    script.chmod(0o755)


def check_config(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "c.toml"
    path.write_text(config)
    return subprocess.run(
        [sys.executable, "-m", "saslauthd_oidc", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"},
    )


@pytest.mark.parametrize("enabled", [True, False])
def test_enabled_http_socket_without_caller_credentials_fails(
    tmp_path: Path, enabled: bool
) -> None:
    fake_systemctl(tmp_path / "bin", enabled)
    result = check_config(tmp_path, CONFIG)
    if enabled:
        assert result.returncode == 2
        assert "http.auth: saslauthd-oidc-http.socket is enabled" in result.stderr
    else:
        assert result.returncode == 0, result.stderr


def test_enabled_http_socket_with_a_secret_file_passes(tmp_path: Path) -> None:
    fake_systemctl(tmp_path / "bin", True)
    secret = tmp_path / "secret"
    secret.write_text("s3cret-for-dovecot\n")
    secret.chmod(0o600)
    result = check_config(tmp_path, f'[http]\nsecret_file = "{secret}"\n' + CONFIG)
    assert result.returncode == 0, result.stderr
