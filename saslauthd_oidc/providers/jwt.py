"""Pure JWS/JWT handling: strict peeking, key sets from JWKS, and verification.

No trio, no httpx, no clock of its own: :func:`verify_jwt` receives ``now``.

* :func:`peek` parses a token *without* verifying it, strictly (length cap first,
  base64url without padding, UTF-8 JSON objects, no duplicate keys, bounded
  nesting). The result may only narrow the candidate providers by ``iss``.
  The JOSE header's parse is memoised per distinct header segment (bounded);
  a memoised header is a shared read-only mapping. The signature segment is
  decoded here (that is its base64url check) and kept for :func:`verify_jwt`.
* :class:`KeySet` turns a JWKS document into ``PyJWK`` objects keyed by
  ``(kid, alg)``, once, with each key bound to the algorithms of its family that
  the provider allows. ``oct`` keys from a JWKS are always dropped; HMAC keys
  only come from a provider's configured secret.
* :func:`verify_jwt` checks ``alg`` against the allow-list, refuses ``crit``,
  applies the ``typ`` policy, looks the key up (never from ``jku``/``x5u``/
  ``jwk``/``x5c``), verifies the signature over the signing input with the
  key's PyJWT algorithm object (built once per JWKS; RS256/384/512 call
  ``cryptography`` as that object would, with a padding and hash built once),
  and then checks the
  claims :func:`peek` already parsed — exact ``iss``, ``sub``/``jti`` types and
  the time claims — so a token's JSON is decoded once — and finally that the
  token is a plain bearer access token (:func:`bearer_problem`: no ``cnf``,
  no ID-token-only claims).

Results are values: :class:`VerifiedClaims` or :class:`Refusal`. No
``detail`` string ever contains the token.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import jwt as pyjwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from jwt import exceptions as jwt_exc
from jwt.algorithms import RSAAlgorithm

from saslauthd_oidc.core.outcome import Reason, Refusal
from saslauthd_oidc.providers.keypolicy import hmac_secret_refusal, jwk_refusal

MAX_TOKEN_BYTES = 16384
MAX_HEADER_BYTES = 4096
MAX_JSON_DEPTH = 16
MAX_KID_LENGTH = 256
MIN_RSA_BITS = 2048
HMAC_MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 §3.2

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")

RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_CURVE_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
OKP_CURVES = frozenset({"Ed25519", "Ed448"})
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = frozenset((*RSA_ALGORITHMS, *EC_CURVE_ALGORITHMS.values(), "EdDSA"))
_PUBLIC_MEMBERS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}
_TYP_PREFIX = "application/"


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class UnverifiedToken:
    """Header and claims of a token whose signature has NOT been checked.

    Use it only to narrow the candidate providers (by ``iss``), never to decide.
    """

    header: Mapping[str, Any]
    claims: Mapping[str, Any] = field(repr=False)
    #: The compact JWS these were parsed from (set by :func:`peek`), so that
    #: :func:`verify_jwt` can use these claims once the signature over it holds.
    token: str | None = field(default=None, repr=False, compare=False)
    #: The decoded signature of ``token`` (set by :func:`peek`, which checks it
    #: is base64url), for the signature check.
    signature: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def issuer(self) -> str | None:
        iss = self.claims.get("iss")
        return iss if isinstance(iss, str) else None


@dataclass(frozen=True, slots=True)
class VerifiedClaims:
    """Claims of a token whose signature, issuer and time claims were verified."""

    claims: Mapping[str, Any]
    header: Mapping[str, Any]
    expires_at: float


class JwksError(ValueError):
    """The JWKS document as a whole is unusable (not an object, no ``keys`` list)."""


# --------------------------------------------------------------------------- strict JSON


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # The dict at C speed; a shorter dict than the pairs means a repeated name.
    # (Names and values are not interned here: what the cache keeps of a
    # verified token is interned when it is compacted.)
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


# One decoder, built once (json.loads with hooks would build one per call).
# Its C scanner is called directly (what JSONDecoder.decode does, in one frame).
_STRICT_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
)
#: (text, index) -> (value, end): the scanner, a module-level object (a seam the
#: compiled build looks up at run time too).
_strict_scan: Callable[[str, int], tuple[Any, int]] = _STRICT_DECODER.scan_once  # type: ignore[attr-defined]
_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")


def _strict_decode(text: str) -> Any:
    """``_STRICT_DECODER.decode(text)``: one JSON value, only whitespace around it."""
    start = _WHITESPACE.match(text, 0)
    try:
        value, end = _strict_scan(text, start.end() if start else 0)
    except StopIteration as err:
        raise json.JSONDecodeError("Expecting value", text, err.value) from None
    tail = _WHITESPACE.match(text, end)
    end = tail.end() if tail else end
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def json_depth_ok(text: str, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """True when ``text`` nests objects/arrays at most ``max_depth`` deep (strings skipped)."""
    if text.count("{") + text.count("[") <= max_depth:
        return True
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
            if depth > max_depth:
                return False
        elif ch in "}]":
            depth -= 1
    return True


def strict_json_loads(data: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse UTF-8 JSON strictly: no duplicate keys, no NaN/Infinity, bounded nesting.

    Raises :class:`ValueError` (``UnicodeDecodeError`` and ``JSONDecodeError`` are
    subclasses) on any violation.
    """
    text = data.decode("utf-8")
    if not json_depth_ok(text, max_depth):
        raise ValueError("JSON nested too deeply")
    return _strict_decode(text)


