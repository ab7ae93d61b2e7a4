"""Which verification keys are worth their cost: size bounds for JWKS keys and HMAC secrets.

A JWKS is the identity provider's to publish, but a key of absurd size turns
every forged token into a CPU bill: RSA verification costs grow with the
modulus and with the public exponent (a 16384-bit modulus, or a 3000-bit
exponent, makes each verification 5-7 times dearer). So, pure and cheap,
before any key object is built:

* RSA: the modulus 2048 to 8192 bits; the public exponent odd, at least 3 and
  at most 2**32 (65537 in practice);
* EC: only P-256, P-384, P-521 (coordinates of the curve's size);
* OKP: only Ed25519 and Ed448 (a public key of the curve's size);
* HMAC secrets (``hmac_secret_file``): at least the hash size (RFC 7518
  §3.2) and at most :data:`HMAC_MAX_SECRET_BYTES`.

:func:`jwk_refusal` returns why a JWK is refused, or None; the caller skips
the key and never uses it. :class:`RefusalLog` lets a provider log each
refused key once (with its kid), not at every fetch.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from typing import Any

RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192
RSA_MAX_EXPONENT = 2**32
EC_COORDINATE_BYTES = {"P-256": 32, "P-384": 48, "P-521": 66}
OKP_KEY_BYTES = {"Ed25519": 32, "Ed448": 57}
HMAC_MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
HMAC_MAX_SECRET_BYTES = 1024


def _b64url(value: Any, max_bytes: int) -> bytes | None:
    """The bytes of a base64url member (no padding), or None if absent, too long or invalid."""
    if not isinstance(value, str) or not value or len(value) > (max_bytes * 4 + 2) // 3 + 1:
        return None
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None


def _rsa_refusal(jwk: Mapping[str, Any]) -> str | None:
    n = _b64url(jwk.get("n"), RSA_MAX_BITS // 8 + 1)
    if n is None:
        return f"RSA modulus missing, invalid or over {RSA_MAX_BITS} bits"
    bits = int.from_bytes(n, "big").bit_length()
    if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
        return f"RSA modulus of {bits} bits (allowed: {RSA_MIN_BITS} to {RSA_MAX_BITS})"
    e_raw = _b64url(jwk.get("e"), 8)
    if e_raw is None:
        return "RSA public exponent missing, invalid or over 2**32"
    e = int.from_bytes(e_raw, "big")
    if e < 3 or e % 2 == 0 or e > RSA_MAX_EXPONENT:
        return "RSA public exponent must be odd, at least 3 and at most 2**32"
    return None


def _ec_refusal(jwk: Mapping[str, Any]) -> str | None:
    crv = jwk.get("crv")
    size = EC_COORDINATE_BYTES.get(crv) if isinstance(crv, str) else None
    if size is None:
        return f"EC curve {str(crv)[:16]!r} is not P-256, P-384 or P-521"
    for member in ("x", "y"):
        raw = _b64url(jwk.get(member), size)
        if raw is None or len(raw) != size:
            return f"EC {member} coordinate is not {size} bytes for {crv}"
    return None


def _okp_refusal(jwk: Mapping[str, Any]) -> str | None:
    crv = jwk.get("crv")
    size = OKP_KEY_BYTES.get(crv) if isinstance(crv, str) else None
    if size is None:
        return f"OKP curve {str(crv)[:16]!r} is not Ed25519 or Ed448"
    raw = _b64url(jwk.get("x"), size)
    if raw is None or len(raw) != size:
        return f"OKP public key is not {size} bytes for {crv}"
    return None


def jwk_refusal(jwk: Mapping[str, Any]) -> str | None:
    """Why this public JWK is refused under the size bounds, or None when it may be used."""
    kty = jwk.get("kty")
    if kty == "RSA":
        return _rsa_refusal(jwk)
    if kty == "EC":
        return _ec_refusal(jwk)
    if kty == "OKP":
        return _okp_refusal(jwk)
    return f"unsupported kty {str(kty)[:16]!r}"


def hmac_secret_refusal(secret: bytes, algorithm: str) -> str | None:
    """Why this shared secret is refused for ``algorithm`` (HS256/384/512), or None."""
    minimum = HMAC_MIN_SECRET_BYTES.get(algorithm, 32)
    if len(secret) < minimum:
        return f"HMAC secret shorter than {minimum} bytes"
    if len(secret) > HMAC_MAX_SECRET_BYTES:
        return f"HMAC secret longer than {HMAC_MAX_SECRET_BYTES} bytes"
    return None


class RefusalLog:
    """Which refused keys a provider reported already, so that each is logged once.

    ``new(skipped)`` returns the entries (``"key[1] kid='x': reason"``, as
    :class:`~saslauthd_oidc.providers.jwt.KeySet` lists them) not seen
    before; at most ``limit`` are remembered (a JWKS that changes every fetch
    cannot grow it without bound).
    """

    def __init__(self, limit: int = 256) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def new(self, refusals: Iterable[str]) -> list[str]:
        fresh = [r for r in dict.fromkeys(refusals) if r not in self._seen]
        for refusal in fresh[: max(0, self._limit - len(self._seen))]:
            self._seen.add(refusal)
        return fresh
