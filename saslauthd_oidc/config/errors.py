"""Configuration errors that name the key, and where in the file a key is.

:class:`ConfigError` carries the dotted key (``rule[2].audiences``), and once
known the entry's name and the file's line; :class:`KeyLines` finds that line
(tomllib gives no positions); a TOML syntax error gets a hint of what to write.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A configuration problem; ``key`` is the dotted path of the offending setting.

    ``str()`` is ``"<key>: <message>"``, followed, once known, by where it is:
    ``(rule "webmail", /etc/saslauthd-oidc/saslauthd-oidc.toml line 23)``.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message
        self.label: str | None = None  # the rule or provider by its name: 'rule "webmail"'
        self.location: str | None = None  # "<file> line <n>"

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}" if self.key else self.message
        where = ", ".join(w for w in (self.label, self.location) if w)
        return f"{text} ({where})" if where else text


def suggest(name: str, known: Iterable[str]) -> str | None:
    """The known name ``name`` is most likely a misspelling of (difflib), if any."""
    matches = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_message(name: str, value: Any, known: Iterable[str]) -> str:
    """What to say about an unknown key: a section or a setting, and the likely intended one."""
    guess = suggest(name, known)
    if isinstance(value, dict):
        text = f"unknown section [{name}] (misspelt?)"
        return text + (f"; did you mean [{guess}]?" if guess else "")
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        text = f"unknown section [[{name}]] (misspelt?)"
        return text + (f"; did you mean [[{guess}]]?" if guess else "")
    text = "unknown setting (misspelt?)"
    return text + (f'; did you mean "{guess}"?' if guess else "")


_TABLE_RE = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(
    r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=(.*)$"
)
_INDEXED_RE = re.compile(r"^(.*)\[(\d+)\]$")


def _dotted(name: str) -> list[str]:
    return [
        part.strip().strip("\"'")
        for part in re.split(r"\.(?=(?:[^\"']|\"[^\"]*\"|'[^']*')*$)", name)
    ]


def _open_brackets(value: str) -> int:
    """How many ``[``/``{`` a value line leaves open (outside strings and comments)."""
    depth, quote = 0, ""
    for ch in value:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return depth


class KeyLines:
    """Where each key of a TOML text is: ``rule[1].audiences`` -> line 23.

    tomllib gives no positions, so this is a light scan of the source: table
    headers (``[server]``, ``[[rule]]``, ``[rule.claims]``) and ``key =``
    lines, skipping what is inside multi-line strings and arrays. It only
    locates; the values come from tomllib.
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        self.values: dict[str, str] = {}
        counts: dict[str, int] = {}
        table: list[str] = []
        depth = 0
        in_string = ""
        for number, line in enumerate(text.splitlines(), 1):
            if in_string:
                if line.count(in_string) % 2:
                    in_string = ""
                continue
            if depth > 0:
                depth += _open_brackets(line)
                continue
            header = _TABLE_RE.match(line)
            if header:
                parts = _dotted(header.group(2))
                if header.group(1) == "[[":
                    name = ".".join(parts)
                    counts[name] = counts.get(name, -1) + 1
                    table = [*parts[:-1], f"{parts[-1]}[{counts[name]}]"]
                else:
                    # [rule.claims] after [[rule]] belongs to the last rule.
                    table = [
                        f"{part}[{counts[part]}]" if i == 0 and part in counts else part
                        for i, part in enumerate(parts)
                    ]
                self.lines.setdefault(".".join(table), number)
                continue
            assignment = _KEY_RE.match(line)
            if not assignment:
                continue
            key = ".".join([*table, *_dotted(assignment.group(1))])
            value = assignment.group(2).strip()
            self.lines.setdefault(key, number)
            self.values.setdefault(key, value)
            for quote in ('"""', "'''"):
                if value.count(quote) % 2:
                    in_string = quote
            if not in_string:
                depth = max(_open_brackets(value), 0)

    def find(self, key: str) -> int | None:
        """The line of ``key``, else of the nearest enclosing table or key that is there."""
        parts = key.split(".")
        while parts:
            line = self.lines.get(".".join(parts))
            if line is not None:
                return line
            parts.pop()
        return None


_TOML_POSITION_RE = re.compile(r"\(at line (\d+), column \d+\)")


_BARE_WORD_RE = re.compile(r"[A-Za-z_][\w.@:/+-]*")


def _bare_word_hint(assignment: re.Match[str] | None) -> str:
    """``audiences = [mail]``: TOML strings need quotes."""
    if assignment is None:
        return ""
    value = assignment.group(2).split("#")[0].strip()
    items = [v.strip() for v in value.strip("[]").split(",")] if value.startswith("[") else [value]
    bare = [v for v in items if _BARE_WORD_RE.fullmatch(v) and v not in ("true", "false")]
    if not bare:
        return ""
    name = assignment.group(1).strip()
    quoted = ", ".join(f'"{v}"' if v in bare else v for v in items if v)
    fixed = f"[{quoted}]" if value.startswith("[") else quoted
    return f"; TOML strings need quotes: {name} = {fixed}"


def syntax_error(path: Path, text: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    """A TOML syntax error, with what to write instead where we can tell."""
    position = _TOML_POSITION_RE.search(str(exc))
    number = int(position.group(1)) if position else None
    lines = text.splitlines()
    line = lines[number - 1] if number and number <= len(lines) else ""
    assignment = _KEY_RE.match(line)
    if assignment and re.fullmatch(r"0[0-7]{3,4}\s*(#.*)?", assignment.group(2).strip()):
        name = assignment.group(1).strip()
        digits = assignment.group(2).strip().split("#")[0].strip()
        keys = KeyLines(text)
        key = next((k for k, n in keys.lines.items() if n == number), name)
        error = ConfigError(
            key,
            f"{digits} is not a TOML number (no leading zeros): write the mode as a "
            f'string, {name} = "{digits}", or in TOML\'s octal notation, '
            f"{name} = 0o{digits.lstrip('0')}",
        )
    else:
        error = ConfigError("", f"TOML syntax error: {exc}{_bare_word_hint(assignment)}")
    if number:
        error.location = f"{path} line {number}"
    else:
        error.message = f"{path}: {error.message}"
    return error
