"""Table-driven tests for saslauthd_oidc.protocol.sasl: decoders, failure challenges, exchanges.

Sources of the cases: RFC 7628 §3.1/§4, RFC 5801 §4, Dovecot's test-sasl-oauth2.c /
test-mech.c / test-auth-gs2.c, the curl test data, Google's XOAUTH2 page and the
"union of malformed cases" in reference/token-validation-peers-attacks.md §2.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from saslauthd_oidc.core.outcome import DiscoveryHint, Reason, Refusal, Verdict
from saslauthd_oidc.core.request import SASL_MECHANISMS, Credentials, Mechanism
from saslauthd_oidc.protocol.sasl import (
    Authenticate,
    Challenge,
    Failed,
    SaslExchange,
    Succeeded,
    decode_oauthbearer,
    decode_plain,
    decode_xoauth2,
    oauth_status,
    oauthbearer_failure,
    xoauth2_failure,
)

RFC_TOKEN = "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="
CURL_TOKEN = "mF_9.B5f-4.1JqM"
SECRET = "SECRETtok3n"
MiB = 1024 * 1024


def creds(
    token: str = SECRET,
    authzid: str | None = None,
    host: str | None = None,
    port: int | None = None,
) -> Credentials:
    return Credentials(token=token, authzid=authzid, host=host, port=port)


def ob(header: bytes, *pairs: bytes) -> bytes:
    """An OAUTHBEARER message: header, %x01, each pair + %x01, final %x01."""
    return header + b"\x01" + b"".join(p + b"\x01" for p in pairs) + b"\x01"


AUTH = b"auth=Bearer " + SECRET.encode()

# --------------------------------------------------------------------------- OAUTHBEARER

OAUTHBEARER_ACCEPT = [
    pytest.param(
        b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
        b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01",
        creds(RFC_TOKEN, "user@example.com", "server.example.com", 143),
        id="rfc7628-4.1-success-example",
    ),
    pytest.param(
        b"n,user=someuser@example.com,\x01auth=Bearer " + RFC_TOKEN.encode() + b"\x01\x01",
        creds(RFC_TOKEN, "someuser@example.com"),
        id="rfc7628-4.4-user-in-header",
    ),
    pytest.param(
        b"user=user\x01host=127.0.0.1\x01port=9003\x01auth=Bearer mF_9.B5f-4.1JqM\x01\x01",
        creds(CURL_TOKEN, "user", "127.0.0.1", 9003),
        id="old-curl-no-gs2-header",
    ),
    pytest.param(
        b"n,a=user,\x01host=127.0.0.1\x01port=9003\x01auth=Bearer mF_9.B5f-4.1JqM\x01\x01",
        creds(CURL_TOKEN, "user", "127.0.0.1", 9003),
        id="new-curl",
    ),
    pytest.param(ob(b"n,,", AUTH), creds(), id="no-authzid"),
    pytest.param(ob(b"y,,", AUTH), creds(), id="cbflag-y"),
    pytest.param(ob(b"y,a=bob,", AUTH), creds(authzid="bob"), id="cbflag-y-authzid"),
    pytest.param(ob(b"n,a==2C=3D,", AUTH), creds(authzid=",="), id="gs2-escapes-only"),
    pytest.param(ob(b"n,a=a=2Cb=3Dc,", AUTH), creds(authzid="a,b=c"), id="gs2-escapes-inside"),
    pytest.param(ob(b"n,a==3D2C,", AUTH), creds(authzid="=2C"), id="gs2-no-double-unescape"),
    pytest.param(
        ob(b"n,a=j\xc3\xbcrgen@example.org,", AUTH),
        creds(authzid="jürgen@example.org"),
        id="utf8-authzid",
    ),
    pytest.param(
        ob(b"n,user=a=b@example.org,", AUTH),
        creds(authzid="a=b@example.org"),
        id="user-in-header-not-unescaped",
    ),
    pytest.param(ob(b"n,,", b"auth=bearer " + SECRET.encode()), creds(), id="scheme-lower"),
    pytest.param(ob(b"n,,", b"auth=BEARER " + SECRET.encode()), creds(), id="scheme-upper"),
    pytest.param(ob(b"n,,", b"auth=bEaReR " + SECRET.encode()), creds(), id="scheme-mixed"),
    pytest.param(
        ob(b"n,,", b"mthd=GET", b"path=/", b"post=", b"qs=a b\tc\r\nd", AUTH),
        creds(),
        id="unknown-keys-ignored-value-sp-htab-cr-lf",
    ),
    pytest.param(
        ob(b"n,,", b"user=mallory", AUTH), creds(), id="user-pair-ignored-with-gs2-header"
    ),
    pytest.param(ob(b"n,,", b"AUTH=Bearer x", AUTH), creds(), id="key-case-sensitive"),
    pytest.param(
        ob(b"n,,", b"auth=Bearer token_with_special_chars!@#"),
        creds("token_with_special_chars!@#"),
        id="token-printable-punctuation",
    ),
    pytest.param(
        ob(b"n,,", b"auth=Bearer abc.def-ghi_~+/=="), creds("abc.def-ghi_~+/=="), id="b64token"
    ),
    pytest.param(ob(b"n,,", b"port=1", AUTH), creds(port=1), id="port-1"),
    pytest.param(ob(b"n,,", b"port=65535", AUTH), creds(port=65535), id="port-65535"),
    pytest.param(ob(b"n,,", AUTH, b"host=h"), creds(host="h"), id="auth-before-host"),
    pytest.param(b"auth=Bearer " + SECRET.encode() + b"\x01\x01", creds(), id="headerless-no-user"),
    pytest.param(
        b"user=a,b=c\x01" + AUTH + b"\x01\x01", creds(authzid="a,b=c"), id="headerless-raw-user"
    ),
]


@pytest.mark.parametrize(("message", "expected"), OAUTHBEARER_ACCEPT)
def test_oauthbearer_accepts(message: bytes, expected: Credentials) -> None:
    result = decode_oauthbearer(message)
    assert result == expected
    assert isinstance(result, Credentials)
    assert result.token == expected.token


M = Reason.MALFORMED_SASL
MT = Reason.MALFORMED_TOKEN
NT = Reason.MISSING_TOKEN
CB = Reason.CHANNEL_BINDING_UNSUPPORTED

OAUTHBEARER_REJECT = [
    # whole message
    pytest.param(b"", M, id="empty"),
    pytest.param(b"\x01", Reason.CANCELLED, id="abort-kvsep"),
    pytest.param(b"\x01\x01", M, id="two-kvsep"),
    pytest.param(b"garbage", M, id="garbage"),
    pytest.param(b"@#$$@%#$", M, id="garbage-punct"),
    pytest.param(b"1213", M, id="garbage-digits"),
    # GS2 header
    pytest.param(ob(b"F,n,a=testuser,", AUTH), M, id="dovecot-F-prefix"),
    pytest.param(ob(b"F,n,,", AUTH), M, id="F-prefix-no-authzid"),
    pytest.param(b"F,", M, id="F-only"),
    pytest.param(ob(b"Fn,,", AUTH), M, id="gs2-Fn"),
    pytest.param(ob(b"q,,", AUTH), M, id="gs2-bad-cbflag-q"),
    pytest.param(ob(b"nn,,", AUTH), M, id="gs2-bad-cbflag-nn"),
    pytest.param(ob(b",,", AUTH), M, id="gs2-empty-cbflag"),
    pytest.param(ob(b"N,,", AUTH), M, id="gs2-cbflag-uppercase"),
    pytest.param(ob(b"p=tls-unique,,", AUTH), CB, id="channel-binding-tls-unique"),
    pytest.param(ob(b"p=tls-server-end-point,a=u,", AUTH), CB, id="channel-binding-with-authzid"),
    pytest.param(ob(b"p=,,", AUTH), M, id="gs2-p-empty-name"),
    pytest.param(ob(b"p=a b,,", AUTH), M, id="gs2-p-bad-name"),
    pytest.param(
        b"n,a=testuser,p=cHJvb2Y=,f=nonstandart\x01host=server\x01port=143\x01"
        + AUTH
        + b"\x01\x01",
        M,
        id="dovecot-extra-gs2-attributes",
    ),
    pytest.param(ob(b"n,a=u,f=x", AUTH), M, id="gs2-extra-attribute-f"),
    pytest.param(ob(b"n,a=u,,", AUTH), M, id="gs2-extra-comma"),
    pytest.param(ob(b"n,a==testuser,", AUTH), M, id="dovecot-a-equals-equals"),
    pytest.param(ob(b"n,a=,", AUTH), M, id="gs2-empty-authzid"),
    pytest.param(ob(b"n,user=,", AUTH), M, id="gs2-empty-user"),
    pytest.param(ob(b"n,a=u=2D,", AUTH), M, id="gs2-bad-escape-2D"),
    pytest.param(ob(b"n,a=u=2c,", AUTH), M, id="gs2-lowercase-escape"),
    pytest.param(ob(b"n,a=u=2,", AUTH), M, id="gs2-short-escape"),
    pytest.param(ob(b"n,a=u=,", AUTH), M, id="gs2-bare-equals-end"),
    pytest.param(ob(b"n,a==,", AUTH), M, id="gs2-bare-equals-only"),
    pytest.param(ob(b"n,b=u,", AUTH), M, id="gs2-unknown-attribute"),
    pytest.param(ob(b"n,u,", AUTH), M, id="gs2-authzid-without-a"),
    pytest.param(ob(b"n,a=u\x00v,", AUTH), M, id="gs2-authzid-nul"),
    pytest.param(ob(b"n,a=v@x\tuser=admin,", AUTH), M, id="gs2-authzid-tab-injection"),
    pytest.param(ob(b"n,a=v@x\nuser=admin,", AUTH), M, id="gs2-authzid-lf"),
    pytest.param(ob(b"n,a=v@x\r,", AUTH), M, id="gs2-authzid-cr"),
    pytest.param(ob(b"n,a=v\x7f,", AUTH), M, id="gs2-authzid-del"),
    pytest.param(ob(b"n,a=v\x1b,", AUTH), M, id="gs2-authzid-esc"),
    pytest.param(ob(b"n,a=v\xc2\x85,", AUTH), M, id="gs2-authzid-c1-nel"),
    pytest.param(ob(b"n,a=\xff\xfe,", AUTH), M, id="gs2-authzid-bad-utf8"),
    pytest.param(ob(b"n,a=\xc3,", AUTH), M, id="gs2-authzid-truncated-utf8"),
    pytest.param(ob(b"n,user=a\tb,", AUTH), M, id="gs2-user-tab"),
    pytest.param(b"n,a=testuser\x01auth=token\x01\x01", M, id="dovecot-header-unterminated"),
    pytest.param(b"n,,auth=Bearer t\x01\x01", M, id="no-kvsep-after-header"),
    pytest.param(b"n,,", M, id="header-only"),
    pytest.param(b"n,", M, id="header-truncated"),
    pytest.param(b"n", M, id="cbflag-only"),
    pytest.param(b"y", M, id="cbflag-y-only"),
    # kvpair framing
    pytest.param(b"n,a=user,\x01" + AUTH + b"\x01", M, id="dovecot-missing-final-kvsep"),
    pytest.param(b"n,,\x01", M, id="no-pairs-no-final-kvsep"),
    pytest.param(b"n,,\x01" + AUTH, M, id="pair-unterminated"),
    pytest.param(b"n,,\x01key=value", M, id="dovecot-kv-unterminated"),
    pytest.param(ob(b"n,,", AUTH) + b"x", M, id="trailing-byte"),
    pytest.param(ob(b"n,,", AUTH) + b"\x01", M, id="trailing-kvsep"),
    pytest.param(ob(b"n,,", AUTH) + b"host=x\x01\x01", M, id="trailing-pairs"),
    pytest.param(b"n,,\x01\x01" + AUTH + b"\x01\x01", M, id="pairs-after-final-kvsep"),
    pytest.param(ob(b"n,,", b"=", AUTH), M, id="dovecot-kv-equals"),
    pytest.param(ob(b"n,,", b"a", AUTH), M, id="dovecot-kv-no-equals"),
    pytest.param(ob(b"n,,", b"key1=a", AUTH), M, id="dovecot-kv-digit-key"),
    pytest.param(ob(b"n,,", b"k e y=a", AUTH), M, id="dovecot-kv-space-key"),
    pytest.param(ob(b"n,,", b"key=a\x02", AUTH), M, id="dovecot-kv-ctrl-value"),
    pytest.param(ob(b"n,,", b"=x", AUTH), M, id="kv-empty-key"),
    pytest.param(ob(b"n,,", b"k_y=a", AUTH), M, id="kv-underscore-key"),
    pytest.param(ob(b"n,,", b"key=\xc3\xa9", AUTH), M, id="kv-8bit-value"),
    pytest.param(ob(b"n,,", b"key=a\x00b", AUTH), M, id="kv-nul-value"),
    pytest.param(ob(b"n,,", b"key=a\x7f", AUTH), M, id="kv-del-value"),
    # host / port
    pytest.param(ob(b"n,,", b"port=0", AUTH), M, id="port-0"),
    pytest.param(ob(b"n,,", b"port=01", AUTH), M, id="port-leading-zero"),
    pytest.param(ob(b"n,,", b"port=65536", AUTH), M, id="port-65536"),
    pytest.param(ob(b"n,,", b"port=100000", AUTH), M, id="port-six-digits"),
    pytest.param(ob(b"n,,", b"port=-1", AUTH), M, id="port-negative"),
    pytest.param(ob(b"n,,", b"port=+1", AUTH), M, id="port-plus"),
    pytest.param(ob(b"n,,", b"port=1_0", AUTH), M, id="port-underscore"),
    pytest.param(ob(b"n,,", b"port= 143", AUTH), M, id="port-space"),
    pytest.param(ob(b"n,,", b"port=143\n", AUTH), M, id="port-newline"),
    pytest.param(ob(b"n,,", b"port=", AUTH), M, id="port-empty"),
    pytest.param(ob(b"n,,", b"port=imap", AUTH), M, id="port-name"),
    pytest.param(ob(b"n,,", b"host=", AUTH), M, id="host-empty"),
    pytest.param(ob(b"n,,", b"host=a b", AUTH), M, id="host-space"),
    pytest.param(ob(b"n,,", b"host=a\tb", AUTH), M, id="host-tab"),
    # duplicates
    pytest.param(ob(b"n,,", AUTH, b"auth=Bearer other"), M, id="duplicate-auth"),
    pytest.param(ob(b"n,,", AUTH, AUTH), M, id="duplicate-auth-same"),
    pytest.param(ob(b"n,,", b"host=a", b"host=b", AUTH), M, id="duplicate-host"),
    pytest.param(ob(b"n,,", b"port=1", b"port=2", AUTH), M, id="duplicate-port"),
    pytest.param(b"user=a\x01user=b\x01" + AUTH + b"\x01\x01", M, id="headerless-duplicate-user"),
    # headerless form
    pytest.param(b"user=\x01" + AUTH + b"\x01\x01", M, id="headerless-empty-user"),
    pytest.param(b"user=v@x\tuser=admin\x01" + AUTH + b"\x01\x01", M, id="headerless-user-tab"),
    pytest.param(b"user=u\x01" + AUTH + b"\x01", M, id="headerless-missing-final"),
    pytest.param(b"user=u\x01" + AUTH, M, id="headerless-unterminated"),
    pytest.param(b"p=x\x01" + AUTH + b"\x01\x01", M, id="headerless-p-key-is-gs2"),
    # auth value
    pytest.param(ob(b"n,a=testuser,", b"auth=token"), MT, id="dovecot-auth-no-bearer"),
    pytest.param(ob(b"n,,", b"auth=Basic dXNlcjpwYXNz"), MT, id="auth-basic"),
    pytest.param(ob(b"n,,", b"auth=Invalid x"), MT, id="auth-invalid-scheme"),
    pytest.param(ob(b"n,,", b"auth=Bearertok"), MT, id="auth-no-space"),
    pytest.param(ob(b"n,,", b"auth=Bearer\ttok"), MT, id="auth-bearer-tab"),
    pytest.param(ob(b"n,,", b"auth=Bearer  tok"), MT, id="auth-bearer-two-spaces"),
    pytest.param(ob(b"n,,", b"auth= Bearer tok"), MT, id="auth-leading-space"),
    pytest.param(ob(b"n,,", b"auth=Bearer tok en"), MT, id="token-space"),
    pytest.param(ob(b"n,,", b"auth=Bearer tok "), MT, id="token-trailing-space"),
    pytest.param(ob(b"n,,", b"auth=Bearer tok\r\n"), MT, id="token-crlf"),
    pytest.param(ob(b"n,,", b"auth=Bearer tok\nx"), MT, id="token-lf"),
    pytest.param(ob(b"n,,", b"auth=Bearer tok\rx"), MT, id="token-cr"),
    pytest.param(ob(b"n,,", b"auth=Bearer tok\tx"), MT, id="token-tab"),
    pytest.param(ob(b"n,,", b"auth=Bearer tok\x00"), M, id="token-nul-breaks-kv-grammar"),
    pytest.param(ob(b"n,,", b"auth=Bearer t\xc3\xa9"), M, id="token-8bit-breaks-kv-grammar"),
    pytest.param(ob(b"n,,", b"auth=Bearer "), NT, id="token-empty"),
    pytest.param(ob(b"n,,", b"auth=Bearer"), NT, id="auth-scheme-only"),
    pytest.param(ob(b"n,a=user@example.com,", b"auth="), NT, id="rfc7628-4.3-empty-auth"),
    pytest.param(ob(b"n,,", b"host=h", b"port=1"), NT, id="no-auth-key"),
    pytest.param(ob(b"n,a=u,"), NT, id="no-pairs-at-all"),
]


@pytest.mark.parametrize(("message", "reason"), OAUTHBEARER_REJECT)
def test_oauthbearer_rejects(message: bytes, reason: Reason) -> None:
    result = decode_oauthbearer(message)
    assert isinstance(result, Refusal)
    assert result.reason is reason
    assert result.detail
    assert SECRET not in result.detail


def test_oauthbearer_abort_detail() -> None:
    assert decode_oauthbearer(b"\x01") == Refusal(Reason.CANCELLED, "client aborted")


def test_oauthbearer_header_authzid_wins_over_user_pair() -> None:
    result = decode_oauthbearer(ob(b"n,a=alice,", b"user=mallory", AUTH))
    assert result == creds(authzid="alice")


def test_oauthbearer_one_mib_token_is_decoded() -> None:
    token = "a" * MiB
    result = decode_oauthbearer(ob(b"n,,", b"auth=Bearer " + token.encode()))
    assert isinstance(result, Credentials)
    assert result.token == token


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(b"n,,\x01" + b"a=\x01" * (MiB // 3) + b"\x01", id="many-pairs"),
        pytest.param(b"n,,\x01" + b"x" * MiB, id="one-unterminated-pair"),
        pytest.param(b"n," + b"a" * MiB, id="unterminated-header"),
        pytest.param(b"\x01" * MiB, id="all-kvsep"),
        pytest.param(b"=" * MiB, id="all-equals"),
    ],
)
def test_oauthbearer_one_mib_garbage_is_refused(message: bytes) -> None:
    result = decode_oauthbearer(message)
    assert isinstance(result, Refusal)


def test_oauthbearer_many_unknown_pairs_without_auth() -> None:
    message = b"n,,\x01" + b"a=\x01" * (MiB // 3) + b"\x01"
    assert decode_oauthbearer(message) == Refusal(Reason.MISSING_TOKEN, "no auth key")


# --------------------------------------------------------------------------- XOAUTH2

DOVECOT_XOAUTH2_TOKEN = "vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg=="

XOAUTH2_ACCEPT = [
    pytest.param(
        b"user=testuser\x01auth=Bearer " + DOVECOT_XOAUTH2_TOKEN.encode() + b"\x01\x01",
        creds(DOVECOT_XOAUTH2_TOKEN, "testuser"),
        id="dovecot-accept",
    ),
    pytest.param(
        b"user=someuser@example.com\x01auth=Bearer "
        b"ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01",
        creds("ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg", "someuser@example.com"),
        id="google-example",
    ),
    pytest.param(b"auth=Bearer t\x01user=u\x01\x01", creds("t", "u"), id="reordered"),
    pytest.param(b"user=u\x01host=x y\x01auth=Bearer t\x01\x01", creds("t", "u"), id="unknown"),
    pytest.param(b"user=u\x01Auth=x\x01auth=Bearer t\x01\x01", creds("t", "u"), id="key-case"),
    pytest.param(b"user=u\x01auth=bearer t\x01\x01", creds("t", "u"), id="scheme-lower"),
    pytest.param(b"user=a=b\x01auth=Bearer t\x01\x01", creds("t", "a=b"), id="user-with-equals"),
    pytest.param(
        b"user=j\xc3\xbcrgen@example.org\x01auth=Bearer t==\x01\x01",
        creds("t==", "jürgen@example.org"),
        id="utf8-user-padded-token",
    ),
]


@pytest.mark.parametrize(("message", "expected"), XOAUTH2_ACCEPT)
def test_xoauth2_accepts(message: bytes, expected: Credentials) -> None:
    result = decode_xoauth2(message)
    assert result == expected
    assert isinstance(result, Credentials)
    assert result.token == expected.token


MA = Reason.MISSING_AUTHZID
XAUTH = b"auth=Bearer " + SECRET.encode() + b"\x01\x01"

XOAUTH2_REJECT = [
    pytest.param(b"", M, id="empty"),
    pytest.param(b"\x01", M, id="kvsep"),
    pytest.param(b"\x01\x01", M, id="two-kvsep"),
    pytest.param(b"garbage", M, id="garbage"),
    pytest.param(b"testuser\x01" + XAUTH, M, id="dovecot-no-user-key"),
    pytest.param(b"user=u\x01auth=Bearer t\x01", M, id="missing-final-kvsep"),
    pytest.param(b"user=u\x01auth=Bearer t", M, id="no-kvsep"),
    pytest.param(b"user=u\x01" + XAUTH + b"x", M, id="trailing-byte"),
    pytest.param(b"user=u\x01" + XAUTH + b"\x01", M, id="trailing-kvsep"),
    pytest.param(b"user=u\x01\x01" + XAUTH, M, id="empty-field"),
    pytest.param(b"=x\x01user=u\x01" + XAUTH, M, id="empty-key"),
    pytest.param(b"user=a\x01user=b\x01" + XAUTH, M, id="duplicate-user"),
    pytest.param(b"user=a\x01auth=Bearer x\x01" + XAUTH, M, id="duplicate-auth"),
    pytest.param(b"user=v@x\tuser=admin\x01" + XAUTH, M, id="user-tab-injection"),
    pytest.param(b"user=v@x\n\x01" + XAUTH, M, id="user-lf"),
    pytest.param(b"user=v@x\r\x01" + XAUTH, M, id="user-cr"),
    pytest.param(b"user=v\x00x\x01" + XAUTH, M, id="user-nul"),
    pytest.param(b"user=v\x7f\x01" + XAUTH, M, id="user-del"),
    pytest.param(b"user=\xff\x01" + XAUTH, M, id="user-bad-utf8"),
    pytest.param(XAUTH, MA, id="no-user"),
    pytest.param(b"user=\x01" + XAUTH, MA, id="empty-user"),
    pytest.param(b"User=u\x01" + XAUTH, MA, id="user-key-case-sensitive"),
    pytest.param(b"a=u\x01" + XAUTH, MA, id="gs2-style-authzid-not-user"),
    pytest.param(b"user=testuser\x01auth=token\x01\x01", MT, id="dovecot-auth-no-bearer"),
    pytest.param(b"user=u\x01auth=Bearer\ttok\x01\x01", MT, id="bearer-tab"),
    pytest.param(b"user=u\x01auth=Bearer  tok\x01\x01", MT, id="bearer-two-spaces"),
    pytest.param(b"user=u\x01auth=Bearer to k\x01\x01", MT, id="token-space"),
    pytest.param(b"user=u\x01auth=Bearer tok\r\n\x01\x01", MT, id="token-crlf"),
    pytest.param(b"user=u\x01auth=Bearer tok\x00\x01\x01", MT, id="token-nul"),
    pytest.param(b"user=u\x01auth=Bearer t\xc3\xa9\x01\x01", MT, id="token-8bit"),
    pytest.param(b"user=u\x01auth=Bearer \x01\x01", NT, id="token-empty"),
    pytest.param(b"user=u\x01auth=\x01\x01", NT, id="auth-empty"),
    pytest.param(b"user=u\x01\x01", NT, id="no-auth"),
    pytest.param(b"user=u\x01Auth=Bearer t\x01\x01", NT, id="auth-key-case-sensitive"),
]


@pytest.mark.parametrize(("message", "reason"), XOAUTH2_REJECT)
def test_xoauth2_rejects(message: bytes, reason: Reason) -> None:
    result = decode_xoauth2(message)
    assert isinstance(result, Refusal)
    assert result.reason is reason
    assert result.detail
    assert SECRET not in result.detail


def test_xoauth2_one_mib() -> None:
    assert isinstance(decode_xoauth2(b"\x01" * MiB), Refusal)
    assert isinstance(decode_xoauth2(b"x=\x01" * (MiB // 3) + b"\x01"), Refusal)
    big = decode_xoauth2(b"user=u\x01auth=Bearer " + b"t" * MiB + b"\x01\x01")
    assert isinstance(big, Credentials)
    assert len(big.token) == MiB


# --------------------------------------------------------------------------- PLAIN

PLAIN_ACCEPT = [
    pytest.param(b"\x00alice\x00" + SECRET.encode(), creds(authzid="alice"), id="no-authzid"),
    pytest.param(b"alice\x00alice\x00" + SECRET.encode(), creds(authzid="alice"), id="same"),
    pytest.param(
        b"\x00j\xc3\xbcrgen\x00" + SECRET.encode(), creds(authzid="jürgen"), id="utf8-authcid"
    ),
    pytest.param(b"\x00a\x00x==", creds("x==", "a"), id="padded-token"),
]


@pytest.mark.parametrize(("message", "expected"), PLAIN_ACCEPT)
def test_plain_accepts(message: bytes, expected: Credentials) -> None:
    result = decode_plain(message)
    assert result == expected
    assert isinstance(result, Credentials)
    assert result.token == expected.token


S = SECRET.encode()

PLAIN_REJECT = [
    pytest.param(b"", M, id="empty"),
    pytest.param(b"alice\x00" + S, M, id="one-nul"),
    pytest.param(b"a\x00b\x00c\x00" + S, M, id="three-nuls"),
    pytest.param(b"bob\x00alice\x00" + S, M, id="authzid-differs"),
    pytest.param(b"Alice\x00alice\x00" + S, M, id="authzid-differs-in-case"),
    pytest.param(b"ali\tce\x00ali\tce\x00" + S, M, id="authzid-tab"),
    pytest.param(b"\x00ali\tce\x00" + S, M, id="authcid-tab"),
    pytest.param(b"\x00v@x\nuser=admin\x00" + S, M, id="authcid-lf"),
    pytest.param(b"\x00\xff\x00" + S, M, id="authcid-bad-utf8"),
    pytest.param(b"\xff\x00a\x00" + S, M, id="authzid-bad-utf8"),
    pytest.param(b"\x00\x00" + S, MA, id="empty-authcid"),
    pytest.param(b"alice\x00\x00" + S, MA, id="authzid-without-authcid"),
    pytest.param(b"\x00alice\x00", NT, id="empty-password"),
    pytest.param(b"\x00alice\x00to ken", MT, id="password-space"),
    pytest.param(b"\x00alice\x00t\xc3\xa9", MT, id="password-8bit"),
    pytest.param(b"\x00alice\x00tok\r\n", MT, id="password-crlf"),
]


@pytest.mark.parametrize(("message", "reason"), PLAIN_REJECT)
def test_plain_rejects(message: bytes, reason: Reason) -> None:
    result = decode_plain(message)
    assert isinstance(result, Refusal)
    assert result.reason is reason
    assert SECRET not in result.detail


# --------------------------------------------------------------------------- failure JSON

REQUEST_SHAPED = {
    Reason.MALFORMED_SASL,
    Reason.MALFORMED_REQUEST,
    Reason.CHANNEL_BINDING_UNSUPPORTED,
    Reason.MISSING_AUTHZID,
    Reason.UNSUPPORTED_MECHANISM,
    Reason.INVALID_BASE64,
}


@pytest.mark.parametrize("reason", list(Reason), ids=str)
def test_oauth_status(reason: Reason) -> None:
    if reason in REQUEST_SHAPED:
        assert oauth_status(reason) == "invalid_request"
    elif reason is Reason.INSUFFICIENT_SCOPE:
        assert oauth_status(reason) == "insufficient_scope"
    else:
        assert oauth_status(reason) == "invalid_token"


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (Reason.MISSING_TOKEN, "invalid_token"),
        (Reason.MALFORMED_TOKEN, "invalid_token"),
        (Reason.EXPIRED, "invalid_token"),
        (Reason.AUTHZID_MISMATCH, "invalid_token"),
        (Reason.WRONG_AUDIENCE, "invalid_token"),
        (Reason.INSUFFICIENT_SCOPE, "insufficient_scope"),
        (Reason.MALFORMED_SASL, "invalid_request"),
        (Reason.MISSING_AUTHZID, "invalid_request"),
        (Reason.CHANNEL_BINDING_UNSUPPORTED, "invalid_request"),
        (Reason.INVALID_BASE64, "invalid_request"),
    ],
)
def test_oauth_status_spot_checks(reason: Reason, expected: str) -> None:
    assert oauth_status(reason) == expected


OIDC = "https://example.com/.well-known/openid-config"


@pytest.mark.parametrize(
    ("reason", "hint", "expected"),
    [
        pytest.param(
            Reason.EXPIRED,
            DiscoveryHint(openid_configuration=OIDC, scope="example_scope"),
            b'{"status":"invalid_token","scope":"example_scope",'
            b'"openid-configuration":"https://example.com/.well-known/openid-config"}',
            id="rfc7628-4.3",
        ),
        pytest.param(Reason.BAD_SIGNATURE, DiscoveryHint(), b'{"status":"invalid_token"}', id="no"),
        pytest.param(
            Reason.INSUFFICIENT_SCOPE,
            DiscoveryHint(scope="mail"),
            b'{"status":"insufficient_scope","scope":"mail"}',
            id="scope-only",
        ),
        pytest.param(
            Reason.MALFORMED_SASL,
            DiscoveryHint(openid_configuration=OIDC),
            b'{"status":"invalid_request",'
            b'"openid-configuration":"https://example.com/.well-known/openid-config"}',
            id="oidc-only",
        ),
        pytest.param(
            Reason.MISSING_TOKEN,
            DiscoveryHint(scope=""),
            b'{"status":"invalid_token","scope":""}',
            id="empty-scope-kept",
        ),
    ],
)
def test_oauthbearer_failure_bytes(reason: Reason, hint: DiscoveryHint, expected: bytes) -> None:
    assert oauthbearer_failure(reason, hint) == expected


@pytest.mark.parametrize(
    ("reason", "hint", "expected"),
    [
        pytest.param(
            Reason.EXPIRED,
            DiscoveryHint(openid_configuration=OIDC, scope="https://mail.google.com/"),
            b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}',
            id="401-scope-no-oidc-field",
        ),
        pytest.param(
            Reason.INSUFFICIENT_SCOPE,
            DiscoveryHint(scope="mail"),
            b'{"status":"403","schemes":"bearer","scope":"mail"}',
            id="403",
        ),
        pytest.param(
            Reason.MISSING_AUTHZID,
            DiscoveryHint(),
            b'{"status":"400","schemes":"bearer"}',
            id="400",
        ),
        pytest.param(
            Reason.MISSING_TOKEN, DiscoveryHint(), b'{"status":"401","schemes":"bearer"}', id="401"
        ),
    ],
)
def test_xoauth2_failure_bytes(reason: Reason, hint: DiscoveryHint, expected: bytes) -> None:
    assert xoauth2_failure(reason, hint) == expected


def test_failure_json_escapes_hint_values() -> None:
    hint = DiscoveryHint(openid_configuration='https://x/"}\n', scope='a"b\\c é')
    for body in (oauthbearer_failure(Reason.EXPIRED, hint), xoauth2_failure(Reason.EXPIRED, hint)):
        body.decode("ascii")
        assert b"\n" not in body
        assert json.loads(body)["scope"] == 'a"b\\c é'
    assert json.loads(oauthbearer_failure(Reason.EXPIRED, hint))["openid-configuration"] == (
        'https://x/"}\n'
    )


# --------------------------------------------------------------------------- exchanges

OB_MSG = b"n,a=alice@example.org,\x01host=mail.example.org\x01port=993\x01" + AUTH + b"\x01\x01"
OB_CREDS = creds(authzid="alice@example.org", host="mail.example.org", port=993)
X_MSG = b"user=alice@example.org\x01" + XAUTH
X_CREDS = creds(authzid="alice@example.org")
P_MSG = b"\x00alice@example.org\x00" + S
P_CREDS = creds(authzid="alice@example.org")
GOOD = {
    Mechanism.OAUTHBEARER: (OB_MSG, OB_CREDS),
    Mechanism.XOAUTH2: (X_MSG, X_CREDS),
    Mechanism.PLAIN: (P_MSG, P_CREDS),
}
OK = Verdict(reason=Reason.OK, account="alice")
HINT = DiscoveryHint(openid_configuration=OIDC, scope="mail")
UNEXPECTED = Failed(Verdict(reason=Reason.MALFORMED_REQUEST, detail="unexpected continuation"))


def login(ex: SaslExchange, initial: bool = False) -> None:
    if initial:
        assert ex.start(b"alice@example.org") == Challenge(b"Password:")
    else:
        assert ex.start(None) == Challenge(b"Username:")
        assert ex.receive(b"alice@example.org") == Challenge(b"Password:")
    assert ex.receive(S) == Authenticate(P_CREDS)


def authenticate(mech: Mechanism, initial: bool) -> SaslExchange:
    ex = SaslExchange(mech)
    if mech is Mechanism.LOGIN:
        login(ex, initial)
        return ex
    message, expected = GOOD[mech]
    if initial:
        step = ex.start(message)
    else:
        assert ex.start(None) == Challenge(b"")
        assert not ex.done
        step = ex.receive(message)
    assert step == Authenticate(expected)
    assert isinstance(step, Authenticate)
    assert step.credentials.token == SECRET
    assert not ex.done
    return ex


@pytest.mark.parametrize("initial", [True, False], ids=["initial-response", "challenge-first"])
@pytest.mark.parametrize("mech", list(SASL_MECHANISMS), ids=str)
def test_exchange_success(mech: Mechanism, initial: bool) -> None:
    ex = authenticate(mech, initial)
    assert ex.conclude(OK) == Succeeded("alice")
    assert ex.done


@pytest.mark.parametrize(
    "account", [None, "", "al\tice", "alice\n", "a\x00"], ids=["none", "empty", "tab", "lf", "nul"]
)
@pytest.mark.parametrize("mech", list(SASL_MECHANISMS), ids=str)
def test_exchange_ok_without_usable_account_is_internal_error(
    mech: Mechanism, account: str | None
) -> None:
    ex = authenticate(mech, True)
    step = ex.conclude(Verdict(reason=Reason.OK, account=account))
    assert isinstance(step, Failed)
    assert step.verdict.reason is Reason.INTERNAL_ERROR
    assert ex.done


OB_FAILURE = (
    b'{"status":"invalid_token","scope":"mail",'
    b'"openid-configuration":"https://example.com/.well-known/openid-config"}'
)


@pytest.mark.parametrize(
    "ack", [b"\x01", b"", b"garbage", b"\x01\x01", b"n,,\x01" + AUTH + b"\x01\x01"]
)
@pytest.mark.parametrize(
    ("mech", "reason", "challenge"),
    [
        (Mechanism.OAUTHBEARER, Reason.EXPIRED, OB_FAILURE),
        (Mechanism.OAUTHBEARER, Reason.AUTHZID_MISMATCH, OB_FAILURE),
        (
            Mechanism.OAUTHBEARER,
            Reason.INSUFFICIENT_SCOPE,
            OB_FAILURE.replace(b"invalid_token", b"insufficient_scope"),
        ),
        (
            Mechanism.XOAUTH2,
            Reason.BAD_SIGNATURE,
            b'{"status":"401","schemes":"bearer","scope":"mail"}',
        ),
        (
            Mechanism.XOAUTH2,
            Reason.INSUFFICIENT_SCOPE,
            b'{"status":"403","schemes":"bearer","scope":"mail"}',
        ),
    ],
)
def test_exchange_token_refused_dialogue(
    mech: Mechanism, reason: Reason, challenge: bytes, ack: bytes
) -> None:
    ex = authenticate(mech, True)
    verdict = Verdict(reason=reason, detail="refused", hint=HINT, rule="r1")
    assert ex.conclude(verdict) == Challenge(challenge)
    assert not ex.done
    assert ex.receive(ack) == Failed(verdict)
    assert ex.done


@pytest.mark.parametrize(
    "reason", [Reason.PROVIDER_UNAVAILABLE, Reason.TIMEOUT, Reason.INTERNAL_ERROR]
)
@pytest.mark.parametrize("mech", list(SASL_MECHANISMS), ids=str)
def test_exchange_tempfail_fails_at_once(mech: Mechanism, reason: Reason) -> None:
    ex = authenticate(mech, False)
    verdict = Verdict(reason=reason, detail="idp down", hint=HINT)
    assert ex.conclude(verdict) == Failed(verdict)
    assert ex.done


@pytest.mark.parametrize("mech", [Mechanism.PLAIN, Mechanism.LOGIN], ids=str)
def test_exchange_password_mechs_refuse_without_json(mech: Mechanism) -> None:
    ex = authenticate(mech, False)
    verdict = Verdict(reason=Reason.EXPIRED, hint=HINT)
    assert ex.conclude(verdict) == Failed(verdict)
    assert ex.done


@pytest.mark.parametrize(
    ("mech", "message", "challenge", "reason"),
    [
        (
            Mechanism.OAUTHBEARER,
            b"n,a=user,\x01" + AUTH + b"\x01",
            b'{"status":"invalid_request"}',
            Reason.MALFORMED_SASL,
        ),
        (
            Mechanism.OAUTHBEARER,
            ob(b"p=tls-unique,,", AUTH),
            b'{"status":"invalid_request"}',
            Reason.CHANNEL_BINDING_UNSUPPORTED,
        ),
        (
            Mechanism.OAUTHBEARER,
            ob(b"n,a=user@example.com,", b"auth="),
            b'{"status":"invalid_token"}',
            Reason.MISSING_TOKEN,
        ),
        (
            Mechanism.OAUTHBEARER,
            ob(b"n,,", b"auth=token"),
            b'{"status":"invalid_token"}',
            Reason.MALFORMED_TOKEN,
        ),
        (Mechanism.OAUTHBEARER, b"", b'{"status":"invalid_request"}', Reason.MALFORMED_SASL),
        (
            Mechanism.XOAUTH2,
            b"testuser\x01" + XAUTH,
            b'{"status":"400","schemes":"bearer"}',
            Reason.MALFORMED_SASL,
        ),
        (Mechanism.XOAUTH2, XAUTH, b'{"status":"400","schemes":"bearer"}', Reason.MISSING_AUTHZID),
        (
            Mechanism.XOAUTH2,
            b"user=u\x01auth=token\x01\x01",
            b'{"status":"401","schemes":"bearer"}',
            Reason.MALFORMED_TOKEN,
        ),
        (Mechanism.XOAUTH2, b"\x01", b'{"status":"400","schemes":"bearer"}', Reason.MALFORMED_SASL),
    ],
)
@pytest.mark.parametrize("initial", [True, False], ids=["initial-response", "challenge-first"])
def test_exchange_decode_failure_dialogue(
    mech: Mechanism, message: bytes, challenge: bytes, reason: Reason, initial: bool
) -> None:
    ex = SaslExchange(mech)
    if initial:
        step = ex.start(message)
    else:
        assert ex.start(None) == Challenge(b"")
        step = ex.receive(message)
    assert step == Challenge(challenge)
    assert not ex.done
    final = ex.receive(b"\x01" if mech is Mechanism.OAUTHBEARER else b"")
    assert isinstance(final, Failed)
    assert final.verdict.reason is reason
    assert final.verdict.detail
    assert SECRET not in final.verdict.detail
    assert final.verdict.account is None
    assert ex.done


@pytest.mark.parametrize("initial", [True, False], ids=["initial-response", "challenge-first"])
def test_exchange_oauthbearer_abort(initial: bool) -> None:
    ex = SaslExchange(Mechanism.OAUTHBEARER)
    if not initial:
        assert ex.start(None) == Challenge(b"")
    step = ex.start(b"\x01") if initial else ex.receive(b"\x01")
    assert step == Failed(Verdict(reason=Reason.CANCELLED, detail="client aborted"))
    assert ex.done


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"", Reason.MALFORMED_SASL),
        (b"alice\x00" + S, Reason.MALFORMED_SASL),
        (b"bob\x00alice\x00" + S, Reason.MALFORMED_SASL),
        (b"\x00\x00" + S, Reason.MISSING_AUTHZID),
        (b"\x00alice\x00", Reason.MISSING_TOKEN),
        (b"\x01", Reason.MALFORMED_SASL),
    ],
)
def test_exchange_plain_decode_failure_fails_at_once(message: bytes, reason: Reason) -> None:
    ex = SaslExchange(Mechanism.PLAIN)
    assert ex.start(None) == Challenge(b"")
    step = ex.receive(message)
    assert isinstance(step, Failed)
    assert step.verdict.reason is reason
    assert ex.done


@pytest.mark.parametrize(
    ("user", "password", "reason"),
    [
        (b"", S, Reason.MISSING_AUTHZID),
        (b"al\tice", S, Reason.MALFORMED_SASL),
        (b"v@x\nuser=admin", S, Reason.MALFORMED_SASL),
        (b"\xff", S, Reason.MALFORMED_SASL),
        (b"alice", b"", Reason.MISSING_TOKEN),
        (b"alice", b"to ken", Reason.MALFORMED_TOKEN),
    ],
)
@pytest.mark.parametrize("initial", [True, False], ids=["initial-response", "challenge-first"])
def test_exchange_login_failures(
    user: bytes, password: bytes, reason: Reason, initial: bool
) -> None:
    ex = SaslExchange(Mechanism.LOGIN)
    if initial:
        step = ex.start(user)
    else:
        assert ex.start(None) == Challenge(b"Username:")
        step = ex.receive(user)
    if step == Challenge(b"Password:"):
        step = ex.receive(password)
    assert isinstance(step, Failed)
    assert step.verdict.reason is reason
    assert ex.done


@pytest.mark.parametrize("mech", list(SASL_MECHANISMS), ids=str)
def test_exchange_message_over_limit(mech: Mechanism) -> None:
    ex = SaslExchange(mech)
    message = b"n,,\x01" + b"auth=Bearer " + b"t" * MiB + b"\x01\x01"
    step = ex.start(message)
    if mech is Mechanism.OAUTHBEARER:
        assert step == Challenge(b'{"status":"invalid_request"}')
        step = ex.receive(b"\x01")
    elif mech is Mechanism.XOAUTH2:
        assert step == Challenge(b'{"status":"400","schemes":"bearer"}')
        step = ex.receive(b"")
    assert isinstance(step, Failed)
    assert step.verdict.reason is Reason.MALFORMED_SASL
    assert "exceeds" in step.verdict.detail
    assert ex.done


def test_exchange_limit_is_inclusive() -> None:
    message = ob(b"n,,", AUTH)
    ex = SaslExchange(Mechanism.OAUTHBEARER, max_message_bytes=len(message))
    assert ex.start(message) == Authenticate(creds())
    ex = SaslExchange(Mechanism.OAUTHBEARER, max_message_bytes=len(message) - 1)
    assert ex.start(message) == Challenge(b'{"status":"invalid_request"}')


def test_exchange_limit_checked_before_abort_form() -> None:
    ex = SaslExchange(Mechanism.OAUTHBEARER, max_message_bytes=0)
    assert ex.start(b"\x01") == Challenge(b'{"status":"invalid_request"}')


@pytest.mark.parametrize("stage", ["user", "password"])
def test_exchange_login_over_limit(stage: str) -> None:
    ex = SaslExchange(Mechanism.LOGIN, max_message_bytes=8)
    if stage == "user":
        step = ex.start(b"a" * 9)
    else:
        assert ex.start(b"alice") == Challenge(b"Password:")
        step = ex.receive(b"t" * 9)
    assert isinstance(step, Failed)
    assert step.verdict.reason is Reason.MALFORMED_SASL


# --------------------------------------------------------------------------- out of order


def _fresh(mech: Mechanism) -> SaslExchange:
    return SaslExchange(mech)


def _awaiting_message(mech: Mechanism) -> SaslExchange:
    ex = SaslExchange(mech)
    ex.start(None)
    return ex


def _awaiting_verdict(mech: Mechanism) -> SaslExchange:
    return authenticate(mech, True)


def _awaiting_ack(mech: Mechanism) -> SaslExchange:
    ex = authenticate(mech, True)
    assert isinstance(ex.conclude(Verdict(reason=Reason.EXPIRED)), Challenge)
    return ex


def _succeeded(mech: Mechanism) -> SaslExchange:
    ex = authenticate(mech, True)
    assert ex.conclude(OK) == Succeeded("alice")
    return ex


def _failed(mech: Mechanism) -> SaslExchange:
    ex = authenticate(mech, True)
    assert isinstance(ex.conclude(Verdict(reason=Reason.TIMEOUT)), Failed)
    return ex


CALLS: dict[str, Callable[[SaslExchange], object]] = {
    "start-none": lambda ex: ex.start(None),
    "start-msg": lambda ex: ex.start(OB_MSG),
    "receive": lambda ex: ex.receive(b"\x01"),
    "conclude-ok": lambda ex: ex.conclude(OK),
    "conclude-fail": lambda ex: ex.conclude(Verdict(reason=Reason.EXPIRED)),
}

OUT_OF_ORDER = [
    (_fresh, "receive"),
    (_fresh, "conclude-ok"),
    (_fresh, "conclude-fail"),
    (_awaiting_message, "start-none"),
    (_awaiting_message, "start-msg"),
    (_awaiting_message, "conclude-ok"),
    (_awaiting_verdict, "start-none"),
    (_awaiting_verdict, "start-msg"),
    (_awaiting_verdict, "receive"),
    (_succeeded, "start-none"),
    (_succeeded, "receive"),
    (_succeeded, "conclude-ok"),
    (_failed, "start-msg"),
    (_failed, "receive"),
    (_failed, "conclude-fail"),
]


@pytest.mark.parametrize(
    ("setup", "call"), OUT_OF_ORDER, ids=[f"{s.__name__[1:]}-{c}" for s, c in OUT_OF_ORDER]
)
@pytest.mark.parametrize("mech", list(SASL_MECHANISMS), ids=str)
def test_exchange_out_of_order(
    mech: Mechanism, setup: Callable[[Mechanism], SaslExchange], call: str
) -> None:
    ex = setup(mech)
    assert CALLS[call](ex) == UNEXPECTED
    assert ex.done
    for again in CALLS.values():
        assert again(ex) == UNEXPECTED
        assert ex.done


@pytest.mark.parametrize("mech", [Mechanism.OAUTHBEARER, Mechanism.XOAUTH2], ids=str)
@pytest.mark.parametrize("call", ["start-none", "conclude-ok", "conclude-fail"])
def test_exchange_out_of_order_while_awaiting_failure_ack(mech: Mechanism, call: str) -> None:
    ex = _awaiting_ack(mech)
    assert CALLS[call](ex) == UNEXPECTED
    assert ex.done


def test_exchange_login_out_of_order_between_prompts() -> None:
    ex = SaslExchange(Mechanism.LOGIN)
    assert ex.start(None) == Challenge(b"Username:")
    assert ex.conclude(OK) == UNEXPECTED
    ex = SaslExchange(Mechanism.LOGIN)
    assert ex.start(b"alice") == Challenge(b"Password:")
    assert ex.start(b"alice") == UNEXPECTED


def test_request_and_verdict_values_behave_as_frozen_dataclasses() -> None:
    import dataclasses

    from saslauthd_oidc.core.outcome import NO_HINT, RuleTrace
    from saslauthd_oidc.core.request import NO_CONTEXT, AuthRequest, RequestContext

    values: list[Any] = [
        Credentials("secret-token", "alice", "imap.example.org", 993),
        AuthRequest(Mechanism.XOAUTH2, Credentials("t"), RequestContext(service="smtp"), False),
        RuleTrace("r", True, Reason.OK, "d"),
        Verdict(Reason.OK, "alice", "r", "p", "d", DiscoveryHint(scope="s"), (), {"a": 1}),
    ]
    for value in values:
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        assert type(value)(**fields) == value
        assert dataclasses.replace(value) == value
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, dataclasses.fields(value)[0].name, None)
    assert hash(values[0]) == hash(Credentials("secret-token", "alice", "imap.example.org", 993))
    assert "secret-token" not in repr(values[0]) and "secret-token" not in repr(
        AuthRequest(Mechanism.OAUTHBEARER, values[0])
    )
    assert Credentials("t") == Credentials("t", None, None, None)
    assert AuthRequest(Mechanism.PLAIN, Credentials("t")).context is NO_CONTEXT == RequestContext()
    assert AuthRequest(Mechanism.PLAIN, Credentials("t")).negotiated is True
    plain = Verdict(Reason.BAD_SIGNATURE)
    assert plain.hint is NO_HINT == DiscoveryHint()
    assert (plain.account, plain.detail, plain.trace, plain.claims) == (None, "", (), None)
    assert RuleTrace("r", False, Reason.NO_RULE_FOR_CONTEXT).detail == ""