# --------------------------------------------------------------------------- peek


_FROM_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")
_PADDING: Final = (b"", b"===", b"==", b"=")


def _b64url_decode(segment: str) -> bytes:
    """Decode base64url without padding; raise ValueError on anything else."""
    # "+", "/" and "=" are the standard alphabet's and padding: not base64url
    # without padding, though they would survive the translation below; the
    # strict decoder refuses every other character.
    if len(segment) % 4 == 1 or "+" in segment or "/" in segment or "=" in segment:
        raise ValueError("not base64url without padding")
    try:
        raw = segment.encode("ascii").translate(_FROM_URLSAFE) + _PADDING[len(segment) % 4]
        return binascii.a2b_base64(raw, strict_mode=True)
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc


def looks_like_jws(token: str) -> bool:
    """Cheap test: three base64url segments whose first decodes to something like ``{``.

    Lets the engine tell compact JWS apart from opaque tokens (which may
    contain dots too) without parsing JSON.
    """
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return False
    if not all(_B64URL_RE.fullmatch(p) for p in parts):
        return False
    try:
        head = _b64url_decode(parts[0][:8])
    except ValueError:
        return False
    return head.lstrip(b" \t\r\n").startswith(b"{")


def _decode_object(segment: str, what: str) -> dict[str, Any] | Refusal:
    try:
        value = strict_json_loads(_b64url_decode(segment))
    except _DuplicateKeyError:
        return Refusal(Reason.MALFORMED_TOKEN, f"duplicate key in JWT {what}")
    except (ValueError, RecursionError):
        return Refusal(Reason.MALFORMED_TOKEN, f"JWT {what} is not strict base64url JSON")
    if not isinstance(value, dict):
        return Refusal(Reason.MALFORMED_TOKEN, f"JWT {what} is not a JSON object")
    return value


# The strict header parse, memoised by the header's base64url segment: a
# provider's tokens share a handful of JOSE headers. Only headers whose values
# are all scalars are kept (then the read-only proxy is immutable all the way
# down); the dict is cleared when full, as an attacker can send unique headers.
MAX_HEADER_MEMO: Final = 64
_SCALARS: Final = (str, int, float, bool, type(None))
_header_memo: dict[str, Mapping[str, Any]] = {}


