"""A built-in development OpenID issuer: keys, token minting, discovery and JWKS over HTTP.

Used by ``saslauthd-oidc dev`` (so a newcomer can try the daemon without an
IdP) and by the test-suite as a real HTTP provider on loopback.

* :class:`DevIssuer` generates one key per algorithm (RS256, PS256, ES256,
  EdDSA/Ed25519), mints realistic RFC 9068 access tokens, rotates keys, and is
  itself a plain ASGI application serving
  ``{issuer_path}.well-known/openid-configuration`` and ``/jwks.json``.
* :meth:`DevIssuer.serve` runs it with hypercorn's trio worker on loopback and
  sets ``url`` (``http://127.0.0.1:PORT``) and ``issuer``, which is
  ``f"{url}{issuer_path}".rstrip("/")`` — so with the default ``issuer_path="/"``
  the issuer is exactly ``url``, and the provider's default discovery URL
  (issuer + ``/.well-known/openid-configuration``) finds the document.
* :class:`DevIssuerThread` runs a DevIssuer in a background thread with its own
  ``trio.run``, for synchronous tests.

Opaque tokens: :meth:`DevIssuer.mint_opaque` issues a random token whose
claims only the issuer knows; ``/introspect`` (RFC 7662, client_secret_basic
or client_secret_post against :attr:`DevIssuer.clients`) and ``/userinfo``
(Bearer) answer for them. ``/userinfo`` and ``/introspect`` also answer for
the JWTs :meth:`DevIssuer.mint` issued (userinfo with the profile in
:attr:`DevIssuer.profiles`); :meth:`DevIssuer.revoke` makes either inactive.

``requests`` counts requests per path (what a soak or a demo can show). The
test-suite's fault knobs (failing, slow, redirecting answers; a JWKS or a
discovery document of its choosing) are not here: they are a subclass in
``tests/support_issuer.py``, which overrides :meth:`DevIssuer.respond`. This is
NOT a real authorization server: its token endpoint is a stub that refuses
every grant.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import math
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import parse_qsl, unquote

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms

from saslauthd_oidc.frontends.asgi import Receive, Scope, Send, acknowledge_lifespan

if TYPE_CHECKING:
    from hypercorn.config import Config as HypercornConfig

SUPPORTED_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
JWKS_PATH = "/jwks.json"
TOKEN_PATH = "/token"
INTROSPECTION_PATH = "/introspect"
USERINFO_PATH = "/userinfo"
#: Profile claims userinfo may return; the rest of a token's claims stay in the token.
PROFILE_CLAIMS = ("sub", "email", "email_verified", "preferred_username", "name")

DISCOVERY_SUFFIX = "/.well-known/openid-configuration"
#: Issuer shapes of the IdPs whose issuers are per client or per application.
KANIDM_PREFIX = "/oauth2/openid/"
AUTHENTIK_PREFIX = "/application/o/"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
#: An HTTP answer: status, headers, body.
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request as the issuer sees it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class DevKey:
    kid: str
    alg: str
    private_key: PrivateKey

    def public_jwk(self) -> dict[str, Any]:
        return {**public_jwk(self.private_key), "kid": self.kid, "alg": self.alg, "use": "sig"}


def public_jwk(key: PrivateKey) -> dict[str, Any]:
    """The public half of ``key`` as a JWK (no kid, alg or use)."""
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        return RSAAlgorithm.to_jwk(pub, as_dict=True)
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return ECAlgorithm.to_jwk(pub, as_dict=True)
    return OKPAlgorithm.to_jwk(pub, as_dict=True)


def generate_key(alg: str) -> PrivateKey:
    """A fresh private key for ``alg`` (RS*/PS* 2048-bit RSA, ES256 P-256, EdDSA Ed25519)."""
    if alg in ("RS256", "PS256"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(
        f"unsupported algorithm {alg!r} (supported: {', '.join(SUPPORTED_ALGORITHMS)})"
    )


class DevIssuer:
    """An in-process OpenID issuer for development and tests (see module docstring)."""

    def __init__(
        self,
        *,
        algorithms: Iterable[str] = ("ES256",),
        issuer_path: str = "/",
        any_issuer_path: bool = False,
    ) -> None:
        self.algorithms = tuple(algorithms)
        # Discovery at <prefix>/.well-known/openid-configuration for ANY prefix, the
        # issuer being url + prefix (with a trailing "/" in Authentik's shape,
        # /application/o/<slug>/): per-client issuers as Kanidm and Authentik have them.
        self.any_issuer_path = any_issuer_path
        self.issuer_path = issuer_path if issuer_path.endswith("/") else issuer_path + "/"
        if not self.issuer_path.startswith("/"):
            self.issuer_path = "/" + self.issuer_path
        self._lock = threading.Lock()
        self._keys: dict[str, DevKey] = {}
        self._current: dict[str, str] = {}
        for alg in self.algorithms:
            self.add_key(alg)
        self.url: str | None = None
        self.issuer: str | None = None
        self.port: int | None = None
        self.requests: collections.Counter[str] = collections.Counter()
        #: client_id -> secret of the clients allowed to call /introspect.
        self.clients: dict[str, str] = {"saslauthd": "saslauthd-secret"}
        #: sub -> extra userinfo claims (merged over those taken from the token).
        self.profiles: dict[str, dict[str, Any]] = {}
        self._opaque: dict[str, dict[str, Any]] = {}
        self._minted: dict[str, dict[str, Any]] = {}
        self._shutdown: trio.Event | None = None

    # ----------------------------------------------------------------- keys

    @property
    def discovery_url(self) -> str:
        return self._require_url() + self.issuer_path + ".well-known/openid-configuration"

    @property
    def jwks_uri(self) -> str:
        return self._require_url() + JWKS_PATH

    def kid(self, alg: str = "ES256") -> str:
        """The current key id for ``alg``."""
        return self._current[alg]

    def add_key(self, alg: str) -> str:
        """Generate another key for ``alg``; it becomes current, older ones stay published."""
        key = DevKey(f"{alg.lower()}-{secrets.token_hex(4)}", alg, generate_key(alg))
        with self._lock:
            self._keys[key.kid] = key
            self._current[alg] = key.kid
        return key.kid

    def rotate(self, alg: str) -> str:
        """Replace ``alg``'s current key with a new one (new kid, old key unpublished)."""
        old = self._current.get(alg)
        kid = self.add_key(alg)
        with self._lock:
            if old is not None:
                del self._keys[old]
        return kid

    def remove_key(self, kid: str) -> None:
        with self._lock:
            self._keys.pop(kid, None)

    def jwks(self) -> dict[str, Any]:
        """The public key set as served on ``/jwks.json``."""
        with self._lock:
            keys = list(self._keys.values())
        return {"keys": [k.public_jwk() for k in keys]}

    def discovery_document(self, issuer: str | None = None) -> dict[str, Any]:
        url = self._require_url()
        issuer = issuer or self._require_issuer()
        return {
            "issuer": issuer,
            "jwks_uri": url + JWKS_PATH,
            "token_endpoint": url + TOKEN_PATH,
            "introspection_endpoint": url + INTROSPECTION_PATH,
            "userinfo_endpoint": url + USERINFO_PATH,
            "authorization_endpoint": url + "/authorize",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": list(self.algorithms),
            "grant_types_supported": ["authorization_code", "client_credentials"],
            "scopes_supported": ["openid", "email", "profile"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
        }

    # ----------------------------------------------------------------- minting

    def mint(
        self,
        claims: dict[str, Any] | None = None,
        *,
        alg: str = "ES256",
        kid: str | None = None,
        header: dict[str, Any] | None = None,
        lifetime: float = 600,
        subject: str = "alice",
        email: str = "alice@example.org",
        audience: str | list[str] = "mail",
        typ: str | None = "at+jwt",
    ) -> str:
        """A signed access token. ``claims`` override defaults; a ``None`` value drops a claim.

        ``kid`` picks the signing key (default: ``alg``'s current key) and is put
        in the header; ``header`` adds or overrides header fields (``None``
        drops one), e.g. ``{"kid": None}`` or ``{"alg": "RS256"}``.
        """
        key = self._signing_key(alg, kid)
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "exp": now + int(lifetime),
            "iat": now,
            "nbf": now,
            "jti": uuid.uuid4().hex,
            "client_id": "dev-client",
            "scope": "openid email profile",
            "email": email,
            "preferred_username": email.split("@", 1)[0],
        }
        payload.update(claims or {})
        payload = {k: v for k, v in payload.items() if v is not None}
        if payload.get("iss") is None:
            raise RuntimeError("no issuer yet: serve() first, or pass claims={'iss': ...}")
        headers: dict[str, Any] = {"alg": alg, "typ": typ, "kid": key.kid, **(header or {})}
        headers = {k: v for k, v in headers.items() if v is not None}
        token = _encode(payload, key.private_key, alg, headers)
        with self._lock:
            self._minted[token] = payload
        return token

    def mint_opaque(
        self,
        claims: dict[str, Any] | None = None,
        *,
        lifetime: float = 600,
        subject: str = "alice",
        email: str = "alice@example.org",
        audience: str | list[str] | None = "mail",
    ) -> str:
        """A random opaque access token; ``/introspect`` knows its claims.

        ``claims`` override the introspection answer's defaults (``None`` drops one).
        """
        now = int(time.time())
        record: dict[str, Any] = {
            "active": True,
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "exp": now + int(lifetime),
            "iat": now,
            "client_id": "dev-client",
            "scope": "openid email profile",
            "token_type": "Bearer",
            "email": email,
            "preferred_username": email.split("@", 1)[0],
        }
        record.update(claims or {})
        record = {k: v for k, v in record.items() if v is not None}
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._opaque[token] = record
        return token

    def revoke(self, token: str) -> None:
        """Make ``token`` inactive at /introspect and /userinfo."""
        with self._lock:
            self._opaque.pop(token, None)
            self._minted.pop(token, None)

    def _introspection_answer(self, token: str) -> dict[str, Any]:
        with self._lock:
            record = self._opaque.get(token)
            if record is None and token in self._minted:  # a JWT it signed, until revoked
                record = {"active": True, **self._minted[token]}
        if record is None or record.get("exp", math.inf) < time.time():
            return {"active": False}
        return dict(record)

    def _userinfo_answer(self, token: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._opaque.get(token) or self._minted.get(token)
        if record is None or record.get("exp", math.inf) < time.time():
            return None
        answer = {k: record[k] for k in PROFILE_CLAIMS if k in record}
        answer.update(self.profiles.get(str(record.get("sub")), {}))
        return {k: v for k, v in answer.items() if v is not None}

    def _signing_key(self, alg: str, kid: str | None) -> DevKey:
        with self._lock:
            chosen = kid or self._current.get(alg)
            key = self._keys.get(chosen) if chosen else None
        if key is None:
            raise KeyError(f"no key {chosen!r} for {alg}; add_key({alg!r}) first")
        return key

    # ----------------------------------------------------------------- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application."""
        if scope["type"] == "lifespan":
            await acknowledge_lifespan(receive, send)
            return
        if scope["type"] != "http":  # pragma: no cover - websocket etc.
            return
        path: str = scope["path"]
        self.requests[path] += 1
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body") or len(body) > 65536:
                break
        status, answer_headers, answer = await self.respond(
            Request(scope["method"], path, headers, body)
        )
        await send({"type": "http.response.start", "status": status, "headers": answer_headers})
        await send({"type": "http.response.body", "body": answer})

    async def respond(self, request: Request) -> Answer:
        """The answer to one request: what a subclass overrides to answer otherwise."""
        return self._answer(request)

    def _answer(self, request: Request) -> Answer:
        method, path = request.method, request.path
        if path == self.issuer_path + ".well-known/openid-configuration" and method == "GET":
            return _metadata(_json(200, self.discovery_document()))
        if self.any_issuer_path and path.endswith(DISCOVERY_SUFFIX) and method == "GET":
            return _metadata(_json(200, self.discovery_document(self._issuer_at(path))))
        if path == JWKS_PATH and method == "GET":
            return _metadata(_json(200, self.jwks(), content_type=b"application/jwk-set+json"))
        if path == TOKEN_PATH:
            return _json(400, {"error": "unsupported_grant_type"})
        if path == INTROSPECTION_PATH and method == "POST":
            form = dict(parse_qsl(request.body.decode("latin-1")))
            if not self._client_authenticated(request.headers, form):
                return _json(401, {"error": "invalid_client"})
            return _json(200, self._introspection_answer(form.get("token", "")))
        if path == USERINFO_PATH and method in ("GET", "POST"):
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            answer = self._userinfo_answer(token) if scheme.lower() == "bearer" else None
            if answer is None:
                status, headers, body = _json(401, {"error": "invalid_token"})
                return (
                    status,
                    [*headers, (b"www-authenticate", b'Bearer error="invalid_token"')],
                    body,
                )
            return _json(200, answer)
        return _json(404, {"error": "not_found"})

    def _issuer_at(self, discovery_path: str) -> str:
        prefix = discovery_path[: -len(DISCOVERY_SUFFIX)]
        if prefix.startswith(AUTHENTIK_PREFIX):
            prefix += "/"
        return self._require_url() + prefix

    # ----------------------------------------------------------------- state

    def export_state(self) -> dict[str, Any]:
        """The issuer URL and private keys, for :func:`mint_offline` in another process."""
        with self._lock:
            keys = list(self._keys.values())
            current = dict(self._current)
        return {
            "url": self._require_url(),
            "issuer": self._require_issuer(),
            "current": current,
            "keys": [
                {
                    "kid": k.kid,
                    "alg": k.alg,
                    "pem": k.private_key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ).decode("ascii"),
                }
                for k in keys
            ],
        }

    def _client_authenticated(self, headers: dict[str, str], form: dict[str, str]) -> bool:
        """client_secret_basic (form-urlencoded parts, RFC 6749 2.3.1) or client_secret_post."""
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except ValueError:
                return False
            cid, _, secret = decoded.partition(":")
            cid, secret = unquote(cid), unquote(secret)
        else:
            cid, secret = form.get("client_id", ""), form.get("client_secret", "")
        expected = self.clients.get(cid)
        return expected is not None and secrets.compare_digest(expected.encode(), secret.encode())

    # ----------------------------------------------------------------- serving

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled or :meth:`stop`; reports the bound port.

        Plain HTTP, or HTTPS when ``certfile``/``keyfile`` are given (``url``
        then starts with ``https://``).
        """
        # Imported here: `serve` imports this module (through devmode) and needs no hypercorn.
        from hypercorn.config import Config as HypercornConfig  # noqa: PLC0415

        config = HypercornConfig()
        if certfile:
            config.certfile, config.keyfile = certfile, keyfile
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        config.accesslog = None
        config.loglevel = "WARNING"
        config.graceful_timeout = 1.0
        self._shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(self._run_hypercorn, config)
            self.url = binds[0]
            self.port = int(self.url.rsplit(":", 1)[1])
            self.issuer = f"{self.url}{self.issuer_path}".rstrip("/")
            task_status.started(self.port)

    async def _run_hypercorn(
        self, config: HypercornConfig, *, task_status: trio.TaskStatus[list[str]]
    ) -> None:
        from hypercorn.trio import serve as hypercorn_serve  # noqa: PLC0415

        assert self._shutdown is not None
        app: Any = self  # a plain ASGI callable; hypercorn's typing wants its TypedDicts
        await hypercorn_serve(
            app, config, shutdown_trigger=self._shutdown.wait, task_status=task_status
        )

    def stop(self) -> None:
        """Ask a running :meth:`serve` to shut down gracefully (call from its trio thread)."""
        if self._shutdown is not None:
            self._shutdown.set()

    def _require_url(self) -> str:
        if self.url is None:
            raise RuntimeError("DevIssuer is not serving yet")
        return self.url

    def _require_issuer(self) -> str:
        if self.issuer is None:
            raise RuntimeError("DevIssuer is not serving yet")
        return self.issuer


AnyIssuer = TypeVar("AnyIssuer", bound=DevIssuer)


class DevIssuerThread(Generic[AnyIssuer]):
    """Run a DevIssuer in a background thread: ``with DevIssuerThread(DevIssuer()) as i: ...``."""

    def __init__(self, issuer: AnyIssuer, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.issuer = issuer
        self._host, self._port = host, port
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> AnyIssuer:
        self._thread = threading.Thread(target=self._run, name="dev-issuer", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout=30):
            raise RuntimeError("dev issuer did not start within 30 s")
        if self._error is not None:
            raise RuntimeError("dev issuer failed to start") from self._error
        return self.issuer

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the server and join the thread (idempotent)."""
        if self._thread is None:
            return
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self.issuer.stop, trio_token=self._token)
        self._thread.join(timeout=30)
        self._thread = None

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.issuer.serve, self._host, self._port)
            self._started.set()


