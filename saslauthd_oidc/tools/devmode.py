"""``saslauthd-oidc dev``: the daemon on a built-in development issuer, for a first try.

Starts a :class:`~saslauthd_oidc.tools.devissuer.DevIssuer` on loopback (a real
HTTP server with discovery and JWKS), writes the equivalent TOML config and a
freshly minted token into a work directory, prints how to try it with
``auth-test``, curl and Postfix, and serves until interrupted. Nothing here is
for production: the issuer's keys live in memory and die with the process.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w
import trio

from saslauthd_oidc.config import Config, parse_config
from saslauthd_oidc.core.engine import Engine
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.service.listeners import socket_in_use
from saslauthd_oidc.service.logs import configure_logging
from saslauthd_oidc.tools.devissuer import DevIssuer, issuer_for, mint_offline

# Under /tmp so that the postfix user can reach the socket; run_dev refuses the
# directory when another user owns it.
DEFAULT_DEV_DIR = "/tmp/saslauthd-oidc-dev"  # noqa: S108
DEV_USER = "alice@example.org"
DEV_AUDIENCE = "mail"


DEV_INTROSPECTION_CLIENT = "saslauthd"
# In Postfix's queue directory, where a chrooted smtpd (Debian's default) looks.
POSTFIX_DEV_SOCKET = "private/saslauthd-oidc-dev"


def postfix_queue_socket() -> Path | None:
    """As root, with a configured Postfix: the dev socket inside its queue directory.

    Debian's master.cf runs smtpd chrooted into ``queue_directory``, where
    nothing under /tmp exists; ``private/`` (owner postfix, 0700) is where
    Postfix's own and Dovecot's auth sockets live. ``postconf`` honours
    ``MAIL_CONFIG``. ``None`` when not root or when there is no Postfix.
    """
    if os.geteuid() != 0:
        return None
    try:
        queue = subprocess.run(
            ["postconf", "-h", "queue_directory"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            stdin=subprocess.DEVNULL,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not queue or not (Path(queue) / "private").is_dir():
        return None
    return Path(queue) / POSTFIX_DEV_SOCKET


STATE_FILE = "issuer.json"  # the dev issuer's URL and private keys (0600), for dev-token


class DevTokenError(Exception):
    """dev-token cannot mint as asked (no running dev issuer state, unknown algorithm)."""


def dev_token(
    workdir: Path,
    *,
    issuer: str | None = None,
    sub: str = "alice",
    email: str | None = DEV_USER,
    audiences: Sequence[str] = (DEV_AUDIENCE,),
    azp: str | None = None,
    client_id: str | None = "dev-client",
    scope: str | None = "openid email profile",
    expires_in: int = 3600,
    typ: str | None = "at+jwt",
    alg: str = "ES256",
    claims: dict[str, Any] | None = None,
    now: float | None = None,
) -> tuple[str, list[str]]:
    """A JWT access token signed with the keys of the dev issuer running in ``workdir``.

    Returns the token and notes for the admin (an issuer the dev issuer does not
    serve, a token already expired). ``expires_in`` may be negative: the token
    is then issued an hour before it expired, as a real stale token is.
    """
    try:
        state = json.loads((workdir / STATE_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        raise DevTokenError(
            f"no dev issuer keys in {workdir / STATE_FILE}: start "
            f"`saslauthd-oidc dev --dir {workdir}` first"
        ) from None
    base = state["url"]
    iss = issuer_for(state["issuer"], issuer)
    notes = []
    if not iss.startswith(base + "/") and iss != base:
        notes.append(
            f"{iss} is not served by the dev issuer ({base}): no provider can fetch keys "
            "for it, so expect unknown_issuer (if no provider has it) or provider_unavailable"
        )
    issued = int(time.time() if now is None else now)
    exp = issued + expires_in
    if expires_in <= 0:
        issued = exp - 3600
        notes.append(f"the token expired {-expires_in} s ago")
    payload: dict[str, Any] = {
        "iss": iss,
        "sub": sub,
        "aud": audiences[0] if len(audiences) == 1 else list(audiences),
        "exp": exp,
        "iat": issued,
        "nbf": issued,
        "jti": secrets.token_hex(16),
        "azp": azp,
        "client_id": client_id,
        "scope": scope,
        "email": email,
        "preferred_username": email.split("@", 1)[0] if email else sub,
    }
    if not audiences:
        payload["aud"] = None
    payload.update(claims or {})
    payload = {k: v for k, v in payload.items() if v is not None}
    try:
        return mint_offline(state, payload, alg=alg, typ=typ), notes
    except KeyError as exc:
        raise DevTokenError(str(exc.args[0])) from None


def dev_config(
    issuer: str,
    workdir: Path,
    socket_path: Path | None = None,
    *,
    kanidm: Sequence[str] = (),
    authentik: Sequence[str] = (),
) -> dict[str, Any]:
    """``socket_path``: the auth socket in Postfix's queue directory (else ``workdir/auth``)."""
    config = _dev_config(issuer, workdir, socket_path)
    # Per-client issuers shaped like Kanidm's and Authentik's, served by the same dev issuer.
    for kind, names in (("kanidm", kanidm), ("authentik", authentik)):
        for name in names:
            config["provider"].append(
                {
                    "name": f"{kind}-{name}",
                    "issuer": issuer_for(issuer, f"{kind}:{name}"),
                    "allow_http": True,
                    "algorithms": ["ES256", "RS256"],
                }
            )
            config["rule"].append(
                {
                    "name": f"{kind}-{name}",
                    "provider": f"{kind}-{name}",
                    "audiences": [name],
                    "username": "{email}",
                }
            )
    return config


