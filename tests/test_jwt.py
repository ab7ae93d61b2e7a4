"""Pure JWT layer: peek, KeySet and verify_jwt vs the attack checklist (§4 rows 1-9, 11, 13)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from saslauthd_oidc.core.outcome import Reason, Refusal
from saslauthd_oidc.providers.jwt import (
    JwksError,
    KeySet,
    UnverifiedToken,
    VerifiedClaims,
    check_time_claims,
    looks_like_jws,
    peek,
    verify_jwt,
)
from tests.support import (
    ALL_ASYM,
    ISS,
    NOW,
    b64u,
    claims,
    ec_key,
    ed_key,
    key_for,
    keyset,
    must_peek,
    public_jwk,
    rsa_key,
    sign_raw,
    token,
)

# One JWKS holding one key per family, every key with kid "k1" except EC ("k1" too: kid+alg keyed).
RSA_JWK = public_jwk(rsa_key(), "k1")
EC_JWK = public_jwk(ec_key("P-256"), "k1")
EC384_JWK = public_jwk(ec_key("P-384"), "k384")
ED_JWK = public_jwk(ed_key(), "k1")
KEYS = keyset(RSA_JWK, EC_JWK, EC384_JWK, ED_JWK)


def verify(
    tok: str,
    keys: KeySet = KEYS,
    *,
    issuer: str = ISS,
    algorithms: tuple[str, ...] = ALL_ASYM,
    leeway: float = 60,
    token_types: tuple[str, ...] = (),
    now: float = NOW,
) -> VerifiedClaims | Refusal:
    unverified = peek(tok)
    if isinstance(unverified, Refusal):
        return unverified
    return verify_jwt(
        tok,
        unverified,
        keys,
        issuer=issuer,
        algorithms=algorithms,
        leeway=leeway,
        token_types=token_types,
        now=now,
    )


def reason(result: VerifiedClaims | Refusal) -> Reason:
    return Reason.OK if isinstance(result, VerifiedClaims) else result.reason


def raw(header: dict[str, Any] | bytes | str, payload: Any = None, sig: bytes = b"") -> str:
    """An unsigned-or-arbitrary-signature JWS: no signing at all."""
    h = header if isinstance(header, bytes | str) else json.dumps(header)
    p = payload if isinstance(payload, bytes | str) else json.dumps(payload or claims())
    return f"{b64u(h)}.{b64u(p)}.{b64u(sig)}"


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize(
    "alg", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "EdDSA"]
)
def test_accepts_asymmetric_algorithms(alg: str) -> None:
    result = verify(token(alg))
    assert isinstance(result, VerifiedClaims), result
    assert result.claims["sub"] == "alice"
    assert result.expires_at == NOW + 600
    assert result.header["alg"] == alg


def test_accepts_es384_key_by_kid() -> None:
    assert reason(verify(token("ES384", kid="k384"))) is Reason.OK


def test_verified_claims_are_from_the_token() -> None:
    result = verify(token("ES256", email="bob@example.org"))
    assert isinstance(result, VerifiedClaims)
    assert result.claims["email"] == "bob@example.org"


# --------------------------------------------------------------------------- row 1: alg


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", "", 123, ["RS256"], None, True])
def test_alg_none_and_garbage_rejected(alg: Any) -> None:
    header: dict[str, Any] = {"typ": "JWT", "kid": "k1"}
    if alg is not None:
        header["alg"] = alg
    # also with a real signature over the same input: alg still decides
    assert reason(verify(raw(header))) is Reason.UNSUPPORTED_ALGORITHM
    signed = sign_raw(header, claims(), key_for("ES256"), "ES256")
    assert reason(verify(signed)) is Reason.UNSUPPORTED_ALGORITHM


def test_alg_not_in_provider_allow_list() -> None:
    assert reason(verify(token("RS256"), algorithms=("ES256",))) is Reason.UNSUPPORTED_ALGORITHM
    assert reason(verify(token("ES256"), algorithms=("RS256",))) is Reason.UNSUPPORTED_ALGORITHM


def test_alg_case_matters() -> None:
    tok = sign_raw({"alg": "es256", "kid": "k1"}, claims(), key_for("ES256"), "ES256")
    assert reason(verify(tok)) is Reason.UNSUPPORTED_ALGORITHM


# --------------------------------------------------------------------------- row 2: HS confusion


def _rsa_secret_forms() -> dict[str, bytes]:
    pub = rsa_key().public_key()
    return {
        "pem_spki": pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "pem_pkcs1": pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        "der": pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "jwk_json": json.dumps(RSA_JWK).encode(),
        "modulus": base64.urlsafe_b64decode(RSA_JWK["n"] + "=="),
    }


@pytest.mark.parametrize("form", sorted(_rsa_secret_forms()))
@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_forged_with_rsa_public_key_rejected(form: str, alg: str) -> None:
    secret = _rsa_secret_forms()[form]
    tok = sign_raw({"alg": alg, "kid": "k1", "typ": "at+jwt"}, claims(), secret, alg)
    # Asymmetric-only allow-list: refused at the alg check.
    assert reason(verify(tok)) is Reason.UNSUPPORTED_ALGORITHM
    # Even a careless allow-list that includes HS* finds no HMAC key in a JWKS.
    assert reason(verify(tok, algorithms=(*ALL_ASYM, alg))) is Reason.UNKNOWN_KEY
    # A configured shared secret does not make the RSA public key a valid secret.
    mixed = KEYS.merged(KeySet.with_hmac_secret(b"s" * 64, (alg,)))
    assert reason(verify(tok, mixed, algorithms=(*ALL_ASYM, alg))) is Reason.BAD_SIGNATURE


def test_oct_keys_in_jwks_are_dropped() -> None:
    secret = b"0123456789abcdef0123456789abcdef"
    oct_jwk = {"kty": "oct", "k": b64u(secret), "kid": "k1", "alg": "HS256"}
    ks = keyset(oct_jwk, algorithms=(*ALL_ASYM, "HS256"))
    assert len(ks) == 0
    assert ks.skipped == ("key[0] kid='k1': symmetric (oct) keys are never taken from a JWKS",)
    tok = sign_raw({"alg": "HS256", "kid": "k1"}, claims(), secret, "HS256")
    assert reason(verify(tok, ks, algorithms=("HS256",))) is Reason.UNKNOWN_KEY


def test_configured_hmac_secret_verifies() -> None:
    secret = b"0123456789abcdef0123456789abcdef"
    ks = KeySet.with_hmac_secret(secret, ("HS256",))
    tok = sign_raw({"alg": "HS256"}, claims(), secret, "HS256")
    assert reason(verify(tok, ks, algorithms=("HS256",))) is Reason.OK
    other = sign_raw({"alg": "HS256"}, claims(), b"x" * 32, "HS256")
    assert reason(verify(other, ks, algorithms=("HS256",))) is Reason.BAD_SIGNATURE
    # Not listed for HS384: no key.
    tok384 = sign_raw({"alg": "HS384"}, claims(), secret, "HS384")
    assert reason(verify(tok384, ks, algorithms=("HS256", "HS384"))) is Reason.UNKNOWN_KEY


def test_short_hmac_secret_refused() -> None:
    with pytest.raises(ValueError, match="shorter than 32"):
        KeySet.with_hmac_secret("x" * 31, ("HS256",))
    with pytest.raises(ValueError, match="shorter than 64"):
        KeySet.with_hmac_secret("x" * 63, ("HS256", "HS512"))
    assert len(KeySet.with_hmac_secret("x" * 64, ("HS256", "HS512")).keys) == 2


# ------------------------------------------------------------------ row 3: key/alg families


def test_rs256_header_with_ec_kid_rejected() -> None:
    ks = keyset(public_jwk(ec_key("P-256"), "ec1"))
    tok = token("RS256", kid="ec1")
    assert reason(verify(tok, ks)) is Reason.UNKNOWN_KEY


def test_ps256_against_key_marked_rs256_rejected() -> None:
    ks = keyset(public_jwk(rsa_key(), "k1", alg="RS256"))
    assert reason(verify(token("RS256"), ks)) is Reason.OK
    assert reason(verify(token("PS256"), ks)) is Reason.UNKNOWN_KEY


def test_rsa_key_without_alg_serves_whole_family() -> None:
    ks = keyset(public_jwk(rsa_key(), "k1"), algorithms=("RS256", "PS256"))
    assert reason(verify(token("PS256"), ks, algorithms=("RS256", "PS256"))) is Reason.OK
    assert reason(verify(token("RS512"), ks)) is Reason.UNKNOWN_KEY


def test_es256_signed_with_p384_rejected() -> None:
    p384 = ec_key("P-384")
    tok = sign_raw({"alg": "ES256", "kid": "k384"}, claims(), p384, "ES256")
    assert reason(verify(tok)) is Reason.UNKNOWN_KEY  # a P-384 key only serves ES384
    tok = sign_raw({"alg": "ES256", "kid": "k1"}, claims(), p384, "ES256")
    assert reason(verify(tok)) is Reason.BAD_SIGNATURE  # the P-256 key does not verify it


def test_es256k_unsupported() -> None:
    k1 = ec_key("secp256k1")
    ks = keyset(public_jwk(k1, "k1"))
    assert len(ks) == 0
    tok = raw({"alg": "ES256K", "kid": "k1"}, sig=b"\x01" * 64)
    assert reason(verify(tok, ks)) is Reason.UNSUPPORTED_ALGORITHM


def _signature_of(tok: str) -> bytes:
    return base64.urlsafe_b64decode(tok.rsplit(".", 1)[1] + "==")


def _with_signature(tok: str, sig: bytes) -> str:
    return tok.rsplit(".", 1)[0] + "." + b64u(sig)


@pytest.mark.parametrize(
    ("alg", "mangle"),
    [
        ("ES256", lambda s: b"\x00" * 64),
        ("ES256", lambda s: s[:-1]),
        ("ES256", lambda s: s[:32]),
        ("ES256", lambda s: b""),
        ("RS256", lambda s: s[:-1]),
        ("RS256", lambda s: b""),
        ("RS256", lambda s: bytes(len(s))),
        ("PS256", lambda s: s[:-8]),
        ("EdDSA", lambda s: s[:-1]),
        ("EdDSA", lambda s: bytes(64)),
        ("ES256", lambda s: bytes([s[0] ^ 1]) + s[1:]),
    ],
)
def test_bad_signatures_rejected(alg: str, mangle: Any) -> None:
    tok = token(alg)
    bad = _with_signature(tok, mangle(_signature_of(tok)))
    assert reason(verify(bad)) is Reason.BAD_SIGNATURE


def test_tampered_payload_rejected() -> None:
    tok = token("ES256")
    h, _, s = tok.split(".")
    evil = f"{h}.{b64u(json.dumps(claims(sub='admin')))}.{s}"
    assert reason(verify(evil)) is Reason.BAD_SIGNATURE


# --------------------------------------------------------------------------- row 4: kid


@pytest.mark.parametrize(
    "kid",
    ["../../etc/passwd", "%2e%2e", "' OR 1=1--", "\u0000", "k1\u0000", "K1", "k1 ", "", "k" * 257],
)
def test_kid_injection_is_just_a_missing_key(kid: str) -> None:
    assert reason(verify(token("ES256", kid=kid))) is Reason.UNKNOWN_KEY


def test_10kb_kid_rejected() -> None:
    # Over the 4 KiB header cap before any lookup; and the lookup itself refuses it.
    assert reason(verify(token("ES256", kid="k" * 10240))) is Reason.MALFORMED_TOKEN
    long_kid = "k" * 10240
    ks = keyset({**public_jwk(ec_key("P-256")), "kid": long_kid})
    assert ks.lookup(long_kid, "ES256") is None


@pytest.mark.parametrize("kid", [123, ["k1"], {"k": "k1"}, True])
def test_non_string_kid_rejected(kid: Any) -> None:
    tok = sign_raw({"alg": "ES256", "kid": kid}, claims(), key_for("ES256"), "ES256")
    assert reason(verify(tok)) is Reason.MALFORMED_TOKEN


def test_overlong_kid_in_jwks_skipped() -> None:
    ks = keyset(public_jwk(ec_key("P-256"), "k" * 300))
    assert len(ks) == 0
    assert ks.lookup("k" * 300, "ES256") is None


def test_absent_kid_with_one_compatible_key() -> None:
    ks = keyset(public_jwk(ec_key("P-256"), "only"), public_jwk(rsa_key(), "r"))
    assert reason(verify(token("ES256", kid=None), ks)) is Reason.OK


def test_absent_kid_with_two_compatible_keys_rejected() -> None:
    ks = keyset(public_jwk(ec_key("P-256"), "one"), public_jwk(ec_key("P-256", "b"), "two"))
    assert reason(verify(token("ES256", kid=None), ks)) is Reason.UNKNOWN_KEY
    assert reason(verify(token("ES256", kid="one"), ks)) is Reason.OK


def test_jwks_key_without_kid_only_for_absent_kid() -> None:
    ks = keyset(public_jwk(ec_key("P-256")))
    assert reason(verify(token("ES256", kid=None), ks)) is Reason.OK
    assert reason(verify(token("ES256", kid="k1"), ks)) is Reason.UNKNOWN_KEY


# --------------------------------------------------------------------------- row 5: embedded keys


ATTACKER = ec_key("P-256", "attacker")
ATTACKER_JWK = public_jwk(ATTACKER, "k1")


@pytest.mark.parametrize(
    "extra",
    [
        {"jwk": ATTACKER_JWK},
        {"jku": "http://127.0.0.1:9/jwks.json"},
        {"x5u": "http://127.0.0.1:9/cert.pem"},
        {"x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]},
        {"jwk": ATTACKER_JWK, "jku": "http://127.0.0.1:9/"},
    ],
)
def test_embedded_key_headers_ignored(extra: dict[str, Any]) -> None:
    forged = sign_raw({"alg": "ES256", "kid": "k1", **extra}, claims(), ATTACKER, "ES256")
    assert reason(verify(forged)) is Reason.BAD_SIGNATURE
    no_kid = sign_raw({"alg": "ES256", **extra}, claims(), ATTACKER, "ES256")
    assert reason(verify(no_kid, keyset(EC_JWK))) is Reason.BAD_SIGNATURE
    genuine = sign_raw({"alg": "ES256", "kid": "k1", **extra}, claims(), key_for("ES256"), "ES256")
    assert reason(verify(genuine)) is Reason.OK


# --------------------------------------------------------------------------- row 6: crit


@pytest.mark.parametrize("extra", [{"crit": ["exp"]}, {"crit": []}, {"b64": False}])
def test_crit_and_b64_rejected(extra: dict[str, Any]) -> None:
    result = verify(token("ES256", header=extra))
    assert isinstance(result, Refusal)
    assert result.reason is Reason.MALFORMED_TOKEN
    assert "crit" in result.detail  # refused by our header policy, not by chance in PyJWT


# --------------------------------------------------------------------------- row 7: typ


AT = ("at+jwt", "application/at+jwt")


@pytest.mark.parametrize(
    ("typ", "token_types", "expected"),
    [
        ("at+jwt", AT, Reason.OK),
        ("application/at+jwt", AT, Reason.OK),
        ("AT+JWT", AT, Reason.OK),
        ("Application/At+Jwt", ("at+jwt",), Reason.OK),
        ("at+jwt", ("application/at+jwt",), Reason.OK),
        ("JWT", AT, Reason.WRONG_TOKEN_TYPE),
        (None, AT, Reason.WRONG_TOKEN_TYPE),
        ("bogus", AT, Reason.WRONG_TOKEN_TYPE),
        ("at+jwt ", AT, Reason.WRONG_TOKEN_TYPE),
        ("JWT", ("JWT",), Reason.OK),
        ("at+jwt", (), Reason.OK),
        ("JWT", (), Reason.OK),
        (None, (), Reason.OK),
        ("bogus", (), Reason.OK),
        (123, (), Reason.MALFORMED_TOKEN),
        (["at+jwt"], AT, Reason.MALFORMED_TOKEN),
    ],
)
def test_typ_policy(typ: Any, token_types: tuple[str, ...], expected: Reason) -> None:
    header: dict[str, Any] = {"alg": "ES256", "kid": "k1"}
    if typ is not None:
        header["typ"] = typ
    tok = sign_raw(header, claims(), key_for("ES256"), "ES256")
    assert reason(verify(tok, token_types=token_types)) is expected


# --------------------------------------------------------------------------- row 8: time claims


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"exp": NOW - 60 - 1, "iat": NOW - 3600, "nbf": None}, Reason.EXPIRED),
        ({"exp": NOW - 60, "iat": NOW - 600, "nbf": None}, Reason.OK),
        ({"nbf": NOW + 60 + 1}, Reason.NOT_YET_VALID),
        ({"nbf": NOW + 60}, Reason.OK),
        ({"iat": NOW + 60 + 1}, Reason.ISSUED_IN_FUTURE),
        ({"iat": NOW + 60}, Reason.OK),
        ({"exp": None}, Reason.BAD_CLAIM),
        ({"exp": "9999999999"}, Reason.BAD_CLAIM),
        ({"exp": True}, Reason.BAD_CLAIM),
        ({"exp": -1}, Reason.BAD_CLAIM),
        ({"exp": [NOW + 600]}, Reason.BAD_CLAIM),
        ({"nbf": "0"}, Reason.BAD_CLAIM),
        ({"iat": False}, Reason.BAD_CLAIM),
        ({"iat": None, "nbf": None}, Reason.OK),
        ({"exp": NOW + 600.5}, Reason.OK),
        ({"exp": NOW + 10, "iat": NOW + 20}, Reason.BAD_CLAIM),
        ({"exp": NOW + 10, "nbf": NOW + 20}, Reason.BAD_CLAIM),
    ],
)
def test_time_claims(overrides: dict[str, Any], expected: Reason) -> None:
    assert reason(verify(token("ES256", **overrides))) is expected


def test_exp_infinity_from_1e400_rejected() -> None:
    payload = json.dumps(claims()).replace(str(NOW + 600), "1e400")
    assert "1e400" in payload
    tok = sign_raw({"alg": "ES256", "kid": "k1"}, payload, key_for("ES256"), "ES256")
    assert reason(verify(tok)) is Reason.BAD_CLAIM


def test_time_claims_pure_function_uses_given_clock() -> None:
    c = {"exp": 100.0, "iat": 50}
    assert check_time_claims(c, now=90, leeway=0) == 100.0
    rejected = check_time_claims(c, now=161, leeway=60)
    assert isinstance(rejected, Refusal)
    assert rejected.reason is Reason.EXPIRED
    assert check_time_claims(c, now=160, leeway=60) == 100.0


def test_leeway_zero() -> None:
    assert (
        reason(verify(token("ES256", exp=NOW - 1, iat=NOW - 9, nbf=None), leeway=0))
        is Reason.EXPIRED
    )


def test_non_string_sub_rejected() -> None:
    assert reason(verify(token("ES256", sub=42))) is Reason.BAD_CLAIM


def test_non_string_jti_rejected() -> None:
    assert reason(verify(token("ES256", jti=7))) is Reason.BAD_CLAIM


# ----------------------------------------------------- claims are those of the signed token


def _verify_with(tok: str, unverified: UnverifiedToken) -> VerifiedClaims | Refusal:
    return verify_jwt(
        tok, unverified, KEYS, issuer=ISS, algorithms=ALL_ASYM, leeway=60, token_types=(), now=NOW
    )


def test_peek_of_another_token_is_not_trusted() -> None:
    signed = token("ES256", sub="alice")
    other = must_peek(token("ES256", sub="mallory"))
    result = _verify_with(signed, other)
    assert isinstance(result, VerifiedClaims)
    assert result.claims["sub"] == "alice"


def test_hand_made_unverified_token_is_reparsed() -> None:
    signed = token("ES256", sub="alice")
    real = must_peek(signed)
    forged = UnverifiedToken(header=real.header, claims={**real.claims, "sub": "mallory"})
    result = _verify_with(signed, forged)
    assert isinstance(result, VerifiedClaims)
    assert result.claims["sub"] == "alice"


def test_peek_with_a_different_header_is_refused() -> None:
    signed = token("ES256", sub="alice")
    other = must_peek(token("ES384", kid="k384"))
    assert reason(_verify_with(signed, other)) is Reason.MALFORMED_TOKEN


def test_key_bound_to_another_algorithm_is_refused() -> None:
    import jwt as pyjwt

    ps256 = pyjwt.PyJWK(RSA_JWK, algorithm="PS256")
    keys = KeySet(keys={("k1", "RS256"): ps256})
    tok = token("RS256")
    result = verify_jwt(
        tok,
        must_peek(tok),
        keys,
        issuer=ISS,
        algorithms=ALL_ASYM,
        leeway=60,
        token_types=(),
        now=NOW,
    )
    assert reason(result) is Reason.UNSUPPORTED_ALGORITHM


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "ES384", "EdDSA"])
def test_signature_of_another_token_does_not_verify(alg: str) -> None:
    kid = "k384" if alg == "ES384" else "k1"
    a, b = token(alg, kid=kid, sub="alice"), token(alg, kid=kid, sub="bob")
    spliced = a.rsplit(".", 1)[0] + "." + b.rsplit(".", 1)[1]
    assert reason(verify(spliced)) is Reason.BAD_SIGNATURE
    assert reason(verify(a)) is Reason.OK


# --------------------------------------------------------------------------- row 11: iss


@pytest.mark.parametrize(
    "iss", [ISS + "/", ISS.upper(), ISS.replace("https", "http"), "", [ISS], 1, "https://evil"]
)
def test_issuer_exact(iss: Any) -> None:
    assert reason(verify(token("ES256", iss=iss))) is Reason.WRONG_ISSUER


def test_issuer_missing() -> None:
    assert reason(verify(token("ES256", iss=None))) is Reason.WRONG_ISSUER


def test_issuer_of_other_provider_with_its_kid() -> None:
    # A token claiming provider B's issuer but signed by a key only A publishes.
    tok = token("ES256", iss="https://other.example")
    assert reason(verify(tok, issuer="https://other.example", keys=keyset())) is Reason.UNKNOWN_KEY


# --------------------------------------------------------------------------- row 13: peek


def test_duplicate_key_in_header_rejected() -> None:
    header = '{"alg":"ES256","kid":"k1","alg":"none"}'
    tok = sign_raw(header, claims(), key_for("ES256"), "ES256")
    result = peek(tok)
    assert isinstance(result, Refusal)
    assert result.reason is Reason.MALFORMED_TOKEN
    assert "duplicate" in result.detail


def test_duplicate_key_in_payload_rejected() -> None:
    payload = json.dumps(claims())[:-1] + ',"sub":"admin"}'
    tok = sign_raw({"alg": "ES256", "kid": "k1"}, payload, key_for("ES256"), "ES256")
    assert reason(verify(tok)) is Reason.MALFORMED_TOKEN


def test_duplicate_key_nested_rejected() -> None:
    payload = json.dumps(claims(x={"a": 1}))[:-2] + ',"a":2}}'
    tok = sign_raw({"alg": "ES256", "kid": "k1"}, payload, key_for("ES256"), "ES256")
    assert reason(verify(tok)) is Reason.MALFORMED_TOKEN


def test_oversized_token() -> None:
    tok = token("ES256", pad="x" * 20000)
    result = peek(tok)
    assert isinstance(result, Refusal)
    assert result.reason is Reason.TOKEN_TOO_LARGE
    assert tok not in result.detail
    assert reason(verify(token("ES256", pad="x" * 8000))) is Reason.OK
    assert isinstance(peek(tok, max_bytes=len(tok)), UnverifiedToken)
    assert isinstance(peek(tok, max_bytes=len(tok) - 1), Refusal)


def test_oversized_header() -> None:
    tok = token("ES256", header={"pad": "x" * 5000})
    result = peek(tok)
    assert isinstance(result, Refusal)
    assert result.reason is Reason.MALFORMED_TOKEN
    assert reason(verify(token("ES256", header={"pad": "x" * 3000}))) is Reason.OK


@pytest.mark.parametrize("where", ["header", "payload"])
@pytest.mark.parametrize("depth", [17, 100, 5000])
def test_deep_nesting_rejected(where: str, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    header = '{"alg":"ES256","kid":"k1"' + (f',"x":{nested}' if where == "header" else "") + "}"
    payload = json.dumps(claims())[:-1] + (f',"x":{nested}' if where == "payload" else "") + "}"
    tok = sign_raw(header, payload, key_for("ES256"), "ES256")
    result = peek(tok, max_bytes=100_000)
    assert isinstance(result, Refusal)
    assert result.reason is Reason.MALFORMED_TOKEN


def test_moderate_nesting_and_brackets_in_strings_accepted() -> None:
    nested = {"a": [[[[{"b": [1]}]]]]}
    tok = token("ES256", x=nested, y="[[[[[[[[[[[[[[[[[[[[[[[[[[{{{{{{")
    assert reason(verify(tok)) is Reason.OK


@pytest.mark.parametrize(
    ("tok", "detail"),
    [
        ("", "not a JWS"),
        ("abc", "not a JWS"),
        ("a.b", "not a JWS"),
        ("a.b.c.d", "not a JWS"),
        ("a.b.c.d.e", "not a JWS"),
    ],
)
def test_not_a_jws(tok: str, detail: str) -> None:
    result = peek(tok)
    assert result == Refusal(Reason.MALFORMED_TOKEN, detail)


def test_malformed_segments() -> None:
    h = b64u('{"alg":"ES256"}')
    p = b64u(json.dumps(claims()))
    not_object = b64u('"str"')
    not_utf8 = b64u(b'{"a":"\xff"}')
    nan = b64u('{"exp":NaN}')
    trailing = b64u('{"exp":1} x')
    bad = [
        h + "=." + p + ".sig",  # padding
        h + "." + p + ".si+g",  # base64 (not url) alphabet
        h + "." + p + ".abcde",  # impossible length
        b64u("[1]") + "." + p + ".",  # header not an object
        h + "." + not_object + ".",  # payload not an object
        h + "." + not_utf8 + ".",  # not UTF-8
        h + "." + nan + ".",  # NaN
        h + "." + trailing + ".",  # trailing garbage
        h + "." + p + ".sig\u00e9",  # non-ASCII
        "." + p + ".",  # empty header
        h + "..",  # empty payload
    ]
    for tok in bad:
        result = peek(tok)
        assert isinstance(result, Refusal), tok
        assert result.reason is Reason.MALFORMED_TOKEN, tok


def test_peek_returns_header_and_claims() -> None:
    u = must_peek(token("ES256", kid="k9"))
    assert u.header == {"alg": "ES256", "typ": "at+jwt", "kid": "k9"}
    assert u.claims["iss"] == ISS
    assert u.issuer == ISS
    assert must_peek(token("ES256", iss=["x"])).issuer is None


@given(st.text(max_size=300))
def test_peek_never_raises(text: str) -> None:
    result = peek(text)
    assert isinstance(result, UnverifiedToken | Refusal)


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_peek_never_raises_on_base64_garbage(h: bytes, p: bytes) -> None:
    result = peek(f"{b64u(h)}.{b64u(p)}.")
    assert isinstance(result, UnverifiedToken | Refusal)


# --------------------------------------------------------------------------- looks_like_jws


@pytest.mark.parametrize(
    ("tok", "expected"),
    [
        ("", False),
        ("aGVsbG8sIHdvcmxkCg", False),
        ("yJhbGciOiJIUzI1NiIsInR5", False),
        ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9", False),
        ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9..", False),
        ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjE1ODEzMzA3OTN9.", True),
        ("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJleHAiOjE1ODEzMzA3OTN9.", True),
        ("ya29.a0AfH6SMBx.abc", False),  # Google-style opaque token with dots
        ("vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg==", False),
        ("a.b.c", False),
        ("eyJ!.eyJ.x", False),
    ],
)
def test_looks_like_jws(tok: str, expected: bool) -> None:
    assert looks_like_jws(tok) is expected


def test_looks_like_jws_on_real_tokens() -> None:
    for alg in ("RS256", "ES256", "EdDSA"):
        assert looks_like_jws(token(alg))


# --------------------------------------------------------------------------- KeySet


def test_keyset_skips_and_counts() -> None:
    good = public_jwk(ec_key("P-256"), "good")
    bad_n = {**public_jwk(rsa_key(), "badn"), "n": "AAAA"}
    short = public_jwk(rsa_key("short", 1024), "short")
    doc = {
        "keys": [
            good,
            {**public_jwk(ec_key("P-256", "b"), "enc"), "use": "enc"},
            {**public_jwk(ec_key("P-256", "c"), "ops"), "key_ops": ["encrypt"]},
            {**public_jwk(ec_key("P-256", "d"), "alg"), "alg": "ES384"},
            {**public_jwk(ec_key("P-256", "e"), "crv"), "crv": "P-999"},
            bad_n,
            short,
            {"kty": "XYZ", "kid": "x"},
            "not an object",
            {"kty": "oct", "k": "AAAA"},
        ]
    }
    ks = KeySet.from_jwks(doc, ("ES256", "RS256"))
    assert ks.kids == {"good"}
    assert [s.split(": ", 1)[1] for s in ks.skipped] == [
        "use is not sig",
        "key_ops does not allow verify",
        "alg 'ES384' not allowed for this provider",
        "no allowed algorithm fits this key",
        "RSA modulus of 0 bits (allowed: 2048 to 8192)",  # providers/keypolicy.py
        "RSA modulus of 1024 bits (allowed: 2048 to 8192)",
        "unsupported kty 'XYZ'",
        "not a JSON object",
        "symmetric (oct) keys are never taken from a JWKS",
    ]
    assert ks.lookup("good", "ES256") is not None
    assert ks.lookup("good", "ES384") is None


def test_keyset_ignores_private_material() -> None:
    priv = ec_key("P-256")
    from jwt.algorithms import ECAlgorithm

    full = ECAlgorithm.to_jwk(priv, as_dict=True)
    assert "d" in full
    ks = keyset({**full, "kid": "k1"})
    key = ks.lookup("k1", "ES256")
    assert key is not None
    assert not hasattr(key.key, "private_numbers")
    assert reason(verify(token("ES256"), ks)) is Reason.OK


def test_keyset_rejects_non_jwks() -> None:
    doc: object
    for doc in ([], {"keys": {}}, {"nokeys": []}, "x", None):
        with pytest.raises(JwksError):
            KeySet.from_jwks(doc, ALL_ASYM)
    assert len(KeySet.from_jwks({"keys": []}, ALL_ASYM)) == 0


def test_keyset_duplicate_kid_keeps_first() -> None:
    first = public_jwk(ec_key("P-256"), "dup")
    second = public_jwk(ec_key("P-256", "other"), "dup")
    ks = keyset(first, second)
    assert len(ks.skipped) == 1
    assert reason(verify(token("ES256", kid="dup"), ks)) is Reason.OK
    assert reason(verify(token("ES256", kid="dup", name="other"), ks)) is Reason.BAD_SIGNATURE


def test_keyset_maps_curves_to_algorithms() -> None:
    ks = keyset(
        public_jwk(ec_key("P-256"), "a"),
        public_jwk(ec_key("P-384"), "b"),
        public_jwk(ec_key("P-521"), "c"),
        public_jwk(ed_key(), "d"),
        public_jwk(rsa_key(), "e"),
    )
    algs = {kid: sorted(a for k, a in ks.keys if k == kid) for kid in "abcde"}
    assert algs == {
        "a": ["ES256"],
        "b": ["ES384"],
        "c": ["ES512"],
        "d": ["EdDSA"],
        "e": ["PS256", "PS384", "PS512", "RS256", "RS384", "RS512"],
    }
    only_rs = keyset(public_jwk(rsa_key(), "e"), algorithms=("RS256",))
    assert sorted(a for _, a in only_rs.keys) == ["RS256"]


# --------------------------------------------------------------------------- header memo


HEADERS_TO_MEMO: list[bytes | str] = [
    json.dumps({"alg": "RS256", "kid": "k1", "typ": "at+jwt"}),
    '{"alg":"RS256","alg":"none"}',  # duplicate key
    '{"alg":"RS256","x":NaN}',  # non-standard constant
    "[1,2]",  # not an object
    b"\xff\xfe",  # not UTF-8
    '{"alg":"RS256","x":' + "[" * 40 + "]" * 40 + "}",  # too deep
    '{"alg":"RS256","jwk":{"kty":"RSA"}}',  # nested: parsed, not memoised
    '{"alg":"RS256"',  # truncated
    json.dumps({"alg": "RS256", "pad": "x" * 5000}),  # oversized
]


@pytest.mark.parametrize("header", HEADERS_TO_MEMO)
def test_header_memo_gives_the_uncached_verdict(header: bytes | str) -> None:
    from saslauthd_oidc.providers import jwt as jwt_mod

    tok = raw(header)
    jwt_mod._header_memo.clear()
    uncached = peek(tok)
    for _ in range(2):  # now from the memo, where the header was kept
        assert peek(tok) == uncached
    kept = tok.split(".")[0] in jwt_mod._header_memo
    assert kept == (isinstance(uncached, UnverifiedToken) and "jwk" not in uncached.header)


def test_memoised_header_is_shared_and_read_only() -> None:
    first, second = must_peek(token("RS256")), must_peek(token("RS256", jti="other"))
    assert first.header is second.header
    with pytest.raises(TypeError):
        first.header["alg"] = "none"  # type: ignore[index]
    assert peek(token("RS256")).header["alg"] == "RS256"  # type: ignore[union-attr]


def test_header_with_nested_values_is_not_shared() -> None:
    tok = raw({"alg": "RS256", "x": {"y": 1}})
    a, b = peek(tok), peek(tok)
    assert isinstance(a, UnverifiedToken) and isinstance(b, UnverifiedToken)
    assert a.header == b.header and a.header is not b.header


def test_header_memo_is_bounded() -> None:
    from saslauthd_oidc.providers import jwt as jwt_mod

    for i in range(3 * jwt_mod.MAX_HEADER_MEMO):
        peek(raw({"alg": "RS256", "kid": f"attacker-{i}"}))
        assert len(jwt_mod._header_memo) <= jwt_mod.MAX_HEADER_MEMO
    # Still correct after the clears.
    assert peek(raw({"alg": "RS256", "kid": "attacker-0"})).header["kid"] == "attacker-0"  # type: ignore[union-attr]
