"""The ``saslauthd-oidc`` command: serve, check-config, explain, auth-test, dev.

Exit codes (README "Command line"): 0 ok, 1 authentication refused, 2 usage or config
error, 3 temporary failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from saslauthd_oidc import __version__
from saslauthd_oidc.config import (
    Config,
    ConfigError,
    KeyLines,
    LoggingConfig,
    load_config,
    resolve_config_path,
)
from saslauthd_oidc.core.autoconfig import discover_report
from saslauthd_oidc.core.engine import Engine
from saslauthd_oidc.core.outcome import Outcome, Reason, Verdict
from saslauthd_oidc.core.request import AuthRequest, Mechanism, token_fingerprint
from saslauthd_oidc.core.rules import config_warnings, ordered, token_policy
from saslauthd_oidc.frontends.http_callers import load_caller_auth
from saslauthd_oidc.providers.http import make_http_client
from saslauthd_oidc.providers.registry import ProviderRegistry
from saslauthd_oidc.service import build
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.service.lifecycle import read_reload_report
from saslauthd_oidc.service.limits import current_nofile_limit, limit_warnings
from saslauthd_oidc.service.listeners import PASSED_NAMES, sort_passed_fds
from saslauthd_oidc.service.logs import configure_logging
from saslauthd_oidc.service.preflight import preflight
from saslauthd_oidc.service.systemd import (
    HTTP_SOCKET_UNIT,
    ActivationError,
    Notifier,
    take_listen_fds,
    unit_enabled,
)
from saslauthd_oidc.service.workers import serve_workers
from saslauthd_oidc.tools.authtest import AuthTestError, run_auth_test
from saslauthd_oidc.tools.devmode import (
    DEFAULT_DEV_DIR,
    DEV_AUDIENCE,
    DEV_USER,
    DevTokenError,
    dev_token,
    run_dev,
)
from saslauthd_oidc.tools.explain import (
    FRONTENDS,
    ExplainUsageError,
    Imitation,
    LoginInput,
    RuleLine,
    closest_issuer,
    facts_text,
    imitate,
    issuer_difference,
    rules_in_file_order,
    token_facts,
)

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
    # The very checks check-config makes (ExecStartPre), so that they cannot disagree.
    check = preflight(config, sorted(sort_passed_fds(passed)) if passed else ())
    for warning in check.warnings:
        log.warning("config", warning=warning)
    if check.problems:
        raise located(check.problems[0], config.source)
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
            config,
            passed_fds=passed,
            notifier=notifier,
            load=partial(load_config, path),
            report_dir=os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None,
        )
    )
    return EXIT_OK


# --------------------------------------------------------------------------- reload


def cmd_reload(args: argparse.Namespace) -> int:
    """Check the file, SIGHUP the daemon, wait for its answer (systemd's ExecReload=)."""
    config = _load(args)  # a broken file: exit 2 naming the key, nothing sent
    if config.server.http_listen or config.server.http_socket:
        load_caller_auth(config.http)
    if args.pid is None or args.pid <= 1:
        raise UsageError("reload: --pid PID of the running daemon is needed (systemd: $MAINPID)")
    state = args.state_dir or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    before = read_reload_report(state) if state else None
    try:
        os.kill(args.pid, signal.SIGHUP)
    except OSError as exc:
        raise UsageError(f"reload: cannot signal pid {args.pid}: {exc.strerror}") from None
    if state is None:
        print(f"sent SIGHUP to {args.pid}; the daemon logs whether it applied the configuration")
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        answer = read_reload_report(state)
        if answer is not None and (before is None or answer.generation > before.generation):
            if answer.ok:
                print(f"reloaded: {answer.message}")
                return EXIT_OK
            where = f"{answer.key}: " if answer.key else ""
            print(
                f"saslauthd-oidc: reload refused: {where}{answer.message}; "
                "still serving the previous configuration",
                file=sys.stderr,
            )
            return EXIT_USAGE
        time.sleep(0.05)
    print(
        f"saslauthd-oidc: reload: no answer from pid {args.pid} within {args.timeout:g} s",
        file=sys.stderr,
    )
    return EXIT_TEMPFAIL


# --------------------------------------------------------------------------- check-config


def located(exc: ConfigError, source: str) -> ConfigError:
    """``exc`` with the line of its key in the config file, when it has none yet."""
    if exc.location is None and exc.key:
        try:
            text = Path(source).read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            return exc
        line = KeyLines(text).find(exc.key)
        if line is not None:
            exc.location = f"{source} line {line}"
    return exc


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    # Socket activation variables reach check-config only when systemd meant them for it.
    passed = take_listen_fds()
    names = sorted(sort_passed_fds(passed)) if isinstance(passed, dict) else []
    # systemd passes sockets to ExecStart= only: the unit says which with --passed.
    for name in (args.passed or "").replace(",", " ").split():
        if name not in PASSED_NAMES:
            raise UsageError(f"--passed: {name!r} is not a socket name ({', '.join(PASSED_NAMES)})")
        names.append(name)
    http_unit = unit_enabled(HTTP_SOCKET_UNIT)
    if http_unit:  # serve will be passed that socket
        names.append("http")
    check = preflight(config, sorted(set(names)))  # what serve checks before it listens
    degraded = [
        ConfigError(p.key, f"{HTTP_SOCKET_UNIT} is enabled: {p.message}") if http_unit else p
        for p in check.degraded
    ]
    if check.problems or degraded:
        for problem in [*check.problems, *degraded]:
            print(
                f"saslauthd-oidc: config error: {located(problem, config.source)}", file=sys.stderr
            )
        return EXIT_USAGE
    print(f"{config.source}: ok")
    print(f"  providers: {', '.join(p.name for p in config.providers) or '(none)'}")
    print(f"  rules (in evaluation order): {', '.join(_rule_order(config))}")
    for line in token_policy(config):
        print(f"  {line}")
    for note in check.notes:
        print(f"note: {note}")
    warnings = config_warnings(config) + check.warnings
    warnings += limit_warnings(config, *current_nofile_limit())
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


# --------------------------------------------------------------------------- discover


def cmd_discover(args: argparse.Namespace) -> int:
    """What autoconfig, PACC, RFC 9728 and the RFC 7628 challenge say for an address."""
    config = _load(args)
    report = discover_report(config, args.address, args.client)
    if report["domain"] is None:
        raise UsageError(f"{args.address!r} is not an e-mail address")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_discover(report)
    return EXIT_OK if report["agree"] else EXIT_REFUSED


def _print_discover(report: Mapping[str, Any]) -> None:
    client = report["client"] or "any client"
    print(f"{report['address']}: domain {report['domain']} ({client})")
    if not report["configured"]:
        print("  no [[domain]] for it: every document answers 404")
        return
    for e in report["endpoints"]:
        if e["protocol"] == "jmap":
            print(f"  jmap {e['url']}")
        else:
            print(f"  {e['protocol']} {e['host']}:{e['port']} {e['socket_type']}")
        if e["issuer"] is None:
            print("    no rule: no issuer (left out of autoconfig and PACC)")
            continue
        scopes = " ".join(e["scopes"]) or "(none)"
        print(f"    rule {e['rule']}: issuer {e['issuer']}, scopes {scopes}")
        if e["protocol"] == "jmap":
            print(f"    RFC 9728 {e['resource_metadata']}: authorization_servers [{e['issuer']}]")
            print(f"    401 from the JMAP server: WWW-Authenticate: {e['www_authenticate']}")
            print(f"    login rule: {e['login_rule'] or 'NONE of this issuer'}")
        else:
            c = e["challenge"]
            print(
                f"    RFC 7628 challenge: openid-configuration {c['openid-configuration']}, "
                f"scope {c['scope'] or '(none)'}"
            )
    for name in ("autoconfig", "pacc"):
        doc = report[name]
        if doc is None:
            print(f"  {name}: 404 (no endpoint it can name has a rule)")
            continue
        where = ", ".join(doc["urls"]) if name == "autoconfig" else doc["url"]
        print(f"  {name} {where}: issuer {doc['issuer'] or 'LEFT OUT (endpoints disagree)'}")
        if name == "pacc":
            print(f"    DNS: {doc['dns_txt']}")
    verdict = "all documents agree" if report["agree"] else "DISAGREE or name no issuer"
    print(f"  {verdict}")


# --------------------------------------------------------------------------- explain


def _login_from_args(args: argparse.Namespace) -> LoginInput:
    headers = []
    for raw in args.header or ():
        name, sep, value = raw.partition(":")
        if not sep or not name.strip() or not raw.isascii() or not raw.isprintable():
            raise UsageError(f"--header: expected NAME: VALUE in printable ASCII, not {raw!r}")
        headers.append((name.strip(), value.strip()))
    return LoginInput(
        frontend=args.frontend,
        token=read_token(args.token),
        mechanism=args.mech,
        user=args.user,
        service=args.service,
        host=args.host,
        port=args.port,
        sni=args.sni,
        remote=args.remote,
        local_ip=args.local_ip,
        secured=args.secured,
        realm=args.realm,
        headers=tuple(headers),
    )


def cmd_explain(args: argparse.Namespace) -> int:
    config = _load(args)
    login = _login_from_args(args)
    configure_logging(LoggingConfig(level="error", format="console"))
    try:
        imitation = trio.run(_explain, config, login)
    except ExplainUsageError as exc:
        raise UsageError(str(exc)) from None
    assert imitation.verdict is not None
    facts = token_facts(login.token, now=time.time())
    lines = rules_in_file_order(config, imitation.verdict, facts.get("iss"))
    if args.json:
        print(json.dumps(explain_json(config, login, imitation, facts, lines), indent=2))
    else:
        print(explain_text(config, login, imitation, facts, lines))
    return _EXIT_FOR[imitation.verdict.outcome]


async def _explain(config: Config, login: LoginInput) -> Imitation:

    async with make_http_client() as client:
        registry = ProviderRegistry(config, client)
        imitation = await imitate(config, login, Engine(config, registry).evaluate)
        await registry.aclose()
    return imitation


def _unknown_issuer_hint(config: Config, verdict: Verdict, facts: Mapping[str, Any]) -> str | None:
    if verdict.reason is not Reason.UNKNOWN_ISSUER:
        return None
    iss = facts.get("iss")
    closest = closest_issuer(iss, config.providers)
    if closest is None:
        return f"no provider has an issuer like the token's iss {iss!r}"
    difference = issuer_difference(iss, closest.issuer)
    return (
        f"closest provider {closest.name!r} has issuer {closest.issuer}: {difference} "
        "(check-config --online compares it with the IdP's discovery document)"
    )


def _request_fields(request: AuthRequest | None) -> dict[str, Any] | None:
    if request is None:
        return None
    c, ctx = request.credentials, request.context
    return {
        "frontend": ctx.frontend,
        "mech": request.mechanism.value,
        "service": ctx.service,
        "user": c.authzid,
        "host": c.host or ctx.local_name,
        "port": c.port or ctx.local_port,
        "remote": ctx.remote_ip,
        "secured": ctx.secured,
    }


def explain_json(
    config: Config,
    login: LoginInput,
    imitation: Imitation,
    facts: Mapping[str, Any],
    lines: Sequence[RuleLine],
) -> dict[str, Any]:
    verdict = imitation.verdict
    assert verdict is not None
    return {
        "outcome": verdict.outcome.value,
        "reason": verdict.reason.value,
        "detail": verdict.detail,
        "hint": _unknown_issuer_hint(config, verdict, facts),
        "rule": verdict.rule,
        "provider": verdict.provider,
        "account": verdict.account,
        "token": token_fingerprint(login.token),
        "token_facts": dict(facts),
        "frontend": imitation.frontend,
        "request": _request_fields(imitation.request),
        "wire": imitation.wire,
        "reply": imitation.reply,
        "notes": imitation.notes,
        "challenge": {
            "openid-configuration": verdict.hint.openid_configuration,
            "scope": verdict.hint.scope,
        },
        "rules": [
            {
                "position": line.position,
                "rule": line.rule,
                "phase": line.phase,
                "provider": line.provider,
                "tried": line.tried,
                "matched": line.matched,
                "reason": line.reason.value if line.reason else None,
                "detail": line.detail,
            }
            for line in lines
        ],
    }


def _dash(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def explain_text(
    config: Config,
    login: LoginInput,
    imitation: Imitation,
    facts: Mapping[str, Any],
    lines: Sequence[RuleLine],
) -> str:
    verdict = imitation.verdict
    assert verdict is not None
    out = [f"frontend {imitation.frontend}: {FRONTENDS[imitation.frontend]}"]
    out += [f"  {w}" for w in imitation.wire]
    out += [f"  note: {n}" for n in imitation.notes]
    out.append("")
    out.append(f"token    sha256:{token_fingerprint(login.token)}  (what it says, NOT verified)")
    out += facts_text(facts)
    out.append("")
    request = _request_fields(imitation.request)
    if request is None:
        out.append("request  (the frontend did not ask the engine)")
    else:
        out.append(
            f"request  mech={request['mech']} service={_dash(request['service'])} "
            f"user={_dash(request['user'])} host={_dash(request['host'])} "
            f"port={_dash(request['port'])} remote={_dash(request['remote'])} "
            f"secured={'yes' if request['secured'] else 'no'}"
        )
    out.append("")
    if request is not None:
        out.append("rules, in file order (fallback rules are tried after all normal ones):")
        width = max((len(line.rule) for line in lines), default=4)
        for line in lines:
            mark = "MATCH" if line.matched else ("no   " if line.tried else "-    ")
            reason = line.reason.value if line.reason else "-"
            out.append(
                f"  rule {line.rule:<{width}}  {line.phase:<8}  {mark}  {reason:<28} {line.detail}"
            )
        out.append("")
    out.append(f"outcome  {verdict.outcome.value} ({verdict.reason.value})")
    if verdict.detail:
        out.append(f"detail   {verdict.detail}")
    hint = _unknown_issuer_hint(config, verdict, facts)
    if hint:
        out.append(f"why      {hint}")
    out.append(f"rule     {verdict.rule or '-'}")
    out.append(f"account  {verdict.account or '-'}")
    if not verdict.ok and verdict.hint.openid_configuration:
        out.append(f"client is told: openid-configuration {verdict.hint.openid_configuration}")
    for reply in imitation.reply:
        out.append(f"reply    {reply}")
    return "\n".join(out)


# --------------------------------------------------------------------------- auth-test


def cmd_auth_test(args: argparse.Namespace) -> int:

    if args.mech.upper() == Mechanism.BEARER.value:
        raise UsageError(
            "--mech BEARER: a bare token is what Dovecot's passdb oauth2 and Stalwart send "
            "over HTTP, not a SASL mechanism; try such a login with "
            "`explain --frontend introspect` (or stalwart)"
        )
    if Mechanism.parse(args.mech) is None:
        known = ", ".join(m.value for m in Mechanism if m.is_sasl)
        raise UsageError(f"--mech: unknown mechanism {args.mech!r} (known: {known})")
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

    # Without --dir, as root with Postfix, the socket goes into Postfix's queue directory.
    workdir = Path(args.dir or DEFAULT_DEV_DIR)
    return trio.run(
        lambda: run_dev(
            workdir,
            issuer_port=args.issuer_port,
            kanidm=args.kanidm or (),
            authentik=args.authentik or (),
            postfix_queue=args.dir is None,
        )
    )


def _claim(raw: str) -> tuple[str, Any]:
    name, sep, value = raw.partition("=")
    if not sep or not name:
        raise UsageError(f"--claim: expected NAME=VALUE, not {raw!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def cmd_dev_token(args: argparse.Namespace) -> int:
    audiences = [a for a in (args.aud or [DEV_AUDIENCE]) if a]
    try:
        token, notes = dev_token(
            Path(args.dir),
            issuer=args.issuer,
            sub=args.sub,
            email=args.email or None,
            audiences=audiences,
            azp=args.azp,
            client_id=args.client_id or None,
            scope=args.scope or None,
            expires_in=args.expires_in,
            typ=None if args.typ.lower() == "none" else args.typ,
            alg=args.alg,
            claims=dict(_claim(c) for c in args.claim or ()),
        )
    except DevTokenError as exc:
        raise UsageError(f"dev-token: {exc}") from None
    for note in notes:
        print(f"saslauthd-oidc: dev-token: note: {note}", file=sys.stderr)
    print(token)
    return EXIT_OK


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
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__} ({build.describe()})"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon in the foreground")
    _add_config(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate the configuration")
    _add_config(p)
    p.add_argument("--online", action="store_true", help="also fetch every provider's keys")
    p.add_argument(
        "--passed",
        metavar="NAMES",
        help="sockets systemd will pass serve (FileDescriptorName=: auth, saslauthd, http; "
        "comma-separated): check them as serve will see them, e.g. in ExecStartPre=",
    )
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "reload", help="reload a running daemon and report whether it took the new configuration"
    )
    _add_config(p)
    p.add_argument("--pid", type=int, help="the daemon's process id (systemd: $MAINPID)")
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the daemon answers (default: $RUNTIME_DIRECTORY, set by systemd)",
    )
    p.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for the answer")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("explain", help="show rule by rule why a token is accepted or refused")
    _add_config(p)
    _add_request(p)
    p.add_argument(
        "--frontend",
        choices=list(FRONTENDS),
        default="dovecot-socket",
        help="whose request to imitate: "
        + "; ".join(f"{name}: {who}" for name, who in FRONTENDS.items())
        + " (default dovecot-socket)",
    )
    p.add_argument("--remote", metavar="IP", help="the mail client's address (remote_networks)")
    p.add_argument("--local-ip", metavar="IP", help="the server address the client connected to")
    p.add_argument("--sni", metavar="NAME", help="TLS SNI the client sent (Dovecot local_name)")
    p.add_argument("--secured", action="store_true", help="the connection is TLS-protected")
    p.add_argument("--realm", default="", help="saslauthd: the realm field (default empty)")
    p.add_argument(
        "--header",
        action="append",
        metavar="'NAME: VALUE'",
        help="introspect/stalwart: another HTTP header to send (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object for scripts")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "discover", help="show what autoconfig, PACC, RFC 9728 and RFC 7628 tell a client"
    )
    _add_config(p)
    p.add_argument("address", help="the e-mail address a client starts from")
    p.add_argument("--client", metavar="CLIENT_ID", help="the OAuth client (aud/azp) to assume")
    p.add_argument("--json", action="store_true", help="one JSON object for scripts")
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("auth-test", help="authenticate once through a running daemon's socket")
    p.add_argument("--socket", required=True, help="the daemon's auth socket (Dovecot protocol)")
    _add_request(p)
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_auth_test)

    p = sub.add_parser("dev", help="run with a built-in development issuer (try it out)")
    p.add_argument(
        "--dir",
        help=f"where socket, config and token go (default {DEFAULT_DEV_DIR}; as root with "
        "Postfix installed, the socket then goes into Postfix's queue directory)",
    )
    p.add_argument("--issuer-port", type=int, default=0, help="loopback port of the dev issuer")
    p.add_argument(
        "--kanidm",
        action="append",
        metavar="CLIENT",
        help="also a provider and rule for a Kanidm-shaped issuer "
        ".../oauth2/openid/CLIENT, audience CLIENT (repeatable)",
    )
    p.add_argument(
        "--authentik",
        action="append",
        metavar="SLUG",
        help="also a provider and rule for an Authentik-shaped issuer "
        ".../application/o/SLUG/, audience SLUG (repeatable)",
    )
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser(
        "dev-token", help="mint a test token with the keys of a running `dev` (try rules)"
    )
    p.add_argument("--dir", default=DEFAULT_DEV_DIR, help="the `dev` directory")
    p.add_argument(
        "--issuer",
        help="kanidm:CLIENT, authentik:SLUG, a path on the dev issuer, or any URL "
        "(default: the dev issuer itself)",
    )
    p.add_argument("--sub", default="alice", help="subject (default alice)")
    p.add_argument("--email", default=DEV_USER, help=f"email claim (default {DEV_USER}; '' none)")
    p.add_argument(
        "--aud",
        action="append",
        metavar="AUDIENCE",
        help=f"audience, repeatable for several (default {DEV_AUDIENCE}; '' for none)",
    )
    p.add_argument("--azp", help="authorized party (azp)")
    p.add_argument("--client-id", default="dev-client", help="client_id claim ('' for none)")
    p.add_argument("--scope", default="openid email profile", help="space-separated scopes")
    p.add_argument(
        "--expires-in",
        type=int,
        default=3600,
        metavar="SECONDS",
        help="lifetime (default 3600); negative: already expired that long ago",
    )
    p.add_argument("--typ", default="at+jwt", help="typ header (default at+jwt; 'none' for none)")
    p.add_argument("--alg", default="ES256", choices=("ES256", "RS256"), help="default ES256")
    p.add_argument(
        "--claim",
        action="append",
        metavar="NAME=VALUE",
        help="another claim (VALUE is JSON when it parses as JSON; repeatable)",
    )
    p.set_defaults(func=cmd_dev_token)
    return parser


def _leaves(group: BaseExceptionGroup[ConfigError]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


def _located_for(args: argparse.Namespace, exc: ConfigError) -> ConfigError:
    if not hasattr(args, "config") or exc.key.startswith("LISTEN_"):
        return exc
    return located(exc, resolve_config_path(args.config))


def _status_on_config_error(args: argparse.Namespace, error: BaseException) -> None:
    """``serve`` under systemd: ``systemctl status`` shows the failing key (Status:)."""
    if args.func is cmd_serve:
        Notifier().status(f"config error: {error}; fix it, then: systemctl restart saslauthd-oidc")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"saslauthd-oidc: config error: {_located_for(args, exc)}", file=sys.stderr)
        _status_on_config_error(args, exc)
        return EXIT_USAGE
    except BaseExceptionGroup as group:
        config_errors, rest = group.split(ConfigError)
        if rest is not None or config_errors is None:
            raise
        leaves = _leaves(config_errors)
        for error in leaves:
            assert isinstance(error, ConfigError)
            print(f"saslauthd-oidc: config error: {_located_for(args, error)}", file=sys.stderr)
        _status_on_config_error(args, leaves[0])
        return EXIT_USAGE
    except UsageError as exc:
        print(f"saslauthd-oidc: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    return code