def _dev_config(issuer: str, workdir: Path, socket_path: Path | None) -> dict[str, Any]:
    server: dict[str, Any] = {
        "auth_socket": str(workdir / "auth"),
        # Postfix's smtpd runs as user postfix and must reach the socket.
        "auth_socket_mode": "0666",
        "mechanisms": ["OAUTHBEARER", "XOAUTH2"],
    }
    if socket_path is not None:  # in Postfix's queue directory: for postfix only
        server.update(
            auth_socket=str(socket_path), auth_socket_mode="0660", auth_socket_group="postfix"
        )
    return {
        "server": server,
        "logging": {"level": "info", "format": "console"},
        "provider": [
            {
                "name": "dev",
                "issuer": issuer,
                "allow_http": True,
                "algorithms": ["ES256", "RS256"],
                "token_types": ["at+jwt"],
                # opaque tokens: RFC 7662 introspection at the dev issuer
                "client_id": DEV_INTROSPECTION_CLIENT,
                "client_secret_file": str(workdir / "introspection.secret"),
            }
        ],
        "rule": [
            {
                "name": "dev",
                "provider": "dev",
                "audiences": [DEV_AUDIENCE],
                "username": "{email}",
            }
        ],
    }


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def postfix_lines(socket_path: str, token_file: Path) -> str:
    """The main.cf lines that point Postfix's smtpd at this run's socket."""
    curl = (
        f'  curl -v --url smtp://127.0.0.1:25 --oauth2-bearer "$(cat {token_file})" \\\n'
        f"       --login-options AUTH=OAUTHBEARER --user {DEV_USER}: -X NOOP\n"
    )
    if socket_path.endswith("/" + POSTFIX_DEV_SOCKET):
        return (
            "Through Postfix (main.cf; the socket is in Postfix's queue directory, so a\n"
            "chrooted smtpd -- Debian's stock master.cf -- reaches it too):\n"
            "  smtpd_sasl_auth_enable = yes\n"
            "  smtpd_sasl_type = dovecot\n"
            f"  smtpd_sasl_path = {POSTFIX_DEV_SOCKET}\n"
            "then `postfix reload`, and:\n" + curl
        )
    return (
        "Through Postfix (main.cf), if its smtpd is NOT chrooted (chroot column n in master.cf):\n"
        "  smtpd_sasl_auth_enable = yes\n"
        "  smtpd_sasl_type = dovecot\n"
        f"  smtpd_sasl_path = {socket_path}\n"
        "then `postfix reload`, and:\n"
        + curl
        + "Debian's stock master.cf runs smtpd chrooted into /var/spool/postfix, where\n"
        f'{socket_path} does not exist (smtpd logs "Connect to Dovecot auth\n'
        'socket ... failed" and "fatal: no SASL authentication mechanisms"). Run dev\n'
        "mode as root without --dir instead (sudo scripts/dev): it then puts the socket\n"
        "into Postfix's queue directory and prints\n"
        f"smtpd_sasl_path = {POSTFIX_DEV_SOCKET}.\n"
    )