def _decode_header(segment: str) -> Mapping[str, Any] | Refusal:
    header = _header_memo.get(segment)
    if header is not None:
        return header
    parsed = _decode_object(segment, "header")
    if isinstance(parsed, Refusal):
        return parsed
    if not all(isinstance(value, _SCALARS) for value in parsed.values()):
        return parsed
    if len(_header_memo) >= MAX_HEADER_MEMO:
        _header_memo.clear()
    shared = MappingProxyType(parsed)
    _header_memo[segment] = shared
    return shared


def peek(token: str, *, max_bytes: int = MAX_TOKEN_BYTES) -> UnverifiedToken | Refusal:
    """Parse a compact JWS strictly without verifying it (see module docstring)."""
    if len(token) > max_bytes:
        return Refusal(Reason.TOKEN_TOO_LARGE, f"token longer than {max_bytes} bytes")
    if not token.isascii():
        return Refusal(Reason.MALFORMED_TOKEN, "token is not ASCII")
    parts = token.split(".")
    if len(parts) != 3:
        return Refusal(Reason.MALFORMED_TOKEN, "not a JWS")
    head_seg, body_seg, sig_seg = parts
    if len(head_seg) * 3 // 4 > MAX_HEADER_BYTES:
        return Refusal(Reason.MALFORMED_TOKEN, f"JWT header over {MAX_HEADER_BYTES} bytes")
    try:
        signature = _b64url_decode(sig_seg)
    except ValueError:
        return Refusal(Reason.MALFORMED_TOKEN, "JWT signature is not base64url")
    header = _decode_header(head_seg)
    if isinstance(header, Refusal):
        return header
    claims = _decode_object(body_seg, "payload")
    if isinstance(claims, Refusal):
        return claims
    return UnverifiedToken(header, claims, token, signature)


# --------------------------------------------------------------------------- key sets


