"""A private, loopback-only Postfix instance for tests, plus small SMTP clients.

Usage::

    from tests.peers.postfix import PostfixInstance, make_shared_tmpdir, smtp_auth

    sock_dir = make_shared_tmpdir()          # 0755, the postfix user can traverse it
    sock = sock_dir / "auth-client"           # create the socket with mode 0666
    ...start an auth server on `sock` FIRST (see "auth server first" below)...
    with PostfixInstance(str(sock)) as pf:
        replies = smtp_auth(pf.host, pf.port, "OAUTHBEARER", b"n,a=...")
        assert replies[-1][0] == 235
        assert token not in pf.auth_replies()

What the instance is
    ``postfix -c <tmp>/etc start-fg`` run as a child in its own session, with its
    own ``main.cf``/``master.cf``, queue, data directory and log file
    (``maillog_file``, so nothing goes to the system syslog), and exactly one
    ``smtpd`` listening on ``127.0.0.1:<free port>``.  Every service runs
    unchrooted, so ``smtpd_sasl_path`` is an ordinary absolute path.  Leaving the
    ``with`` block runs ``postfix stop``, SIGKILLs whatever is left in the
    process group and removes the directory; an ``atexit`` hook does the same if
    the instance is never exited.  Requires root (``postfix_available()``).

Debian's stock master.cf (``stock_master_cf=True``)
    Debian's Postfix package installs ``/usr/share/postfix/master.cf.dist`` as
    ``/etc/postfix/master.cf``: ``smtp inet n - y - - smtpd``, i.e. smtpd (and
    most other services) chrooted into ``queue_directory``.  With
    ``stock_master_cf=True`` the instance runs that file byte for byte
    (:func:`stock_master_cf`): smtpd sees only the queue directory, and a
    relative ``smtpd_sasl_path`` (``private/saslauthd-oidc``) is resolved
    inside it.  Before starting, the instance runs Debian's own
    ``/usr/lib/postfix/configure-instance.sh`` (``postfix@.service``'s
    ``ExecStartPre``) with ``MAIL_CONFIG`` pointing at it, which copies
    ``etc/services``, ``etc/resolv.conf``, ``etc/hosts``, the NSS libraries
    and so on into the chroot.  The stock ``smtp`` service listens on port
    25, which the file does not let us change: master runs in a network
    namespace of its own (:mod:`tests.peers.netns`), where 127.0.0.1:25 is
    always free, and ``host``/``port`` are a loopback forwarder to it, so
    clients connect as usual and meet no system MTA.  The auth socket is a
    path, which network namespaces do not separate.  ``before_start`` starts
    the auth server once the queue directory exists.

Socket permissions
    smtpd runs as the ``postfix`` user and connects to the auth socket with
    those privileges.  The caller must therefore create the socket with mode
    0666 (or owned by/accessible to ``postfix``) in a directory that ``postfix``
    can traverse.  pytest's ``tmp_path`` is under a 0700 directory and does not
    qualify; use :func:`make_shared_tmpdir` (``/tmp/...``, mode 0755; also keeps
    the path well under the 108-byte ``sun_path`` limit).

Auth server first
    smtpd connects to the Dovecot auth socket at the start of every SMTP
    session (it logs its 220 banner first but has not flushed it yet).  If the
    socket is missing or the handshake fails, smtpd logs ``fatal: no SASL
    authentication mechanisms`` and exits, the client sees the connection
    close without any banner, and master throttles smtpd ("bad command
    startup -- throttling").  The stock throttle is 60 s; this instance sets
    ``service_throttle_time = 1s`` so a test that provokes it does not stall
    the ones after it.  Start the auth server before entering the context
    manager: the readiness check waits for a real 220 banner.

Logging
    ``debug_peer_list = 127.0.0.1`` makes smtpd log the Dovecot exchange
    verbosely, including every ``auth reply: ...`` line, so tests can prove
    that replies carry no secrets (:meth:`PostfixInstance.auth_replies`).  Note
    that Postfix's *own* verbose lines also echo what the SMTP client sent
    (the initial response / continuation, i.e. the token in base64), so do not
    grep the whole log for the token: grep the ``auth reply:`` lines.  The log
    is written asynchronously by ``postlogd``; use
    :meth:`PostfixInstance.wait_for_log` rather than reading it immediately.

Line length
    ``line_length_limit`` is left at its default of 2048 bytes.  Postfix 3.7
    cuts an ``AUTH <mech> <initial-response>`` line longer than that and
    answers ``535 5.7.8 Error: authentication failed: Invalid base64 data in
    initial response`` itself, without asking the auth server, so tokens
    larger than roughly 1.5 KB must be sent through the ``334`` continuation
    (``smtp_auth(..., initial_response=None, continuation=...)``) unless the
    test raises ``line_length_limit`` (the README's long-token lines,
    ``tests/test_peer_postfix_debian.py``).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import functools
import grp
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tests.peers.netns import NETNS_PREFIX, Forwarder, netns_available, wait_for_netns
from tests.peers.process import tail, wait_for_match

__all__ = [
    "POSTFIX",
    "STOCK_MASTER_CF",
    "PostfixInstance",
    "curl_available",
    "curl_smtp_auth",
    "free_tcp_port",
    "make_shared_tmpdir",
    "postfix_available",
    "smtp_auth",
    "smtp_ehlo",
]

#: The ``postfix`` command; overridable for odd installs (and for checking
#: that a missing Postfix turns into a skip, or a failure in CI).
POSTFIX = os.environ.get("SASLAUTHD_OIDC_POSTFIX", "/usr/sbin/postfix")

_STARTUP_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0

#: Where Debian's postfix package keeps the master.cf it installs (then copied
#: to /etc/postfix/master.cf, which an administrator may have edited).
STOCK_MASTER_CF = (Path("/usr/share/postfix/master.cf.dist"), Path("/etc/postfix/master.cf"))
#: Debian's chroot preparation (postfix@.service's ExecStartPre).
CONFIGURE_INSTANCE = Path("/usr/lib/postfix/configure-instance.sh")


# --------------------------------------------------------------------------- probes


def _postconf_bin() -> str:
    return str(Path(POSTFIX).with_name("postconf"))


@functools.cache
def _daemon_directory(postconf: str) -> str:
    return subprocess.run(
        [postconf, "-dh", "daemon_directory"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()


def postfix_available() -> str | None:
    """``None`` if a private Postfix can be started here, else the reason why not."""
    if not (os.path.isfile(POSTFIX) and os.access(POSTFIX, os.X_OK)):
        return f"{POSTFIX} not found (install the 'postfix' package)"
    postconf = _postconf_bin()
    if not (os.path.isfile(postconf) and os.access(postconf, os.X_OK)):
        return f"{postconf} not found"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "user 'postfix' does not exist"
    try:
        grp.getgrnam("postdrop")
    except KeyError:
        return "group 'postdrop' does not exist"
    try:
        daemon_dir = _daemon_directory(postconf)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"postconf failed: {exc}"
    if not os.access(os.path.join(daemon_dir, "master"), os.X_OK):
        return f"{daemon_dir}/master not found"
    return None


def stock_master_cf() -> str:
    """The text of Debian's stock ``master.cf`` (the package's copy first)."""
    for path in STOCK_MASTER_CF:
        if path.is_file():
            return path.read_text()
    raise FileNotFoundError(" or ".join(map(str, STOCK_MASTER_CF)))


def stock_postfix_available() -> str | None:
    """``None`` if a private Postfix with Debian's stock master.cf can run here."""
    reason = postfix_available()
    if reason is not None:
        return reason
    if not any(p.is_file() for p in STOCK_MASTER_CF):
        return f"{' or '.join(map(str, STOCK_MASTER_CF))} not found (Debian's postfix package)"
    if not CONFIGURE_INSTANCE.is_file():
        return f"{CONFIGURE_INSTANCE} not found (Debian's postfix package)"
    return netns_available()


