"""A private Cyrus IMAP 3.6 (Debian's cyrus-imapd, unpacked, not installed) on loopback.

Where Cyrus comes from
    Installing Debian's ``cyrus-imapd`` removes ``dovecot-imapd`` (both
    provide ``imap-server`` and conflict), and the Dovecot peer needs the
    latter. ``.ci/run`` therefore fetches ``cyrus-common`` and ``cyrus-imapd``
    with ``apt-get download`` and unpacks them with ``dpkg -x`` into
    :data:`CYRUS_ROOT` (``$SASLAUTHD_OIDC_CYRUS_ROOT``, default
    ``/opt/saslauthd-oidc-peers/cyrus``), installs the libraries the binaries
    need that the image lacks (``libxapian30 libpcre3 libical3``; libraries
    only) and creates the ``cyrus`` user as cyrus-common's postinst does
    (system user in group ``mail``, then ``adduser cyrus sasl``). Cyrus's own
    libraries live in the unpacked tree: ``LD_LIBRARY_PATH`` points there.

What the instance is
    Cyrus's ``master -D -C <dir>/imapd.conf -M <dir>/cyrus.conf`` as root in
    its own session (it drops to ``cyrus`` for ``imapd``), one ``imap``
    service on ``127.0.0.1:<free port>``, every directory and socket under a
    temporary directory. ``imapd.conf`` is the instance's own lines (paths)
    followed by ``extra_conf`` (the README recipe). Cyrus logs only to
    syslog; when a C compiler is at hand a tiny ``LD_PRELOAD`` shim writes
    those lines to the instance's ``syslog`` file instead (:meth:`log`),
    otherwise they are lost (this machine has no syslog daemon).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

from tests.peers.postfix import free_tcp_port
from tests.peers.process import PeerDaemon, wait_for_match

__all__ = ["CYRUS_ROOT", "CyrusImapd", "cyrus_imapd_available"]

CYRUS_ROOT = Path(os.environ.get("SASLAUTHD_OIDC_CYRUS_ROOT", "/opt/saslauthd-oidc-peers/cyrus"))
_BIN = CYRUS_ROOT / "usr" / "lib" / "cyrus" / "bin"
_LIBS = CYRUS_ROOT / "usr" / "lib" / "x86_64-linux-gnu"
_STARTUP_TIMEOUT = 30.0

_LOG_SHIM = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
void openlog(const char *i, int o, int f) { (void)i; (void)o; (void)f; }
void closelog(void) {}
void vsyslog(int p, const char *fmt, va_list ap) {
    /* a file of its own: imapd's stdout/stderr are the client's connection */
    const char *path = getenv("SASLO_SYSLOG_FILE");
    FILE *f = path ? fopen(path, "a") : NULL;
    (void)p;
    if (!f) return;
    fputs("syslog: ", f); vfprintf(f, fmt, ap); fputc('\n', f); fclose(f);
}
void syslog(int p, const char *fmt, ...) {
    va_list ap; va_start(ap, fmt); vsyslog(p, fmt, ap); va_end(ap);
}
void __vsyslog_chk(int p, int f, const char *fmt, va_list ap) { (void)f; vsyslog(p, fmt, ap); }
void __syslog_chk(int p, int f, const char *fmt, ...) {
    va_list ap; (void)f; va_start(ap, fmt); vsyslog(p, fmt, ap); va_end(ap);
}
"""


