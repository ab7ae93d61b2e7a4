"""A private, loopback-only Exim (Debian's exim4-daemon-heavy, unpacked, not installed).

Usage::

    from tests.peers.exim import EximInstance, exim_available

    with EximInstance(auth_socket="/tmp/x/auth") as ex:
        replies = smtp_auth(ex.host, ex.port, "XOAUTH2", b"user=...")

Where Exim comes from
    Debian's Exim packages conflict with Postfix (installing one removes the
    other), and only ``exim4-daemon-heavy`` has the ``dovecot`` authenticator.
    ``.ci/run`` therefore fetches ``exim4-daemon-heavy``, ``exim4-base`` and
    ``exim4-config`` with ``apt-get download``, unpacks them with ``dpkg -x``
    into :data:`EXIM_ROOT` (``$SASLAUTHD_OIDC_EXIM_ROOT``, default
    ``/opt/saslauthd-oidc-peers/exim``), installs the shared libraries the
    binary needs (``libidn12 libmariadb3 libspf2-2``; libraries only, no
    conflict with Postfix) and creates the ``Debian-exim`` user the binary is
    compiled for. Without all of that :func:`exim_available` names what is
    missing, and the tests skip (or fail in CI).

What the instance is
    ``exim4 -C <tmp>/exim.conf -bdf -oX <free port> -oP <tmp>/exim.pid`` run
    as root in its own session: a foreground daemon listening on
    ``127.0.0.1:<port>`` only, with its own spool and log directory under a
    temporary directory and a config with two ``driver = dovecot``
    authenticators, OAUTHBEARER and XOAUTH2 (the README recipe), pointed at
    ``auth_socket``. Receiving processes run as ``Debian-exim``, so the socket
    must be reachable by that user (mode 0666 in a 0755 directory). Leaving
    the ``with`` block sends SIGTERM, then SIGKILL to the process group, and
    removes the directory.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

from tests.peers.postfix import free_tcp_port
from tests.peers.process import PeerDaemon, wait_for_match
from tests.recipes import recipe, substitute

__all__ = ["EXIM_ROOT", "EXIM_USER", "EximInstance", "exim_available", "exim_binary"]

EXIM_ROOT = Path(os.environ.get("SASLAUTHD_OIDC_EXIM_ROOT", "/opt/saslauthd-oidc-peers/exim"))
EXIM_USER = "Debian-exim"
_STARTUP_TIMEOUT = 30.0

README_SOCKET = "/run/saslauthd-oidc/auth"
_TLS_ONLY = "  server_advertise_condition = ${if def:tls_in_cipher}\n"


def recipe_authenticators(auth_socket: str, *, tls_only: bool = True) -> str:
    """The README's Exim authenticators (taken from README.md), pointed at ``auth_socket``.

    ``tls_only=False`` drops their ``server_advertise_condition`` lines, for
    the plaintext instances that test the protocol (:class:`EximInstance`);
    :class:`DebianExim` runs the recipe whole, with TLS.
    """
    text = substitute(recipe("exim-authenticators"), {README_SOCKET: auth_socket})
    return text if tls_only else substitute(text, {_TLS_ONLY: ""})


def exim_binary() -> Path:
    return EXIM_ROOT / "usr" / "sbin" / "exim4"


def exim_available() -> str | None:
    """``None`` if a private Exim with the dovecot authenticator can be started here."""
    binary = exim_binary()
    hint = "(.ci/run unpacks exim4-daemon-heavy there; see tests/peers/exim.py)"
    if not binary.is_file():
        return f"{binary} not found {hint}"
    if os.geteuid() != 0:
        return "a private Exim must be started as root"
    try:
        pwd.getpwnam(EXIM_USER)
    except KeyError:
        return f"user {EXIM_USER!r} does not exist (useradd --system {EXIM_USER})"
    try:
        res = subprocess.run(
            [str(binary), "-C", "/dev/null", "-bV"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError as exc:
        return f"{binary} cannot run: {exc}"
    out = res.stdout + res.stderr
    if "error while loading shared libraries" in out:
        return out.strip().splitlines()[-1]
    authenticators = next((ln for ln in out.splitlines() if ln.startswith("Authenticators:")), "")
    if " dovecot" not in authenticators:
        return f"{binary} has no dovecot authenticator (need exim4-daemon-heavy): {out[:200]!r}"
    return None


class EximInstance(PeerDaemon):
    """A private Exim daemon whose ``dovecot`` authenticators use ``auth_socket``."""

    name = "Exim"
    banner = b"220 "
    goodbye = b"QUIT\r\n"

    def __init__(
        self,
        auth_socket: str,
        *,
        mechanisms: tuple[str, ...] = (),
        startup_timeout: float = _STARTUP_TIMEOUT,
    ) -> None:
        """``mechanisms`` adds ``driver = dovecot`` authenticators (e.g. PLAIN) to the recipe's."""
        super().__init__(startup_timeout=startup_timeout)
        self.auth_socket = auth_socket
        self.mechanisms = mechanisms

    # -- configuration --------------------------------------------------------

    def config(self) -> str:
        d = self.directory
        assert d is not None
        return f"""\
# Private Exim for saslauthd-oidc tests (generated).
primary_hostname = mx.test.example
exim_user = {EXIM_USER}
exim_group = {EXIM_USER}
spool_directory = {d}/spool
log_file_path = {d}/log/%slog
pid_file_path = {d}/exim.pid
keep_environment =
local_interfaces = 127.0.0.1
daemon_smtp_ports = {self.port}
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
auth_advertise_hosts = *
acl_smtp_rcpt = acl_check_rcpt
smtp_banner = $smtp_active_hostname ESMTP saslauthd-oidc-test

begin acl
acl_check_rcpt:
  accept authenticated = *
  deny   message = authentication required

begin routers
discard:
  driver = redirect
  data = :blackhole:

begin transports

begin authenticators
{recipe_authenticators(self.auth_socket, tls_only=False)}{self._extra_authenticators()}"""

    def _extra_authenticators(self) -> str:
        return "".join(
            f"{mech.lower()}:\n  driver = dovecot\n  public_name = {mech}\n"
            f"  server_socket = {self.auth_socket}\n  server_set_id = $auth1\n"
            for mech in self.mechanisms
        )

    # -- lifecycle ------------------------------------------------------------

    def _start(self) -> None:
        d = self._make_directory("exim-")
        pw = pwd.getpwnam(EXIM_USER)
        for sub in ("spool", "log"):
            (d / sub).mkdir(mode=0o750)
            os.chown(d / sub, pw.pw_uid, pw.pw_gid)
        self.port = free_tcp_port(self.host)
        conf = d / "exim.conf"
        conf.write_text(self.config())
        conf.chmod(0o644)  # owned by root, writable by nobody else: Exim insists
        self._proc = subprocess.Popen(
            [str(exim_binary()), "-C", str(conf), "-bdf", "-oX", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=(d / "exim.out").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    # -- observation ----------------------------------------------------------

    def mainlog(self) -> str:
        return self._read("log/mainlog")

    def logs(self) -> str:
        """Everything Exim wrote: main, reject and panic logs and its stdout/stderr."""
        return "\n".join(
            self._read(name)
            for name in ("log/mainlog", "log/rejectlog", "log/paniclog", "exim.out")
        )

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        return wait_for_match(self.mainlog, pattern, timeout=timeout, what="Exim's mainlog")

    def diagnostics(self) -> str:
        return self.logs()[-4000:]

    def _read(self, name: str) -> str:
        if self.directory is None:
            return ""
        try:
            return (self.directory / name).read_text(errors="replace")
        except FileNotFoundError:
            return ""


# --------------------------------------------------------------------------- Debian's config


#: The debconf answers of a Debian Exim that delivers locally and relays for
#: authenticated clients, with the split configuration (what
#: ``dpkg-reconfigure exim4-config`` writes to update-exim4.conf.conf).
_UPDATE_EXIM4_CONF_CONF = """\
dc_eximconfig_configtype='internet'
dc_other_hostnames='mx.test.example'
dc_local_interfaces='127.0.0.1'
dc_readhost=''
dc_relay_domains=''
dc_minimaldns='false'
dc_relay_nets=''
dc_smarthost=''
CFILEMODE='644'
dc_use_split_config='true'
dc_hide_mailname=''
dc_mailname_in_oh='true'
dc_localdelivery='mail_spool'
"""


class DebianExim(EximInstance):
    """Exim built from Debian's own ``conf.d`` by Debian's ``update-exim4.conf``.

    The instance copies the unpacked ``/etc/exim4`` (exim4-config) into its
    directory, answers debconf with the split configuration, adds the files
    an administrator adds — ``conf.d/auth/35_saslauthd-oidc`` (``auth_file``)
    and ``conf.d/main/000_localmacros`` (``localmacros``) — and a certificate
    ``exim.crt``/``exim.key`` (``cert``, ``key``) readable by group
    ``Debian-exim``, then runs ``update-exim4.conf -d <its etc/exim4> -o
    <its exim4.conf>`` and starts Exim on the result. The only lines the
    instance adds of its own are macros Debian's files provide for it
    (``CONFDIR``, ``SPOOLDIR``, ``MAIN_HARDCODE_PRIMARY_HOSTNAME``),
    ``log_file_path`` and ``pid_file_path``, so that nothing outside its
    directory is used.
    """

    def __init__(
        self,
        auth_file: str,
        localmacros: str,
        cert: Path,
        key: Path,
        *,
        split: bool = True,
        startup_timeout: float = _STARTUP_TIMEOUT,
    ) -> None:
        super().__init__(auth_socket="", startup_timeout=startup_timeout)
        self.split = split
        self.auth_file = auth_file
        self.localmacros = localmacros
        self.cert = cert
        self.key = key
        self.update_output = ""

    @property
    def confdir(self) -> Path:
        assert self.directory is not None
        return self.directory / "etc" / "exim4"

    def config(self) -> str:
        d = self.directory
        assert d is not None
        confdir = self.confdir
        shutil.copytree(EXIM_ROOT / "etc" / "exim4", confdir)
        answers = _UPDATE_EXIM4_CONF_CONF
        macros = (
            f"CONFDIR = {confdir}\nSPOOLDIR = {d}/spool\n"
            "MAIN_HARDCODE_PRIMARY_HOSTNAME = mx.test.example\n"
            f"{self.localmacros}log_file_path = {d}/log/%slog\npid_file_path = {d}/exim.pid\n"
        )
        if self.split:
            (confdir / "conf.d" / "auth" / "35_saslauthd-oidc").write_text(self.auth_file)
            (confdir / "conf.d" / "main" / "000_localmacros").write_text(macros)
        else:
            # One file: the block after "begin authenticators" in the template.
            # Debian's update-exim4.conf looks for exim4.conf.localmacros under
            # /etc/exim4 only, whatever -d says, so the macros open the template.
            answers = answers.replace("dc_use_split_config='true'", "dc_use_split_config='false'")
            template = confdir / "exim4.conf.template"
            text = template.read_text()
            marker = "\nbegin authenticators\n"
            assert text.count(marker) == 1, "Debian's template changed"
            text = text.replace(marker, marker + "\n" + self.auth_file)
            template.write_text(macros + text)
        (confdir / "update-exim4.conf.conf").write_text(answers)
        exim_gid = pwd.getpwnam(EXIM_USER).pw_gid
        for src, name, mode in ((self.cert, "exim.crt", 0o644), (self.key, "exim.key", 0o640)):
            shutil.copyfile(src, confdir / name)
            os.chown(confdir / name, 0, exim_gid)
            os.chmod(confdir / name, mode)
        out = d / "exim4.conf"
        update = str(EXIM_ROOT / "usr/sbin/update-exim4.conf")
        res = subprocess.run(
            ["/bin/sh", update, "-d", str(confdir), "-o", str(out)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        self.update_output = res.stdout + res.stderr
        if res.returncode != 0:
            raise RuntimeError(
                f"update-exim4.conf failed ({res.returncode}):\n{self.update_output}"
            )
        return out.read_text()
