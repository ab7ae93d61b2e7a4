"""``saslauthd-oidc explain``: one login, imitated frontend by frontend, and why it ends as it does.

:func:`imitate` builds the request the chosen frontend receives on the wire —
the Dovecot auth-protocol lines Postfix or Exim send, the counted strings of a
Cyrus saslauthd client, the RFC 7662 call of Dovecot's ``passdb oauth2`` with
its ``X-Dovecot-Auth-*`` headers, Stalwart's userinfo call — and hands it to
the very code that frontend uses (``protocol.dovecot``, ``protocol.saslauthd``,
the ASGI application of ``frontends.http``), so that the ``AuthRequest`` the
engine sees is the one the daemon would build. It then shows what the
frontend would answer.

:func:`token_facts` shows what the token says about itself (unverified:
``iss``, ``aud``, ``azp``, ``scope``, ``exp``, ``typ``, ``alg``, ``kid``),
never the token. :func:`issuer_difference` says what differs between a
token's ``iss`` and a configured issuer. :func:`rules_in_file_order` puts the
engine's trace back in file order, with each rule's phase.
"""

from __future__ import annotations

import binascii
import contextlib
import datetime
import ipaddress
import json
import os
import struct
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from saslauthd_oidc.config import Config, ProviderConfig, suggest
from saslauthd_oidc.core.outcome import Outcome, Reason, Refusal, RuleTrace, Verdict
from saslauthd_oidc.core.request import AuthRequest, Mechanism, token_fingerprint
from saslauthd_oidc.frontends.http import HttpFrontend
from saslauthd_oidc.frontends.http_callers import CallerAuth
from saslauthd_oidc.protocol.dovecot import DovecotServerConnection, NeedVerdict, decode_base64
from saslauthd_oidc.protocol.saslauthd import (
    Rejected,
    Request,
    SaslauthdServerConnection,
    reply_text,
)
from saslauthd_oidc.providers.jwt import peek
from saslauthd_oidc.tools.authtest import (
    build_auth_line,
    build_initial_response,
    client_answer,
    redact,
    show_sasl,
)

__all__ = [
    "FRONTENDS",
    "Imitation",
    "LoginInput",
    "RuleLine",
    "imitate",
    "issuer_difference",
    "rules_in_file_order",
    "token_facts",
]

Authenticate = Callable[[AuthRequest], Awaitable[Verdict]]

#: The frontends explain can imitate, and who talks to each.
FRONTENDS: Mapping[str, str] = {
    "dovecot-socket": "Postfix, Exim (Dovecot auth protocol on the auth socket)",
    "saslauthd": "Cyrus SASL clients: Cyrus IMAP, Postfix with Cyrus SASL (saslauthd socket)",
    "introspect": "Dovecot IMAP/POP3 passdb oauth2 (POST /introspect)",
    "stalwart": "Stalwart's OIDC directory (GET <stalwart_issuer>/userinfo)",
}

_REQUEST_ID = 1
_MAX_ROUNDS = 4


class ExplainUsageError(Exception):
    """The imitation cannot be built as asked (the command line is at fault)."""


@dataclass(frozen=True, slots=True)
class LoginInput:
    """What the admin tells explain about the login to imitate."""

    frontend: str
    token: str = field(repr=False)
    mechanism: str = "OAUTHBEARER"
    user: str | None = None
    service: str = "smtp"
    host: str | None = None  # OAUTHBEARER host=
    port: int | None = None  # OAUTHBEARER port= and the server's local port
    sni: str | None = None  # TLS SNI (Dovecot's local_name)
    remote: str | None = None
    local_ip: str | None = None
    secured: bool = False
    realm: str = ""  # saslauthd's realm field
    headers: tuple[tuple[str, str], ...] = ()  # extra HTTP headers


