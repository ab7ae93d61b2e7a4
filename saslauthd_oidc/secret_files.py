"""Secrets read from files (client secrets, HMAC keys, the HTTP callers' files).

Apart from config.py, which parses the TOML and reads no other file: a secret
is read when a provider or the HTTP frontend is built (and again on reload),
and refused when others may read or write its file. Errors name the setting
and say how to fix the file's mode; they never show its content.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from saslauthd_oidc.config import ConfigError


def read_secret_file(key: str, path: str) -> str:
    """Read a secret (client secret, HMAC key) from a file that others cannot write."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {p}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IWOTH | stat.S_IROTH):
        raise ConfigError(
            key,
            f"{p} is readable or writable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"{SECRET_FILE_ADVICE.format(path=p)}",
        )
    try:
        text = p.read_text("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(key, f"{p} is not UTF-8 text") from None
    except OSError as exc:
        advice = ""
        if exc.errno == errno.EACCES:
            advice = f" for this user (uid {os.geteuid()}): {SECRET_FILE_ADVICE.format(path=p)}"
        raise ConfigError(key, f"cannot read {p}: {exc.strerror}{advice}") from None
    if not text:
        raise ConfigError(key, f"{p} is empty")
    return text


# The README's install layout: root owns the file, the daemon's group reads it.
DAEMON_USER = "saslauthd-oidc"
SECRET_FILE_ADVICE = (
    "the daemon's user must read it and nobody else: chown root:saslauthd-oidc {path} "
    "&& chmod 0640 {path} (the daemon's group; the README's install layout)"
)
