"""Every row of the attack checklist (reference §4) through the daemon's real Unix socket.

One parametrized case per checklist row (ids ``r01-…`` to ``r19-…``). Each
case runs the assembled daemon in-process (``run_daemon``) against two real
loopback issuers, A and B, plus a third loopback listener, the *trap*: the
``jku``/``x5u`` target of the forged tokens, which must never see a request.
Every variant of the row goes over one Dovecot-protocol connection and must
get the reply the checklist expects (``FAIL`` after the RFC 7628 challenge,
or ``OK``/``user=`` for the positive controls); the refusal reason is read
from the daemon's one JSON "authentication" log line for that token; and the
same connection must still authenticate a good token afterwards.

Rows whose substance is provider behaviour (15: slow/500 JWKS, 16: redirect,
100 MB JWKS) have their fault variants in tests/test_provider_faults.py;
here they are covered as far as the token side goes (the unknown-kid flood).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import io
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import get_default_algorithms

from saslauthd_oidc.config import LoggingConfig, parse_config
from saslauthd_oidc.core.request import token_fingerprint
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.service.logs import configure_logging
from tests.peers.dovecot_client import LineClient
from tests.support_issuer import FaultIssuer

USER = "alice@example.org"
LEEWAY = 60


# --------------------------------------------------------------------------- issuers


@cache
def _issuer(role: str) -> FaultIssuer:
    """RSA key generation is the slow part: one DevIssuer per role, served per test."""
    if role == "a":
        iss = FaultIssuer(algorithms=("ES256", "RS256"))
        iss.add_key("ES256")  # two EC keys: a kid-less ES256 token is ambiguous
        return iss
    if role == "b":
        return FaultIssuer(algorithms=("ES256",))
    return FaultIssuer(algorithms=("ES256",))  # the trap / the attacker


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def enc(obj: Any) -> str:
    return b64u(json.dumps(obj).encode())


def private_key(iss: FaultIssuer, alg: str) -> Any:
    return iss._signing_key(alg, None).private_key


def sign(signing_input: str, alg: str, key: Any) -> bytes:
    """Sign with PyJWT's algorithm object (no key/alg consistency checks of its own)."""
    algo = get_default_algorithms()[alg]
    return algo.sign(signing_input.encode(), key)


def jws(header: dict[str, Any] | str, claims: dict[str, Any] | str, alg: str, key: Any) -> str:
    """A compact JWS over ``claims`` (a dict, or a raw JSON text) signed as ``alg`` with ``key``."""
    payload = b64u(claims.encode()) if isinstance(claims, str) else enc(claims)
    head = b64u(header.encode()) if isinstance(header, str) else enc(header)
    signing_input = f"{head}.{payload}"
    return f"{signing_input}.{b64u(sign(signing_input, alg, key))}"


def hs(header: dict[str, Any], claims: dict[str, Any], alg: str, secret: bytes) -> str:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{enc(header)}.{enc(claims)}"
    mac = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64u(mac)}"


def unsigned(header: dict[str, Any], claims: dict[str, Any], sig: bytes = b"") -> str:
    return f"{enc(header)}.{enc(claims)}.{b64u(sig)}"