@dataclass
class Imitation:
    """The imitated exchange: what went over the wire (token redacted) and what came of it."""

    frontend: str
    wire: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    request: AuthRequest | None = None  # what the frontend handed the engine, if it did
    verdict: Verdict | None = None
    reply: list[str] = field(default_factory=list)  # what the frontend answered

    @property
    def outcome(self) -> Outcome:
        assert self.verdict is not None
        return self.verdict.outcome


# --------------------------------------------------------------------------- imitations


async def imitate(config: Config, login: LoginInput, authenticate: Authenticate) -> Imitation:
    """Run ``login`` through the frontend's own request-building code and the engine."""
    if login.frontend == "dovecot-socket":
        out = await _dovecot_socket(config, login, authenticate)
    elif login.frontend == "saslauthd":
        out = await _saslauthd(config, login, authenticate)
    elif login.frontend in ("introspect", "stalwart"):
        out = await _http(config, login, authenticate)
    else:
        known = ", ".join(FRONTENDS)
        raise ExplainUsageError(f"--frontend: unknown frontend {login.frontend!r} (known: {known})")
    missing = _not_served(config, login.frontend)
    if missing:
        out.notes.insert(0, missing)
    return out


def _not_served(config: Config, frontend: str) -> str | None:
    """Why the daemon with this config would never see this request at all, if it would not."""
    server = config.server
    if frontend == "dovecot-socket" and not server.auth_socket:
        return "server.auth_socket is off: this config serves no Dovecot-protocol socket"
    if frontend == "saslauthd" and not server.saslauthd_socket:
        return "server.saslauthd_socket is not set: this config serves no saslauthd socket"
    if frontend in ("introspect", "stalwart") and not (server.http_listen or server.http_socket):
        return (
            "server.http_listen and server.http_socket are not set: no HTTP listener "
            "(unless systemd passes one)"
        )
    return None


def _mechanism(login: LoginInput) -> Mechanism:
    if login.mechanism.upper() == Mechanism.BEARER.value:
        raise ExplainUsageError(
            "--mech BEARER: a bare token is what Dovecot's passdb oauth2 and Stalwart send "
            "over HTTP; use --frontend introspect (Dovecot IMAP) or --frontend stalwart"
        )
    mechanism = Mechanism.parse(login.mechanism)
    if mechanism is None:
        known = ", ".join(m.value for m in Mechanism if m.is_sasl)
        raise ExplainUsageError(f"--mech: unknown mechanism {login.mechanism!r} (known: {known})")
    return mechanism


def _lines(data: bytes) -> list[str]:
    return [line for line in data.decode("utf-8", "replace").split("\n") if line]


def _show_server(line: str, token: str) -> str:
    fields = line.split("\t")
    if fields[0] == "COOKIE":
        return "S: COOKIE\t<redacted>"
    if fields[0] == "CONT" and len(fields) > 2 and fields[2]:
        data = decode_base64(fields[2])
        if data:
            return f"S: {line}\n     = {show_sasl(data, token)}"
    return "S: " + redact(line, token)