def issuer_for(base: str, spec: str | None) -> str:
    """An issuer URL of the dev issuer at ``base``, from ``kanidm:CLIENT``, ``authentik:SLUG``,
    a path (``/oauth2/openid/webmail``) or a full URL (taken as it is; None: the root issuer)."""
    if not spec:
        return base
    kind, sep, name = spec.partition(":")
    if sep and kind == "kanidm" and name:
        return f"{base}{KANIDM_PREFIX}{name}"
    if sep and kind == "authentik" and name:
        return f"{base}{AUTHENTIK_PREFIX}{name}/"
    if spec.startswith("/"):
        return base + (
            spec + "/" if spec.startswith(AUTHENTIK_PREFIX) and not spec.endswith("/") else spec
        )
    return spec


def mint_offline(
    state: dict[str, Any],
    claims: dict[str, Any],
    *,
    alg: str = "ES256",
    typ: str | None = "at+jwt",
) -> str:
    """A token signed with the current ``alg`` key of an exported dev issuer state."""
    kid = state.get("current", {}).get(alg)
    entry = next((k for k in state.get("keys", []) if k.get("kid") == kid), None)
    if entry is None:
        have = ", ".join(sorted(state.get("current", {}))) or "none"
        raise KeyError(f"the dev issuer has no {alg} key (it has: {have})")
    key = serialization.load_pem_private_key(entry["pem"].encode("ascii"), password=None)
    assert isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    )
    header = {"alg": alg, "typ": typ, "kid": kid}
    return _encode(claims, key, alg, {k: v for k, v in header.items() if v is not None})


def _json(status: int, doc: Any, *, content_type: bytes = b"application/json") -> Answer:
    body = json.dumps(doc).encode()
    return status, [(b"content-type", content_type), (b"cache-control", b"no-store")], body


def _metadata(answer: Answer) -> Answer:
    """Discovery and JWKS carry no Cache-Control: a client caches them as it likes."""
    status, headers, body = answer
    return status, [(k, v) for k, v in headers if k != b"cache-control"], body


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _encode(payload: dict[str, Any], key: PrivateKey, alg: str, header: dict[str, Any]) -> str:
    """Compact JWS signed with ``alg`` whatever the header says (tests forge mismatches)."""
    compact = (",", ":")
    signing_input = (
        f"{_b64url(json.dumps(header, separators=compact).encode())}."
        f"{_b64url(json.dumps(payload, separators=compact).encode())}"
    )
    signature = get_default_algorithms()[alg].sign(signing_input.encode("ascii"), key)
    return f"{signing_input}.{_b64url(signature)}"
