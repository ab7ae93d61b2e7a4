"""Shared test builders and fakes (fixtures are in conftest.py; peers in tests/peers/).

Keys, JWKs and hand-crafted JWS: ``sign_raw`` builds compact JWS byte by byte
(any header/payload bytes, any algorithm, any key), so tests can produce tokens
PyJWT would refuse to make. SASL client messages come from the same builder as
``auth-test`` (:func:`oauthbearer`, :func:`xoauth2`). :class:`FakeClock` is a
settable clock; :func:`write_config` the daemon configuration the peer tests
share.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import json
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from saslauthd_oidc.core.outcome import DiscoveryHint, Reason, Verdict
from saslauthd_oidc.core.request import AuthRequest, Mechanism
from saslauthd_oidc.providers.jwt import KeySet, UnverifiedToken, peek
from saslauthd_oidc.tools import devissuer
from saslauthd_oidc.tools.authtest import build_initial_response

NOW = 1_800_000_000.0
ISS = "https://idp.example.org/realms/mail"
ALL_ASYM = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def b64u(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def rsa_key(name: str = "a", bits: int = 2048) -> rsa.RSAPrivateKey:
    return _rsa_key(name, bits)


def ec_key(curve: str = "P-256", name: str = "a") -> ec.EllipticCurvePrivateKey:
    return _ec_key(curve, name)


def ed_key(name: str = "a") -> ed25519.Ed25519PrivateKey:
    return _ed_key(name)


@functools.cache
def _rsa_key(name: str, bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@functools.cache
def _ec_key(curve: str, name: str) -> ec.EllipticCurvePrivateKey:
    curves: dict[str, ec.EllipticCurve] = {
        "P-256": ec.SECP256R1(),
        "P-384": ec.SECP384R1(),
        "P-521": ec.SECP521R1(),
        "secp256k1": ec.SECP256K1(),
    }
    return ec.generate_private_key(curves[curve])


@functools.cache
def _ed_key(name: str) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def key_for(alg: str, name: str = "a") -> PrivateKey:
    if alg.startswith(("RS", "PS")):
        return rsa_key(name)
    if alg == "ES256":
        return ec_key("P-256", name)
    if alg == "ES384":
        return ec_key("P-384", name)
    if alg == "ES512":
        return ec_key("P-521", name)
    if alg == "EdDSA":
        return ed_key(name)
    raise ValueError(alg)


def public_jwk(key: PrivateKey, kid: str | None = None, **extra: Any) -> dict[str, Any]:
    jwk = devissuer.public_jwk(key)
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(extra)
    return {k: v for k, v in jwk.items() if v is not None}


def _encode_part(part: dict[str, Any] | bytes | str) -> str:
    if isinstance(part, dict):
        part = json.dumps(part, separators=(",", ":"))
    return b64u(part)


def sign_raw(
    header: dict[str, Any] | bytes | str,
    payload: dict[str, Any] | bytes | str,
    key: Any,
    alg: str,
) -> str:
    """A compact JWS over exactly these header/payload bytes, signed with ``alg``.

    For HS* ``key`` is the raw secret (bytes). Anything else goes through
    PyJWT's algorithm implementations with the given private key.
    """
    signing_input = f"{_encode_part(header)}.{_encode_part(payload)}"
    msg = signing_input.encode("ascii")
    if alg.startswith("HS"):
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
        sig = hmac.new(key, msg, digest).digest()
    else:
        sig = get_default_algorithms()[alg].sign(msg, key)
    return f"{signing_input}.{b64u(sig)}"


def claims(**overrides: Any) -> dict[str, Any]:
    """Realistic access-token claims at ``NOW``; ``None`` deletes a claim."""
    base: dict[str, Any] = {
        "iss": ISS,
        "sub": "alice",
        "aud": "mail",
        "exp": NOW + 600,
        "iat": NOW,
        "nbf": NOW,
        "jti": "j1",
        "client_id": "webmail",  # RFC 9068 §2.2: an access token names its client
        "scope": "openid email",
        "email": "alice@example.org",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def token(alg: str = "ES256", kid: str | None = "k1", name: str = "a", **kw: Any) -> str:
    header: dict[str, Any] = {"alg": alg, "typ": "at+jwt"}
    if kid is not None:
        header["kid"] = kid
    header.update(kw.pop("header", {}))
    return sign_raw(header, claims(**kw), key_for(alg, name), alg)


def keyset(*jwks: dict[str, Any], algorithms: tuple[str, ...] = ALL_ASYM) -> KeySet:
    return KeySet.from_jwks({"keys": list(jwks)}, algorithms)


def must_peek(tok: str) -> UnverifiedToken:
    result = peek(tok)
    assert isinstance(result, UnverifiedToken), result
    return result


class FakeClock:
    """A settable wall clock for OidcProvider's refresh/cooldown decisions."""

    def __init__(self, now: float | None = None) -> None:
        import time

        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write_tls_files(directory: Any, host: str = "127.0.0.1") -> tuple[str, str, str]:
    """A private CA and a server certificate for ``host``: (ca_file, certfile, keyfile)."""
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    d = Path(directory)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "cert.pem").write_bytes(cert.public_bytes(pem))
    (d / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(d / "ca.pem"), str(d / "cert.pem"), str(d / "key.pem")


# --------------------------------------------------------------------------- SASL messages

USER = "alice@example.org"


def oauthbearer(
    token: str, user: str | None = USER, *, host: str | None = None, port: int | None = None
) -> bytes:
    """An OAUTHBEARER initial response, built as ``auth-test`` builds it."""
    message = build_initial_response(Mechanism.OAUTHBEARER, token, user=user, host=host, port=port)
    assert message is not None
    return message


def xoauth2(token: str, user: str = USER) -> bytes:
    """An XOAUTH2 initial response, built as ``auth-test`` builds it."""
    message = build_initial_response(Mechanism.XOAUTH2, token, user=user)
    assert message is not None
    return message


# --------------------------------------------------------------------------- daemon config


def write_config(path: Path, socket_path: Path, issuer: str, *, tempfail: str = "fail") -> None:
    """The daemon configuration the mail-server peer tests share (one dev issuer, one rule)."""
    path.write_text(
        f"""
[server]
auth_socket = "{socket_path}"
auth_socket_mode = "0666"
request_timeout = 3.0
tempfail = "{tempfail}"

[logging]
level = "info"
format = "json"

[[provider]]
name = "dev"
issuer = "{issuer}"
allow_http = true
token_types = ["at+jwt"]

[[rule]]
name = "mail"
provider = "dev"
audiences = ["mail"]
required_scopes = ["email"]
username = "{{email}}"
"""
    )


# --------------------------------------------------------------------------- processes


def wait_for(predicate: Callable[[], object], timeout: float = 15.0) -> None:
    """Poll ``predicate`` until it is true (AssertionError after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def accepts(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def start(
    workdir: Path, issuer: devissuer.DevIssuer, workers: int
) -> tuple[subprocess.Popen[bytes], Path]:
    """``serve`` in a subprocess with ``workers`` workers and one rule for ``issuer``."""
    sock = workdir / "auth"
    conf = workdir / "conf.toml"
    conf.write_text(
        f"""
[server]
auth_socket = "{sock}"
workers = {workers}
[logging]
level = "info"
[[provider]]
name = "dev"
issuer = "{issuer.issuer}"
allow_http = true
[[rule]]
name = "r"
provider = "dev"
audiences = ["mail"]
"""
    )
    log = (workdir / "log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "saslauthd_oidc", "serve", "--config", str(conf)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    return proc, sock


@contextlib.contextmanager
def serve_at_fd_limit(
    config: Path, log_path: Path, nofile: int, *, stop_timeout: float = 10.0
) -> Iterator[subprocess.Popen[bytes]]:
    """``serve --config CONFIG`` in a subprocess whose RLIMIT_NOFILE is ``nofile``, soft
    *and* hard (so the daemon cannot raise it), its log in ``log_path``.

    Yields once the daemon logged "started"; on the way out SIGTERM, and the daemon
    must exit 0 (its log's tail is the message if not).
    """

    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "saslauthd_oidc", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=limit_fds,  # noqa: PLW1509 - only setrlimit, before exec
        )
    try:
        deadline = time.monotonic() + 20
        while b'"event": "started"' not in log_path.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.returncode == 0, log_path.read_text()[-3000:]


# --------------------------------------------------------------------------- Dovecot auth clients

MECHS = [Mechanism.OAUTHBEARER, Mechanism.XOAUTH2]


class Stub:
    """An engine stand-in: the token says what to answer."""

    def __init__(self) -> None:
        self.seen: list[AuthRequest] = []
        self.cancelled = 0
        self.started = trio.Event()

    async def __call__(self, request: AuthRequest) -> Verdict:
        self.seen.append(request)
        token = request.credentials.token
        if token.startswith("good-"):
            return Verdict(reason=Reason.OK, account=token.removeprefix("good-"))
        if token == "temp":
            return Verdict(reason=Reason.PROVIDER_UNAVAILABLE)
        if token == "slow":
            await trio.sleep(30)
        if token == "boom":
            raise RuntimeError("engine bug")
        if token == "hang":
            self.started.set()
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled += 1
        return Verdict(
            reason=Reason.BAD_SIGNATURE,
            hint=DiscoveryHint(openid_configuration="https://idp/.well-known/openid-configuration"),
        )


def ir(token: str, user: str = USER) -> str:
    """An OAUTHBEARER initial response as an AUTH line's base64 resp=."""
    return base64.b64encode(oauthbearer(token, user)).decode()


def auth_line(rid: int, token: str) -> str:
    """A Dovecot AUTH line for OAUTHBEARER with ``token`` (service smtp, no addresses)."""
    return f"AUTH\t{rid}\tOAUTHBEARER\tservice=smtp\tnologin\tlip=\trip=\tresp={ir(token)}"


class Client:
    """A Dovecot auth-client over a Unix socket: handshake, AUTH, and the replies."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, path: str) -> Client:
        return cls(await trio.open_unix_socket(path))

    async def send(self, *lines: str) -> None:
        await self.stream.send_all("".join(line + "\n" for line in lines).encode())

    async def line(self) -> str | None:
        """The next line, or None at EOF."""
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buffer += data
        raw, _, self.buffer = self.buffer.partition(b"\n")
        return raw.decode()

    async def handshake(self) -> list[str]:
        lines = []
        while (line := await self.line()) != "DONE":
            assert line is not None
            lines.append(line)
        await self.send("VERSION\t1\t0", "CPID\t4711")
        return lines

    async def authenticate(self, rid: int, token: str) -> str | None:
        await self.send(auth_line(rid, token))
        reply = await self.line()
        if reply is not None and reply.startswith(f"CONT\t{rid}\t"):
            await self.send(f"CONT\t{rid}\tAQ==")
            reply = await self.line()
        return reply
