"""setuptools' build backend, with mypy added to the requirements when compiling.

``[build-system] requires`` cannot depend on the environment, so the pure
build (the default) needs only setuptools, and ``SASLAUTHD_OIDC_COMPILE=1``
asks for mypy (which ships mypyc) here. Editable builds are always pure
(setup.py compiles only in the commands that build extensions).
"""

from __future__ import annotations

import os
from typing import Any

from setuptools import build_meta as _meta
from setuptools.build_meta import *  # noqa: F403 - this module is setuptools' backend

MYPY = "mypy>=1.10"


def _compiling() -> bool:
    return os.environ.get("SASLAUTHD_OIDC_COMPILE", "").strip().lower() in ("1", "yes", "true")


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    extra = [MYPY] if _compiling() else []
    return [*_meta.get_requires_for_build_wheel(config_settings), *extra]