async def _dovecot_socket(
    config: Config, login: LoginInput, authenticate: Authenticate
) -> Imitation:
    mechanism = _mechanism(login)
    out = Imitation("dovecot-socket")
    token = login.token
    conn = DovecotServerConnection(
        [Mechanism(m) for m in config.server.mechanisms],
        spid=os.getpid(),
        cuid=1,
        cookie="0" * 32,
    )
    out.wire += [_show_server(line, token) for line in _lines(conn.handshake())]
    initial = build_initial_response(
        mechanism, token, user=login.user, host=login.host, port=login.port
    )
    params = [f"{k}={v}" for k, v in _dovecot_params(login) if v is not None]
    if login.secured:
        params.append("secured")
    line = build_auth_line(
        _REQUEST_ID, mechanism, service=login.service, initial_response=initial, params=params
    )
    shown = line
    if initial is not None:
        shown = line.rpartition("resp=")[0] + f"resp=<{show_sasl(initial, token)}>"
    client = ["VERSION\t1\t2", f"CPID\t{os.getpid()}", line]
    out.wire += ["C: VERSION\t1\t2", f"C: CPID\t{os.getpid()}", "C: " + redact(shown, token)]
    if mechanism.value not in config.server.mechanisms:
        out.notes.append(
            f"{mechanism} is not in server.mechanisms ({', '.join(config.server.mechanisms)}): "
            "the socket does not offer it"
        )
    needs = _verdicts_asked(conn.receive_data("".join(f"{c}\n" for c in client).encode()))
    for round_no in range(_MAX_ROUNDS):
        replies = _lines(conn.data_to_send())
        out.wire += [_show_server(r, token) for r in replies]
        if needs:
            break
        cont = [r.split("\t") for r in replies if r.startswith(f"CONT\t{_REQUEST_ID}\t")]
        if not cont:
            out.verdict = conn.last_failure or Verdict(
                reason=Reason.MALFORMED_REQUEST, detail="the frontend refused the request"
            )
            out.reply = [redact(r, token) for r in replies]
            out.notes.append("the frontend answered before asking the engine")
            return out
        challenge = decode_base64(cont[0][2]) if cont[0][2] else b""
        answer = client_answer(
            mechanism,
            challenge or b"",
            round_no=round_no,
            initial=initial,
            user=login.user,
            token=token,
        )
        reply = f"CONT\t{_REQUEST_ID}\t{binascii.b2a_base64(answer, newline=False).decode()}"
        out.wire.append(f"C: CONT\t{_REQUEST_ID}\t<{show_sasl(answer, token)}>")
        needs = _verdicts_asked(conn.receive_data((reply + "\n").encode()))
    if not needs:
        out.verdict = Verdict(
            reason=Reason.MALFORMED_REQUEST, detail="no verdict asked for after several rounds"
        )
        return out
    need = needs[0]
    out.request = need.request
    out.verdict = await authenticate(need.request)
    conn.conclude(need.request_id, out.verdict)
    # Follow the failure challenge as a client does (OAUTHBEARER's %x01, XOAUTH2's empty line).
    for round_no in range(_MAX_ROUNDS):
        replies = _lines(conn.data_to_send())
        for r in replies:
            out.reply += [part.strip() for part in _show_server(r, token)[3:].split("\n")]
        cont = [r.split("\t") for r in replies if r.startswith(f"CONT\t{_REQUEST_ID}\t")]
        if not cont:
            break
        challenge = decode_base64(cont[0][2]) or b""
        answer = client_answer(
            mechanism, challenge, round_no=round_no, initial=None, user=login.user, token=token
        )
        out.reply.append(f"(client) CONT\t{_REQUEST_ID}\t<{show_sasl(answer, token)}>")
        encoded = binascii.b2a_base64(answer, newline=False).decode()
        conn.receive_data(f"CONT\t{_REQUEST_ID}\t{encoded}\n".encode())
    return out


def _verdicts_asked(events: Sequence[object]) -> list[NeedVerdict]:
    """The requests the frontend hands the engine (protocol errors are its own FAIL lines)."""
    return [e for e in events if isinstance(e, NeedVerdict)]


def _dovecot_params(login: LoginInput) -> list[tuple[str, str | None]]:
    """The AUTH parameters a Dovecot-protocol client sends about the connection."""
    return [
        ("lip", login.local_ip),
        ("rip", login.remote),
        ("lport", str(login.port) if login.port else None),
        ("local_name", login.sni),
    ]


def _counted(*values: str) -> bytes:
    out = bytearray()
    for value in values:
        raw = value.encode("utf-8")
        out += struct.pack("!H", len(raw)) + raw
    return bytes(out)


