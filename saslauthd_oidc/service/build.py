"""Which build of the package runs: mypyc-compiled modules or the interpreted source.

:data:`MYPYC_MODULES` is the list ``setup.py`` compiles when asked to
(``SASLAUTHD_OIDC_COMPILE=1``, see the README). What runs is read from the
imported modules themselves (a compiled module's ``__file__`` is a shared
object), never from a flag written at build time, so a build that fell back to
the ``.py`` files says so.
"""

from __future__ import annotations

import importlib
from typing import Final

#: The strictly typed modules on the hot path that mypyc compiles: the pure
#: cores, the engine and its cache, and the Dovecot socket's reactor. Each one
#: is here because an interleaved benchmark showed it pays (bench/run-all
#: --compare HEAD --head-package-from .venv-compiled); a test that patches a
#: function of one of them sees no effect from the compiled callers.
MYPYC_MODULES: Final = (
    "saslauthd_oidc.core.outcome",
    "saslauthd_oidc.core.request",
    "saslauthd_oidc.core.identity",
    "saslauthd_oidc.core.rules",
    "saslauthd_oidc.core.engine",
    "saslauthd_oidc.protocol.sasl",
    "saslauthd_oidc.protocol.dovecot",
    "saslauthd_oidc.protocol.saslauthd",
    "saslauthd_oidc.providers.jwt",
    "saslauthd_oidc.providers.verification_cache",
    "saslauthd_oidc.frontends.reactor",
)

_EXTENSION_SUFFIXES: Final = (".so", ".pyd")


def compiled_modules() -> tuple[str, ...]:
    """The modules of :data:`MYPYC_MODULES` that were imported from a shared object."""
    found = []
    for name in MYPYC_MODULES:
        path = getattr(importlib.import_module(name), "__file__", None) or ""
        if path.endswith(_EXTENSION_SUFFIXES):
            found.append(name)
    return tuple(found)


def describe() -> str:
    """``compiled: mypyc, 11 modules``, ``interpreted``, or a partial ``… 3 of 11 modules``."""
    compiled = len(compiled_modules())
    if compiled == 0:
        return "interpreted"
    if compiled == len(MYPYC_MODULES):
        return f"compiled: mypyc, {compiled} modules"
    return f"compiled: mypyc, {compiled} of {len(MYPYC_MODULES)} modules"
