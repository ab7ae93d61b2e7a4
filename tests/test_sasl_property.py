"""Property tests for saslauthd_oidc.protocol.sasl: no input makes it raise, and encodings
round-trip."""

from __future__ import annotations

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

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
)

DECODERS = (decode_oauthbearer, decode_xoauth2, decode_plain)

# Fragments that reach deep into the parsers far more often than uniform bytes do.
FRAGMENTS = st.sampled_from(
    [
        b"n",
        b"y",
        b"F",
        b"p=",
        b",",
        b"a=",
        b"user=",
        b"auth=",
        b"host=",
        b"port=",
        b"Bearer ",
        b"bearer",
        b"=2C",
        b"=3D",
        b"=",
        b"\x01",
        b"\x00",
        b"\t",
        b" ",
        b"143",
        b"0",
        b"tok",
        b"\xc3\xa9",
        b"\xff",
    ]
)
PARSER_INPUT = st.one_of(st.binary(max_size=200), st.lists(FRAGMENTS, max_size=30).map(b"".join))


def assert_sane(result: Credentials | Refusal) -> None:
    assert isinstance(result, Credentials | Refusal)
    if isinstance(result, Refusal):
        assert isinstance(result.reason, Reason)
        assert result.reason is not Reason.OK
        assert result.detail
        return
    assert result.token
    assert all(0x21 <= ord(ch) <= 0x7E for ch in result.token)
    if result.authzid is not None:
        assert result.authzid
        assert not any(unicodedata.category(ch) == "Cc" for ch in result.authzid)
    if result.port is not None:
        assert 1 <= result.port <= 65535


@settings(max_examples=1000)
@given(PARSER_INPUT)
def test_decoders_never_raise(data: bytes) -> None:
    for decode in DECODERS:
        assert_sane(decode(data))


VERDICTS = st.one_of(
    st.builds(Verdict, reason=st.sampled_from(list(Reason)), account=st.none() | st.text()),
    st.just(Verdict(reason=Reason.OK, account="alice")),
)
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("start"), st.none() | PARSER_INPUT),
        st.tuples(st.just("receive"), PARSER_INPUT),
        st.tuples(st.just("conclude"), VERDICTS),
    ),
    max_size=8,
)


@settings(max_examples=500)
@given(st.sampled_from(list(SASL_MECHANISMS)), st.integers(0, 300), OPERATIONS)
def test_exchange_never_raises(
    mech: Mechanism, limit: int, operations: list[tuple[str, object]]
) -> None:
    ex = SaslExchange(mech, max_message_bytes=limit)
    finished = False
    for name, arg in operations:
        if name == "start":
            assert arg is None or isinstance(arg, bytes)
            step = ex.start(arg)
        elif name == "receive":
            assert isinstance(arg, bytes)
            step = ex.receive(arg)
        else:
            assert isinstance(arg, Verdict)
            step = ex.conclude(arg)
        assert isinstance(step, Challenge | Authenticate | Succeeded | Failed)
        if finished:
            assert step == Failed(
                Verdict(reason=Reason.MALFORMED_REQUEST, detail="unexpected continuation")
            )
        if isinstance(step, Succeeded):
            assert step.account
            assert isinstance(arg, Verdict)
            assert arg.ok
        if isinstance(step, Failed):
            assert not step.verdict.ok
        if isinstance(step, Authenticate):
            assert_sane(step.credentials)
        assert ex.done == isinstance(step, Succeeded | Failed)
        finished = ex.done


AUTHZIDS = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")) | st.sampled_from(",=@"),
    min_size=1,
    max_size=40,
)
PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)


def escape_saslname(name: str) -> bytes:
    return name.replace("=", "=3D").replace(",", "=2C").encode("utf-8")


@given(
    cbflag=st.sampled_from([b"n", b"y"]),
    authzid=st.none() | AUTHZIDS,
    host=st.none() | PRINTABLE,
    port=st.none() | st.integers(1, 65535),
    token=PRINTABLE,
    scheme=st.sampled_from([b"Bearer", b"bearer", b"BEARER"]),
    extra=st.lists(
        st.tuples(
            st.sampled_from([b"mthd", b"path", b"qs", b"user", b"xyz"]),
            st.binary().map(lambda b: bytes(c for c in b if 0x20 <= c <= 0x7E)),
        ),
        max_size=3,
    ),
)
def test_oauthbearer_round_trip(
    cbflag: bytes,
    authzid: str | None,
    host: str | None,
    port: int | None,
    token: str,
    scheme: bytes,
    extra: list[tuple[bytes, bytes]],
) -> None:
    header = cbflag + b"," + (b"a=" + escape_saslname(authzid) if authzid else b"") + b","
    pairs = [key + b"=" + value for key, value in extra]
    if host is not None:
        pairs.append(b"host=" + host.encode())
    if port is not None:
        pairs.append(b"port=" + str(port).encode())
    pairs.append(b"auth=" + scheme + b" " + token.encode())
    message = header + b"\x01" + b"".join(p + b"\x01" for p in pairs) + b"\x01"
    result = decode_oauthbearer(message)
    assert result == Credentials(token=token, authzid=authzid, host=host, port=port)
    assert isinstance(result, Credentials)
    assert result.token == token


@given(user=AUTHZIDS, token=PRINTABLE, auth_first=st.booleans())
def test_xoauth2_round_trip(user: str, token: str, auth_first: bool) -> None:
    fields = [b"user=" + user.encode(), b"auth=Bearer " + token.encode()]
    if auth_first:
        fields.reverse()
    result = decode_xoauth2(b"\x01".join(fields) + b"\x01\x01")
    assert result == Credentials(token=token, authzid=user)
    assert isinstance(result, Credentials)
    assert result.token == token


@given(user=AUTHZIDS, token=PRINTABLE, repeat=st.booleans())
def test_plain_round_trip(user: str, token: str, repeat: bool) -> None:
    authzid = user.encode() if repeat else b""
    result = decode_plain(authzid + b"\x00" + user.encode() + b"\x00" + token.encode())
    assert result == Credentials(token=token, authzid=user)
    assert isinstance(result, Credentials)
    assert result.token == token


@given(
    mech=st.sampled_from([Mechanism.OAUTHBEARER, Mechanism.XOAUTH2]),
    scope=st.none() | st.text(),
    oidc=st.none() | st.text(),
    reason=st.sampled_from([r for r in Reason if r.outcome.value == "fail"]),
    ack=st.binary(max_size=20),
)
def test_token_mechanism_refusal_keeps_engine_verdict(
    mech: Mechanism, scope: str | None, oidc: str | None, reason: Reason, ack: bytes
) -> None:
    message = (
        b"n,,\x01auth=Bearer t\x01\x01"
        if mech is Mechanism.OAUTHBEARER
        else b"user=u\x01auth=Bearer t\x01\x01"
    )
    ex = SaslExchange(mech)
    assert isinstance(ex.start(message), Authenticate)
    verdict = Verdict(reason=reason, hint=DiscoveryHint(openid_configuration=oidc, scope=scope))
    challenge = ex.conclude(verdict)
    assert isinstance(challenge, Challenge)
    challenge.data.decode("ascii")
    assert ex.receive(ack) == Failed(verdict)
