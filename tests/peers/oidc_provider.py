"""A real OpenID provider for tests: panva's ``oidc-provider`` (npm) on loopback.

Usage::

    from tests.peers.oidc_provider import OidcProviderPeer

    with OidcProviderPeer() as op:          # after the oidc_provider_ready fixture
        jwt_at = op.token("mail-webmail", resource="urn:mail")     # JWT, aud urn:mail
        opaque = op.token("mail-desktop")                          # no resource: opaque
        assert op.introspect(opaque)["active"] is True

What runs
    ``node tests/peers/oidc_provider/provider.mjs 0``: the script binds
    ``127.0.0.1`` on a free port, builds the provider with issuer
    ``http://127.0.0.1:<port>`` and prints ``READY <port>``.  Leaving the
    ``with`` block sends SIGTERM (then SIGKILL after a few seconds).  Its
    output (warnings, errors) is kept in :attr:`OidcProviderPeer.output`.
    The package is pinned in ``tests/peers/oidc_provider/package.json`` /
    ``package-lock.json``; install it with
    ``npm ci --prefix tests/peers/oidc_provider`` (``.ci/run`` does).

Clients (secrets are random per instance, see :attr:`OidcProviderPeer.clients`)
    ``mail-webmail``  client_secret_basic; client_credentials and
                      authorization_code with PKCE (user alice@example.org,
                      logged in and consented by a scripted interaction)
    ``mail-desktop``  client_secret_post; client_credentials
    ``saslauthd``     client_secret_basic; meant for the daemon's introspection

Tokens (all state is in memory and dies with the process)
    ``resource="urn:mail"``  JWT access token, header ``typ: at+jwt``, ES256,
                             ``aud: "urn:mail"``, scope within ``mail email``
    ``resource="urn:other"`` JWT access token, RS256, ``aud: "urn:other"``
    no resource              opaque access token (check it by introspection)
    Every access token carries ``email``: ``<client_id>@clients.example.org``
    for client_credentials, ``alice@example.org`` for authorization_code.
    ``sub`` is the client_id (client_credentials) or ``alice``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx

__all__ = [
    "NODE",
    "PEER_DIR",
    "OidcProviderPeer",
    "oidc_provider_available",
]

#: The peer's npm project (package.json, package-lock.json, provider.mjs).
PEER_DIR = Path(__file__).resolve().parent / "oidc_provider"
#: The ``node`` command; overridable (and a way to check that a missing node
#: turns into a skip, or a failure in CI).
NODE = os.environ.get("SASLAUTHD_OIDC_NODE", "node")

#: client_id -> token endpoint authentication method.
CLIENT_AUTH = {
    "mail-webmail": "client_secret_basic",
    "mail-desktop": "client_secret_post",
    "saslauthd": "client_secret_basic",
}
REDIRECT_URI = "http://127.0.0.1/callback"

_STARTUP_TIMEOUT = 20.0
_STOP_TIMEOUT = 5.0
_MIN_NODE = (20, 18)


def oidc_provider_available() -> str | None:
    """``None`` if the provider can be started here, else the reason why not."""
    node = shutil.which(NODE)
    if node is None:
        return f"{NODE!r} not found (install Node.js >= 20.18, e.g. the 'nodejs' package)"
    if not (PEER_DIR / "node_modules" / "oidc-provider" / "package.json").is_file():
        return (
            f"{PEER_DIR}/node_modules/oidc-provider is missing "
            "(run `npm ci --prefix tests/peers/oidc_provider`)"
        )
    try:
        version = subprocess.run(
            [node, "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{node} --version failed: {exc}"
    try:
        major, minor = (int(x) for x in version.lstrip("v").split(".")[:2])
    except ValueError:
        return f"cannot parse `{node} --version`: {version!r}"
    if (major, minor) < _MIN_NODE:
        # oidc-provider 9 uses URL.parse (Node 20.18+); Debian 12's own nodejs is 18.
        return f"Node.js {version} is too old (need >= {_MIN_NODE[0]}.{_MIN_NODE[1]})"
    return None


def _pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class OidcProviderPeer:
    """``oidc-provider`` as a child process on ``127.0.0.1:<free port>``.

    Attributes after ``__enter__``: ``host``, ``port``, ``issuer``,
    ``discovery`` (the parsed discovery document), ``clients`` (client_id ->
    secret), ``output`` (lines the process printed so far).
    """

    host = "127.0.0.1"

    def __init__(self, *, startup_timeout: float = _STARTUP_TIMEOUT) -> None:
        self.startup_timeout = startup_timeout
        self.clients = {cid: secrets.token_urlsafe(24) for cid in CLIENT_AUTH}
        self.port = 0
        self.issuer = ""
        self.discovery: dict[str, Any] = {}
        self.output: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._http: httpx.Client | None = None

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self) -> OidcProviderPeer:
        reason = oidc_provider_available()
        if reason is not None:
            raise RuntimeError(f"oidc-provider not available: {reason}")
        env = dict(os.environ, OIDC_PEER_CLIENT_SECRETS=json.dumps(self.clients))
        env.pop("NODE_OPTIONS", None)
        self._proc = subprocess.Popen(
            [shutil.which(NODE) or NODE, str(PEER_DIR / "provider.mjs"), "0"],
            cwd=PEER_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        ready = threading.Event()
        self._reader = threading.Thread(target=self._read_output, args=(ready,), daemon=True)
        self._reader.start()
        try:
            if not ready.wait(self.startup_timeout) or not self.port:
                raise RuntimeError(
                    f"oidc-provider did not become ready within {self.startup_timeout} s "
                    f"(exit status {self._proc.poll()}):\n" + "\n".join(self.output[-40:])
                )
            self.issuer = f"http://{self.host}:{self.port}"
            self._http = httpx.Client(timeout=10.0, trust_env=False)
            resp = self._http.get(f"{self.issuer}/.well-known/openid-configuration")
            resp.raise_for_status()
            self.discovery = resp.json()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _read_output(self, ready: threading.Event) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.rstrip("\n")
            self.output.append(line)
            if not ready.is_set() and line.startswith("READY "):
                with contextlib.suppress(ValueError):
                    self.port = int(line.split()[1])
                ready.set()
        ready.set()  # EOF: the process is gone

    def _stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)  # a paused provider must hear SIGTERM
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(_STOP_TIMEOUT)
        if self._reader is not None:
            self._reader.join(_STOP_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- endpoints ------------------------------------------------------------

    def _client(self) -> httpx.Client:
        assert self._http is not None, "OidcProviderPeer not started"
        return self._http

    @property
    def token_endpoint(self) -> str:
        return str(self.discovery["token_endpoint"])

    @property
    def introspection_endpoint(self) -> str:
        return str(self.discovery["introspection_endpoint"])

    def _authenticated_post(self, url: str, client_id: str, data: dict[str, str]) -> httpx.Response:
        secret = self.clients[client_id]
        if CLIENT_AUTH[client_id] == "client_secret_post":
            data = {**data, "client_id": client_id, "client_secret": secret}
            return self._client().post(url, data=data)
        return self._client().post(url, data=data, auth=(client_id, secret))

    def token_response(
        self, client_id: str, *, resource: str | None = None, scope: str | None = "mail email"
    ) -> httpx.Response:
        """The raw client_credentials answer of the token endpoint (errors included)."""
        data = {"grant_type": "client_credentials"}
        if scope:
            data["scope"] = scope
        if resource is not None:
            data["resource"] = resource
        return self._authenticated_post(self.token_endpoint, client_id, data)

    def token(
        self, client_id: str, *, resource: str | None = None, scope: str | None = "mail email"
    ) -> str:
        """An access token from a real client_credentials grant.

        With ``resource`` (``urn:mail``, ``urn:other``) a JWT whose ``aud`` is
        the resource; without one an opaque token.
        """
        resp = self.token_response(client_id, resource=resource, scope=scope)
        if resp.status_code != 200:
            raise RuntimeError(f"token endpoint: {resp.status_code} {resp.text}")
        return str(resp.json()["access_token"])

    def counts(self) -> dict[str, int]:
        """Requests received per ``"METHOD /path"`` since the provider started."""
        resp = self._client().get(f"{self.issuer}/__peer/counts")
        resp.raise_for_status()
        return {str(k): int(v) for k, v in resp.json().items()}

    def count(self, endpoint: str, method: str | None = None) -> int:
        """Requests so far to the endpoint the discovery document names ``endpoint``."""
        path = urlsplit(str(self.discovery[endpoint])).path
        counts = self.counts()
        return sum(
            n
            for key, n in counts.items()
            if key.split(" ", 1)[1] == path and (method is None or key.startswith(method + " "))
        )

    def pause(self) -> None:
        """Freeze the provider process (SIGSTOP): connections open, nothing answers."""
        assert self._proc is not None
        os.killpg(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        os.killpg(self._proc.pid, signal.SIGCONT)

    def introspect_credentials(self, client_id: str = "saslauthd") -> tuple[str, str]:
        """``(client_id, client_secret)`` of a client allowed to introspect tokens."""
        return client_id, self.clients[client_id]

    def introspect(self, token: str, *, client_id: str = "saslauthd") -> dict[str, Any]:
        """The introspection answer for ``token`` (RFC 7662), asked as ``client_id``."""
        resp = self._authenticated_post(self.introspection_endpoint, client_id, {"token": token})
        resp.raise_for_status()
        answer: dict[str, Any] = resp.json()
        return answer

    def authorization_code_tokens(
        self,
        client_id: str = "mail-webmail",
        *,
        resource: str | None = "urn:mail",
        scope: str = "openid email mail",
    ) -> dict[str, Any]:
        """The token answer of a scripted authorization_code + PKCE flow for alice.

        Follows the redirects /auth -> /interaction (scripted login, then
        consent) -> /auth/<uid> -> redirect_uri?code=..., then redeems the code.
        """
        verifier, challenge = _pkce_pair()
        state = secrets.token_urlsafe(12)
        params = {
            "client_id": client_id,
            "response_type": "code",
            "redirect_uri": REDIRECT_URI,
            "scope": scope,
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        if resource is not None:
            params["resource"] = resource
        with httpx.Client(timeout=10.0, trust_env=False, follow_redirects=False) as browser:
            url = str(self.discovery["authorization_endpoint"])
            resp = browser.get(url, params=params)
            for _ in range(10):
                if resp.status_code not in (302, 303):
                    raise RuntimeError(f"authorization: {resp.status_code} {resp.text[:500]}")
                location = urljoin(str(resp.url), resp.headers["location"])
                if location.startswith(REDIRECT_URI):
                    break
                resp = browser.get(location)
            else:
                raise RuntimeError("authorization: too many redirects")
        query = parse_qs(urlsplit(location).query)
        if "code" not in query:
            raise RuntimeError(f"authorization failed: {query}")
        if query.get("state") != [state]:
            raise RuntimeError(f"authorization: state mismatch in {location}")
        data = {
            "grant_type": "authorization_code",
            "code": query["code"][0],
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        }
        if resource is not None:
            data["resource"] = resource
        resp = self._authenticated_post(self.token_endpoint, client_id, data)
        if resp.status_code != 200:
            raise RuntimeError(f"token endpoint: {resp.status_code} {resp.text}")
        answer: dict[str, Any] = resp.json()
        return answer
