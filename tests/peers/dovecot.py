"""A private, loopback-only Dovecot 2.3 instance whose ``passdb oauth2`` calls our ``/introspect``.

Usage::

    from tests.peers.dovecot import DovecotInstance, imap_authenticate

    with DovecotInstance("http://user:secret@127.0.0.1:8480/introspect") as dc:
        typ, detail = imap_authenticate(dc.host, dc.port, "XOAUTH2", "alice@example.org", token)
        assert typ == "OK"

What the instance is
    ``dovecot -F -c <tmp>/dovecot.conf`` as a child in its own session, with
    its own ``base_dir``/``state_dir``, a log file (``log_path``, nothing goes
    to syslog), IMAP only, on ``127.0.0.1:<free port>``, no TLS. Its
    ``auth_mechanisms``, passdb and userdb are the README's ``dovecot.conf``
    recipe and its oauth2 file the ``dovecot-oauth2.conf.ext`` recipe, both
    taken from README.md (:mod:`tests.recipes`), today: ``driver = oauth2`` with
    ``introspection_mode = post``, ``username_attribute = username``,
    ``active_attribute = active``, ``active_value = true``,
    ``force_introspection = yes``, ``send_auth_headers = yes``, an empty
    ``tokeninfo_url``; the userdb is static (user ``nobody``, a home under the
    instance directory). Leaving the ``with`` block SIGTERMs the master,
    SIGKILLs whatever is left in its process group and removes the directory;
    an ``atexit`` hook does the same if the block is never left. The system's
    Dovecot service is neither used nor needed. Requires root (Dovecot drops
    privileges to ``dovenull``/``dovecot``/``nobody`` itself).

The daemon behind it
    :func:`behind_dovecot` runs ``saslauthd-oidc serve`` with its HTTP listener
    on a free loopback port, callers authenticated by HTTP Basic (``CALLER``,
    whose credentials sit in Dovecot's ``introspection_url`` as the README
    recipe says), and the providers and rules a test gives, then this Dovecot
    in front of it.
"""

from __future__ import annotations

import contextlib
import imaplib
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from tests.peers.daemon import Daemon
from tests.peers.postfix import free_tcp_port, make_shared_tmpdir
from tests.peers.process import PeerDaemon, tail, wait_for_match
from tests.recipes import RecipeError, recipe, substitute

DOVECOT = os.environ.get("SASLAUTHD_OIDC_DOVECOT", "/usr/sbin/dovecot")
_STARTUP_TIMEOUT = 30.0


