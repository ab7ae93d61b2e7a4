"""The HTTP listener: a small ASGI application served by hypercorn's trio worker.

Routes (README "Recipes": Dovecot, Stalwart, Discovery, Autoconfig; "Metrics and health"):

* ``POST /introspect`` — RFC 7662 as Dovecot's ``passdb oauth2`` expects it
  (``introspection_mode = post``); ``X-Dovecot-Auth-*`` headers feed rule
  selection. Callers authenticate unless ``http.auth = "open"``.
* ``{stalwart}/introspect``, ``{stalwart}/userinfo``,
  ``{stalwart}/.well-known/openid-configuration`` — Stalwart's OIDC-directory
  contracts, when ``http.stalwart_issuer`` is set.
* ``GET /.well-known/oauth-protected-resource[/path]`` — RFC 9728 metadata
  from the rule selected by Host, path and Referer (:mod:`..core.resource_metadata`).
* ``GET /.well-known/autoconfig/mail/config-v1.1.xml``, ``/mail/config-v1.1.xml``
  and ``/.well-known/user-agent-configuration.json`` — Mail Autoconfig and
  PACC for the ``[[domain]]`` the Host or ``emailaddress`` names (:mod:`..core.autoconfig`).
* ``GET /metrics``, ``/healthz``, ``/readyz``.

HTTP itself is hypercorn's business; this module only sees ASGI scopes and
routes them. A Verdict becomes an HTTP reply in
:func:`.http_replies.introspection_reply` or, on Stalwart's paths, in
:func:`.stalwart.verdict_reply`, and nowhere else; Stalwart's contract is
:mod:`.stalwart`; who may call is :mod:`.http_callers`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

import structlog
import trio

from saslauthd_oidc.config import Config, HttpConfig
from saslauthd_oidc.core.autoconfig import (
    AUTOCONFIG_PATHS,
    PACC_PATH,
    autoconfig_xml,
    domain_for,
    email_domain,
    pacc_json,
)
from saslauthd_oidc.core.engine import Authenticator
from saslauthd_oidc.core.outcome import Reason, Verdict
from saslauthd_oidc.core.request import (
    AuthRequest,
    Credentials,
    Mechanism,
    RequestContext,
    token_fingerprint,
)
from saslauthd_oidc.core.resource_metadata import (
    ResourceRequest,
    parse_host,
    protected_resource_metadata,
    resource_path,
    select_rule,
)
from saslauthd_oidc.frontends import stalwart
from saslauthd_oidc.frontends.accept import ConnectionTable, serve_connections
from saslauthd_oidc.frontends.asgi import Receive, Scope, Send, acknowledge_lifespan
from saslauthd_oidc.frontends.http_callers import CallerAuth
from saslauthd_oidc.frontends.http_replies import Reply, introspection_reply, json_reply
from saslauthd_oidc.frontends.stalwart import stalwart_discovery

if TYPE_CHECKING:
    from hypercorn.config import Config as HypercornConfig

__all__ = ["HttpFrontend", "HttpLimits", "serve_http", "stalwart_discovery"]

log = structlog.get_logger("saslauthd_oidc.http")


class MetricsPage(Protocol):
    """What ``GET /metrics`` serves: the service's metrics (the frontend does not import
    the service layer above it), rendered as the body and its content type."""

    def render(self) -> tuple[bytes, str]: ...


MAX_BODY_BYTES = 65536
FRONTEND = "http"
_NOT_FOUND = json_reply(404, {"error": "not_found"})
_BAD_METHOD = json_reply(405, {"error": "method_not_allowed"})
_BAD_HOST = json_reply(400, {"error": "invalid_request", "error_description": "bad Host"})
_BAD_ADDRESS = json_reply(
    400, {"error": "invalid_request", "error_description": "bad emailaddress"}
)


# --------------------------------------------------------------------------- the application


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _split_ip_port(value: str | None) -> tuple[str | None, int | None]:
    """Dovecot's ``net_ipport2str``: ``127.0.0.1:143`` or ``[::1]:143``."""
    if not value:
        return None, None
    host, sep, port = value.strip().rpartition(":")
    if not sep:
        return value.strip() or None, None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or None, int(port) if port.isdigit() and 0 < int(port) < 65536 else None


