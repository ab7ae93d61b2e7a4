"""debian/: the lock pins what pyproject.toml asks for; the conffile is the reference, unarmed.

The package itself is built and run under systemd in tests/test_systemd_deb.py;
these are the quick checks of its inputs.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import re
import runpy
import tomllib
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from saslauthd_oidc.config import ConfigError, parse_config
from tests.test_reference_config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
DEBIAN = ROOT / "debian"
LOCK = DEBIAN / "requirements.lock"


def pins() -> dict[str, tuple[str, list[str]]]:
    """Package -> (version, hashes) from the lock (pip-compile --generate-hashes)."""
    found: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in LOCK.read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9._-]+)==([^ \\]+)", line)
        if pin:
            current = canonicalize_name(pin.group(1))
            found[current] = (pin.group(2), [])
        hashed = re.match(r"^\s+--hash=sha256:([0-9a-f]{64})", line)
        if hashed and current:
            found[current][1].append(hashed.group(1))
    return found


def test_lock_pins_every_dependency_within_pyprojects_bounds_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    locked = pins()
    wanted = [Requirement(r) for r in project["project"]["dependencies"]]
    wanted += [Requirement(r) for r in project["build-system"]["requires"]]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in {LOCK.name}"
        version, _ = locked[name]
        assert req.specifier.contains(version, prereleases=True), f"{req}: locked {version}"
    for locked_name, (version, hashes) in locked.items():
        assert hashes, f"{locked_name}=={version} has no --hash in {LOCK.name}"


def test_rules_build_with_debians_python_and_the_lock_only() -> None:
    rules = (DEBIAN / "rules").read_text()
    assert "--builtin-venv --python $(PYTHON)" in rules
    assert "PYTHON := /usr/bin/python3" in rules
    assert "--requirements debian/requirements.lock" in rules
    assert "--extra-pip-arg=--no-deps" in rules  # nothing but the lock is installed


def test_the_package_is_compiled_with_the_mypy_of_the_lock() -> None:
    """debian/rules builds with SASLAUTHD_OIDC_COMPILE=1; the lock pins setup.py's mypy."""
    rules = (DEBIAN / "rules").read_text()
    assert "SASLAUTHD_OIDC_COMPILE=1 dh_virtualenv" in rules
    assert "build.compiled_modules() != build.MYPYC_MODULES" in rules  # no quiet fallback
    control = (DEBIAN / "control").read_text()
    assert "python3-dev" in control.split("Standards-Version")[0]
    setup_py = runpy.run_path(str(ROOT / "setup.py"), run_name="setup")
    mypy = Requirement(setup_py["MYPY"])
    version, _ = pins()[canonicalize_name(mypy.name)]
    assert mypy.specifier.contains(version)
    # What compiles the package is removed from the venv it ships.
    removed = re.search(r"MYPY_PACKAGES := (.*)", rules)
    assert removed and "pip uninstall --yes --quiet $(MYPY_PACKAGES)" in rules
    for dist in removed.group(1).split():
        assert canonicalize_name(dist) in pins(), dist


def load_make_conffile() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("make_conffile", str(DEBIAN / "make-conffile"))
    spec = importlib.util.spec_from_loader("make_conffile", loader)
    assert spec
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_conffile_is_the_reference_with_no_provider_or_rule_yet() -> None:
    reference = (ROOT / "etc" / "saslauthd-oidc.toml").read_text()
    text = load_make_conffile().conffile(reference)
    data = tomllib.loads(text)
    assert "provider" not in data and "rule" not in data
    assert data["server"]["auth_socket"] == "/run/saslauthd-oidc/auth"
    # Every key is still there to uncomment (the same reading as test_reference_config).
    seen: dict[str, set[str]] = {name: set() for name in SECTIONS}
    section = None
    for line in text.splitlines():
        header = re.match(r"^#?\s*\[\[?(\w+)\]\]?\s*(#.*)?$", line)
        if header and header.group(1) in SECTIONS:
            section = header.group(1)
            continue
        key = re.match(r"^#?\s{0,1}(\w+)\s*=", line)
        if section is not None and key:
            seen[section].add(key.group(1))
    for name, cls in SECTIONS.items():
        settings = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
        missing = settings - seen[name]
        assert not missing, (name, missing)
    # As shipped it is refused naming the key: the daemon starts only once configured.
    try:
        parse_config(data)
    except ConfigError as exc:
        assert exc.key == "rule"
    else:
        raise AssertionError("the shipped configuration must not be accepted as is")
    assert "systemctl restart saslauthd-oidc" in text


def test_lintian_overrides_each_have_a_reason() -> None:
    text = (DEBIAN / "saslauthd-oidc.lintian-overrides").read_text()
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert blocks
    for block in blocks:
        assert block.lstrip().startswith("#"), f"override without a reason:\n{block}"
        assert any(not line.startswith("#") for line in block.splitlines()), block