def dovecot_available() -> str | None:
    """None when a private Dovecot with the oauth2 passdb can run here, else why not."""
    if not Path(DOVECOT).exists():
        return f"{DOVECOT} not found (apt-get install dovecot-core dovecot-imapd)"
    if (
        not Path("/usr/lib/dovecot/imap").exists()
        and not Path("/usr/lib/dovecot/imap-login").exists()
    ):
        return "dovecot-imapd is not installed"
    if os.geteuid() != 0:
        return "a private Dovecot instance needs root"
    for user in ("dovecot", "dovenull", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"system user {user!r} is missing"
    return None


def dovecot_version() -> str:
    res = subprocess.run([DOVECOT, "--version"], capture_output=True, text=True, check=False)
    return res.stdout.strip()


_CONF = """\
# Private test instance (tests/peers/dovecot.py)
base_dir = {d}/run
state_dir = {d}/state
instance_name = saslo-dovecot-{port}
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
debug_log_path = {d}/dovecot.log
listen = 127.0.0.1
protocols = imap
ssl = no
disable_plaintext_auth = no
auth_verbose = yes
auth_failure_delay = 0
first_valid_uid = 1
mail_location = maildir:~/Maildir
default_login_user = dovenull
default_internal_user = dovecot
shutdown_clients = yes

{recipe}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service imap {{
  process_limit = 16
}}
"""


def recipe_conf(d: Path) -> str:
    """The README's ``dovecot.conf`` recipe, for an instance in ``d``.

    Two edits, each checked by :func:`tests.recipes.substitute`: the oauth2
    args file is the instance's, and the static userdb's ``vmail`` user and
    ``/var/vmail`` become ``nobody`` and a directory under ``d``.
    """
    text = substitute(
        recipe("dovecot.conf"),
        {
            "/etc/dovecot/dovecot-oauth2.conf.ext": f"{d}/dovecot-oauth2.conf.ext",
            "uid=vmail gid=vmail home=/var/vmail/%u": f"uid=nobody gid=nogroup home={d}/home/%u",
        },
    )
    return text


def recipe_oauth2_conf(url: str) -> str:
    """The README's ``dovecot-oauth2.conf.ext`` with this test's ``introspection_url``."""
    lines = recipe("dovecot-oauth2.conf.ext").splitlines()
    keyed = [n for n, ln in enumerate(lines) if ln.split("=")[0].strip() == "introspection_url"]
    if len(keyed) != 1:
        raise RecipeError(
            f"the dovecot-oauth2.conf.ext recipe has {len(keyed)} introspection_url lines"
        )
    lines[keyed[0]] = f"introspection_url = {url}"
    return "# The README's Dovecot recipe (dovecot-oauth2.conf.ext)\n" + "\n".join(lines) + "\n"


class DovecotInstance(PeerDaemon):
    """A private Dovecot (see module docstring); a context manager."""

    name = "Dovecot"
    banner = b"* OK"
    goodbye = b"a LOGOUT\r\n"

    def __init__(self, introspection_url: str, *, startup_timeout: float = _STARTUP_TIMEOUT):
        super().__init__(startup_timeout=startup_timeout)
        self.introspection_url = introspection_url

    @property
    def introspection_port(self) -> int | None:
        """The port of the introspection endpoint Dovecot calls (the daemon's HTTP listener)."""
        return urlsplit(self.introspection_url).port

    @property
    def log_path(self) -> Path:
        assert self.directory is not None
        return self.directory / "dovecot.log"

    def _start(self) -> None:
        d = self._make_directory("saslo-dc-")
        nobody = pwd.getpwnam("nobody")
        (d / "home").mkdir(mode=0o755)
        os.chown(d / "home", nobody.pw_uid, nobody.pw_gid)
        self.port = free_tcp_port(self.host)
        (d / "dovecot.conf").write_text(_CONF.format(d=d, port=self.port, recipe=recipe_conf(d)))
        oauth2 = d / "dovecot-oauth2.conf.ext"
        oauth2.write_text(recipe_oauth2_conf(self.introspection_url))
        oauth2.chmod(0o600)  # it holds the caller's credentials
        self._out = d / "dovecot-F.out"
        with open(self._out, "wb") as out:
            self._proc = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(d / "dovecot.conf")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def diagnostics(self) -> str:
        out = self._out.read_text(errors="replace") if self._out.exists() else ""
        return f"dovecot -F output:\n{tail(out)}\nlog tail:\n{tail(self.log())}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (FileNotFoundError, AssertionError):
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        return wait_for_match(self.log, pattern, timeout=timeout, what="the Dovecot log")


# --------------------------------------------------------------------------- clients


_SOURCES = itertools.count(2)


def fresh_source_address() -> str:
    """A loopback address of its own for each client connection (127.0.1.N).

    Dovecot's anvil delays logins from an address after failed ones (auth
    penalty, up to 15 s); a fresh source address per connection keeps the
    tests' deliberate failures from slowing the next test down.
    """
    n = next(_SOURCES)
    return f"127.0.{1 + n // 250}.{1 + n % 250}"


class _IMAP4From(imaplib.IMAP4):
    def __init__(self, host: str, port: int, *, source: str, timeout: float) -> None:
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self._source, 0)
        )


def sasl_payload(mechanism: str, user: str, token: str, host: str, port: int) -> bytes:
    if mechanism == "XOAUTH2":
        return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    return f"n,a={user},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01".encode()