def self_signed_cert(key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


# --------------------------------------------------------------------------- the daemon


@dataclass
class Stack:
    a: FaultIssuer
    b: FaultIssuer
    trap: FaultIssuer
    sock: str
    log: io.StringIO
    client: LineClient
    rid: int = 0

    # ---- tokens

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.a.issuer,
            "sub": "alice",
            "aud": "mail",
            "azp": "webmail",
            "exp": now + 600,
            "iat": now,
            "nbf": now,
            "email": USER,
            "scope": "openid email",  # an access token names what it grants (RFC 9068)
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def good(self, **claims: Any) -> str:
        return self.a.mint(self.claims(**claims), email=claims.get("email", USER))

    def header(self, alg: str = "ES256", **extra: Any) -> dict[str, Any]:
        kid = self.a.kid(alg) if alg in self.a.algorithms else None
        head = {"alg": alg, "typ": "at+jwt", "kid": kid}
        head.update(extra)
        return {k: v for k, v in head.items() if v is not None}

    def signed(self, claims: dict[str, Any] | str, alg: str = "ES256", **header: Any) -> str:
        """Signed with A's real key for ``alg`` (the header is as given)."""
        return jws(self.header(alg, **header), claims, alg, private_key(self.a, alg))

    # ---- the wire

    async def auth(self, payload: bytes, mech: str = "OAUTHBEARER") -> str:
        """One authentication; follows a failure challenge; returns the final reply line."""
        self.rid += 1
        rid = self.rid
        await self.client.send(f"AUTH\t{rid}\t{mech}\tservice=smtp\tresp={b64(payload)}")
        reply = await self.client.line()
        if reply.startswith(f"CONT\t{rid}\t"):
            challenge = json.loads(base64.b64decode(reply.split("\t", 2)[2]))
            assert "status" in challenge, challenge
            await self.client.send(f"CONT\t{rid}\t{'AQ==' if mech == 'OAUTHBEARER' else ''}")
            reply = await self.client.line()
        assert reply.split("\t")[:2] in (["OK", str(rid)], ["FAIL", str(rid)]), reply
        return reply

    def reasons(self, token: str) -> list[str]:
        fp = token_fingerprint(token)
        events = [json.loads(line) for line in self.log.getvalue().splitlines() if line]
        return [
            e["reason"]
            for e in events
            if e.get("event") == "authentication" and e.get("token") == fp
        ]

    async def refused(self, token: str, *reasons: str, user: str | None = USER) -> None:
        """The token is refused over the socket, with one of ``reasons`` in the log."""
        reply = await self.auth(ob(token, user))
        assert reply.startswith(f"FAIL\t{self.rid}"), reply
        assert "user=" not in reply
        if reasons:
            logged = self.reasons(token)
            assert logged and logged[-1] in reasons, (logged, reasons)

    async def accepted(self, token: str, user: str = USER, account: str = USER) -> None:
        reply = await self.auth(ob(token, user))
        assert reply == f"OK\t{self.rid}\tuser={account}", (reply, self.reasons(token))

    async def still_serves(self) -> None:
        await self.accepted(self.good())


def ob(token: str, user: str | None = USER) -> bytes:
    gs2 = f"n,a={user}," if user is not None else "n,,"
    return f"{gs2}\x01auth=Bearer {token}\x01\x01".encode()


@pytest.fixture
async def stack(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Stack]:
    a, b, trap = _issuer("a"), _issuer("b"), _issuer("trap")
    for iss in (a, b, trap):
        iss.requests.clear()
        iss.fail_status = None
        iss.delay = 0.0
        await nursery.start(iss.serve)
    secret_file = tmp_path / "secret"
    secret_file.write_text("saslauthd-secret\n")
    secret_file.chmod(0o600)
    sock = str(tmp_path / "auth")
    config = parse_config(
        {
            "server": {"auth_socket": sock, "request_timeout": 3.0},
            "cache": {"negative_ttl": 0},
            "provider": [
                {
                    "name": "a",
                    "issuer": a.issuer,
                    "allow_http": True,
                    "algorithms": ["ES256", "RS256"],
                    "token_types": ["at+jwt"],
                    "leeway": LEEWAY,
                    "introspection_endpoint": f"{a.url}/introspect",
                    "client_id": "saslauthd",
                    "client_secret_file": str(secret_file),
                },
                {
                    "name": "b",
                    "issuer": b.issuer,
                    "allow_http": True,
                    "algorithms": ["ES256"],
                    "token_types": ["at+jwt"],
                },
            ],
            "rule": [
                {
                    "name": "mail-a",
                    "provider": "a",
                    "audiences": ["mail"],
                    "authorized_parties": ["webmail", "dev-client"],
                    "username": "{email}",
                },
                {"name": "mail-b", "provider": "b", "audiences": ["mail-b"], "username": "{email}"},
            ],
        }
    )
    log = io.StringIO()
    configure_logging(LoggingConfig(level="info", format="json"), stream=log)
    await nursery.start(
        lambda task_status: run_daemon(config, task_status=task_status, handle_signals=False)
    )
    client = LineClient(await trio.open_unix_socket(sock))
    await client.handshake()
    st = Stack(a, b, trap, sock, log, client)
    yield st
    await client.stream.aclose()
    assert sum(trap.requests.values()) == 0, trap.requests  # nothing, ever, fetched the trap
    nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- the rows

Row = Callable[[Stack], Awaitable[None]]
ROWS: dict[str, Row] = {}


def row(name: str) -> Callable[[Row], Row]:
    def register(fn: Row) -> Row:
        ROWS[name] = fn
        return fn

    return register


@row("r01-alg-none")
async def _alg_none(s: Stack) -> None:
    claims = s.claims()
    for alg in ("none", "None", "NONE", "nOnE", "", 123, ["RS256"], None):
        header = {"typ": "at+jwt"} if alg is None else {"alg": alg, "typ": "at+jwt"}
        await s.refused(unsigned(header, claims), "unsupported_algorithm", "malformed_token")
        # the same header over a real signature of A's key changes nothing
        real_sig = s.good().rsplit(".", 1)[1]
        await s.refused(
            f"{enc(header)}.{enc(claims)}.{real_sig}", "unsupported_algorithm", "malformed_token"
        )


def rsa_public_forms(key: rsa.RSAPublicKey, jwk: dict[str, Any]) -> dict[str, bytes]:
    pem, der = serialization.Encoding.PEM, serialization.Encoding.DER
    spki, pkcs1 = (
        serialization.PublicFormat.SubjectPublicKeyInfo,
        serialization.PublicFormat.PKCS1,
    )
    n = key.public_numbers().n
    return {
        "pem-spki": key.public_bytes(pem, spki),
        "pem-pkcs1": key.public_bytes(pem, pkcs1),
        "der-spki": key.public_bytes(der, spki),
        "der-pkcs1": key.public_bytes(der, pkcs1),
        "jwk-json": json.dumps(jwk).encode(),
        "jwk-json-sorted": json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode(),
        "modulus-bytes": n.to_bytes((n.bit_length() + 7) // 8, "big"),
        "modulus-b64u": jwk["n"].encode(),
    }


@row("r02-hs-rs-confusion")
async def _hs_rs(s: Stack) -> None:
    rsa_kid = s.a.kid("RS256")
    jwk = next(k for k in s.a.jwks()["keys"] if k["kid"] == rsa_kid)
    forms = rsa_public_forms(private_key(s.a, "RS256").public_key(), jwk)
    for alg in ("HS256", "HS384", "HS512"):
        for secret in forms.values():
            for kid in (rsa_kid, None):
                head = {"alg": alg, "typ": "at+jwt", **({"kid": kid} if kid else {})}
                await s.refused(hs(head, s.claims(), alg, secret), "unsupported_algorithm")


@row("r03-alg-key-mismatch")
async def _alg_key(s: Stack) -> None:
    claims = s.claims()
    ec_kid, rsa_kid = s.a.kid("ES256"), s.a.kid("RS256")
    rsa_key = private_key(s.a, "RS256")
    bad = ("unknown_key", "bad_signature", "unsupported_algorithm", "malformed_token")
    # RS256 header, signed by A's RSA key, naming A's EC kid
    await s.refused(jws(s.header("RS256", kid=ec_kid), claims, "RS256", rsa_key), *bad)
    # PS256 with A's RSA key, which A publishes for RS256 (and PS256 is not allowed)
    await s.refused(jws(s.header("PS256", kid=rsa_kid), claims, "PS256", rsa_key), *bad)
    # ES256 header + A's EC kid, signed with a P-384 key / a secp256k1 key
    p384 = ec.generate_private_key(ec.SECP384R1())
    await s.refused(jws(s.header("ES256", kid=ec_kid), claims, "ES384", p384), *bad)
    k1 = ec.generate_private_key(ec.SECP256K1())
    head = s.header("ES256", kid=ec_kid)
    await s.refused(jws(s.header("ES256K", kid=ec_kid), claims, "ES256", k1), *bad)
    # ES256: 64 zero bytes; truncated real signatures (EC and RSA)
    await s.refused(unsigned(head, claims, b"\0" * 64), *bad)
    good_ec, good_rsa = s.signed(claims, "ES256"), s.signed(claims, "RS256")
    await s.refused(good_ec[:-10], *bad)
    await s.refused(good_rsa[:-10], *bad)
    await s.refused(good_ec.rsplit(".", 1)[0] + ".", *bad)
    await s.accepted(good_ec)
    await s.accepted(good_rsa)


@row("r04-kid-injection")
async def _kid(s: Stack) -> None:
    claims = s.claims()
    await s.still_serves()  # the routine key load, before the count starts
    jwks_before = s.a.requests["/jwks.json"]
    # (each new kid in a token newer than the keys could be a rotation: after the one
    # refetch per cooldown, a temporary refusal — never an OK)
    kid: Any
    for kid in ("../../etc/passwd", "%2e%2e%2f", "' OR 1=1--", "k\u0000", "ES256", "*"):
        await s.refused(s.signed(claims, kid=kid), "unknown_key", "key_refresh_pending")
    for kid in (123, ["k"], {"k": 1}, True, "x" * 1000):
        await s.refused(s.signed(claims, kid=kid), "malformed_token", "unknown_key")
    # 10 KB kid: refused by the size caps before any parsing (line or token cap)
    await s.refused(s.signed(claims, kid="x" * 10240))
    # string kids may cause one refetch per cooldown; the others none at all
    assert s.a.requests["/jwks.json"] - jwks_before <= 1
    # kid absent: A has two EC keys (ambiguous: refused) and one RSA key (unique: accepted)
    await s.refused(s.signed(claims, "ES256", kid=None), "unknown_key")
    await s.accepted(s.signed(claims, "RS256", kid=None))


@row("r05-jku-x5u-jwk-x5c")
async def _embedded(s: Stack) -> None:
    attacker = ec.generate_private_key(ec.SECP256R1())
    attacker_jwk = get_default_algorithms()["ES256"].to_jwk(attacker.public_key(), as_dict=True)
    cert = b64(self_signed_cert(attacker))
    trap_jwks = f"{s.trap.url}/jwks.json"
    trap_kid = s.trap.kid("ES256")
    trap_key = private_key(s.trap, "ES256")
    claims = s.claims()
    for kid in (s.a.kid("ES256"), trap_kid, None):
        for extra in (
            {"jku": trap_jwks},
            {"x5u": f"{s.trap.url}/cert.pem"},
            {"jwk": attacker_jwk},
            {"x5c": [cert]},
            {"jku": trap_jwks, "jwk": attacker_jwk, "x5u": f"{s.trap.url}/x", "x5c": [cert]},
        ):
            header = s.header("ES256", kid=kid, **extra)
            for key in (attacker, trap_key):
                await s.refused(
                    jws(header, claims, "ES256", key),
                    "unknown_key",
                    "bad_signature",
                    "key_refresh_pending",
                )
    # the trap's own, correctly signed tokens claiming A's issuer: refused too
    await s.refused(s.trap.mint(s.claims(), header={"jku": trap_jwks}), "unknown_key")
    assert sum(s.trap.requests.values()) == 0, s.trap.requests


@row("r06-crit-b64")
async def _crit(s: Stack) -> None:
    extra: dict[str, Any]
    for extra in ({"crit": ["exp"]}, {"crit": []}, {"b64": False}, {"crit": ["b64"], "b64": False}):
        await s.refused(s.signed(s.claims(), **extra), "malformed_token", "unsupported_algorithm")


@row("r07-typ-and-id-token")
async def _typ(s: Stack) -> None:
    for typ in ("JWT", "jwt", None, "bogus", "application/jwt", "at+jwt ", "id_token", 5):
        await s.refused(s.signed(s.claims(), typ=typ), "wrong_token_type", "malformed_token")
    for typ in ("at+jwt", "application/at+jwt", "AT+JWT"):
        await s.accepted(s.signed(s.claims(), typ=typ))
    # an ID token (typ JWT, aud = the client, nonce, at_hash) used as an access token
    id_claims = s.claims(
        aud="mail",
        azp="mail",
        nonce="n-0S6_WzA2Mj",
        at_hash="77QmUPtjPfzWtF2AnpK9RQ",
        auth_time=int(time.time()),
    )
    await s.refused(s.signed(id_claims, typ="JWT"), "wrong_token_type")
    await s.refused(s.signed(id_claims, typ=None), "wrong_token_type")


@row("r08-time-claims")
async def _time(s: Stack) -> None:
    now = int(time.time())
    cases: list[tuple[dict[str, Any], tuple[str, ...]]] = [
        ({"exp": now - LEEWAY - 1, "iat": now - 3600, "nbf": None}, ("expired",)),
        ({"nbf": now + LEEWAY + 5}, ("not_yet_valid",)),
        ({"iat": now + LEEWAY + 5}, ("issued_in_future",)),
        ({"exp": None}, ("bad_claim",)),
        ({"exp": "9999999999"}, ("bad_claim",)),
        ({"exp": True}, ("bad_claim",)),
        ({"exp": -1}, ("expired", "bad_claim")),
        ({"exp": [now + 600]}, ("bad_claim",)),
        ({"exp": {"v": now + 600}}, ("bad_claim",)),
        ({"nbf": "0"}, ("bad_claim",)),
        ({"iat": str(now)}, ("bad_claim",)),
        ({"iat": now + 30, "exp": now + 20, "nbf": None}, ("bad_claim", "expired")),
    ]
    for claims, reasons in cases:
        await s.refused(s.signed(s.claims(**claims)), *reasons)
    # 1e400 is a JSON number that Python reads as infinity; NaN is not JSON at all
    raw = json.dumps(s.claims(exp=None))[:-1]
    for literal in ("1e400", "-1e400", "NaN", "Infinity"):
        await s.refused(s.signed(f'{raw}, "exp": {literal}}}'), "bad_claim", "malformed_token")
    await s.accepted(s.signed(s.claims(exp=now + 600, iat=now + LEEWAY - 5)))


@row("r09-aud-tricks")
async def _aud(s: Stack) -> None:
    wrong = ("wrong_audience", "bad_claim", "untrusted_authorized_party", "no_rule_for_context")
    for aud in (None, "", [], 123, "MAIL", "mail ", ["MAIL"], [123], "mail,evil", {"mail": 1}):
        await s.refused(s.signed(s.claims(aud=aud)), *wrong)
    # several audiences: azp must be present and trusted (OIDC Core 3.1.3.7)
    await s.refused(
        s.signed(s.claims(aud=["mail", "evil"], azp=None)), "untrusted_authorized_party"
    )
    await s.refused(
        s.signed(s.claims(aud=["mail", "evil"], azp="evil")), "untrusted_authorized_party"
    )
    await s.accepted(s.signed(s.claims(aud=["mail", "evil"], azp="webmail")))


@row("r10-azp")
async def _azp(s: Stack) -> None:
    for claims in (
        {"azp": "evil"},
        {"azp": "WEBMAIL"},
        {"azp": None, "client_id": "evil"},
        {"azp": 123},
        {"azp": ["webmail"]},
        {"azp": None, "client_id": None},
    ):
        await s.refused(s.signed(s.claims(**claims)), "untrusted_authorized_party", "bad_claim")
    await s.accepted(s.signed(s.claims(azp=None, client_id="dev-client")))


@row("r11-issuer-confusion")
async def _issuer_confusion(s: Stack) -> None:
    b_key = private_key(s.b, "ES256")
    # iss = A, with a kid that exists only in B's JWKS, signed by B
    await s.refused(
        jws(s.header("ES256", kid=s.b.kid("ES256")), s.claims(), "ES256", b_key), "unknown_key"
    )
    # iss = A, with A's kid, signed by B
    await s.refused(jws(s.header("ES256"), s.claims(), "ES256", b_key), "bad_signature")
    a_iss = s.a.issuer
    assert a_iss
    for iss in (a_iss + "/", a_iss.upper(), a_iss.replace("127.0.0.1", "localhost"), "", None, 7):
        await s.refused(s.signed(s.claims(iss=iss)), "unknown_issuer", "wrong_issuer", "bad_claim")
    # B's genuine token: valid for B's rule, refused for A's audience
    await s.refused(s.b.mint(email=USER, audience="mail"), "wrong_audience", "no_rule_for_context")
    await s.accepted(s.b.mint(email=USER, audience="mail-b"))


@row("r12-other-app-and-authzid")
async def _other_app(s: Stack) -> None:
    for aud in ("graph", "https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000"):
        await s.refused(s.signed(s.claims(aud=aud)), "wrong_audience", "no_rule_for_context")
    good = s.good()
    await s.refused(good, "authzid_mismatch", user="victim@example.org")
    await s.refused(good, "authzid_mismatch", user="ALICE@example.org.evil")
    reply = await s.auth(
        f"user=victim@example.org\x01auth=Bearer {good}\x01\x01".encode(), "XOAUTH2"
    )
    assert reply.startswith(f"FAIL\t{s.rid}"), reply
    await s.accepted(good, user="Alice@Example.ORG")  # same account after normalisation


@row("r13-oversized-and-duplicates")
async def _oversized(s: Stack) -> None:
    # 1 MiB SASL message / 64 KiB token: over the 16384-byte line, FAIL for that id only
    for size in (1 << 20, 64 << 10):
        s.rid += 1
        await s.client.send(f"AUTH\t{s.rid}\tOAUTHBEARER\tservice=smtp\tresp=" + "A" * size)
        assert (await s.client.line()).startswith(f"FAIL\t{s.rid}\t")
    # header over 4 KiB, token within the line
    await s.refused(s.signed(s.claims(), pad="x" * 5000), "token_too_large", "malformed_token")
    # deep nesting within the line, and far beyond it
    deep = "[" * 3000 + "]" * 3000
    raw = json.dumps(s.claims())[:-1]
    await s.refused(s.signed(f'{raw}, "x": {deep}}}'), "malformed_token")
    s.rid += 1
    await s.client.send(f"AUTH\t{s.rid}\tOAUTHBEARER\tservice=smtp\tresp=" + b64(b"[" * 100_000))
    assert (await s.client.line()).startswith(f"FAIL\t{s.rid}\t")
    # a 1000-element aud (fits) without "mail": refused; 10k elements: over every cap
    await s.refused(
        s.signed(s.claims(aud=[f"a{i}" for i in range(1000)])),
        "wrong_audience",
        "untrusted_authorized_party",
        "token_too_large",
    )
    await s.refused(s.signed(s.claims(aud=[f"a{i}" for i in range(10_000)])))
    # duplicate keys, in the payload and in the header
    for dup in ('"sub": "mallory"', '"email": "mallory@example.org"', '"aud": "evil"'):
        await s.refused(s.signed(f"{raw}, {dup}}}"), "malformed_token")
    head = json.dumps(s.header())[:-1]
    await s.refused(
        jws(f'{head}, "alg": "none"}}', s.claims(), "ES256", private_key(s.a, "ES256")),
        "malformed_token",
    )


@row("r14-confusable-usernames")
async def _confusable(s: Stack) -> None:
    # NFKC + lower case, then exact compare: fullwidth and case fold onto the ASCII name
    await s.accepted(s.good(email="ａlice@example.org"), user=USER)
    await s.accepted(s.good(email="Alice@EXAMPLE.org"), user=USER)
    # Cyrillic а is another name: never the ASCII account
    cyr = s.good(email="\u0430lice@example.org")
    await s.refused(cyr, "authzid_mismatch", user=USER)
    # zero-width, TAB/CR/LF/NUL and other controls in the mapped name: refused
    for email in (
        "alice\u200b@example.org",
        "v@x\tuser=admin",
        "v@x\nOK\t1\tuser=admin",
        "v@x\r",
        "v@x\0admin",
        "v@x\u2028",
        "v@x user",
    ):
        await s.refused(s.good(email=email), "invalid_account", user=None)
    await s.refused(s.good(email_verified=False), "unverified_email")
    # TAB/newline injection by the *client*, in the authzid / XOAUTH2 user=
    for user in ("v@x\tuser=admin", "v@x\nOK\t99\tuser=admin", "admin@x\0"):
        reply = await s.auth(ob(s.good(), user))
        assert reply.startswith(f"FAIL\t{s.rid}\t") and "admin" not in reply, reply
        xo = f"user={user}\x01auth=Bearer {s.good()}\x01\x01".encode()
        reply = await s.auth(xo, "XOAUTH2")
        assert reply.startswith(f"FAIL\t{s.rid}\t") and "admin" not in reply, reply
    # nothing stray was written: the next reply on the connection is the next request's
    await s.still_serves()


@row("r15-unknown-kid-flood")
async def _flood(s: Stack) -> None:
    await s.still_serves()  # keys loaded
    before = s.a.requests["/jwks.json"]
    tokens = [s.signed(s.claims(), kid=f"k-{secrets.token_hex(6)}") for _ in range(1000)]

    async def one_connection(chunk: list[str]) -> None:
        client = LineClient(await trio.open_unix_socket(s.sock))
        await client.handshake()
        lines = [
            f"AUTH\t{i}\tOAUTHBEARER\tservice=smtp\tresp={b64(ob(t))}"
            for i, t in enumerate(chunk, 1)
        ]
        await client.stream.send_all(("\n".join(lines) + "\n").encode())
        pending = set(range(1, len(chunk) + 1))
        while pending:
            verb, rid, *_ = (await client.line()).split("\t")
            if verb == "CONT":
                await client.send(f"CONT\t{rid}\tAQ==")
                continue
            assert verb == "FAIL"
            pending.discard(int(rid))
        await client.stream.aclose()

    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(one_connection, tokens[i * 50 : (i + 1) * 50])
    assert s.a.requests["/jwks.json"] - before <= 1, s.a.requests
    # the one refetch per cooldown is used by the first; the others could be rotations
    assert {r for t in tokens[:50] for r in s.reasons(t)} <= {"unknown_key", "key_refresh_pending"}


@row("r17-introspection-answers")
async def _introspection(s: Stack) -> None:
    await s.accepted(s.a.mint_opaque(email=USER, claims={"azp": "webmail"}))
    for claims in ({"active": "true"}, {"active": None}, {"active": 1}, {"active": False}):
        await s.refused(
            s.a.mint_opaque(email=USER, claims={"azp": "webmail", **claims}), "token_inactive"
        )
    await s.refused("never-issued-" + secrets.token_urlsafe(24), "token_inactive")
    # a provider error is temporary, never a success
    s.a.fail_status = 500
    try:
        await s.refused(
            s.a.mint_opaque(email=USER, claims={"azp": "webmail"}), "provider_unavailable"
        )
    finally:
        s.a.fail_status = None


@row("r18-bad-signature-no-fallback")
async def _no_fallback(s: Stack) -> None:
    introspections = s.a.requests["/introspect"]
    head, body, sig = s.good().split(".")
    flipped = "A" if sig[5] != "A" else "B"
    for token in (
        f"{head}.{body}.{sig[:5]}{flipped}{sig[6:]}",
        f"{head}.{body}.",
        f"{head}.{enc(s.claims(email='mallory@example.org'))}.{sig}",
    ):
        await s.refused(token, "bad_signature", "malformed_token")
    assert s.a.requests["/introspect"] == introspections


@row("r19-abort-after-challenge")
async def _abort(s: Stack) -> None:
    bad = s.signed(s.claims(aud="evil"))
    for answer in ("AQ==", "", b64(b"garbage"), "!!!not-base64", b64(b"\x01" * 5000), "*"):
        s.rid += 1
        await s.client.send(f"AUTH\t{s.rid}\tOAUTHBEARER\tservice=smtp\tresp={b64(ob(bad))}")
        assert (await s.client.line()).startswith(f"CONT\t{s.rid}\t")
        await s.client.send(f"CONT\t{s.rid}\t{answer}")
        assert (await s.client.line()).startswith(f"FAIL\t{s.rid}")
    # a CANCEL instead of an answer, then the next request
    s.rid += 1
    xo = b64(f"user=x\x01auth=Bearer {bad}\x01\x01".encode())
    await s.client.send(f"AUTH\t{s.rid}\tXOAUTH2\tservice=smtp\tresp={xo}")
    assert (await s.client.line()).startswith(f"CONT\t{s.rid}\t")
    await s.client.send(f"CANCEL\t{s.rid}")
    await s.still_serves()


@pytest.mark.parametrize("name", list(ROWS))
async def test_attack_row(stack: Stack, name: str) -> None:
    await ROWS[name](stack)
    await stack.still_serves()


def test_every_checklist_row_is_here_or_named() -> None:
    """Rows 15 (slow/500 JWKS) and 16 (discovery) have their fault cases in test_provider_faults."""
    numbers = {int(name[1:3]) for name in ROWS}
    assert numbers | {16} == set(range(1, 20))
