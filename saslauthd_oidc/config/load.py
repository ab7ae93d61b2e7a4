"""Reading the configuration file: its path, its permissions, its TOML, its errors' lines."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from saslauthd_oidc.config.errors import ConfigError, KeyLines, syntax_error
from saslauthd_oidc.config.parse import parse_config
from saslauthd_oidc.config.schema import CONFIG_ENV, DEFAULT_CONFIG_PATH, Config


def resolve_config_path(cli_value: str | None) -> str:
    return cli_value or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {p}: {exc.strerror}") from None
    try:
        st = p.stat()
    except OSError:  # pragma: no cover - raced with a delete
        st = None
    if st is not None and st.st_mode & stat.S_IWOTH:
        raise ConfigError("", f"{p} is world-writable; refusing to use it (chmod o-w)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("", f"{p}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise syntax_error(p, text, exc) from None
    lines = KeyLines(text)
    _octal_literal_modes(data, lines)
    try:
        return parse_config(data, source=str(p))
    except ConfigError as exc:
        line = lines.find(exc.key)
        if line is not None:
            exc.location = f"{p} line {line}"
        raise


_MODE_KEYS = ("auth_socket_mode", "saslauthd_socket_mode", "http_socket_mode")


def _octal_literal_modes(data: dict[str, Any], lines: KeyLines) -> None:
    """``auth_socket_mode = 0o660`` means what it says: pass it on as the string "0660"."""
    server = data.get("server")
    if not isinstance(server, dict):
        return
    for name in _MODE_KEYS:
        value = server.get(name)
        literal = lines.values.get(f"server.{name}", "").split("#")[0].strip().lower()
        if isinstance(value, int) and literal.startswith("0o"):
            server[name] = f"0{value:o}"