def algorithms_for_jwk(jwk: Mapping[str, Any], allowed: Collection[str]) -> tuple[str, ...]:
    """The allowed algorithms this public JWK may verify (its family, or its ``alg``)."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        family: tuple[str, ...] = RSA_ALGORITHMS
    elif kty == "EC" and isinstance(crv, str) and crv in EC_CURVE_ALGORITHMS:
        family = (EC_CURVE_ALGORITHMS[crv],)
    elif kty == "OKP" and crv in OKP_CURVES:
        family = ("EdDSA",)
    else:
        return ()
    alg = jwk.get("alg")
    if alg is not None:
        family = tuple(a for a in family if a == alg)
    return tuple(a for a in family if a in allowed)


def _skip_reason(jwk: Any, allowed: Collection[str]) -> str | None:
    if not isinstance(jwk, dict):
        return "not a JSON object"
    kty = jwk.get("kty")
    if kty == "oct":
        return "symmetric (oct) keys are never taken from a JWKS"
    if kty not in _PUBLIC_MEMBERS:
        return f"unsupported kty {str(kty)[:16]!r}"
    if jwk.get("use", "sig") != "sig":
        return "use is not sig"
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return "key_ops does not allow verify"
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH):
        return "kid is not a short string"
    alg = jwk.get("alg")
    if alg is not None and alg not in allowed:
        return f"alg {str(alg)[:16]!r} not allowed for this provider"
    if not algorithms_for_jwk(jwk, allowed):
        return "no allowed algorithm fits this key"
    return jwk_refusal(jwk)  # size bounds (providers/keypolicy.py)


def _public_jwk(jwk: Mapping[str, Any]) -> dict[str, Any]:
    """Only the public members: private material in a published JWKS is ignored."""
    kty = jwk["kty"]
    return {"kty": kty, **{m: jwk[m] for m in _PUBLIC_MEMBERS[kty] if m in jwk}}


def _build_keys(jwk: Mapping[str, Any], algs: Iterable[str]) -> list[tuple[str, pyjwt.PyJWK]]:
    public = _public_jwk(jwk)
    out = []
    for alg in algs:
        key = pyjwt.PyJWK(public, algorithm=alg)
        size = getattr(key.key, "key_size", None)
        if jwk["kty"] == "RSA" and (size is None or size < MIN_RSA_BITS):
            raise ValueError(f"RSA key shorter than {MIN_RSA_BITS} bits")
        out.append((alg, key))
    return out


@dataclass(frozen=True, slots=True)
class KeySet:
    """Verification keys by ``(kid, alg)``; built once per JWKS fetch."""

    keys: Mapping[tuple[str | None, str], pyjwt.PyJWK] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()
    any_kid_algorithms: frozenset[str] = frozenset()

    @classmethod
    def from_jwks(cls, doc: Any, allowed_algorithms: Collection[str]) -> KeySet:
        """Build from a JWKS document; unusable keys are skipped and listed in ``skipped``.

        Raises :class:`JwksError` when the document itself is not a JWKS.
        """
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise JwksError("JWKS is not an object with a 'keys' list")
        allowed = frozenset(allowed_algorithms) & ASYMMETRIC_ALGORITHMS
        keys: dict[tuple[str | None, str], pyjwt.PyJWK] = {}
        skipped: list[str] = []
        for index, jwk in enumerate(doc["keys"]):
            label = _key_label(index, jwk)
            reason = _skip_reason(jwk, allowed)
            if reason is not None:
                skipped.append(f"{label}: {reason}")
                continue
            try:
                built = _build_keys(jwk, algorithms_for_jwk(jwk, allowed))
            except (jwt_exc.PyJWTError, ValueError, TypeError, KeyError) as exc:
                skipped.append(f"{label}: invalid key ({type(exc).__name__})")
                continue
            for alg, key in built:
                if (jwk.get("kid"), alg) in keys:
                    skipped.append(f"{label}: duplicate kid for {alg}")
                    continue
                keys[(jwk.get("kid"), alg)] = key
        return cls(keys=keys, skipped=tuple(skipped))

    @classmethod
    def with_hmac_secret(cls, secret: str | bytes, algorithms: Collection[str]) -> KeySet:
        """A key set holding a configured shared secret for the allowed HS* algorithms.

        The secret matches any ``kid`` (there is only one). Raises ValueError when
        the secret is shorter than the hash of an algorithm asked for (RFC 7518 §3.2).
        """
        raw = secret.encode("utf-8") if isinstance(secret, str) else secret
        algs = [a for a in HMAC_ALGORITHMS if a in algorithms]
        for alg in algs:
            if (refusal := hmac_secret_refusal(raw, alg)) is not None:
                raise ValueError(refusal)
        k = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
        keys: dict[tuple[str | None, str], pyjwt.PyJWK] = {
            (None, a): pyjwt.PyJWK({"kty": "oct", "k": k}, algorithm=a) for a in algs
        }
        return cls(keys=keys, any_kid_algorithms=frozenset(algs))

    def merged(self, other: KeySet) -> KeySet:
        """Union of two key sets (``other`` wins on equal ``(kid, alg)``)."""
        return KeySet(
            keys={**self.keys, **other.keys},
            skipped=self.skipped + other.skipped,
            any_kid_algorithms=self.any_kid_algorithms | other.any_kid_algorithms,
        )

    def __len__(self) -> int:
        return len({kid for kid, _ in self.keys})

    @property
    def kids(self) -> frozenset[str | None]:
        return frozenset(kid for kid, _ in self.keys)

    def lookup(self, kid: str | None, alg: str) -> pyjwt.PyJWK | None:
        """The key for exactly this kid and alg; absent kid only if one key fits ``alg``."""
        if alg in self.any_kid_algorithms:
            return self.keys.get((None, alg))
        if kid is not None:
            if not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH:
                return None
            return self.keys.get((kid, alg))
        fitting = [key for (_, a), key in self.keys.items() if a == alg]
        return fitting[0] if len(fitting) == 1 else None


def _key_label(index: int, jwk: Any) -> str:
    kid = jwk.get("kid") if isinstance(jwk, dict) else None
    return f"key[{index}] kid={kid[:40]!r}" if isinstance(kid, str) else f"key[{index}]"


# --------------------------------------------------------------------------- verification


_FLOAT_MAX_INT: Final = int(sys.float_info.max)


def _is_number(value: Any) -> bool:
    if type(value) is int and 0 <= value <= _FLOAT_MAX_INT:
        return True  # the usual case: a JSON integer (a larger one fails below, as ever)
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def check_time_claims(claims: Mapping[str, Any], *, now: float, leeway: float) -> float | Refusal:
    """Check ``exp`` (required), ``nbf`` and ``iat`` as JSON numbers; return ``exp``."""
    exp = claims.get("exp")
    if exp is None:
        return Refusal(Reason.BAD_CLAIM, "exp claim missing")
    nbf, iat = claims.get("nbf"), claims.get("iat")
    # A present claim whose JSON value is null is not a number either.
    if not _is_number(exp):
        return Refusal(Reason.BAD_CLAIM, "exp claim is not a non-negative number")
    if (nbf is not None or "nbf" in claims) and not _is_number(nbf):
        return Refusal(Reason.BAD_CLAIM, "nbf claim is not a non-negative number")
    if (iat is not None or "iat" in claims) and not _is_number(iat):
        return Refusal(Reason.BAD_CLAIM, "iat claim is not a non-negative number")
    if iat is not None and exp < iat:
        return Refusal(Reason.BAD_CLAIM, "exp is before iat")
    if nbf is not None and exp < nbf:
        return Refusal(Reason.BAD_CLAIM, "exp is before nbf")
    if exp < now - leeway:
        return Refusal(Reason.EXPIRED, f"expired {now - exp:.0f}s ago")
    if nbf is not None and nbf > now + leeway:
        return Refusal(Reason.NOT_YET_VALID, f"not valid for another {nbf - now:.0f}s")
    if iat is not None and iat > now + leeway:
        return Refusal(Reason.ISSUED_IN_FUTURE, f"issued {iat - now:.0f}s in the future")
    return float(exp)


def _normalize_typ(typ: str) -> str:
    typ = typ.lower()
    return typ[len(_TYP_PREFIX) :] if typ.startswith(_TYP_PREFIX) else typ


def check_header(
    header: Mapping[str, Any], *, algorithms: Collection[str], token_types: Collection[str]
) -> Refusal | None:
    """Header policy: alg allow-list, no ``crit``/``b64``, ``typ`` policy, kid type."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none" or alg not in algorithms:
        shown = alg[:16] if isinstance(alg, str) else type(alg).__name__
        return Refusal(Reason.UNSUPPORTED_ALGORITHM, f"alg {shown!r} not allowed")
    if "crit" in header or "b64" in header:
        return Refusal(Reason.MALFORMED_TOKEN, "crit/b64 header extensions not supported")
    typ = header.get("typ")
    if typ is not None and not isinstance(typ, str):
        return Refusal(Reason.MALFORMED_TOKEN, "typ header is not a string")
    if token_types:
        wanted = {_normalize_typ(t) for t in token_types}
        if typ is None or _normalize_typ(typ) not in wanted:
            shown_typ = f"typ {typ[:32]!r}" if typ is not None else "no typ header"
            wants = ", ".join(sorted(token_types))
            return Refusal(
                Reason.WRONG_TOKEN_TYPE, f"{shown_typ} not accepted (token_types: {wants})"
            )
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return Refusal(Reason.MALFORMED_TOKEN, "kid header is not a string")
    return None