def cyrus_imapd_available() -> str | None:
    """``None`` if a private Cyrus IMAP can run here, else what is missing."""
    hint = "(.ci/run unpacks cyrus-imapd there; see tests/peers/cyrus_imapd.py)"
    for name in ("master", "imapd"):
        if not (_BIN / name).is_file():
            return f"{_BIN / name} not found {hint}"
    if os.geteuid() != 0:
        return "a private Cyrus IMAP must be started as root"
    try:
        user = pwd.getpwnam("cyrus")
    except KeyError:
        return "user 'cyrus' does not exist (useradd --system --gid mail cyrus)"
    try:
        if (
            "cyrus" not in grp.getgrnam("sasl").gr_mem
            and user.pw_gid != grp.getgrnam("sasl").gr_gid
        ):
            return "user 'cyrus' is not in group 'sasl' (adduser cyrus sasl, as cyrus-common does)"
    except KeyError:
        return "group 'sasl' does not exist (install sasl2-bin)"
    res = subprocess.run(
        ["ldd", str(_BIN / "imapd")],
        env={**os.environ, "LD_LIBRARY_PATH": str(_LIBS)},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    missing = [ln.split()[0] for ln in res.stdout.splitlines() if "not found" in ln]
    if missing:
        return f"imapd needs {', '.join(missing)} (apt-get install libxapian30 libpcre3 libical3)"
    return None


class CyrusImapd(PeerDaemon):
    """A private Cyrus IMAP whose ``imapd.conf`` ends with ``extra_conf``; a context manager."""

    name = "Cyrus IMAP"
    banner = b"* OK"
    goodbye = b"a LOGOUT\r\n"

    def __init__(self, extra_conf: str, *, startup_timeout: float = _STARTUP_TIMEOUT) -> None:
        super().__init__(startup_timeout=startup_timeout)
        self.extra_conf = extra_conf

    def imapd_conf(self) -> str:
        d = self.directory
        assert d is not None
        return (
            "# Private Cyrus IMAP for saslauthd-oidc tests (generated): paths, then the recipe.\n"
            f"configdirectory: {d}/lib\n"
            "defaultpartition: default\n"
            f"partition-default: {d}/spool\n"
            f"sievedir: {d}/lib/sieve\n"
            f"proc_path: {d}/run/proc\n"
            f"mboxname_lockpath: {d}/run/lock\n"
            f"lmtpsocket: {d}/run/socket/lmtp\n"
            f"idlesocket: {d}/run/socket/idle\n"
            f"notifysocket: {d}/run/socket/notify\n"
            "allowplaintext: yes\n"  # Debian's imapd.conf says so too
            "syslog_prefix: saslo-cyrus\n" + self.extra_conf
        )

    def _start(self) -> None:
        d = self._make_directory("saslo-cyrus-")
        cyrus = pwd.getpwnam("cyrus")
        for sub in (
            "lib/db",
            "lib/sieve",
            "lib/socket",
            "lib/user",
            "lib/quota",
            "spool",
            "run/proc",
        ):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("run/lock", "run/socket"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for root, dirs, _files in os.walk(d):
            for name in dirs:
                os.chown(os.path.join(root, name), cyrus.pw_uid, cyrus.pw_gid)
        self.port = free_tcp_port(self.host)
        conf = d / "imapd.conf"
        conf.write_text(self.imapd_conf())
        (d / "cyrus.conf").write_text(
            "START {\n}\nSERVICES {\n"
            f'  imap cmd="{_BIN}/imapd -C {conf}" listen="{self.host}:{self.port}" prefork=0\n'
            "}\nEVENTS {\n}\n"
        )
        env = {**os.environ, "LD_LIBRARY_PATH": str(_LIBS)}
        shim = self._log_shim(d)
        if shim is not None:
            env["LD_PRELOAD"] = str(shim)
            env["SASLO_SYSLOG_FILE"] = str(d / "syslog")
            (d / "syslog").touch()
            os.chmod(d / "syslog", 0o666)  # imapd appends as user cyrus
        with (d / "master.out").open("wb") as out:
            self._proc = subprocess.Popen(
                [
                    *(str(_BIN / "master"), "-D", "-C", str(conf)),
                    *("-M", str(d / "cyrus.conf"), "-p", str(d / "master.pid")),
                ],
                cwd=d,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @staticmethod
    def _log_shim(d: Path) -> Path | None:
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            return None
        src, lib = d / "logshim.c", d / "logshim.so"
        src.write_text(_LOG_SHIM)
        res = subprocess.run(
            [cc, "-shared", "-fPIC", "-o", str(lib), str(src)],
            capture_output=True,
            check=False,
            timeout=60,
        )
        return lib if res.returncode == 0 else None

    def diagnostics(self) -> str:
        return self.log()

    def log(self) -> str:
        """Cyrus's syslog lines (through the shim) and anything master printed."""
        if self.directory is None:
            return ""
        text = ""
        for name in ("syslog", "master.out"):
            with contextlib.suppress(FileNotFoundError):
                text += (self.directory / name).read_text(errors="replace")
        return text

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        return wait_for_match(self.log, pattern, timeout=timeout, what="Cyrus's log")