def dovecot_context(headers: Mapping[str, str]) -> RequestContext:
    """Rule-selection context from Dovecot's ``send_auth_headers = yes`` headers."""
    local_ip, local_port = _split_ip_port(headers.get("x-dovecot-auth-local"))
    remote_ip, remote_port = _split_ip_port(headers.get("x-dovecot-auth-remote"))
    service = headers.get("x-dovecot-auth-service") or headers.get("x-dovecot-auth-protocol")
    return RequestContext(
        frontend=FRONTEND,
        service=service.lower() if service else None,
        local_ip=local_ip,
        local_port=local_port,
        remote_ip=remote_ip,
        remote_port=remote_port,
    )


class _BodyTooLarge(Exception):
    pass


async def _read_body(receive: Receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if len(body) > MAX_BODY_BYTES:
            raise _BodyTooLarge
        if not message.get("more_body", False):
            break
    return bytes(body)


def _form_token(body: bytes) -> str | None:
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        return None
    values = form.get("token")
    return values[0] if values and values[0] else None


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


class HttpFrontend:
    """The ASGI application. ``authenticate`` is the (instrumented) engine."""

    def __init__(
        self,
        config: Config,
        authenticate: Authenticator,
        caller_auth: CallerAuth,
        *,
        metrics: MetricsPage | None = None,
        ready: Callable[[], bool] = lambda: True,
        request_timeout: float | None = None,
    ) -> None:
        self._config = config
        self._authenticate = authenticate
        self._caller_auth = caller_auth
        self._metrics = metrics if config.http.metrics else None
        self._ready = ready
        self._timeout = request_timeout or config.server.request_timeout
        self._providers = {p.name: p for p in config.providers}
        self._stalwart = config.http.stalwart_path
        self._documents: dict[tuple[bool, str], bytes | None] = {}  # (PACC?, domain)
        # Rules that need Dovecot's send_auth_headers; said once if Dovecot sends none.
        self._header_rules = [
            r.name
            for r in config.rules
            if (r.services or r.ports or r.remote_networks)
            and (not r.mechanisms or Mechanism.BEARER.value in r.mechanisms)
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await acknowledge_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            reply = await self._route(scope, receive)
        except _BodyTooLarge:
            reply = json_reply(413, {"error": "request_too_large"})
        cacheable = any(key == b"cache-control" for key, _ in reply.headers)
        headers = [
            (b"content-type", reply.content_type),
            *(() if cacheable else ((b"cache-control", b"no-store"),)),
            *reply.headers,
        ]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    async def _route(self, scope: Scope, receive: Receive) -> Reply:
        path: str = scope["path"]
        method: str = scope["method"]
        headers = _headers(scope)
        if path == "/introspect":
            if method != "POST":
                return _BAD_METHOD
            return await self._introspect(headers, receive)
        if self._stalwart and path.startswith(self._stalwart + "/"):
            return await self._stalwart_route(path[len(self._stalwart) :], method, headers, receive)
        resource = resource_path(path)
        if resource is not None:
            return self._protected_resource(scope, resource) if method == "GET" else _BAD_METHOD
        if path in AUTOCONFIG_PATHS or path == PACC_PATH:
            return self._autoconfig(scope, path) if method == "GET" else _BAD_METHOD
        if method != "GET":
            return _BAD_METHOD if path in ("/metrics", "/healthz", "/readyz") else _NOT_FOUND
        if path == "/healthz":
            return Reply(200, b"ok\n", content_type=b"text/plain; charset=utf-8")
        if path == "/readyz":
            ready = self._ready()
            return Reply(
                200 if ready else 503,
                b"ready\n" if ready else b"waiting for provider keys\n",
                content_type=b"text/plain; charset=utf-8",
            )
        if path == "/metrics" and self._metrics is not None:
            body, content_type = self._metrics.render()
            return Reply(200, body, content_type=content_type.encode())
        return _NOT_FOUND

    async def _introspect(self, headers: Mapping[str, str], receive: Receive) -> Reply:
        token = await self._caller_token(headers, receive)
        if isinstance(token, Reply):
            return token
        context = dovecot_context(headers)
        if context.service is None and self._header_rules:
            log.warning(
                "introspect_without_auth_headers",
                rules=self._header_rules,
                hint="set send_auth_headers = yes in Dovecot's passdb oauth2 file: "
                "without it these rules' services, ports and remote_networks never hold",
            )
            self._header_rules = []  # once per process
        return await self._answer(token, context, introspection_reply)

    async def _caller_token(
        self, headers: Mapping[str, str], receive: Receive
    ) -> str | Reply | None:
        """The form's token from a caller ``http.auth`` allows, or the 401 refusing the caller."""
        if not self._caller_auth.allows(headers.get("authorization")):
            return json_reply(
                401,
                {"error": "invalid_client"},
                (b"www-authenticate", b'Basic realm="saslauthd-oidc"'),
            )
        return _form_token(await _read_body(receive))

    async def _stalwart_route(
        self, rest: str, method: str, headers: Mapping[str, str], receive: Receive
    ) -> Reply:
        if rest == stalwart.INTROSPECT_PATH:
            if method != "POST":
                return _BAD_METHOD
            token = await self._caller_token(headers, receive)
            if isinstance(token, Reply):
                return token
            return await self._answer(token, stalwart.CONTEXT, stalwart.verdict_reply)
        if rest == stalwart.USERINFO_PATH:
            if method not in ("GET", "POST"):
                return _BAD_METHOD
            token = _bearer(headers.get("authorization"))
            return await self._answer(token, stalwart.CONTEXT, stalwart.verdict_reply)
        if method != "GET":
            return _BAD_METHOD
        return stalwart.document(rest, self._config.http.stalwart_issuer or "") or _NOT_FOUND

    async def _answer(
        self, token: str | None, context: RequestContext, reply: Callable[[Verdict], Reply]
    ) -> Reply:
        if token is None:
            return reply(Verdict(reason=Reason.MISSING_TOKEN, detail="no token in the request"))
        request = AuthRequest(Mechanism.BEARER, Credentials(token), context)
        verdict = Verdict(reason=Reason.TIMEOUT, detail="request_timeout exceeded")
        with trio.move_on_after(self._timeout):
            try:
                verdict = await self._authenticate(request)
            except Exception as exc:
                log.error("authenticate_failed", error=type(exc).__name__, exc_info=True)
                verdict = Verdict(reason=Reason.INTERNAL_ERROR, detail="authenticator raised")
        return reply(verdict)

    def _protected_resource(self, scope: Scope, path: str) -> Reply:
        request = resource_request(scope, path, self._config.http)
        if request is None:
            return _BAD_HOST
        rule = select_rule(self._config.rules, request)
        if rule is None:
            return _NOT_FOUND
        doc = protected_resource_metadata(rule, self._providers[rule.provider], request)
        return json_reply(200, doc)

    def _autoconfig(self, scope: Scope, path: str) -> Reply:
        """Autoconfig or PACC from configuration; the request only picks the domain."""
        request = resource_request(scope, path, self._config.http)
        if request is None:
            return _BAD_HOST
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        addresses = query.get("emailaddress", [])
        if len(addresses) > 1:
            return _BAD_ADDRESS
        address = addresses[0] if addresses else None
        if address is not None and email_domain(address) is None:
            return _BAD_ADDRESS
        pacc = path == PACC_PATH
        domain = domain_for(self._config, request.hostname, None if pacc else address)
        # The address itself is never logged: its domain and a fingerprint only.
        asked = {"address": token_fingerprint(address)} if address is not None else {}
        if domain is None:
            log.info(
                "autoconfig_unknown_domain",
                document="pacc" if pacc else "autoconfig",
                host=request.hostname,
                domain=email_domain(address) if address else None,
                **asked,
            )
            return _NOT_FOUND
        key = (pacc, domain.name)
        if key not in self._documents:
            build = pacc_json if pacc else autoconfig_xml
            self._documents[key] = build(self._config, domain)
        body = self._documents[key]
        log.info(
            "autoconfig",
            document="pacc" if pacc else "autoconfig",
            domain=domain.name,
            found=body is not None,
            **asked,
        )
        if body is None:
            return _NOT_FOUND
        return Reply(
            200,
            body,
            ((b"cache-control", f"public, max-age={domain.max_age}".encode()),),
            content_type=b"application/json" if pacc else b"application/xml; charset=utf-8",
        )


def _header_values(scope: Scope, name: bytes, *, split: bool = True) -> list[str]:
    """Every value of header ``name`` (lower case): repeated headers, and comma lists split."""
    values: list[str] = []
    for key, value in scope["headers"]:
        if key.lower() == name:
            text = value.decode("latin-1")
            parts = text.split(",") if split else [text]
            values.extend(part.strip() for part in parts)
    return values


def from_trusted_proxy(scope: Scope, cfg: HttpConfig) -> bool:
    """The peer is one of ``http.trusted_proxies`` (``"unix"``: any peer on a Unix socket)."""
    client = scope.get("client")
    if not client:
        return cfg.trust_unix_proxies
    if not cfg.trusted_proxies:
        return False
    try:
        address = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return False
    return any(address in network for network in cfg.trusted_proxies if network != "unix")


def resource_request(scope: Scope, path: str, cfg: HttpConfig) -> ResourceRequest | None:
    """A discovery request's facts, or None when its Host is missing, repeated or invalid.

    ``X-Forwarded-Host``/``X-Forwarded-Proto`` count only from a trusted proxy,
    and then their last value (the one the nearest proxy set).
    """
    hosts = _header_values(scope, b"host")
    scheme = "https"
    if from_trusted_proxy(scope, cfg):
        forwarded = _header_values(scope, b"x-forwarded-host")
        if forwarded:
            hosts = forwarded[-1:]
        proto = _header_values(scope, b"x-forwarded-proto")
        if proto and proto[-1].lower() in ("http", "https"):
            scheme = proto[-1].lower()
    if len(hosts) != 1:
        return None
    parsed = parse_host(hosts[0])
    if parsed is None:
        return None
    referers = _header_values(scope, b"referer", split=False)
    return ResourceRequest(
        host=parsed[0],
        port=parsed[1],
        path=path,
        referer=referers[0] if len(referers) == 1 else None,
        scheme=scheme,
    )


# --------------------------------------------------------------------------- serving

#: Request target (path and query) bytes at most: the RFC 9728 path is
#: reflected into the answer, and nothing we serve has a longer one (414).
MAX_TARGET_BYTES = 2048
#: Bytes of one header value at most, Authorization aside (431).
MAX_HEADER_VALUE_BYTES = 4096
#: Streams one HTTP/2 connection may have open at once.
H2_MAX_STREAMS = 8


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The HTTP listener's bounds (``[http]``, within the descriptor budget)."""

    max_connections: int = 256
    read_timeout: float = 10.0  # a request's body, once its head has arrived (408)
    write_timeout: float = 10.0  # each answer's bytes taken by the client
    keepalive_timeout: float = 15.0  # an idle connection between requests
    max_requests_per_connection: int = 100
    max_token_bytes: int = 16384  # an Authorization header may carry one

    @classmethod
    def from_config(cls, config: Config, max_connections: int) -> HttpLimits:
        http = config.http
        return cls(
            max_connections=max_connections,
            read_timeout=http.read_timeout,
            write_timeout=http.write_timeout,
            keepalive_timeout=http.keepalive_timeout,
            max_requests_per_connection=http.max_requests_per_connection,
            max_token_bytes=config.server.max_token_bytes,
        )

    @property
    def max_head_bytes(self) -> int:
        """Request line and headers together (h11's incomplete-event bound)."""
        return self.max_token_bytes + 8192


class _RequestTimeout(Exception):
    pass


def _plain(status: int, text: bytes) -> Reply:
    return Reply(status, text, ((b"connection", b"close"),), b"text/plain; charset=utf-8")


def _oversized(scope: Scope, limits: HttpLimits) -> Reply | None:
    target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    if target > MAX_TARGET_BYTES:
        return _plain(414, b"request target too long\n")
    for name, value in scope["headers"]:
        bound = limits.max_token_bytes + 64 if name == b"authorization" else MAX_HEADER_VALUE_BYTES
        if len(value) > bound:
            return _plain(431, b"request header too large\n")
    return None


def bounded_app(
    app: Callable[[Scope, Receive, Send], Awaitable[None]], limits: HttpLimits
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """``app`` behind the request bounds: target and header sizes, body arrival time."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        refusal = _oversized(scope, limits)
        if refusal is not None:
            await _send_reply(send, refusal)
            return
        deadline = trio.current_time() + limits.read_timeout
        started = False

        async def bounded_receive() -> MutableMapping[str, Any]:
            with trio.move_on_at(deadline):
                return await receive()
            raise _RequestTimeout

        async def tracking_send(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await app(scope, bounded_receive, tracking_send)
        except _RequestTimeout:
            if not started:
                await _send_reply(send, _plain(408, b"request not complete within read_timeout\n"))

    return guarded


async def _send_reply(send: Send, reply: Reply) -> None:
    headers = [(b"content-type", reply.content_type), (b"cache-control", b"no-store")]
    headers.extend(reply.headers)
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


def hypercorn_config(limits: HttpLimits, graceful_timeout: float) -> HypercornConfig:
    # hypercorn is imported only where HTTP is served: a daemon without an
    # HTTP listener never loads it (megabytes of RSS; tests/test_imports.py).
    from hypercorn.config import Config as HypercornConfig  # noqa: PLC0415

    config = HypercornConfig()
    config.accesslog = None  # paths only, but keep one log line per authentication
    config.errorlog = None
    config.graceful_timeout = graceful_timeout
    config.include_server_header = False
    config.h11_max_incomplete_size = limits.max_head_bytes
    config.h2_max_concurrent_streams = H2_MAX_STREAMS
    config.h2_max_header_list_size = limits.max_head_bytes
    # A backstop per receive (the idle timer below closes idle connections,
    # the ASGI guard bounds a body): a client silent this long is dropped.
    config.read_timeout = max(limits.read_timeout, limits.keepalive_timeout)  # type: ignore[assignment]
    config.keep_alive_timeout = limits.keepalive_timeout
    config.keep_alive_max_requests = limits.max_requests_per_connection
    config.max_app_queue_size = 4
    return config


async def serve_http(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    sockets: Sequence[socket.socket],
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    graceful_timeout: float = 1.0,
    limits: HttpLimits | None = None,
    table: ConnectionTable | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on already bound and listening sockets until cancelled.

    hypercorn speaks HTTP (its trio ``TCPServer``, one per connection); the
    connections are accepted by our own loop (:mod:`.accept`), so that the
    listener holds at most ``limits.max_connections`` of them (one cap for
    all HTTP sockets; at the cap the longest-idle one of the busiest peer is
    closed), a client that does not take an answer within
    ``write_timeout`` is dropped, and a client that left stops costing work
    (its pipelined requests included). When ``shutdown_trigger`` returns,
    accepting stops, idle keep-alive connections close, and open requests
    get ``graceful_timeout`` to finish.
    """
    from hypercorn.trio.tcp_server import TCPServer  # noqa: PLC0415
    from hypercorn.trio.worker_context import WorkerContext  # noqa: PLC0415
    from hypercorn.typing import ConnectionState  # noqa: PLC0415
    from hypercorn.utils import repr_socket_addr, wrap_app  # noqa: PLC0415

    limits = limits or HttpLimits()
    config = hypercorn_config(limits, graceful_timeout)
    context = WorkerContext(None)
    asgi: Any = bounded_app(app, limits)
    wrapped = wrap_app(asgi, config.wsgi_max_body_size, "asgi")
    table = table or ConnectionTable("http", limits.max_connections)
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
    binds = [f"http://{repr_socket_addr(s.family, s.getsockname())}" for s in sockets]

    async def serve_one(stream: trio.abc.Stream) -> None:
        await TCPServer(wrapped, config, context, ConnectionState({}), stream)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            await nursery.start(
                partial(
                    serve_connections,
                    listener,
                    serve_one,
                    table=table,
                    write_timeout=limits.write_timeout,
                )
            )
        task_status.started(binds)
        if shutdown_trigger is None:
            await trio.sleep_forever()
        await shutdown_trigger()
        table.stop_accepting()
        for s in sockets:
            s.close()  # a new connection is refused, not left waiting in the backlog
        await context.terminated.set()
        with trio.move_on_after(graceful_timeout):
            await table.wait_empty()
        nursery.cancel_scope.cancel()