async def _saslauthd(config: Config, login: LoginInput, authenticate: Authenticate) -> Imitation:
    out = Imitation("saslauthd")
    if login.mechanism.upper() not in ("OAUTHBEARER", "PLAIN"):
        out.notes.append(
            f"--mech {login.mechanism} ignored: a saslauthd client sends login and password "
            "(the token), whatever the mail client's mechanism"
        )
    if not login.user:
        raise ExplainUsageError(
            "--frontend saslauthd needs --user: a saslauthd request always carries a login"
        )
    fields = [login.user, login.token, login.service, login.realm]
    shown = [
        login.user,
        f"<token sha256:{token_fingerprint(login.token)}>",
        login.service,
        login.realm,
    ]
    if login.remote:
        fields.append(f"{login.remote};0")
        shown.append(f"{login.remote};0")
    out.wire.append("C: " + " | ".join(shown) + f"  ({len(fields)} counted strings)")
    conn = SaslauthdServerConnection(max_password_bytes=config.server.max_token_bytes)
    event = conn.receive_data(_counted(*fields))
    if isinstance(event, Rejected):
        out.verdict = event.verdict
        out.notes.append("the frontend answered before asking the engine")
    else:
        assert isinstance(event, Request)
        out.request = event.request
        out.verdict = await authenticate(event.request)
    out.reply = [reply_text(out.verdict)]
    for name, value in (("--host", login.host), ("--port", login.port), ("--sni", login.sni)):
        if value:
            out.notes.append(f"{name} ignored: saslauthd requests carry no host or port")
    return out


def _http_address(ip: str, port: int | None) -> str:
    """Dovecot's ``net_ipport2str``: ``192.0.2.1:143`` or ``[2001:db8::1]:143``."""
    version = ipaddress.ip_address(ip).version
    return f"[{ip}]:{port or 0}" if version == 6 else f"{ip}:{port or 0}"


