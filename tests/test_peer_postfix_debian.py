"""The README's Postfix recipes, taken from README.md, on Postfix with Debian's stock master.cf.

Debian's postfix package runs smtpd chrooted into the queue directory
(``smtp inet n - y - - smtpd``). Each test here starts a private Postfix with
that master.cf byte for byte (``PostfixInstance(stock_master_cf=True)``,
chroot prepared by Debian's own ``configure-instance.sh``) and the README's
``main.cf`` lines as README.md has them (:mod:`tests.recipes`), so a recipe
and its test cannot drift apart. The only edit made to a recipe is the queue
directory: ``/var/spool/postfix`` is the instance's own.

* the systemd route: the socket where the README's socket-unit drop-in puts
  it (``private/saslauthd-oidc``), with the user, group and mode of the
  shipped ``contrib/systemd/saslauthd-oidc.socket``, bound as root by
  ``systemd-socket-activate`` and passed to the daemon, which runs as an
  unprivileged user (``nobody`` stands in for ``saslauthd-oidc``);
* the route without systemd: the daemon, unprivileged, binds its socket in a
  directory of its own made by the README's ``install -d`` line;
* dev mode as root: the ``main.cf`` lines it prints, and the socket it puts
  into the queue directory;
* what breaks: an absolute socket path outside the chroot (what dev mode
  used to print);
* the TLS recipe: no AUTH before STARTTLS, OAUTHBEARER/XOAUTH2 after it
  (smtplib, curl); the advice it replaced kills every smtpd;
* long tokens: a 4 KB token on the AUTH line fails with Postfix's default
  ``line_length_limit`` and works with the README's long-token lines.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import smtplib
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread
from tests.conftest import require_peer
from tests.peers.daemon import Daemon
from tests.peers.groups import CLIENT_GROUP, ensure_client_group
from tests.peers.postfix import (
    PostfixInstance,
    curl_available,
    make_shared_tmpdir,
    master_cf_row,
    smtp_auth,
    smtp_ehlo,
    stock_master_cf,
    stock_postfix_available,
)
from tests.peers.tls import client_context, self_signed_cert
from tests.recipes import main_cf_settings, recipe, substitute

pytestmark = pytest.mark.peer

USER = "alice@example.org"
QUEUE = "/var/spool/postfix"
REPO = Path(__file__).resolve().parent.parent
#: Postfix 3.7's own answer to an AUTH line it cut at line_length_limit.
POSTFIX_CUT_REPLY = "5.7.8 Error: authentication failed: Invalid base64 data in initial response"
SOCKET_UNIT = REPO / "contrib" / "systemd" / "saslauthd-oidc.socket"


def oauthbearer(token: str, user: str = USER) -> bytes:
    return f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()


def xoauth2(token: str, user: str = USER) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def unit_settings(text: str, section: str) -> dict[str, list[str]]:
    """``Key=Value`` lines of one section of a systemd unit; an empty value resets the list."""
    out: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        if current != section:
            continue
        key, _, value = line.partition("=")
        values = out.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return out


def rules_toml(issuer: str, *, require_secured: bool = False) -> str:
    secured = "require_secured = true\n" if require_secured else ""
    return f"""
request_timeout = 3.0

[logging]
level = "info"
format = "json"

[[provider]]
name = "dev"
issuer = "{issuer}"
allow_http = true

[[rule]]
name = "mail"
provider = "dev"
audiences = ["mail"]
username = "{{email}}"
{secured}"""


def config_text(server_toml: str, issuer: str, *, require_secured: bool = False) -> str:
    """The README's ``[server]`` recipe plus a provider and a rule for the dev issuer."""
    head, sep, rest = rules_toml(issuer, require_secured=require_secured).partition("\n[logging]")
    # request_timeout belongs to [server]: append it to the recipe's table.
    return server_toml.rstrip("\n") + "\n" + head.strip() + "\n" + sep + rest


