"""The ``saslauthd-oidc`` command: serve, check-config, explain, auth-test, dev.

Exit codes (DESIGN.md §5): 0 ok, 1 authentication refused, 2 usage or config
error, 3 temporary failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from saslauthd_oidc import __version__
from saslauthd_oidc.authtest import AuthTestError, run_auth_test
from saslauthd_oidc.config import (
    Config,
    ConfigError,
    LoggingConfig,
    load_config,
    resolve_config_path,
)
from saslauthd_oidc.daemon import run_daemon
from saslauthd_oidc.devmode import DEFAULT_DEV_DIR, run_dev
from saslauthd_oidc.engine import Engine
from saslauthd_oidc.frontends.http import load_caller_auth
from saslauthd_oidc.limits import current_nofile_limit, limit_warnings
from saslauthd_oidc.observability import configure_logging
from saslauthd_oidc.outcome import Outcome, Verdict
from saslauthd_oidc.providers import ProviderRegistry
from saslauthd_oidc.providers.http import make_http_client
from saslauthd_oidc.request import AuthRequest, Credentials, Mechanism, RequestContext
from saslauthd_oidc.rules import config_warnings, ordered
from saslauthd_oidc.systemd import ActivationError, Notifier, take_listen_fds
from saslauthd_oidc.workers import serve_workers

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_TEMPFAIL = 0, 1, 2, 3
_EXIT_FOR = {Outcome.OK: EXIT_OK, Outcome.FAIL: EXIT_REFUSED, Outcome.TEMPFAIL: EXIT_TEMPFAIL}


class UsageError(Exception):
    pass


def read_token(value: str) -> str:
    """TOKEN, @FILE or - (standard input): files and stdin keep tokens out of ``ps``."""
    if value == "-":
        text = sys.stdin.read()
    elif value.startswith("@"):
        try:
            text = Path(value[1:]).read_text("utf-8")
        except OSError as exc:
            raise UsageError(f"--token: cannot read {value[1:]}: {exc.strerror}") from None
    else:
        text = value
    token = text.strip()
    if not token:
        raise UsageError("--token: empty token")
    return token


def _load(args: argparse.Namespace) -> Config:
    return load_config(resolve_config_path(args.config))


# --------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    # Read (and unset) systemd's socket-activation variables first, whatever
    # happens next: no child may inherit them.
    passed = take_listen_fds()
    path = resolve_config_path(args.config)
    config = load_config(path)
    configure_logging(config.logging, cache_loggers=True)
    if isinstance(passed, ActivationError):
        raise ConfigError("LISTEN_FDS", f"socket activation: {passed.detail}")

    log = structlog.get_logger("saslauthd_oidc.daemon")
    for warning in config_warnings(config):
        log.warning("config", warning=warning)
    if config.server.workers > 1:
        if passed:
            raise ConfigError(
                "server.workers",
                "socket activation passes one set of sockets; use workers = 1 with it",
            )
        return serve_workers(config)
    notifier = Notifier()
    trio.run(
        lambda: run_daemon(
            config, passed_fds=passed, notifier=notifier, load=partial(load_config, path)
        )
    )
    return EXIT_OK


# --------------------------------------------------------------------------- check-config


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    if config.server.http_listen or config.server.http_socket:
        load_caller_auth(config.http)  # the credential files must be readable and private
    print(f"{config.source}: ok")
    print(f"  providers: {', '.join(p.name for p in config.providers) or '(none)'}")
    print(f"  rules (in evaluation order): {', '.join(_rule_order(config))}")
    warnings = config_warnings(config) + limit_warnings(config, *current_nofile_limit())
    for w in warnings:
        print(f"warning: {w}")
    if not args.online:
        return EXIT_OK
    configure_logging(LoggingConfig(level="error", format="console"))
    return trio.run(_check_online, config)


def _rule_order(config: Config) -> list[str]:

    return [r.name + (" (fallback)" if r.fallback else "") for r in ordered(config.rules)]


async def _check_online(config: Config) -> int:

    status = EXIT_OK
    async with make_http_client() as client:
        registry = ProviderRegistry(config, client)
        for p in config.providers:
            for what, ok, detail in await registry.get(p.name).self_check():
                print(f"provider {p.name}: {what}: {'ok' if ok else 'FAILED'}: {detail}")
                if not ok:
                    status = EXIT_TEMPFAIL
        await registry.aclose()
    return status


# --------------------------------------------------------------------------- explain


def _request_from_args(args: argparse.Namespace) -> AuthRequest:
    mechanism = Mechanism.parse(args.mech)
    if mechanism is None:
        raise UsageError(f"--mech: unknown mechanism {args.mech!r}")
    return AuthRequest(
        mechanism=mechanism,
        credentials=Credentials(
            token=read_token(args.token), authzid=args.user, host=args.host, port=args.port
        ),
        context=RequestContext(
            frontend="explain",
            service=args.service,
            local_port=args.port,
            local_name=args.host,
            remote_ip=args.remote,
            secured=args.secured,
        ),
    )


def cmd_explain(args: argparse.Namespace) -> int:
    config = _load(args)
    request = _request_from_args(args)
    configure_logging(LoggingConfig(level="error", format="console"))
    verdict = trio.run(_explain, config, request)
    if args.json:
        print(json.dumps(explain_json(request, verdict), indent=2))
    else:
        print(explain_text(request, verdict))
    return _EXIT_FOR[verdict.outcome]


async def _explain(config: Config, request: AuthRequest) -> Verdict:

    async with make_http_client() as client:
        registry = ProviderRegistry(config, client)
        verdict = await Engine(config, registry).evaluate(request)
        await registry.aclose()
    return verdict


def explain_json(request: AuthRequest, verdict: Verdict) -> dict[str, Any]:
    return {
        "outcome": verdict.outcome.value,
        "reason": verdict.reason.value,
        "detail": verdict.detail,
        "rule": verdict.rule,
        "provider": verdict.provider,
        "account": verdict.account,
        "token": request.credentials.fingerprint,
        "challenge": {
            "openid-configuration": verdict.hint.openid_configuration,
            "scope": verdict.hint.scope,
        },
        "rules": [
            {"rule": t.rule, "matched": t.matched, "reason": t.reason.value, "detail": t.detail}
            for t in verdict.trace
        ],
    }


def explain_text(request: AuthRequest, verdict: Verdict) -> str:
    c, ctx = request.credentials, request.context
    lines = [
        f"token    sha256:{c.fingerprint}",
        f"request  mech={request.mechanism} service={ctx.service or '-'} user={c.authzid or '-'} "
        f"host={c.host or '-'} port={c.port or '-'}",
        "",
    ]
    width = max((len(t.rule) for t in verdict.trace), default=4)
    for t in verdict.trace:
        mark = "MATCH" if t.matched else "no   "
        lines.append(f"  rule {t.rule:<{width}}  {mark}  {t.reason.value:<28} {t.detail}")
    lines.append("")
    lines.append(f"outcome  {verdict.outcome.value} ({verdict.reason.value})")
    if verdict.detail:
        lines.append(f"detail   {verdict.detail}")
    lines.append(f"rule     {verdict.rule or '-'}")
    lines.append(f"account  {verdict.account or '-'}")
    if not verdict.ok and verdict.hint.openid_configuration:
        lines.append(f"client is told: openid-configuration {verdict.hint.openid_configuration}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- auth-test


def cmd_auth_test(args: argparse.Namespace) -> int:

    if Mechanism.parse(args.mech) is None:
        raise UsageError(f"--mech: unknown mechanism {args.mech!r}")
    token = read_token(args.token)
    try:
        result = trio.run(
            lambda: run_auth_test(
                args.socket,
                token,
                user=args.user,
                mechanism=args.mech.upper(),
                service=args.service,
                host=args.host,
                port=args.port,
                timeout=args.timeout,
            )
        )
    except AuthTestError as exc:
        for line in exc.transcript:
            print(line)
        print(f"saslauthd-oidc: auth-test: {exc}", file=sys.stderr)
        return EXIT_TEMPFAIL
    for line in result.transcript:
        print(line)
    if result.challenge is not None:
        print(f"challenge: {json.dumps(result.challenge)}")
    print(f"result: {result.outcome.value}" + (f" user={result.user}" if result.user else ""))
    return _EXIT_FOR[result.outcome]


# --------------------------------------------------------------------------- dev


def cmd_dev(args: argparse.Namespace) -> int:

    return trio.run(lambda: run_dev(Path(args.dir), issuer_port=args.issuer_port))


# --------------------------------------------------------------------------- parser


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $SASLAUTHD_OIDC_CONFIG, "
        "else /etc/saslauthd-oidc/saslauthd-oidc.toml)",
    )


def _add_request(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", required=True, help="TOKEN, @FILE or - for standard input")
    p.add_argument("--user", help="authzid / XOAUTH2 user / login the client claims")
    p.add_argument("--mech", default="OAUTHBEARER", help="OAUTHBEARER (default), XOAUTH2, PLAIN")
    p.add_argument("--service", default="smtp", help="service name (default smtp)")
    p.add_argument("--host", help="host the client connected to (OAUTHBEARER host=, TLS SNI)")
    p.add_argument("--port", type=int, help="port the client connected to")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saslauthd-oidc",
        description="SASL OAUTHBEARER/XOAUTH2 for mail servers, against several OpenID providers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon in the foreground")
    _add_config(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate the configuration")
    _add_config(p)
    p.add_argument("--online", action="store_true", help="also fetch every provider's keys")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("explain", help="show rule by rule why a token is accepted or refused")
    _add_config(p)
    _add_request(p)
    p.add_argument("--remote", metavar="IP", help="the mail client's address (remote_networks)")
    p.add_argument("--secured", action="store_true", help="the connection is TLS-protected")
    p.add_argument("--json", action="store_true", help="one JSON object for scripts")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("auth-test", help="authenticate once through a running daemon's socket")
    p.add_argument("--socket", required=True, help="the daemon's auth socket (Dovecot protocol)")
    _add_request(p)
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_auth_test)

    p = sub.add_parser("dev", help="run with a built-in development issuer (try it out)")
    p.add_argument("--dir", default=DEFAULT_DEV_DIR, help="where socket, config and token go")
    p.add_argument("--issuer-port", type=int, default=0, help="loopback port of the dev issuer")
    p.set_defaults(func=cmd_dev)
    return parser


def _leaves(group: BaseExceptionGroup[ConfigError]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"saslauthd-oidc: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BaseExceptionGroup as group:
        config_errors, rest = group.split(ConfigError)
        if rest is not None or config_errors is None:
            raise
        for error in _leaves(config_errors):
            print(f"saslauthd-oidc: config error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"saslauthd-oidc: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    return code
