"""The two builds: pure Python (the default) and mypyc-compiled, and which one runs.

``scripts/test`` runs the suite against this checkout's sources (an editable
install); ``scripts/test-compiled`` runs it against a non-editable compiled
build and sets ``SASLAUTHD_OIDC_EXPECT_COMPILED=1``: then every module of
``MYPYC_MODULES`` must have been imported from a shared object, here and in a
daemon the tests start, or these tests fail.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from saslauthd_oidc import __version__
from saslauthd_oidc.service import build

ROOT = Path(__file__).resolve().parents[1]
EXPECT_COMPILED = os.environ.get("SASLAUTHD_OIDC_EXPECT_COMPILED") == "1"


def test_the_modules_to_compile_exist_and_setup_reads_the_same_list() -> None:
    setup_py = runpy.run_path(str(ROOT / "setup.py"), run_name="setup")
    paths = setup_py["mypyc_modules"]()
    assert paths == [m.replace(".", "/") + ".py" for m in build.MYPYC_MODULES]
    for path in paths:
        assert (ROOT / path).is_file(), path


def test_the_build_that_runs_is_the_one_expected() -> None:
    compiled = build.compiled_modules()
    if EXPECT_COMPILED:
        assert compiled == build.MYPYC_MODULES
        assert build.describe() == f"compiled: mypyc, {len(compiled)} modules"
        sources = str(ROOT / "saslauthd_oidc")
        for name in ("saslauthd_oidc", *compiled):
            assert not str(importlib.import_module(name).__file__).startswith(sources)
    else:
        assert compiled == ()
        assert build.describe() == "interpreted"


def test_version_says_which_build_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "saslauthd_oidc", "--version"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,  # the daemon's ``-m`` must not pick this checkout over the build
    ).stdout.strip()
    n = len(build.MYPYC_MODULES)
    expected = f"compiled: mypyc, {n} modules" if EXPECT_COMPILED else "interpreted"
    assert out == f"saslauthd-oidc {__version__} ({expected})"


def test_default_build_is_pure_and_needs_no_compiler(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SASLAUTHD_OIDC_COMPILE"}
    env["CC"] = env["CXX"] = "/bin/false"  # a compiler that always fails
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("saslauthd_oidc-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith((".so", ".pyd", ".c"))]
    for name in build.MYPYC_MODULES:
        assert name.replace(".", "/") + ".py" in names


def test_started_log_line_says_which_build_runs(tmp_path: Path) -> None:
    path = tmp_path / "conf.toml"
    path.write_text(
        f'[server]\nauth_socket = "{tmp_path}/auth"\n[logging]\nformat = "json"\n'
        '[[provider]]\nname = "p"\nissuer = "https://127.0.0.1:1"\n'
        'jwks_uri = "https://127.0.0.1:1/jwks"\n'
        '[[rule]]\nname = "r"\nprovider = "p"\naudiences = ["mail"]\nusername = "{email}"\n'
    )
    log = tmp_path / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "saslauthd_oidc", "serve", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 20
        while b'"event": "started"' not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    started = next(e for e in events if e["event"] == "started")
    n = len(build.MYPYC_MODULES)
    assert started["build"] == (
        f"compiled: mypyc, {n} modules" if EXPECT_COMPILED else "interpreted"
    )