@pytest.fixture(scope="module")
def stock_ready() -> None:
    require_peer("postfix with Debian's stock master.cf", stock_postfix_available())


@pytest.fixture(scope="module")
def issuer() -> Iterator[DevIssuer]:
    with DevIssuerThread(DevIssuer(algorithms=("ES256",))) as iss:
        yield iss


def recipe_main_cf() -> dict[str, str]:
    return main_cf_settings(recipe("postfix-main.cf"))


def unit_socket_path() -> str:
    listen = unit_settings(recipe("postfix-socket-unit"), "Socket")["ListenStream"]
    assert len(listen) == 1, listen
    return listen[0]


class SocketActivated:
    """The daemon behind the socket ``saslauthd-oidc.socket`` + the README drop-in make."""

    def __init__(self, workdir: Path, issuer: str, *, require_secured: bool = False) -> None:
        self.workdir = workdir
        self.issuer = issuer
        self.require_secured = require_secured
        self.daemon: Daemon | None = None

    def __call__(self, pf: PostfixInstance) -> None:
        path = Path(substitute(unit_socket_path(), {QUEUE: str(pf.queue_directory)}))
        shipped = unit_settings(SOCKET_UNIT.read_text(), "Socket")
        config = self.workdir / "saslauthd-oidc.toml"
        config.write_text(
            config_text("[server]\n", self.issuer, require_secured=self.require_secured)
        )
        self.daemon = Daemon(
            config,
            path,
            self.workdir / "daemon.log",
            prefix=["systemd-socket-activate", "-l", str(path), "--fdname=auth"],
            # the service runs unprivileged (User= in the unit); the socket is systemd's
            drop_to=("nobody", "nogroup"),
        )
        # What systemd does with SocketUser=, SocketGroup=, SocketMode=
        # (and the package's postinst, which puts postfix in that group):
        require_peer(CLIENT_GROUP, ensure_client_group())
        os.chown(
            path,
            pwd.getpwnam(shipped["SocketUser"][0]).pw_uid,
            grp.getgrnam(shipped["SocketGroup"][0]).gr_gid,
        )
        os.chmod(path, int(shipped["SocketMode"][0], 8))

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()


@pytest.fixture(scope="module")
def socket_activate_ready() -> None:
    if shutil.which("systemd-socket-activate") is None:
        require_peer("systemd-socket-activate", "not installed (Debian: systemd)")


@pytest.fixture(scope="module")
def self_signed() -> tuple[Path, Path]:
    """A self-signed certificate for mx.test.example; smtpd reads the key as root."""
    return self_signed_cert(make_shared_tmpdir("saslo-tls-"))


def tls_main_cf(cert: Path, key: Path) -> dict[str, str]:
    text = substitute(
        recipe("postfix-tls-main.cf"),
        {
            "/etc/ssl/certs/ssl-cert-snakeoil.pem": str(cert),
            "/etc/ssl/private/ssl-cert-snakeoil.key": str(key),
        },
    )
    return main_cf_settings(text)


