"""Build script: pure Python by default; mypyc-compiled with ``SASLAUTHD_OIDC_COMPILE=1``.

The metadata is in pyproject.toml. This file only adds the compiled modules
(``saslauthd_oidc/service/build.py``'s ``MYPYC_MODULES``) when compiling was
asked for: then a C compiler, the Python headers and mypy are needed (mypy
is asked for through ``setup_requires``, which setuptools' PEP 517 backend
turns into a build requirement, since ``[build-system] requires`` cannot
depend on the environment), and a failure to compile fails the build rather
than falling back. Editable
installs are always pure: a compiled module in the source tree would shadow
edits to its ``.py`` file.
"""

from __future__ import annotations

import ast
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from setuptools import setup

HERE = Path(__file__).resolve().parent
MYPY = "mypy>=1.10"


def mypyc_modules() -> list[str]:
    """MYPYC_MODULES as file paths, read without importing the package."""
    tree = ast.parse((HERE / "saslauthd_oidc" / "service" / "build.py").read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "MYPYC_MODULES"
            and node.value is not None
        ):
            names = ast.literal_eval(node.value)
            return [name.replace(".", "/") + ".py" for name in names]
    raise SystemExit("setup.py: MYPYC_MODULES not found in saslauthd_oidc/service/build.py")


def compile_requested() -> bool:
    value = os.environ.get("SASLAUTHD_OIDC_COMPILE", "").strip().lower()
    if value in ("", "0", "no", "false"):
        return False
    if value in ("1", "yes", "true"):
        return True
    raise SystemExit(f"setup.py: SASLAUTHD_OIDC_COMPILE must be 0 or 1, not {value!r}")


# Only the commands that build the extensions compile: metadata, sdist and
# editable_wheel (pip install -e) stay pure whatever the variable says.
_BUILDS = frozenset({"bdist_wheel", "build", "build_ext", "install"})


def main() -> None:
    kwargs: dict[str, Any] = {}
    if compile_requested():
        kwargs["setup_requires"] = [MYPY]
    if compile_requested() and _BUILDS.intersection(sys.argv[1:]):
        from mypyc.build import mypycify  # noqa: PLC0415 - only there when compiling

        # A fresh build directory: pip builds in the source tree, and a stale
        # build/ there could hand over objects of older sources.
        build_base = tempfile.mkdtemp(prefix="saslauthd-oidc-mypyc-")
        atexit.register(shutil.rmtree, build_base, ignore_errors=True)
        # pip may build the wheel before it installs the dependencies, where
        # mypy cannot see them: their types are then Any, which compiles to the
        # same (dynamic) calls. tests/test_lint.py is the strict type check.
        kwargs["ext_modules"] = mypycify(
            ["--ignore-missing-imports", *mypyc_modules()],
            opt_level="3",
            debug_level="0",
            target_dir=build_base,
        )
        kwargs["options"] = {"build": {"build_base": build_base}}

    setup(**kwargs)


if __name__ == "__main__":  # setuptools runs it so
    main()