# PyJWT's RS256/384/512 algorithm class (not its RSA-PSS subclass), and the
# padding and hashes it would build on every verify: they hold no state.
_RSA: Final = RSAAlgorithm
_PKCS1V15: Final = padding.PKCS1v15()
_RSA_PKCS1_HASHES: Final[dict[Any, hashes.HashAlgorithm]] = {
    hashes.SHA256: hashes.SHA256(),
    hashes.SHA384: hashes.SHA384(),
    hashes.SHA512: hashes.SHA512(),
}


def _check_signature(
    token: str, key: pyjwt.PyJWK, alg: str, signature: bytes | None = None
) -> Refusal | None:
    """Verify the JWS signature over the signing input with the key's own algorithm object.

    The key was built for exactly ``alg`` (:class:`KeySet` binds every key to one
    algorithm of its family); a key bound to another algorithm is refused.
    ``signature``: the token's, decoded already (by :func:`peek`).
    """
    if key.algorithm_name != alg:
        return Refusal(Reason.UNSUPPORTED_ALGORITHM, "algorithm does not fit the key")
    signing_input, _, sig_seg = token.rpartition(".")
    try:
        if signature is None:
            signature = _b64url_decode(sig_seg)
        algorithm = key.Algorithm
        rsa_hash = _RSA_PKCS1_HASHES.get(algorithm.hash_alg) if type(algorithm) is _RSA else None
        if rsa_hash is not None:
            # What PyJWT's RSAAlgorithm.verify does, without building a padding
            # and a hash object per call; InvalidSignature is caught below.
            key.key.verify(signature, signing_input.encode("ascii"), _PKCS1V15, rsa_hash)
            valid = True
        else:
            valid = algorithm.verify(signing_input.encode("ascii"), key.key, signature)
    except (ValueError, TypeError, InvalidSignature):
        valid = False
    except jwt_exc.PyJWTError:
        return Refusal(Reason.UNKNOWN_KEY, "key unusable for this algorithm")
    if not valid:
        return Refusal(Reason.BAD_SIGNATURE, "signature does not verify")
    return None