def master_cf_row(master_cf: str, service: str, kind: str) -> list[str]:
    """The columns of the ``service kind ...`` line of a master.cf (``AssertionError`` if none)."""
    for line in master_cf.splitlines():
        cols = line.split()
        if len(cols) >= 8 and not line[0].isspace() and cols[0] == service and cols[1] == kind:
            return cols
    raise AssertionError(f"master.cf has no {service} {kind} line")


def curl_available() -> str | None:
    """``None`` if the ``curl`` command is usable for SMTP, else the reason why not."""
    curl = shutil.which("curl")
    if curl is None:
        return "curl not found (install the 'curl' package)"
    try:
        out = subprocess.run(
            [curl, "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"curl --version failed: {exc}"
    protocols = next((ln for ln in out.splitlines() if ln.startswith("Protocols:")), "")
    if " smtp" not in protocols:
        return "curl was built without SMTP support"
    return None


# --------------------------------------------------------------------------- helpers


def make_shared_tmpdir(prefix: str = "saslo-") -> Path:
    """A fresh mode-0755 directory under /tmp that the ``postfix`` user can traverse.

    Meant for the auth server's Unix socket.  It is removed at interpreter exit
    (``atexit``); the ``shared_tmp_path`` fixture removes it at test teardown.
    """
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, 0o755)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return Path(path)


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- instance


_MASTER_CF = """\
# Private Postfix instance for saslauthd-oidc tests (generated).  chroot = n
# everywhere, so absolute paths (smtpd_sasl_path) work as they are.
# service    type       private unpriv  chroot  wakeup  maxproc command
{listen}     inet       n       -       n       -       -       smtpd
cleanup      unix       n       -       n       -       0       cleanup
qmgr         unix       n       -       n       300     1       qmgr
rewrite      unix       -       -       n       -       -       trivial-rewrite
bounce       unix       -       -       n       -       0       bounce
defer        unix       -       -       n       -       0       bounce
trace        unix       -       -       n       -       0       bounce
verify       unix       -       -       n       -       1       verify
flush        unix       n       -       n       1000?   0       flush
proxymap     unix       -       -       n       -       -       proxymap
proxywrite   unix       -       -       n       -       1       proxymap
error        unix       -       -       n       -       -       error
retry        unix       -       -       n       -       -       error
discard      unix       -       -       n       -       -       discard
anvil        unix       -       -       n       -       1       anvil
scache       unix       -       -       n       -       1       scache
postlog      unix-dgram n       -       n       -       1       postlogd
"""


class PostfixInstance:
    """A private Postfix whose smtpd authenticates against ``sasl_path``.

    ``sasl_path`` is an absolute socket path (or ``unix:/path``, ``inet:h:p``).
    ``extra_main_cf`` overrides/extends the generated ``main.cf`` (e.g.
    ``{"smtpd_sasl_security_options": "noanonymous, noplaintext"}``).
    ``stock_master_cf`` runs Debian's master.cf unchanged (module docstring).
    ``before_start(instance)`` runs once the queue directory is ready and
    before Postfix starts: start the auth server there when its socket lives
    in the queue directory (``private/...``).
    ``extra_files`` maps paths relative to the config directory to file
    contents written before Postfix starts (Debian's Postfix reads Cyrus SASL's
    ``smtpd.conf`` from ``<config_directory>/sasl/``, whatever
    ``cyrus_sasl_config_path`` says).

    Attributes after ``__enter__``: ``host``, ``port``, ``directory`` (the temp
    dir), ``config_directory`` (``<dir>/etc``), ``maillog_path``.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        sasl_path: str,
        *,
        sasl_type: str = "dovecot",
        extra_main_cf: Mapping[str, str] | None = None,
        extra_files: Mapping[str, str] | None = None,
        stock_master_cf: bool = False,
        before_start: Callable[[PostfixInstance], None] | None = None,
        startup_timeout: float = _STARTUP_TIMEOUT,
    ) -> None:
        if sasl_type == "dovecot" and not sasl_path.startswith("inet:") and not stock_master_cf:
            bare = sasl_path.removeprefix("unix:")
            if not os.path.isabs(bare):
                # A relative path would be resolved against queue_directory.
                raise ValueError(f"smtpd_sasl_path must be absolute, got {sasl_path!r}")
        self.stock_master_cf = stock_master_cf
        self.before_start = before_start
        self.sasl_path = sasl_path
        self.sasl_type = sasl_type
        self.extra_main_cf = dict(extra_main_cf or {})
        self.extra_files = dict(extra_files or {})
        self.startup_timeout = startup_timeout
        self.port = 0
        self.directory: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: Path | None = None
        self._netns: int | None = None
        self._forwarder: Forwarder | None = None

    # -- paths ---------------------------------------------------------------

    @property
    def config_directory(self) -> Path:
        assert self.directory is not None, "PostfixInstance not started"
        return self.directory / "etc"

    @property
    def queue_directory(self) -> Path:
        """``queue_directory`` (the chroot of chrooted services)."""
        assert self.directory is not None, "PostfixInstance not started"
        return self.directory / "spool"

    @property
    def maillog_path(self) -> Path:
        assert self.directory is not None, "PostfixInstance not started"
        return self.directory / "maillog"

    # -- configuration --------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        """The ``main.cf`` settings this instance is started with."""
        d = self.directory
        assert d is not None
        cf = {
            "compatibility_level": "3.6",
            "queue_directory": f"{d}/spool",
            "data_directory": f"{d}/data",
            # maillog_file needs postlogd (postlog in master.cf).  /dev/stdout
            # must be an allowed prefix too, or postfix(1) refuses to run.
            "maillog_file": f"{d}/maillog",
            "maillog_file_prefixes": f"{d}, /dev/stdout",
            "myhostname": "mx.test.example",
            "mydomain": "test.example",
            "myorigin": "$myhostname",
            "mydestination": "$myhostname, localhost",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.1/32",
            # Anything accepted is thrown away; any local address is valid.
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "local_transport": "discard:",
            "default_transport": "discard:",
            "relay_transport": "discard:",
            "biff": "no",
            "smtpd_banner": "$myhostname ESMTP saslauthd-oidc-test",
            # SASL through the auth server under test.
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": self.sasl_type,
            "smtpd_sasl_path": self.sasl_path,
            "smtpd_sasl_security_options": "noanonymous",
            # Only an authenticated client may send (to any address).
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
            "smtpd_recipient_restrictions": "permit_sasl_authenticated, reject",
            # Log every "auth reply:" line from the auth server.
            "debug_peer_list": "127.0.0.1",
            # A smtpd that dies (auth socket missing) is throttled for 1 s, not 60 s.
            "service_throttle_time": "1s",
            # line_length_limit stays at the default 2048: tokens whose
            # "AUTH <mech> <ir>" line is longer must use the 334 continuation.
        }
        cf.update(self.extra_main_cf)
        return cf

    def _write_config(self) -> None:
        lines = ["# Private Postfix instance for saslauthd-oidc tests (generated)."]
        lines += [f"{k} = {v}" for k, v in self.main_cf().items()]
        (self.config_directory / "main.cf").write_text("\n".join(lines) + "\n")
        for rel, content in self.extra_files.items():
            target = self.config_directory / rel
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            target.write_text(content)
            target.chmod(0o644)
        if self.stock_master_cf:
            (self.config_directory / "master.cf").write_text(stock_master_cf())
        else:
            (self.config_directory / "master.cf").write_text(
                _MASTER_CF.format(listen=f"{self.host}:{self.port}")
            )

    def _postfix(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_directory), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def postconf(self, settings: Mapping[str, str], *, reload: bool = True) -> None:
        """Change ``main.cf`` with ``postconf -e`` and (by default) ``postfix reload``.

        Reload is asynchronous: smtpd processes already running finish their
        session with the old settings; new sessions get the new ones.
        """
        args = [f"{k}={v}" for k, v in settings.items()]
        subprocess.run(
            [_postconf_bin(), "-c", str(self.config_directory), "-e", *args],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.extra_main_cf.update(settings)
        if reload:
            res = self._postfix("reload")
            if res.returncode != 0:
                raise RuntimeError(f"postfix reload failed:\n{res.stdout}{res.stderr}")

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self) -> PostfixInstance:
        reason = postfix_available()
        if reason is not None:
            raise RuntimeError(f"Postfix not available: {reason}")
        atexit.register(self.stop)
        try:
            for attempt in range(3):
                self._start_once()
                try:
                    self._wait_ready()
                    return self
                except _PortTaken:
                    self.stop()
                    if attempt == 2:
                        raise RuntimeError("could not find a free port for Postfix") from None
            raise AssertionError("unreachable")
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _start_once(self) -> None:
        d = Path(tempfile.mkdtemp(prefix="pfx-", dir="/tmp"))
        self.directory = d
        os.chmod(d, 0o755)  # smtpd/postlogd (user postfix) must traverse it
        self.config_directory.mkdir()
        (d / "spool").mkdir(mode=0o755)  # owned by root; `postfix check` fills it
        (d / "data").mkdir(mode=0o700)
        pw = pwd.getpwnam("postfix")
        os.chown(d / "data", pw.pw_uid, pw.pw_gid)
        # The stock "smtp inet" service is port 25, inside a namespace of its own;
        # self.port becomes the forwarder's once master runs.
        self.port = 25 if self.stock_master_cf else free_tcp_port(self.host)
        self._write_config()

        res = self._postfix("check")
        if res.returncode != 0:
            raise RuntimeError(
                f"postfix check failed ({res.returncode}):\n{res.stdout}{res.stderr}\n"
                f"maillog:\n{tail(self.maillog())}"
            )
        if self.stock_master_cf:
            self._configure_chroot()
        if self.before_start is not None:
            # The queue directory exists now (``postfix check`` made private/
            # and public/): the place for an auth socket inside the chroot.
            self.before_start(self)
        self._out = d / "start-fg.out"
        prefix = NETNS_PREFIX if self.stock_master_cf else []
        with open(self._out, "wb") as out:
            self._proc = subprocess.Popen(
                [*prefix, POSTFIX, "-c", str(self.config_directory), "start-fg"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if self.stock_master_cf:
            self._netns = wait_for_netns(self._proc.pid)
            self._forwarder = Forwarder(self._netns, ("127.0.0.1", 25))
            self.port = self._forwarder.port

    def _configure_chroot(self) -> None:
        """Debian's ``configure-instance.sh``, pointed at this instance by ``MAIL_CONFIG``."""
        env = {**os.environ, "MAIL_CONFIG": str(self.config_directory)}
        res = subprocess.run(
            ["/bin/sh", str(CONFIGURE_INSTANCE), "-"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if res.returncode != 0 or not (self.queue_directory / "etc" / "services").is_file():
            raise RuntimeError(
                f"{CONFIGURE_INSTANCE} failed ({res.returncode}) or did not fill the chroot "
                f"{self.queue_directory}:\n{res.stdout}{res.stderr}"
            )

    def _diagnostics(self) -> str:
        out = ""
        if self._out is not None and self._out.exists():
            out = self._out.read_text(errors="replace")
        return f"start-fg output:\n{tail(out)}\nmaillog tail:\n{tail(self.maillog())}"

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        last = "no attempt"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                diag = self._diagnostics()
                if "Address already in use" in diag:
                    raise _PortTaken
                raise RuntimeError(
                    f"postfix start-fg exited with {self._proc.returncode} "
                    f"before answering on {self.host}:{self.port}\n{diag}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=5) as s:
                    f = s.makefile("rb")
                    while True:
                        line = f.readline(4096)
                        if not line:
                            last = "connection closed before the 220 banner"
                            break
                        if line.startswith(b"220 "):
                            s.sendall(b"QUIT\r\n")
                            return
                        if not line.startswith(b"220-"):
                            last = f"unexpected greeting {line!r}"
                            break
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
        raise RuntimeError(
            f"Postfix did not answer with a 220 banner on {self.host}:{self.port} within "
            f"{self.startup_timeout:.0f}s (last: {last}); is the auth server at "
            f"{self.sasl_path} up and reachable by user postfix?\n{self._diagnostics()}"
        )

    def _master_pid(self) -> int | None:
        if self.directory is None:
            return None
        try:
            return int((self.directory / "spool" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stop Postfix (idempotent) and remove the instance directory.

        ``postfix stop`` first (SIGTERM to master, which waits up to 5 s and
        then SIGKILLs master's process group itself).  master runs in a session
        of its own (``master -s`` calls setsid), so our Popen's process group
        only holds the ``postfix-script start-fg`` shell; leftovers in master's
        group are SIGKILLed here as a last resort.
        """
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                master = self._master_pid()
                if proc.poll() is None:
                    with contextlib.suppress(subprocess.SubprocessError, OSError):
                        self._postfix("stop", timeout=_STOP_TIMEOUT)
                    _wait_exited_nowait(proc.pid, 10.0)
                if master is not None:
                    _kill_postfix_group(master)
                # The start-fg shell is at most a zombie now (not reaped), so
                # its pid cannot have been reused: kill any straggler.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        finally:
            if self._forwarder is not None:
                self._forwarder.close()
                self._forwarder = None
            if self._netns is not None:
                os.close(self._netns)
                self._netns = None
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None
            atexit.unregister(self.stop)

    # -- observation ----------------------------------------------------------

    def maillog(self) -> str:
        """The instance's log so far ('' if nothing was written yet)."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except (FileNotFoundError, AssertionError):
            return ""

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) matches somewhere in the log."""
        return wait_for_match(self.maillog, pattern, timeout=timeout, what="the Postfix log")

    def auth_replies(self) -> list[str]:
        """The auth server's replies as logged by smtpd (``auth reply: ...``).

        smtpd logs them through ``printable()``: TABs (and any other
        non-printable byte) appear as ``?``, e.g. ``OK?1?user=alice@example.org``.
        """
        return re.findall(r"auth reply: (.*)", self.maillog())


class _PortTaken(Exception):
    pass


def _kill_postfix_group(pgid: int) -> None:
    """SIGKILL live Postfix processes in process group ``pgid`` (master's group).

    Only processes whose executable lives in Postfix's daemon directory are
    touched, so a recycled pgid cannot hit anything else.
    """
    daemon_dir = _daemon_directory(_postconf_bin()).rstrip("/") + "/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            state, member_pgid = fields[0], int(fields[2])
            exe = os.readlink(entry / "exe")
        except (OSError, ValueError):
            continue
        if member_pgid == pgid and state != "Z" and exe.startswith(daemon_dir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


def _wait_exited_nowait(pid: int, timeout: float) -> bool:
    """Wait for ``pid`` (our child) to exit without reaping it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- clients


def _b64(data: bytes | str, *, initial: bool) -> str:
    if isinstance(data, str):
        return data  # sent verbatim (e.g. deliberately malformed base64, or "*")
    if not data:
        return "=" if initial else ""  # RFC 4954: "=" is an empty initial response
    return base64.b64encode(data).decode("ascii")


def smtp_ehlo(host: str, port: int, *, timeout: float = 30.0) -> dict[str, str]:
    """EHLO and return the ESMTP keywords (lower-case) → parameters, e.g. ``{"auth": ...}``."""
    with smtplib.SMTP(host, port, local_hostname="client.test.example", timeout=timeout) as s:
        code, msg = s.ehlo()
        if code != 250:
            raise AssertionError(f"EHLO answered {code} {msg!r}")
        # smtplib keeps a leading space on the "auth" value; normalise.
        return {k: v.strip() for k, v in s.esmtp_features.items()}


def smtp_auth(
    host: str,
    port: int,
    mechanism: str,
    initial_response: bytes | str | None,
    *,
    continuation: bytes | str | Sequence[bytes | str] | None = None,
    timeout: float = 30.0,
) -> list[tuple[int, str]]:
    """One SMTP session: EHLO, ``AUTH <mechanism> [<ir>]``, answer any 334s.

    ``initial_response``/``continuation`` given as ``bytes`` are raw SASL data
    and get base64-encoded (``b""`` → ``=`` as an initial response, an empty
    line as a continuation; ``b"\\x01"`` → ``AQ==``).  A ``str`` is sent
    verbatim.  ``continuation`` may be a list for several rounds.  A 334 left
    unanswered is cancelled with ``*`` (Postfix answers 501).

    Returns every ``(code, text)`` reply from the AUTH command on, e.g.
    ``[(334, 'eyJzdGF0dXMi...'), (535, '5.7.8 Error: authentication failed: ...')]``.
    """
    if continuation is None:
        pending: list[bytes | str] = []
    elif isinstance(continuation, (bytes, str)):
        pending = [continuation]
    else:
        pending = list(continuation)
    replies: list[tuple[int, str]] = []
    with smtplib.SMTP(host, port, local_hostname="client.test.example", timeout=timeout) as s:
        code, msg = s.ehlo()
        if code != 250:
            raise AssertionError(f"EHLO answered {code} {msg!r}")
        arg = (
            mechanism
            if initial_response is None
            else (f"{mechanism} {_b64(initial_response, initial=True)}")
        )
        code, raw = s.docmd("AUTH", arg)
        replies.append((code, raw.decode("utf-8", "replace")))
        while code == 334:
            line = _b64(pending.pop(0), initial=False) if pending else "*"
            code, raw = s.docmd(line)
            replies.append((code, raw.decode("utf-8", "replace")))
    return replies


def curl_smtp_auth(
    host: str,
    port: int,
    user: str,
    token: str,
    mechanism: str,
    *,
    sasl_ir: bool = True,
    timeout: float = 30.0,
) -> tuple[int, str]:
    """Authenticate with curl's own OAUTHBEARER/XOAUTH2 client and do nothing else.

    Runs (``-X NOOP`` makes curl send a harmless NOOP after AUTH instead of its
    default HELP, which Postfix answers with 502; without ``--sasl-ir`` curl
    waits for an empty 334 before sending its response)::

        curl -v -sS --max-time T --url smtp://HOST:PORT/ --user USER: \\
             --oauth2-bearer TOKEN --login-options AUTH=MECH --sasl-ir -X NOOP

    Returns ``(exit status, verbose stderr)``.  Success is exit 0; a 535 gives
    exit 67 (CURLE_LOGIN_DENIED).  The verbose text contains the base64 SASL
    exchange, i.e. the token: keep it out of test ids and assertion messages
    if the token matters.
    """
    curl = shutil.which("curl") or "curl"
    cmd = [
        curl,
        "-v",
        "-sS",
        "--max-time",
        str(int(timeout)),
        "--url",
        f"smtp://{host}:{port}/",
        "--user",
        f"{user}:",
        "--oauth2-bearer",
        token,
        "--login-options",
        f"AUTH={mechanism}",
    ]
    if sasl_ir:
        cmd.append("--sasl-ir")
    cmd += ["-X", "NOOP"]
    res = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        stdin=subprocess.DEVNULL,
        errors="replace",
    )
    return res.returncode, res.stderr
