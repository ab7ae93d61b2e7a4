"""The README's recipes, as the tests that run them read them.

A recipe is a fenced code block in README.md preceded by a marker comment::

    <!-- recipe: postfix-main.cf -->
    ```
    smtpd_sasl_auth_enable = yes
    ...
    ```

Only blank lines may stand between the marker and the opening fence. A test
takes the block with :func:`recipe` and runs it against the real peer, so the
README and the test cannot drift apart: a renamed or deleted marker, a marker
used twice, or a marker without a block after it fails the test that asks for
it (:class:`RecipeError`), and so does a :func:`substitute` whose text is no
longer in the recipe.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "README",
    "RecipeError",
    "main_cf_settings",
    "recipe",
    "recipe_names",
    "substitute",
]

README = Path(__file__).resolve().parent.parent / "README.md"

_MARKER = re.compile(r"^[ \t]*<!--\s*recipe:\s*(?P<name>[A-Za-z0-9._/-]+)\s*-->[ \t]*$")
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


class RecipeError(AssertionError):
    """A recipe marker is missing, duplicated, or not followed by a fenced block."""


def _blocks(text: str, source: str) -> dict[str, str]:
    lines = text.splitlines()
    found: dict[str, str] = {}
    i = 0
    while i < len(lines):
        m = _MARKER.match(lines[i])
        if m is None:
            i += 1
            continue
        name = m["name"]
        if name in found:
            raise RecipeError(f"{source}:{i + 1}: recipe {name!r} is marked twice")
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        fence = _FENCE.match(lines[j]) if j < len(lines) else None
        if fence is None:
            raise RecipeError(
                f"{source}:{i + 1}: recipe marker {name!r} is not followed by a fenced code block"
            )
        indent, closing = fence["indent"], fence["fence"]
        body: list[str] = []
        k = j + 1
        while k < len(lines) and lines[k].strip() != closing:
            line = lines[k]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            k += 1
        if k == len(lines):
            raise RecipeError(f"{source}:{j + 1}: recipe {name!r}: the code block is not closed")
        found[name] = "\n".join(body) + "\n"
        i = k + 1
    return found


def recipe_names(readme: Path = README) -> list[str]:
    """Every recipe marked in ``readme``, in file order."""
    return list(_blocks(readme.read_text(encoding="utf-8"), str(readme)))


def recipe(name: str, readme: Path = README) -> str:
    """The text of the fenced block marked ``<!-- recipe: NAME -->`` (dedented, newline-ended)."""
    blocks = _blocks(readme.read_text(encoding="utf-8"), str(readme))
    if name not in blocks:
        known = ", ".join(sorted(blocks)) or "none"
        raise RecipeError(f"{readme}: no '<!-- recipe: {name} -->' marker (recipes: {known})")
    return blocks[name]


def substitute(text: str, replacements: Mapping[str, str]) -> str:
    """Replace each key by its value; a key that does not occur is an error (the recipe changed)."""
    for old, new in replacements.items():
        if old not in text:
            raise RecipeError(f"the recipe no longer contains {old!r}:\n{text}")
        text = text.replace(old, new)
    return text


def main_cf_settings(text: str) -> dict[str, str]:
    """``name = value`` lines of a Postfix ``main.cf`` fragment (comments and blanks skipped).

    Continuation lines (starting with white space) are joined to the setting
    before them, as Postfix does.
    """
    settings: dict[str, str] = {}
    last: str | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0] in " \t":
            if last is None:
                raise RecipeError(f"line {n}: continuation line without a setting: {raw!r}")
            settings[last] = f"{settings[last]} {raw.strip()}"
            continue
        name, sep, value = raw.partition("=")
        if not sep or not name.strip():
            raise RecipeError(f"line {n}: not a 'name = value' line: {raw!r}")
        last = name.strip()
        settings[last] = value.strip()
    return settings