def _check_registered_claims(claims: Mapping[str, Any], issuer: str) -> Refusal | None:
    """Exact ``iss``; ``sub`` and ``jti`` are strings when present (as PyJWT checks them)."""
    iss = claims.get("iss")
    if iss is None:
        return Refusal(Reason.WRONG_ISSUER, "iss claim missing")
    if iss != issuer or not isinstance(iss, str):
        return Refusal(Reason.WRONG_ISSUER, "iss does not match the provider")
    for name in ("sub", "jti"):
        if name in claims and not isinstance(claims[name], str):
            return Refusal(Reason.BAD_CLAIM, "sub/jti claim is not a string")
    return None


# Claims that only ID tokens carry: the hashes binding an ID token to the access
# token, code or state it came with (OIDC Core 3.1.3.6, 3.3.2.11; FAPI 1.0 s_hash)
# and the client's nonce (OIDC Core 2). No access-token profile defines them
# (RFC 9068 §2.2: access tokens may carry auth_time, acr, amr — not these), and
# the access tokens of Keycloak (>= 24), Kanidm, Authentik, Entra ID and
# oidc-provider do not carry them. auth_time is *not* a marker: RFC 9068
# allows it, and Keycloak, Kanidm and Authentik access tokens carry it.
ID_TOKEN_CLAIMS = ("at_hash", "c_hash", "s_hash", "nonce")
# An access token names the client it was issued to (RFC 9068 §2.2 client_id,
# REQUIRED; azp: Keycloak, Entra v2, Authentik, Auth0; cid: Okta; appid: Entra
# v1) or the scopes it grants; an ID token names its client only in aud (OIDC
# Core 2: azp is optional), and oidc-provider's ID tokens from the token
# endpoint carry neither at_hash nor nonce. A JWT with none of these claims is
# taken for an ID token. (Dex hands out ID-token-shaped access tokens: that
# is what accept_id_tokens is for.)
CLIENT_CLAIMS = ("client_id", "azp", "cid", "appid")
SCOPE_CLAIMS = ("scope", "scp", "roles")
# Keycloak names the kind of token in a "typ" claim: Bearer (access), ID,
# Refresh, Offline, Logout. Older Keycloaks put the nonce in access tokens too,
# so a "Bearer" typ claim outweighs a nonce.
_KEYCLOAK_ACCESS = "bearer"
_KEYCLOAK_ID = "id"
_KEYCLOAK_OTHER = frozenset({"refresh", "offline", "logout"})
_CLIENT_OR_SCOPE: Final = frozenset((*CLIENT_CLAIMS, *SCOPE_CLAIMS))
_ID_TOKEN_CLAIMS: Final = frozenset(ID_TOKEN_CLAIMS)