def long_token(issuer: DevIssuer, size: int = 4096) -> str:
    """A JWT of at least ``size`` bytes (a large ``groups`` claim, as Entra ID/Keycloak send)."""
    groups = [f"group-{n:05d}-mail-users" for n in range(size // 20)]
    tok = issuer.mint(email=USER, claims={"groups": groups})
    assert len(tok) >= size
    return tok


# --------------------------------------------------------------------------- recipes are consistent


def test_stock_master_cf_runs_smtpd_chrooted(stock_ready: None) -> None:
    row = master_cf_row(stock_master_cf(), "smtp", "inet")
    assert row[4] == "y" and row[7] == "smtpd", row


def test_socket_unit_drop_in_matches_smtpd_sasl_path() -> None:
    """The drop-in's socket is where a chrooted smtpd looks for ``smtpd_sasl_path``."""
    sasl_path = recipe_main_cf()["smtpd_sasl_path"]
    assert not sasl_path.startswith("/"), "a chrooted smtpd needs a queue-relative path"
    assert Path(unit_socket_path()) == Path(QUEUE) / sasl_path
    shipped = unit_settings(SOCKET_UNIT.read_text(), "Socket")
    assert shipped["SocketGroup"] == [CLIENT_GROUP]
    assert stat.S_IMODE(int(shipped["SocketMode"][0], 8)) & 0o007 == 0


# --------------------------------------------------------------------------- systemd route


@pytest.fixture(scope="module")
def chrooted(
    stock_ready: None, socket_activate_ready: None, issuer: DevIssuer
) -> Iterator[tuple[PostfixInstance, SocketActivated]]:
    """Stock master.cf + the README's main.cf lines, nothing else about SASL or TLS."""
    assert issuer.issuer
    activated = SocketActivated(make_shared_tmpdir(), issuer.issuer)
    try:
        with PostfixInstance(
            recipe_main_cf()["smtpd_sasl_path"],
            stock_master_cf=True,
            extra_main_cf=recipe_main_cf(),
            before_start=activated,
        ) as pf:
            yield pf, activated
    finally:
        activated.stop()


def test_chrooted_smtpd_authenticates_through_the_socket_unit_path(
    chrooted: tuple[PostfixInstance, SocketActivated], issuer: DevIssuer
) -> None:
    pf, activated = chrooted
    assert {"OAUTHBEARER", "XOAUTH2"} <= set(smtp_ehlo(pf.host, pf.port)["auth"].split())
    tok = issuer.mint(email=USER)
    assert smtp_auth(pf.host, pf.port, "OAUTHBEARER", oauthbearer(tok))[-1][0] == 235
    assert smtp_auth(pf.host, pf.port, "XOAUTH2", xoauth2(tok))[-1][0] == 235
    bad = issuer.mint(email=USER, audience="another-client")
    assert smtp_auth(pf.host, pf.port, "XOAUTH2", xoauth2(bad), continuation=b"")[-1][0] == 535
    assert activated.daemon is not None
    assert activated.daemon.events_for(tok)[-1]["outcome"] == "ok"
    assert activated.daemon.events_for(bad)[-1]["reason"] == "wrong_audience"
    # it really was a chrooted smtpd: the instance's log names the chroot-relative path
    assert "no SASL authentication mechanisms" not in pf.maillog()


def test_curl_through_chrooted_smtpd(
    chrooted: tuple[PostfixInstance, SocketActivated], issuer: DevIssuer
) -> None:
    require_peer("curl", curl_available())
    pf, _ = chrooted
    curl = shutil.which("curl") or "curl"
    res = subprocess.run(
        [
            *(curl, "-sS", "--max-time", "20", "--url", f"smtp://{pf.host}:{pf.port}/"),
            *("--oauth2-bearer", issuer.mint(email=USER), "--login-options", "AUTH=OAUTHBEARER"),
            *("--user", f"{USER}:", "-X", "NOOP"),
        ],
        capture_output=True,
        text=True,
        timeout=40,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr[-500:]


def test_long_token_on_the_auth_line_needs_the_long_token_lines(
    chrooted: tuple[PostfixInstance, SocketActivated], issuer: DevIssuer
) -> None:
    """Postfix's default line_length_limit (2048) refuses a 4 KB token on the AUTH line."""
    pf, activated = chrooted
    assert activated.daemon is not None
    tok = long_token(issuer)
    # Through the 334 continuation (what curl does) the default limits suffice.
    replies = smtp_auth(pf.host, pf.port, "OAUTHBEARER", None, continuation=oauthbearer(tok))
    assert replies[-1][0] == 235, replies
    # On the AUTH line, as Thunderbird, smtplib and mutt send it: Postfix cuts the
    # line at 2048 bytes and refuses the rest itself; the daemon never sees it.
    seen = len([e for e in activated.daemon.log_events() if e.get("event") == "authentication"])
    cut = long_token(issuer)
    replies = smtp_auth(pf.host, pf.port, "XOAUTH2", xoauth2(cut), continuation=b"")
    assert replies == [(535, POSTFIX_CUT_REPLY)], replies
    with smtplib.SMTP(pf.host, pf.port, local_hostname="client.test.example", timeout=30) as s:
        s.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.auth("XOAUTH2", lambda challenge=None: xoauth2(cut).decode())
    # A login after them is the next line in the daemon's log: none came in between.
    probe = issuer.mint(email=USER)
    assert smtp_auth(pf.host, pf.port, "XOAUTH2", xoauth2(probe))[-1][0] == 235
    assert activated.daemon.events_for(probe)
    after = [e for e in activated.daemon.log_events() if e.get("event") == "authentication"]
    assert len(after) == seen + 1, after[seen:]


# --------------------------------------------------------------------------- TLS + long tokens


@pytest.fixture(scope="module")
def chrooted_tls(
    stock_ready: None,
    socket_activate_ready: None,
    issuer: DevIssuer,
    self_signed: tuple[Path, Path],
) -> Iterator[tuple[PostfixInstance, SocketActivated]]:
    """The README's main.cf, TLS and long-token lines, on the stock master.cf.

    The rule says ``require_secured``: a login only passes if Postfix told the
    daemon the session is TLS-protected.
    """
    assert issuer.issuer
    activated = SocketActivated(make_shared_tmpdir(), issuer.issuer, require_secured=True)
    main = {
        **recipe_main_cf(),
        **tls_main_cf(*self_signed),
        **main_cf_settings(recipe("postfix-long-tokens-main.cf")),
    }
    try:
        with PostfixInstance(
            main["smtpd_sasl_path"],
            stock_master_cf=True,
            extra_main_cf=main,
            before_start=activated,
        ) as pf:
            yield pf, activated
    finally:
        activated.stop()


def test_tls_recipe_offers_auth_only_after_starttls(
    chrooted_tls: tuple[PostfixInstance, SocketActivated], issuer: DevIssuer
) -> None:
    pf, activated = chrooted_tls
    with smtplib.SMTP(pf.host, pf.port, local_hostname="client.test.example", timeout=30) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        assert not s.has_extn("auth"), s.esmtp_features
        s.starttls(context=client_context())
        s.ehlo()
        assert {"OAUTHBEARER", "XOAUTH2"} <= set(s.esmtp_features["auth"].split())
        tok = issuer.mint(email=USER)
        code, _ = s.auth("OAUTHBEARER", lambda challenge=None: oauthbearer(tok).decode())
        assert code == 235
    assert activated.daemon is not None
    # the rule requires "secured": Postfix said so after STARTTLS
    assert activated.daemon.events_for(tok)[-1]["outcome"] == "ok"


def test_tls_recipe_long_token_on_the_auth_line(
    chrooted_tls: tuple[PostfixInstance, SocketActivated], issuer: DevIssuer
) -> None:
    """With the README's long-token lines, a 4 KB token on the AUTH line logs in (smtplib)."""
    pf, activated = chrooted_tls
    tok = long_token(issuer)
    with smtplib.SMTP(pf.host, pf.port, local_hostname="client.test.example", timeout=30) as s:
        s.starttls(context=client_context())
        s.ehlo()
        code, _ = s.auth("XOAUTH2", lambda challenge=None: xoauth2(tok).decode())
        assert code == 235
    assert activated.daemon is not None
    assert activated.daemon.events_for(tok)[-1]["outcome"] == "ok"


def test_curl_starttls_then_oauthbearer(
    chrooted_tls: tuple[PostfixInstance, SocketActivated], issuer: DevIssuer
) -> None:
    require_peer("curl", curl_available())
    pf, _ = chrooted_tls
    curl = shutil.which("curl") or "curl"
    res = subprocess.run(
        [
            *(curl, "-sS", "--max-time", "20", "--ssl-reqd", "--insecure"),
            *("--url", f"smtp://{pf.host}:{pf.port}/"),
            *("--oauth2-bearer", long_token(issuer), "--login-options", "AUTH=OAUTHBEARER"),
            *("--user", f"{USER}:", "-X", "NOOP"),
        ],
        capture_output=True,
        text=True,
        timeout=40,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr[-500:]


def test_the_old_noplaintext_advice_kills_every_smtpd(
    stock_ready: None,
    socket_activate_ready: None,
    issuer: DevIssuer,
    self_signed: tuple[Path, Path],
) -> None:
    """Evidence for the README's warning: no mechanism survives before STARTTLS, smtpd dies."""
    assert issuer.issuer
    activated = SocketActivated(make_shared_tmpdir(), issuer.issuer)
    main = {
        **recipe_main_cf(),
        **tls_main_cf(*self_signed),
        "smtpd_tls_auth_only": "no",
        "smtpd_sasl_security_options": "noanonymous, noplaintext",
        "smtpd_sasl_tls_security_options": "noanonymous",
    }
    diagnostics = ""
    try:
        with PostfixInstance(
            main["smtpd_sasl_path"],
            stock_master_cf=True,
            extra_main_cf=main,
            before_start=activated,
            startup_timeout=8,
        ):
            pass
    except RuntimeError as exc:
        diagnostics = str(exc)
    finally:
        activated.stop()
    assert "skip mechanism: OAUTHBEARER" in diagnostics
    assert "fatal: no SASL authentication mechanisms" in diagnostics


# --------------------------------------------------------------------------- without systemd


def test_own_socket_directory_unprivileged_daemon(stock_ready: None, issuer: DevIssuer) -> None:
    """The no-systemd recipe: ``install -d`` + the ``[server]`` lines, daemon not root."""
    assert issuer.issuer
    workdir = make_shared_tmpdir()
    toml_text = recipe("postfix-own-socket.toml")
    socket_in_queue = Path(tomllib.loads(toml_text)["server"]["auth_socket"])
    sasl_path = str(socket_in_queue.relative_to(QUEUE))
    readme = (REPO / "README.md").read_text()
    assert f"smtpd_sasl_path = {sasl_path}" in readme
    # The daemon's system user: "nobody" stands in for saslauthd-oidc here.
    user = pwd.getpwnam("nobody")
    holder: dict[str, Daemon] = {}

    def start(pf: PostfixInstance) -> None:
        queue = str(pf.queue_directory)
        script = substitute(
            recipe("postfix-own-socket.sh"), {QUEUE: queue, "-o saslauthd-oidc": "-o nobody"}
        )
        subprocess.run(["/bin/sh", "-e", "-c", script], check=True, timeout=30)
        config = workdir / "saslauthd-oidc.toml"
        config.write_text(config_text(substitute(toml_text, {QUEUE: queue}), issuer.issuer or ""))
        sock = Path(queue) / sasl_path
        holder["daemon"] = Daemon(
            config,
            sock,
            workdir / "daemon.log",
            user="nobody",
            group=grp.getgrgid(user.pw_gid).gr_name,
        )
        st = sock.parent.stat()
        assert (st.st_uid, grp.getgrgid(st.st_gid).gr_name) == (user.pw_uid, "postfix")
        assert stat.S_IMODE(st.st_mode) & 0o007 == 0  # nobody else may enter

    try:
        main = {**recipe_main_cf(), "smtpd_sasl_path": sasl_path}
        with PostfixInstance(
            sasl_path, stock_master_cf=True, extra_main_cf=main, before_start=start
        ) as pf:
            tok = issuer.mint(email=USER)
            assert smtp_auth(pf.host, pf.port, "OAUTHBEARER", oauthbearer(tok))[-1][0] == 235
            assert holder["daemon"].events_for(tok)[-1]["outcome"] == "ok"
    finally:
        if "daemon" in holder:
            assert holder["daemon"].stop() == 0, holder["daemon"].log()


def test_absolute_socket_path_breaks_chrooted_smtpd(
    stock_ready: None, socket_activate_ready: None, issuer: DevIssuer
) -> None:
    """What dev mode used to print: an absolute path outside the chroot kills smtpd."""
    assert issuer.issuer
    workdir = make_shared_tmpdir()
    sock = workdir / "auth"
    config = workdir / "saslauthd-oidc.toml"
    config.write_text(
        config_text(f'[server]\nauth_socket = "{sock}"\nauth_socket_mode = "0666"\n', issuer.issuer)
    )
    daemon = Daemon(config, sock, workdir / "daemon.log")
    diagnostics = ""
    try:
        with PostfixInstance(
            str(sock),
            stock_master_cf=True,
            extra_main_cf={**recipe_main_cf(), "smtpd_sasl_path": str(sock)},
            startup_timeout=8,
        ):
            pass
    except RuntimeError as exc:
        diagnostics = str(exc)
    finally:
        daemon.stop()
    assert (
        f"Connect to Dovecot auth socket '{sock}' failed: No such file or directory" in diagnostics
    )
    assert "fatal: no SASL authentication mechanisms" in diagnostics


# --------------------------------------------------------------------------- dev mode


def printed_postfix_lines(text: str) -> dict[str, str]:
    """The ``main.cf`` lines dev mode printed under "Through Postfix"."""
    block = text[text.index("Through Postfix") :]
    block = block[: block.index("then `postfix reload`")]
    lines = [ln.strip() for ln in block.splitlines()[1:] if ln.startswith("  ") and " = " in ln]
    return main_cf_settings("\n".join(lines))


def test_dev_mode_postfix_lines_work_with_stock_postfix(stock_ready: None) -> None:
    """`scripts/dev` as root: the lines it prints make Debian's chrooted smtpd authenticate."""
    workdir = make_shared_tmpdir()
    out_path = workdir / "dev.out"
    holder: dict[str, subprocess.Popen[bytes]] = {}

    def start(pf: PostfixInstance) -> None:
        # What `saslauthd-oidc dev` (no --dir) does as root; postconf finds this
        # instance through MAIL_CONFIG, as it would find /etc/postfix.
        code = (
            "import trio; from pathlib import Path\n"
            "from saslauthd_oidc.tools.devmode import run_dev\n"
            f"d = Path({str(workdir)!r})\n"
            "raise SystemExit(trio.run(lambda: run_dev(d, postfix_queue=True)))"
        )
        with out_path.open("wb") as out:
            holder["dev"] = subprocess.Popen(
                [sys.executable, "-c", code],
                env={**os.environ, "MAIL_CONFIG": str(pf.config_directory)},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while "Stop with Ctrl-C" not in out_path.read_text(errors="replace"):
            assert holder["dev"].poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.05)
        printed = printed_postfix_lines(out_path.read_text())
        assert printed["smtpd_sasl_path"] == "private/saslauthd-oidc-dev"
        sock = pf.queue_directory / printed["smtpd_sasl_path"]
        st = sock.stat()
        assert grp.getgrgid(st.st_gid).gr_name == "postfix" and stat.S_IMODE(st.st_mode) == 0o660
        pf.postconf(printed, reload=False)

    try:
        with PostfixInstance(
            "private/saslauthd-oidc-dev", stock_master_cf=True, before_start=start
        ) as pf:
            tok = (workdir / "token").read_text().strip()
            assert smtp_auth(pf.host, pf.port, "OAUTHBEARER", oauthbearer(tok))[-1][0] == 235
    finally:
        if "dev" in holder:
            holder["dev"].send_signal(signal.SIGINT)
            assert holder["dev"].wait(20) == 0, out_path.read_text()