def imap_authenticate(
    host: str,
    port: int,
    mechanism: str,
    user: str,
    token: str,
    *,
    source: str | None = None,
    timeout: float = 30.0,
) -> tuple[str, str]:
    """``AUTHENTICATE`` with imaplib; returns ("OK", text) or ("NO"/"BAD", the error text).

    The connection comes from ``source`` (default: :func:`fresh_source_address`).

    A failure challenge from the server is answered the way RFC 7628 (a
    single %x01) and XOAUTH2 (an empty line) ask.
    """
    payload = sasl_payload(mechanism, user, token, host, port)
    rounds = 0

    def respond(_challenge: bytes) -> bytes:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            return payload
        return b"\x01" if mechanism == "OAUTHBEARER" else b""

    imap = _IMAP4From(host, port, source=source or fresh_source_address(), timeout=timeout)
    try:
        # What IMAP4.authenticate() does, minus turning NO/BAD into one exception:
        # the tagged status is what the tests are about.
        imap.literal = imaplib._Authenticator(respond).process  # type: ignore[attr-defined]
        typ, data = imap._simple_command("AUTHENTICATE", mechanism)
        return typ, b" ".join(d for d in data if isinstance(d, bytes)).decode(errors="replace")
    finally:
        with contextlib.suppress(OSError, imaplib.IMAP4.error):
            imap.logout()


def curl_imap_auth(
    host: str, port: int, user: str, token: str, mechanism: str, *, timeout: float = 30.0
) -> tuple[int, str]:
    """curl's own IMAP OAUTHBEARER/XOAUTH2 client: ``curl imap://HOST:PORT/ --oauth2-bearer``.

    Lists the mailboxes after logging in. Returns (exit status, verbose stderr):
    0 is success, 67 (CURLE_LOGIN_DENIED) a refusal. The verbose text holds
    the token (base64): keep it out of assertion messages.
    """
    curl = shutil.which("curl") or "curl"
    cmd = [
        curl,
        "-v",
        "-sS",
        "--max-time",
        str(int(timeout)),
        "--url",
        f"imap://{host}:{port}/",
        "--user",
        f"{user}:",
        "--oauth2-bearer",
        token,
        "--login-options",
        f"AUTH={mechanism}",
        "--sasl-ir",
        "--interface",
        fresh_source_address(),
    ]
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


# --------------------------------------------------------------------------- the daemon behind it

CALLER = "dovecot"
CALLER_SECRET = "s3cret-for-dovecot"


def daemon_config(workdir: Path, http_port: int, providers_and_rules: str) -> Path:
    """The daemon's config behind Dovecot: its auth socket, HTTP on ``http_port`` for
    ``CALLER`` (HTTP Basic), ready at once; then ``providers_and_rules`` (TOML)."""
    users = workdir / "http-users"
    users.write_text(f"# caller:password\n{CALLER}:{CALLER_SECRET}\n")
    users.chmod(0o600)
    config = workdir / "saslauthd-oidc.toml"
    config.write_text(
        f"""
[server]
auth_socket = "{workdir / "auth"}"
http_listen = "127.0.0.1:{http_port}"
request_timeout = 3.0

[http]
users_file = "{users}"
readyz_grace = 0

[logging]
level = "info"
format = "json"
{providers_and_rules}"""
    )
    return config


@contextlib.contextmanager
def behind_dovecot(providers_and_rules: str) -> Iterator[tuple[Daemon, DovecotInstance]]:
    """``saslauthd-oidc serve`` (:func:`daemon_config`) with a private Dovecot in front,
    whose ``introspection_url`` names ``CALLER``; the daemon must exit 0 when stopped."""
    workdir = make_shared_tmpdir()
    http_port = free_tcp_port()
    config = daemon_config(workdir, http_port, providers_and_rules)
    daemon = Daemon(config, workdir / "auth", workdir / "daemon.log")
    url = f"http://{CALLER}:{CALLER_SECRET}@127.0.0.1:{http_port}/introspect"
    try:
        with DovecotInstance(url) as dc:
            yield daemon, dc
    finally:
        assert daemon.stop() == 0, daemon.log()
