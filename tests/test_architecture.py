"""The import rule of docs/ARCHITECTURE.md, checked by parsing every module's imports.

Layers run one way, top to bottom: tools -> service -> frontends -> core -> providers
-> protocol -> the shared values (config, core.outcome, core.request). A module may
import its own layer and the layers below it, never one above. The pure floor (wire
cores, rules, identity, outcome, request, resource metadata, JWT checks, config)
imports no I/O library: no trio, no httpx, no sockets, no clock.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "saslauthd_oidc"

# Lowest first. A module belongs to the longest prefix listed here.
LAYERS: list[tuple[str, ...]] = [
    ("saslauthd_oidc", "config", "secret_files", "core.outcome", "core.request"),
    ("protocol",),
    ("providers",),
    ("core",),
    ("frontends",),
    ("service",),
    ("tools",),
    ("__main__",),
]

PURE = (
    "config",
    "core.outcome",
    "core.request",
    "core.rules",
    "core.identity",
    "core.resource_metadata",
    "core.autoconfig",
    "protocol",
    "providers.jwt",
    "providers.answers",
    "providers.issuers",
)
IO_LIBRARIES = frozenset(
    {"trio", "httpx", "hypercorn", "anyio", "asyncio", "socket", "selectors", "time"}
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "saslauthd_oidc"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(name: str) -> int:
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if _within(name, prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rank)
    assert best is not None, f"{name}: in no layer of tests/test_architecture.py"
    return best[1]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every import, including those under TYPE_CHECKING and
    those inside functions: a layer may not know an upper one even lazily."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            assert node.module is not None
            if node.module == "saslauthd_oidc":
                # from saslauthd_oidc import __version__ / a submodule
                found.extend(
                    (
                        node.lineno,
                        "saslauthd_oidc" if a.name.startswith("_") else f"{node.module}.{a.name}",
                    )
                    for a in node.names
                )
            else:
                found.append((node.lineno, node.module))
    return found


def internal(name: str) -> str | None:
    if name == "saslauthd_oidc":
        return name
    return name.removeprefix("saslauthd_oidc.") if name.startswith("saslauthd_oidc.") else None


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_run_downwards(name: str) -> None:
    path = modules()[name]
    mine = layer_of(name)
    upward = []
    for line, imported in imports(path):
        target = internal(imported)
        if target is not None and layer_of(target) > mine:
            upward.append(f"{path.name}:{line} imports {imported}")
    assert not upward, f"{name} (layer {LAYERS[mine]}) imports a layer above it: {upward}"


@pytest.mark.parametrize("name", sorted(n for n in modules() if any(_within(n, p) for p in PURE)))
def test_pure_floor_imports_no_io(name: str) -> None:
    path = modules()[name]
    io = [
        f"{path.name}:{line} imports {imported}"
        for line, imported in imports(path)
        if imported.split(".")[0] in IO_LIBRARIES
    ]
    assert not io, f"{name} belongs to the sans-I/O floor: {io}"


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an upward import and an I/O import are both seen."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from typing import TYPE_CHECKING\n"
        "import trio\n"
        "if TYPE_CHECKING:\n"
        "    from saslauthd_oidc.service.daemon import run_daemon\n"
    )
    found = [internal(n) or n for _, n in imports(bad)]
    assert "trio" in found
    assert layer_of("service.daemon") > layer_of("protocol.sasl")
    assert "service.daemon" in found
    assert layer_of("core.outcome") < layer_of("protocol.dovecot") < layer_of("core.engine")
