"""Cyrus SASL peers: Debian's ``testsaslauthd`` (sasl2-bin) and a Cyrus SASL config for Postfix.

``testsaslauthd`` is the saslauthd client that ships with cyrus-sasl: it sends
one four-field request (login, password, service, realm) to the mux socket
given with ``-f`` and prints ``0: OK "Success."`` (exit 0) or
``0: NO "authentication failed"`` (exit 255); it shows nothing of the reply
text. Debian's saslauthd *service* is never started by the tests.

:func:`smtpd_conf` is the ``smtpd.conf`` with which Postfix
(``smtpd_sasl_type = cyrus``, ``smtpd_sasl_path = smtpd``) checks PLAIN and
LOGIN passwords through libsasl's ``pwcheck_method: saslauthd`` against our
socket. Debian's Postfix looks for it in ``<config_directory>/sasl/`` and
then ``/usr/lib/sasl/`` (seen with strace); ``cyrus_sasl_config_path`` is
not consulted, so :func:`cyrus_postfix_files` puts it there.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.recipes import main_cf_settings, recipe, substitute

__all__ = [
    "CYRUS_MAIN_CF",
    "README_MUX",
    "TESTSASLAUTHD",
    "cyrus_plugins_available",
    "cyrus_postfix_files",
    "run_testsaslauthd",
    "smtpd_conf",
    "testsaslauthd_available",
]

TESTSASLAUTHD = "/usr/sbin/testsaslauthd"
_PLUGIN_DIR = Path("/usr/lib/x86_64-linux-gnu/sasl2")


def testsaslauthd_available() -> str | None:
    if shutil.which(TESTSASLAUTHD) is None:
        return f"{TESTSASLAUTHD} not found (install the 'sasl2-bin' package)"
    return None


def cyrus_plugins_available() -> str | None:
    """``None`` if libsasl's PLAIN and LOGIN plugins are installed (libsasl2-modules)."""
    for name in ("libplain.so", "liblogin.so"):
        if not any(_PLUGIN_DIR.glob(name + "*")):
            return f"{_PLUGIN_DIR}/{name} not found (install 'libsasl2-modules')"
    return None


def run_testsaslauthd(
    socket_path: Path | str,
    user: str,
    password: str,
    *,
    service: str = "smtp",
    realm: str | None = None,
) -> tuple[int, str]:
    """Run ``testsaslauthd -u USER -p PASSWORD -s SERVICE -f SOCKET [-r REALM]``."""
    cmd = [TESTSASLAUTHD, "-u", user, "-p", password, "-s", service, "-f", str(socket_path)]
    if realm is not None:
        cmd += ["-r", realm]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL
    )
    return res.returncode, res.stdout + res.stderr


README_MUX = "/run/saslauthd-oidc/mux"


def smtpd_conf(socket_path: Path | str) -> str:
    """The README's libsasl ``smtpd.conf`` (taken from README.md), pointed at our socket."""
    return substitute(recipe("cyrus-smtpd.conf"), {README_MUX: str(socket_path)})


def cyrus_postfix_files(socket_path: Path | str) -> dict[str, str]:
    """``PostfixInstance(extra_files=...)``: Debian's Postfix reads ``<config_dir>/sasl/``."""
    return {"sasl/smtpd.conf": smtpd_conf(socket_path)}


#: ``PostfixInstance(extra_main_cf=...)`` for Cyrus SASL: the README recipe, plus
#: ``smtpd_sasl_security_options = noanonymous`` (Postfix's default).
CYRUS_MAIN_CF = {
    **main_cf_settings(recipe("cyrus-postfix-main.cf")),
    "smtpd_sasl_security_options": "noanonymous",
}