def bearer_problem(claims: Mapping[str, Any], *, accept_id_tokens: bool) -> Refusal | None:
    """Why verified ``claims`` are not those of a plain bearer access token, or None.

    * ``cnf`` (RFC 7800; DPoP ``jkt`` RFC 9449 §6, mTLS ``x5t#S256`` RFC 8705
      §3): the token is only valid with a proof of possession, which SASL
      cannot carry; accepting it as a bearer token would make a stolen one
      usable (RFC 9449 §7.2).
    * An ID token (see :data:`ID_TOKEN_CLAIMS`, Keycloak ``typ: ID``, and no
      client or scope claim at all, :data:`CLIENT_CLAIMS`), unless
      ``accept_id_tokens``: it is issued *to* the client, not for a resource.
    * Keycloak's refresh, offline and logout tokens: never.
    """
    cnf = claims.get("cnf")
    if cnf is not None:
        shown = sorted(str(k)[:16] for k in cnf)[:4] if isinstance(cnf, dict) else "?"
        return Refusal(
            Reason.SENDER_CONSTRAINED,
            f"token is sender-constrained (cnf {shown}): SASL carries no proof of possession",
        )
    kind = claims.get("typ")
    kind = kind.lower() if isinstance(kind, str) else None
    if kind in _KEYCLOAK_OTHER:
        return Refusal(Reason.WRONG_TOKEN_TYPE, f"typ claim {kind!r}: not an access token")
    if kind == _KEYCLOAK_ACCESS or accept_id_tokens:
        return None
    names = claims.keys()
    has_client = not names.isdisjoint(_CLIENT_OR_SCOPE)
    if has_client and kind != _KEYCLOAK_ID and names.isdisjoint(_ID_TOKEN_CLAIMS):
        return None  # the usual access token: nothing below applies
    markers = [name for name in ID_TOKEN_CLAIMS if name in claims]
    if kind == _KEYCLOAK_ID:
        markers.insert(0, "typ ID")
    if not has_client:
        markers.append("no client_id, azp or scope: the client only in aud")
    if markers:
        return Refusal(
            Reason.ID_TOKEN,
            f"an ID token ({', '.join(markers)}), not an access token "
            "(accept_id_tokens = true lets ID tokens log in)",
        )
    return None


def verify_jwt(
    token: str,
    unverified: UnverifiedToken,
    keys: KeySet,
    *,
    issuer: str,
    algorithms: Collection[str],
    leeway: float,
    token_types: Collection[str],
    now: float,
    accept_id_tokens: bool = False,
) -> VerifiedClaims | Refusal:
    """Verify a peeked token against one provider's keys and issuer (see module docstring)."""
    header = unverified.header
    refused = check_header(header, algorithms=algorithms, token_types=token_types)
    if refused is not None:
        return refused
    alg: str = header["alg"]
    kid = header.get("kid")
    key = keys.lookup(kid, alg)
    if key is None:
        shown = f"kid {kid[:40]!r}" if isinstance(kid, str) else "a token without kid"
        return Refusal(Reason.UNKNOWN_KEY, f"no {alg} key for {shown}")
    if unverified.token != token:
        # Claims must come from the very token whose signature is checked.
        reparsed = peek(token)
        if isinstance(reparsed, Refusal):
            return reparsed
        if reparsed.header != header:
            return Refusal(Reason.MALFORMED_TOKEN, "token differs from the peek")
        unverified = reparsed
    refused = _check_signature(token, key, alg, unverified.signature)
    if refused is not None:
        return refused
    claims = unverified.claims
    refused = _check_registered_claims(claims, issuer)
    if refused is not None:
        return refused
    expires = check_time_claims(claims, now=now, leeway=leeway)
    if isinstance(expires, Refusal):
        return expires
    refused = bearer_problem(claims, accept_id_tokens=accept_id_tokens)
    if refused is not None:
        return refused
    return VerifiedClaims(claims=claims, header=header, expires_at=expires)
