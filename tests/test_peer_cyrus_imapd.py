"""The README's Cyrus IMAP recipe, taken from README.md, against Debian's Cyrus IMAP 3.6.

Cyrus's ``imapd.conf`` ends with the ``cyrus-imapd.conf`` recipe; the daemon's
``[server]`` is the ``saslauthd-socket.toml`` recipe (group
``saslauthd-oidc-clients``, mode 0660), so ``imapd`` (user ``cyrus``, in that
group as the Debian package's postinst puts it) reaches
the socket only through its group. Only the socket path is changed.
"""

from __future__ import annotations

import contextlib
import grp
import imaplib
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread
from tests.conftest import require_peer
from tests.peers.cyrus import README_MUX
from tests.peers.cyrus_imapd import CyrusImapd, cyrus_imapd_available
from tests.peers.daemon import Daemon
from tests.peers.groups import CLIENT_GROUP, ensure_client_group
from tests.peers.postfix import make_shared_tmpdir
from tests.recipes import recipe, substitute

pytestmark = pytest.mark.peer

USER = "alice@example.org"


def rules(issuer: str) -> str:
    return f"""
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

[[rule]]
name = "office-only"
provider = "dev"
audiences = ["office"]
remote_networks = ["127.0.0.0/8"]
username = "{{email}}"
"""


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Daemon, DevIssuer, Path]]:
    require_peer("cyrus-imapd", cyrus_imapd_available())
    require_peer(CLIENT_GROUP, ensure_client_group())
    with DevIssuerThread(DevIssuer(algorithms=("ES256",))) as issuer:
        assert issuer.issuer
        workdir = make_shared_tmpdir()
        mux = workdir / "mux"
        server = substitute(recipe("saslauthd-socket.toml"), {README_MUX: str(mux)})
        config = workdir / "saslauthd-oidc.toml"
        config.write_text(server + rules(issuer.issuer))
        daemon = Daemon(config, mux, workdir / "daemon.log")
        try:
            yield daemon, issuer, mux
        finally:
            assert daemon.stop() == 0, daemon.log()


def imapd_conf(mux: Path) -> str:
    return substitute(recipe("cyrus-imapd.conf"), {README_MUX: str(mux)})


def login(cy: CyrusImapd, user: str, token: str) -> tuple[str, str]:
    imap = imaplib.IMAP4(cy.host, cy.port, timeout=30)
    try:
        typ, data = imap.login(user, token)
        return typ, b" ".join(data).decode()
    except imaplib.IMAP4.error as exc:
        return "NO", str(exc)
    finally:
        with contextlib.suppress(OSError, imaplib.IMAP4.error):
            imap.logout()


def test_socket_is_for_the_client_group_only(stack: tuple[Daemon, DevIssuer, Path]) -> None:
    _, _, mux = stack
    st = mux.stat()
    assert grp.getgrgid(st.st_gid).gr_name == CLIENT_GROUP
    assert stat.S_IMODE(st.st_mode) & 0o007 == 0


def test_recipe_logs_in_with_the_token_as_password(stack: tuple[Daemon, DevIssuer, Path]) -> None:
    daemon, issuer, mux = stack
    with CyrusImapd(imapd_conf(mux)) as cy:
        tok = issuer.mint(email=USER)
        typ, text = login(cy, USER, tok)
        assert typ == "OK", text
        event = daemon.events_for(tok)[-1]
        assert event["outcome"] == "ok" and event["frontend"] == "saslauthd"
        assert event["service"] == "imap" and event["mech"] == "PLAIN"
        # Cyrus sends no client address, so a remote_networks rule cannot match:
        assert not event.get("remote")
        office = issuer.mint(email=USER, audience="office")
        typ, _ = login(cy, USER, office)
        assert typ == "NO"
        assert daemon.events_for(office)[-1]["outcome"] == "fail"
        # A refused token is a refused login.
        typ, _ = login(cy, USER, issuer.mint(email=USER, audience="other"))
        assert typ == "NO"


def test_without_virtdomains_cyrus_refuses_what_the_daemon_accepted(
    stack: tuple[Daemon, DevIssuer, Path],
) -> None:
    daemon, issuer, mux = stack
    conf = substitute(imapd_conf(mux), {"virtdomains: userid\n": ""})
    with CyrusImapd(conf) as cy:
        tok = issuer.mint(email=USER)
        typ, text = login(cy, USER, tok)
        assert typ == "NO" and "Login failed: authentication failure" in text, text
        assert daemon.events_for(tok)[-1]["outcome"] == "ok"
        if "syslog:" in cy.log():  # the log shim is there (a C compiler was found)
            cy.wait_for_log(r"SASL cross-realm login alice@example\.org denied", timeout=3)
