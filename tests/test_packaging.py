"""The wheel: built from this tree, installed into a fresh venv, its command works.

The venv gets the wheel alone (``--no-deps --no-index``); its dependencies
come from the test environment through a ``.pth`` line, so that the test
needs no package index. What is imported is the wheel's copy, not this
checkout's: that is asserted.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("saslauthd_oidc-*.whl")
    return built


def test_wheel_holds_the_package_and_the_command(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "saslauthd_oidc/service/systemd.py" in names
    assert "saslauthd_oidc/frontends/dovecot.py" in names
    assert not any(n.startswith("tests/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "saslauthd-oidc = saslauthd_oidc.tools.cli:main" in text


def test_wheel_installs_into_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(target)
    python = target / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True
    )
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the dependencies (trio, httpx, ...) from the test environment
    Path(site, "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    command = target / "bin" / "saslauthd-oidc"
    where = subprocess.run(
        [python, "-c", "import saslauthd_oidc; print(saslauthd_oidc.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert where.startswith(site)
    help_text = subprocess.run(
        [command, "--help"], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout
    assert "check-config" in help_text and "serve" in help_text
    checked = subprocess.run(
        [command, "check-config", "--config", str(ROOT / "etc" / "saslauthd-oidc.toml")],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines()[0].endswith(": ok")