async def _http(config: Config, login: LoginInput, authenticate: Authenticate) -> Imitation:
    out = Imitation(login.frontend)
    token = login.token
    headers: list[tuple[str, str]] = []
    if login.frontend == "introspect":
        method, path = "POST", "/introspect"
        # What Dovecot 2.3's passdb oauth2 sends with send_auth_headers = yes.
        headers.append(("X-Dovecot-Auth-Service", login.service))
        if login.local_ip or login.port:
            try:
                local = _http_address(login.local_ip or "127.0.0.1", login.port)
            except ValueError:
                raise ExplainUsageError("--local-ip: not an IP address") from None
            headers.append(("X-Dovecot-Auth-Local", local))
        if login.remote:
            try:
                headers.append(("X-Dovecot-Auth-Remote", _http_address(login.remote, None)))
            except ValueError:
                raise ExplainUsageError("--remote: not an IP address") from None
        headers.append(("Content-Type", "application/x-www-form-urlencoded"))
        body = urlencode({"token": token}).encode()
        if login.user:
            out.notes.append(
                "--user is not sent: Dovecot's introspection request carries no user name "
                "(add what your Dovecot sends with --header)"
            )
    else:
        stalwart = config.http.stalwart_path
        if stalwart is None:
            raise ExplainUsageError(
                "--frontend stalwart: http.stalwart_issuer is not set, so this daemon "
                "serves no Stalwart endpoints"
            )
        method, path, body = "GET", stalwart + "/userinfo", b""
        headers.append(("Authorization", f"Bearer {token}"))
    headers += list(login.headers)
    for name, value in (("--host", login.host), ("--sni", login.sni)):
        if value:
            out.notes.append(f"{name} ignored: this HTTP request carries no mail-client host")
    if login.secured:
        out.notes.append("--secured ignored: the HTTP request does not say whether IMAP used TLS")
    out.notes.append("caller authentication (http.auth) is not imitated")
    out.wire.append(f"C: {method} {path} HTTP/1.1")
    out.wire += [f"C: {k}: {redact(v, token)}" for k, v in headers]
    if body:
        # Shown, not redacted: the form-encoding of an opaque token is not the token's text.
        out.wire.append(f"C: token=<token sha256:{token_fingerprint(token)}>")

    async def capture(request: AuthRequest) -> Verdict:
        out.request = request
        out.verdict = await authenticate(request)
        return out.verdict

    app = HttpFrontend(config, capture, CallerAuth(open=True))
    scope: dict[str, Any] = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [
            (k.lower().encode("latin-1", "replace"), v.encode("latin-1", "replace"))
            for k, v in headers
        ],
        "client": (login.remote or "127.0.0.1", 0),
        "server": ("127.0.0.1", 8480),
        "scheme": "http",
        "http_version": "1.1",
    }
    sent: list[MutableMapping[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    reply_body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    out.reply = [f"HTTP {status} {redact(reply_body.decode('utf-8', 'replace'), token)}"]
    if out.verdict is None:
        out.verdict = Verdict(reason=Reason.MISSING_TOKEN, detail="no token reached the engine")
        out.notes.append("the frontend answered before asking the engine")
    return out


# --------------------------------------------------------------------------- token facts

_FACT_CLAIMS = ("iss", "aud", "azp", "client_id", "scope", "scp", "sub", "exp", "nbf", "iat")
_FACT_HEADERS = ("alg", "kid", "typ")


def _ago(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 90:
        return f"{round(seconds)} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    if seconds < 172800:
        return f"{round(seconds / 3600)} h"
    return f"{round(seconds / 86400)} days"


def token_facts(token: str, *, now: float) -> dict[str, Any]:
    """What the token says about itself, NOT verified: for reading, never for deciding."""
    unverified = peek(token, max_bytes=max(len(token), 1))
    if isinstance(unverified, Refusal):
        return {"format": "opaque", "length": len(token), "note": unverified.detail}
    facts: dict[str, Any] = {"format": "JWT"}
    for name in _FACT_HEADERS:
        if name in unverified.header:
            facts[name] = unverified.header[name]
    for name in _FACT_CLAIMS:
        if name in unverified.claims:
            facts[name] = unverified.claims[name]
    for name, past, future in (
        ("exp", "expired {} ago", "expires in {}"),
        ("nbf", "valid since {}", "not valid for another {}"),
        ("iat", "issued {} ago", "issued {} in the future"),
    ):
        value = facts.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            delta = float(value) - now
            text = (future if delta > 0 else past).format(_ago(delta))
            with contextlib.suppress(OverflowError, OSError, ValueError):
                when = datetime.datetime.fromtimestamp(float(value), datetime.UTC)
                text = f"{when:%Y-%m-%d %H:%M:%S} UTC, {text}"
            facts[f"{name}_relative"] = text
    return facts


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def facts_text(facts: Mapping[str, Any]) -> list[str]:
    """The token facts as explain prints them."""
    if facts.get("format") != "JWT":
        return [f"  opaque token ({facts.get('length')} characters): only its IdP can read it"]
    lines = []
    head = "  ".join(f"{k} {_shown(facts[k])}" for k in _FACT_HEADERS if k in facts)
    lines.append(f"  header  {head or '(no alg, kid or typ)'}")
    for name in ("iss", "aud", "azp", "client_id", "scope", "scp", "sub"):
        if name in facts:
            lines.append(f"  {name:<9} {_shown(facts[name])}")
    for name in ("exp", "nbf", "iat"):
        if name in facts:
            relative = facts.get(f"{name}_relative")
            lines.append(
                f"  {name:<9} {_shown(facts[name])}" + (f" ({relative})" if relative else "")
            )
    if "iss" not in facts:
        lines.append("  iss       (none: no provider can claim this token)")
    return lines


# --------------------------------------------------------------------------- issuers


def issuer_difference(iss: object, configured: str) -> str:
    """What differs between a token's ``iss`` and a configured issuer, in an admin's words."""
    if not isinstance(iss, str):
        return "the token has no iss"
    if iss == configured:
        return "identical"
    if iss.rstrip("/") == configured.rstrip("/"):
        ends = "ends" if iss.endswith("/") else "does not end"
        return (
            f"only the trailing '/' differs: the token's iss {ends} with '/'; issuers are "
            "compared exactly (Authentik's end with '/', Kanidm's do not): copy it as the "
            "IdP's discovery document spells it"
        )
    if iss.lower() == configured.lower():
        return "only upper/lower case differs; issuers are compared exactly"
    try:
        a, b = urlsplit(iss), urlsplit(configured)
    except ValueError:
        return f"the token's iss {iss!r} is not a URL"
    parts = []
    if a.scheme != b.scheme:
        parts.append(f"scheme {a.scheme or '(none)'} vs configured {b.scheme}")
    if (a.hostname or "") != (b.hostname or ""):
        parts.append(f"host {a.hostname or '(none)'} vs configured {b.hostname}")
    if a.port != b.port:
        parts.append(f"port {a.port or 'default'} vs configured {b.port or 'default'}")
    if a.path.rstrip("/") != b.path.rstrip("/"):
        parts.append(f"path {a.path or '/'} vs configured {b.path or '/'}")
        kanidm = "/oauth2/openid/"
        if kanidm in a.path and kanidm in b.path:
            client = a.path.split(kanidm, 1)[1].strip("/")
            parts.append(
                f"Kanidm puts the client in the issuer: this token was issued to client "
                f"{client!r}, which needs a [[provider]] of its own"
            )
        authentik = "/application/o/"
        if authentik in a.path and authentik in b.path:
            slug = a.path.split(authentik, 1)[1].strip("/")
            parts.append(
                f"Authentik's per-application issuer: this token was issued by application "
                f"{slug!r}, which needs a [[provider]] of its own"
            )
    return "; ".join(parts) or f"{iss!r} vs configured {configured!r}"


def closest_issuer(iss: object, providers: Sequence[ProviderConfig]) -> ProviderConfig | None:
    """The provider whose issuer the token's ``iss`` most resembles."""
    if not isinstance(iss, str) or not providers:
        return None
    by_issuer = {p.issuer: p for p in providers}
    guess = suggest(iss, by_issuer) or suggest(iss.rstrip("/"), by_issuer)
    if guess is None:
        host = (urlsplit(iss).hostname or "").lower()
        same_host = [p for p in providers if (urlsplit(p.issuer).hostname or "") == host]
        return same_host[0] if same_host else None
    return by_issuer[guess]


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class RuleLine:
    position: int  # 1-based, in the file
    rule: str
    phase: str  # "normal" or "fallback"
    provider: str
    tried: bool
    matched: bool
    reason: Reason | None
    detail: str


def rules_in_file_order(config: Config, verdict: Verdict, iss: object) -> list[RuleLine]:
    """The engine's per-rule trace, in file order, with each rule's phase.

    A rule the engine never reached (an earlier one matched) says so. An
    ``unknown_issuer`` says what differs between the token's iss and the
    rule's provider's issuer.
    """
    traces: dict[str, RuleTrace] = {}
    for t in verdict.trace:
        traces[t.rule] = t  # the last word on a rule (a match refused later, e.g. authzid)
    lines = []
    for position, rule in enumerate(config.rules, 1):
        phase = "fallback" if rule.fallback else "normal"
        trace = traces.get(rule.name)
        if trace is None:
            why = f"not tried: rule {verdict.rule!r} decided first" if verdict.rule else "not tried"
            lines.append(
                RuleLine(position, rule.name, phase, rule.provider, False, False, None, why)
            )
            continue
        detail = trace.detail
        if trace.reason is Reason.UNKNOWN_ISSUER:
            provider = config.provider(rule.provider)
            detail = (
                f"token iss is not the issuer of provider {provider.name} ({provider.issuer}): "
                + issuer_difference(iss, provider.issuer)
            )
        lines.append(
            RuleLine(
                position,
                rule.name,
                phase,
                rule.provider,
                True,
                trace.matched,
                trace.reason,
                detail,
            )
        )
    return lines
