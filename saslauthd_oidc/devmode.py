"""``saslauthd-oidc dev``: the daemon on a built-in development issuer, for a first try.

Starts a :class:`~saslauthd_oidc.devissuer.DevIssuer` on loopback (a real
HTTP server with discovery and JWKS), writes the equivalent TOML config and a
freshly minted token into a work directory, prints how to try it with
``auth-test``, curl and Postfix, and serves until interrupted. Nothing here is
for production: the issuer's keys live in memory and die with the process.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w
import trio

from saslauthd_oidc.config import Config, parse_config
from saslauthd_oidc.daemon import run_daemon, socket_in_use
from saslauthd_oidc.devissuer import DevIssuer, issuer_for, mint_offline
from saslauthd_oidc.engine import Engine
from saslauthd_oidc.observability import configure_logging

# Under /tmp so that the postfix user can reach the socket; run_dev refuses the
# directory when another user owns it.
DEFAULT_DEV_DIR = "/tmp/saslauthd-oidc-dev"  # noqa: S108
DEV_USER = "alice@example.org"
DEV_AUDIENCE = "mail"


DEV_INTROSPECTION_CLIENT = "saslauthd"
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
    issuer: str, workdir: Path, *, kanidm: Sequence[str] = (), authentik: Sequence[str] = ()
) -> dict[str, Any]:
    config = _dev_config(issuer, workdir)
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


def _dev_config(issuer: str, workdir: Path) -> dict[str, Any]:
    return {
        "server": {
            "auth_socket": str(workdir / "auth"),
            # Postfix's smtpd runs as user postfix and must reach the socket.
            "auth_socket_mode": "0666",
            "mechanisms": ["OAUTHBEARER", "XOAUTH2"],
        },
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

Through Postfix (main.cf; the socket is world-accessible in dev mode):
  smtpd_sasl_auth_enable = yes
  smtpd_sasl_type = dovecot
  smtpd_sasl_path = {socket_path}
and then:
  curl -v --url smtp://127.0.0.1:25 --oauth2-bearer "$(cat {token_file})" \\
       --login-options AUTH=OAUTHBEARER --user {DEV_USER}: -X NOOP

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
) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    if workdir.lstat().st_uid != os.getuid() or workdir.is_symlink():
        print(f"saslauthd-oidc: {workdir} belongs to another user; use --dir", file=sys.stderr)
        return 2
    if socket_in_use(str(workdir / "auth")):
        print(f"saslauthd-oidc: {workdir / 'auth'} is in use by another process", file=sys.stderr)
        return 2
    workdir.chmod(0o755)  # the postfix user must be able to reach the socket inside
    issuer = DevIssuer(algorithms=("ES256", "RS256"), any_issuer_path=True)
    try:
        return await _serve_dev(workdir, issuer, issuer_port, kanidm, authentik)
    finally:
        # Its keys die with this process: dev-token must not mint with them any more.
        (workdir / STATE_FILE).unlink(missing_ok=True)


async def _serve_dev(
    workdir: Path,
    issuer: DevIssuer,
    issuer_port: int,
    kanidm: Sequence[str],
    authentik: Sequence[str],
) -> int:
    async with trio.open_nursery() as nursery:
        await nursery.start(issuer.serve, "127.0.0.1", issuer_port)
        assert issuer.issuer is not None
        secret = issuer.clients[DEV_INTROSPECTION_CLIENT] = secrets.token_urlsafe(24)
        _write_private(workdir / "introspection.secret", secret + "\n")
        # For dev-token: mint tokens with these keys from another terminal.
        _write_private(workdir / STATE_FILE, json.dumps(issuer.export_state()) + "\n")
        raw = dev_config(issuer.issuer, workdir, kanidm=kanidm, authentik=authentik)
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