def instructions(workdir: Path, socket_path: str, issuer: str) -> str:
    token_file = workdir / "token"
    opaque_file = workdir / "opaque-token"
    return f"""
saslauthd-oidc development mode
  issuer        {issuer}  (discovery: {issuer}/.well-known/openid-configuration)
  auth socket   {socket_path}  (Dovecot auth protocol)
  config        {workdir / "saslauthd-oidc.toml"}  (what this run is using)
  token         {token_file}  (an ES256 JWT access token for {DEV_USER}, valid 1 hour)
  opaque token  {opaque_file}  (checked by introspection at the issuer)

Try it from another terminal:
  .venv/bin/saslauthd-oidc auth-test --socket {socket_path} \\
      --token @{token_file} --user {DEV_USER}
  .venv/bin/saslauthd-oidc auth-test --socket {socket_path} \\
      --token @{token_file} --mech XOAUTH2 --user {DEV_USER}
  .venv/bin/saslauthd-oidc auth-test --socket {socket_path} \\
      --token @{opaque_file} --user {DEV_USER}
  .venv/bin/saslauthd-oidc explain --config {workdir / "saslauthd-oidc.toml"} \\
      --token @{token_file} --user {DEV_USER}

{postfix_lines(socket_path, token_file)}
Mint more test tokens (other users, audiences, azp, scopes, expiry, issuers
shaped like Kanidm's or Authentik's) and try a config against them:
  .venv/bin/saslauthd-oidc dev-token --dir {workdir} --issuer kanidm:webmail \\
      --sub bob --email bob@example.org --aud webmail --expires-in 600 > /tmp/bob.token
  .venv/bin/saslauthd-oidc explain --config YOUR.toml --token @/tmp/bob.token

Stop with Ctrl-C.
"""


async def run_dev(
    workdir: Path,
    *,
    issuer_port: int = 0,
    kanidm: Sequence[str] = (),
    authentik: Sequence[str] = (),
    postfix_queue: bool = False,
) -> int:
    """``postfix_queue``: as root with Postfix, put the socket into its queue directory."""
    workdir.mkdir(parents=True, exist_ok=True)
    if workdir.lstat().st_uid != os.getuid() or workdir.is_symlink():
        print(f"saslauthd-oidc: {workdir} belongs to another user; use --dir", file=sys.stderr)
        return 2
    in_queue = postfix_queue_socket() if postfix_queue else None
    socket_path = in_queue if in_queue is not None else workdir / "auth"
    if socket_in_use(str(socket_path)):
        print(f"saslauthd-oidc: {socket_path} is in use by another process", file=sys.stderr)
        return 2
    workdir.chmod(0o755)  # the postfix user must be able to reach the socket inside
    issuer = DevIssuer(algorithms=("ES256", "RS256"), any_issuer_path=True)
    try:
        return await _serve_dev(workdir, issuer, issuer_port, kanidm, authentik, in_queue=in_queue)
    finally:
        # Its keys die with this process: dev-token must not mint with them any more.
        (workdir / STATE_FILE).unlink(missing_ok=True)


async def _serve_dev(
    workdir: Path,
    issuer: DevIssuer,
    issuer_port: int,
    kanidm: Sequence[str],
    authentik: Sequence[str],
    *,
    in_queue: Path | None,
) -> int:
    async with trio.open_nursery() as nursery:
        await nursery.start(issuer.serve, "127.0.0.1", issuer_port)
        assert issuer.issuer is not None
        secret = issuer.clients[DEV_INTROSPECTION_CLIENT] = secrets.token_urlsafe(24)
        _write_private(workdir / "introspection.secret", secret + "\n")
        # For dev-token: mint tokens with these keys from another terminal.
        _write_private(workdir / STATE_FILE, json.dumps(issuer.export_state()) + "\n")
        raw = dev_config(issuer.issuer, workdir, in_queue, kanidm=kanidm, authentik=authentik)
        config_path = workdir / "saslauthd-oidc.toml"
        _write_private(config_path, tomli_w.dumps(raw))
        config = parse_config(raw, source=str(config_path))
        token = issuer.mint(email=DEV_USER, audience=DEV_AUDIENCE, lifetime=3600)
        _write_private(workdir / "token", token + "\n")
        opaque = issuer.mint_opaque(email=DEV_USER, audience=DEV_AUDIENCE, lifetime=3600)
        _write_private(workdir / "opaque-token", opaque + "\n")
        configure_logging(config.logging)
        await nursery.start(_daemon_then_stop, config, nursery.cancel_scope)
        assert config.server.auth_socket is not None
        print(instructions(workdir, config.server.auth_socket, issuer.issuer), file=sys.stderr)
    return 0


async def _daemon_then_stop(
    config: Config, scope: trio.CancelScope, *, task_status: trio.TaskStatus[Engine]
) -> None:
    """run_daemon returns on SIGINT/SIGTERM; the issuer must stop with it."""
    await run_daemon(config, task_status=task_status)
    scope.cancel()
