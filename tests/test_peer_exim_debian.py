"""The README's Exim recipes, taken from README.md, in Debian's split and one-file layouts.

Debian's Exim is configured from ``/etc/exim4/conf.d/*`` by
``update-exim4.conf``; an administrator adds a file to ``conf.d/auth/`` and
macros to ``conf.d/main/000_localmacros``. :class:`tests.peers.exim.DebianExim`
does exactly that with the README's ``exim-authenticators`` and
``exim-localmacros`` recipes, runs Debian's ``update-exim4.conf`` on Debian's
own ``conf.d`` (from the unpacked exim4-config package) and starts Exim on
the result. The recipe's socket path is the only edit.

Checked: the generated configuration contains the recipe after ``begin
authenticators``; EHLO offers no AUTH before STARTTLS and OAUTHBEARER and
XOAUTH2 after it (``server_advertise_condition = ${if def:tls_in_cipher}``),
an AUTH before STARTTLS is refused without reaching the daemon, and tokens
log in (smtplib, curl) with ``A=`` the account in Exim's mainlog.
"""

from __future__ import annotations

import shutil
import smtplib
import subprocess
from collections.abc import Iterator

import pytest

from saslauthd_oidc.tools.devissuer import DevIssuer, DevIssuerThread
from tests.conftest import require_peer
from tests.peers.daemon import Daemon
from tests.peers.exim import README_SOCKET, DebianExim, exim_available
from tests.peers.postfix import curl_available, make_shared_tmpdir
from tests.peers.tls import client_context, self_signed_cert
from tests.recipes import recipe, substitute
from tests.support import oauthbearer, write_config, xoauth2

pytestmark = pytest.mark.peer

USER = "alice@example.org"


@pytest.fixture(scope="module", params=[True, False], ids=["split", "one-file"])
def stack(request: pytest.FixtureRequest) -> Iterator[tuple[DebianExim, Daemon, DevIssuer]]:
    require_peer("exim", exim_available())
    with DevIssuerThread(DevIssuer(algorithms=("ES256",))) as issuer:
        assert issuer.issuer
        workdir = make_shared_tmpdir()
        sock = workdir / "auth"
        write_config(workdir / "saslauthd-oidc.toml", sock, issuer.issuer)
        daemon = Daemon(workdir / "saslauthd-oidc.toml", sock, workdir / "daemon.log")
        cert, key = self_signed_cert(workdir)
        auth_file = substitute(recipe("exim-authenticators"), {README_SOCKET: str(sock)})
        try:
            exim = DebianExim(auth_file, recipe("exim-localmacros"), cert, key, split=request.param)
            with exim:
                yield exim, daemon, issuer
        finally:
            assert daemon.stop() == 0, daemon.log()


def test_update_exim4_conf_puts_the_recipe_into_the_authenticators(
    stack: tuple[DebianExim, Daemon, DevIssuer],
) -> None:
    exim, _, _ = stack
    assert exim.directory is not None
    generated = (exim.directory / "exim4.conf").read_text()
    authenticators = generated[generated.index("begin authenticators") :]
    assert "driver = dovecot" in authenticators
    assert "server_advertise_condition = ${if def:tls_in_cipher}" in authenticators
    # the README names update-exim4.conf as the step that builds this file
    assert "update-exim4.conf" in recipe("exim-update.sh")


def test_no_auth_before_starttls(stack: tuple[DebianExim, Daemon, DevIssuer]) -> None:
    exim, daemon, issuer = stack
    tok = issuer.mint(email=USER)
    with smtplib.SMTP(exim.host, exim.port, local_hostname="client.test.example", timeout=30) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        assert not s.has_extn("auth"), s.esmtp_features
        code, text = s.docmd("AUTH", "XOAUTH2 " + _b64(xoauth2(tok)))
        assert code == 503, text
        assert b"not advertised" in text
    assert daemon.events_for(tok, timeout=0.5) == []


@pytest.mark.parametrize("mech", ["OAUTHBEARER", "XOAUTH2"])
def test_auth_after_starttls(stack: tuple[DebianExim, Daemon, DevIssuer], mech: str) -> None:
    exim, daemon, issuer = stack
    tok = issuer.mint(email=USER)
    payload = oauthbearer(tok) if mech == "OAUTHBEARER" else xoauth2(tok)
    with smtplib.SMTP(exim.host, exim.port, local_hostname="client.test.example", timeout=30) as s:
        s.starttls(context=client_context())
        s.ehlo()
        assert {"OAUTHBEARER", "XOAUTH2"} <= set(s.esmtp_features["auth"].split())
        code, _ = s.auth(mech, lambda challenge=None: payload.decode())
        assert code == 235
    assert daemon.events_for(tok)[-1]["outcome"] == "ok"


def test_curl_starttls_xoauth2(stack: tuple[DebianExim, Daemon, DevIssuer]) -> None:
    require_peer("curl", curl_available())
    exim, _, issuer = stack
    curl = shutil.which("curl") or "curl"
    res = subprocess.run(
        [
            *(curl, "-sS", "--max-time", "20", "--ssl-reqd", "--insecure"),
            *("--url", f"smtp://{exim.host}:{exim.port}/", "--user", f"{USER}:"),
            *("--oauth2-bearer", issuer.mint(email=USER), "--login-options", "AUTH=XOAUTH2"),
            *("-X", "NOOP"),
        ],
        capture_output=True,
        text=True,
        timeout=40,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr[-500:]


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
