"""The sans-I/O saslauthd mux protocol: framing, both request variants, limits, replies."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saslauthd_oidc.core.outcome import Outcome, Reason, Verdict
from saslauthd_oidc.core.request import Mechanism
from saslauthd_oidc.protocol.saslauthd import (
    MAX_FIELD_BYTES,
    NeedData,
    Rejected,
    Request,
    SaslauthdServerConnection,
    account_name,
    encode_reply,
    reply_text,
)

TOKEN = b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"


def counted(*fields: bytes) -> bytes:
    return b"".join(struct.pack("!H", len(f)) + f for f in fields)


def feed(data: bytes, *, eof: bool = False, **kw: int) -> NeedData | Request | Rejected:
    conn = SaslauthdServerConnection(**kw)
    event = conn.receive_data(data)
    if eof and isinstance(event, NeedData):
        event = conn.receive_data(b"")
    return event


def test_four_field_request_as_the_reference_example() -> None:
    # reference §5: 00 05 'alice' 00 0a 'good-token' 00 04 'smtp' 00 00
    event = feed(b"\x00\x05alice\x00\x0agood-token\x00\x04smtp\x00\x00")
    assert isinstance(event, Request)
    assert event.fields == 4
    req = event.request
    assert req.mechanism is Mechanism.PLAIN
    assert req.credentials.token == "good-token"
    assert req.credentials.authzid == "alice"
    assert req.context.frontend == "saslauthd"
    assert req.context.service == "smtp"
    assert req.context.remote_ip is None
    assert req.negotiated is False  # login + token as password: no mechanism negotiated


def test_five_field_request_carries_the_client_address() -> None:
    event = feed(counted(b"alice", TOKEN, b"IMAP", b"example.org", b"192.0.2.7;51234"))
    assert isinstance(event, Request)
    assert event.fields == 5
    assert event.request.credentials.authzid == "alice@example.org"
    assert event.request.context.service == "imap"
    assert event.request.context.remote_ip == "192.0.2.7"
    assert event.request.context.remote_port == 51234


@pytest.mark.parametrize(
    ("addr", "ip", "port"),
    [
        (b"2001:db8::1;25", "2001:db8::1", 25),
        (b"[2001:db8::1];25", "2001:db8::1", 25),
        (b"192.0.2.1", "192.0.2.1", None),
        (b"", None, None),
        (b"not-an-ip;x", None, None),
        (b"192.0.2.1;70000", "192.0.2.1", None),
    ],
)
def test_client_address_forms(addr: bytes, ip: str | None, port: int | None) -> None:
    event = feed(counted(b"alice", TOKEN, b"smtp", b"", addr))
    assert isinstance(event, Request)
    assert (event.request.context.remote_ip, event.request.context.remote_port) == (ip, port)


@pytest.mark.parametrize(
    ("login", "realm", "account"),
    [
        ("alice", "", "alice"),
        ("alice", "example.org", "alice@example.org"),
        ("alice@example.org", "", "alice@example.org"),
        ("alice@example.org", "other.example", "alice@example.org"),
    ],
)
def test_account_name_from_login_and_realm(login: str, realm: str, account: str) -> None:
    assert account_name(login, realm) == account
    event = feed(counted(login.encode(), TOKEN, b"smtp", realm.encode()))
    assert isinstance(event, Request)
    assert event.request.credentials.authzid == account


def test_byte_by_byte_needs_data_until_the_fourth_field_is_complete() -> None:
    data = counted(b"alice", TOKEN, b"smtp", b"example.org")
    conn = SaslauthdServerConnection()
    for i, byte in enumerate(data):
        event = conn.receive_data(bytes([byte]))
        if i < len(data) - 1:
            assert isinstance(event, NeedData), i
    assert isinstance(event, Request)
    assert event.fields == 4


def test_fifth_field_split_across_reads_is_awaited() -> None:
    data = counted(b"alice", TOKEN, b"smtp", b"", b"192.0.2.7;25")
    conn = SaslauthdServerConnection()
    assert isinstance(conn.receive_data(data[:-3]), NeedData)
    event = conn.receive_data(data[-3:])
    assert isinstance(event, Request)
    assert event.fields == 5
    assert event.request.context.remote_ip == "192.0.2.7"


def test_event_is_final() -> None:
    conn = SaslauthdServerConnection()
    first = conn.receive_data(counted(b"alice", TOKEN, b"smtp", b""))
    assert isinstance(first, Request)
    assert conn.receive_data(b"\x00\x01x") is first
    assert conn.buffered_bytes == 0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (counted(b"", TOKEN, b"smtp", b""), Reason.MISSING_AUTHZID),
        (counted(b"alice", b"", b"smtp", b""), Reason.MISSING_TOKEN),
        (counted(b"alice", b"tok en", b"smtp", b""), Reason.MALFORMED_TOKEN),
        (counted(b"alice", b"tok\x00en", b"smtp", b""), Reason.MALFORMED_TOKEN),
        (counted(b"al\tice", TOKEN, b"smtp", b""), Reason.MALFORMED_REQUEST),
        (counted(b"al\x00ice", TOKEN, b"smtp", b""), Reason.MALFORMED_REQUEST),
        (counted(b"\xffalice", TOKEN, b"smtp", b""), Reason.MALFORMED_REQUEST),
        (counted(b"alice", TOKEN, b"sm\ntp", b""), Reason.MALFORMED_REQUEST),
        (counted(b"alice", TOKEN, b"smtp", b"ex\rample"), Reason.MALFORMED_REQUEST),
        (counted(b"alice", TOKEN, b"smtp", b"", b"1.2.3.4\x00"), Reason.MALFORMED_REQUEST),
        (counted(b"alice", TOKEN, b"smtp", b"", b"1.2.3.4;1") + b"x", Reason.MALFORMED_REQUEST),
        (counted(b"a" * (MAX_FIELD_BYTES + 1)), Reason.MALFORMED_REQUEST),
        (counted(b"alice", b"t" * 300), Reason.TOKEN_TOO_LARGE),
    ],
)
def test_unusable_requests_are_rejected(data: bytes, reason: Reason) -> None:
    event = feed(data, max_password_bytes=256)
    assert isinstance(event, Rejected)
    assert event.verdict.reason is reason
    assert "tok" not in event.verdict.detail


def test_oversized_length_is_rejected_before_the_field_arrives() -> None:
    event = feed(b"\x00\x05alice\xff\xff")
    assert isinstance(event, Rejected)
    assert event.verdict.reason is Reason.TOKEN_TOO_LARGE


@pytest.mark.parametrize("cut", [0, 1, 3, 7, 20])
def test_eof_mid_request_is_rejected(cut: int) -> None:
    data = counted(b"alice", TOKEN, b"smtp", b"x")[:cut]
    if data:  # b"" itself means EOF
        assert isinstance(feed(data), NeedData)
    event = feed(data, eof=True)
    assert isinstance(event, Rejected)
    assert event.verdict.reason is Reason.MALFORMED_REQUEST


def test_eof_inside_the_fifth_field_is_rejected() -> None:
    data = counted(b"alice", TOKEN, b"smtp", b"", b"1.2.3.4;5")[:-2]
    event = feed(data, eof=True)
    assert isinstance(event, Rejected)


def test_max_request_bytes_bounds_what_is_buffered() -> None:
    conn = SaslauthdServerConnection(max_password_bytes=1000, max_field_bytes=10)
    assert conn.max_request_bytes == 5 * 2 + 4 * 10 + 1000


# ------------------------------------------------------------------------- replies


@pytest.mark.parametrize(
    ("verdict", "text"),
    [
        (Verdict(reason=Reason.OK, account="alice@example.org"), "OK ok"),
        (Verdict(reason=Reason.EXPIRED, detail="exp 123 < now"), "NO expired"),
        (Verdict(reason=Reason.AUTHZID_MISMATCH), "NO authzid_mismatch"),
        (
            Verdict(reason=Reason.PROVIDER_UNAVAILABLE, detail="jwks fetch"),
            "NO temporary failure, try again later: provider_unavailable",
        ),
        (Verdict(reason=Reason.TIMEOUT), "NO temporary failure, try again later: timeout"),
    ],
)
def test_reply_text(verdict: Verdict, text: str) -> None:
    assert reply_text(verdict) == text
    assert encode_reply(verdict) == struct.pack("!H", len(text)) + text.encode()


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_gives_a_reply_a_cyrus_client_reads_correctly(reason: Reason) -> None:
    reply = encode_reply(Verdict(reason=reason, account="a" if reason is Reason.OK else None))
    (length,) = struct.unpack("!H", reply[:2])
    body = reply[2:]
    assert length == len(body)
    assert 2 <= length <= 1023  # checkpw.c: count < 2 is "bad response"; buffer is 1024
    assert body.startswith(b"OK") == (reason.outcome is Outcome.OK)
    assert body.startswith(b"NO") == (reason.outcome is not Outcome.OK)
    assert body.isascii()


def test_reply_never_carries_the_detail_or_the_account() -> None:
    v = Verdict(reason=Reason.OK, account="alice@example.org", detail="secret-ish")
    assert b"alice" not in encode_reply(v)
    assert b"secret" not in encode_reply(Verdict(reason=Reason.BAD_SIGNATURE, detail="secret"))


# ------------------------------------------------------------------------ property

FRAGMENTS = st.sampled_from(
    [b"\x00", b"\x01", b"\x00\x05", b"\x00\x00", b"\xff\xff", b"alice", b"@", b";", b"\t",
     b"\xc3\xa9", b"\xff", TOKEN, b"smtp", b"1.2.3.4;25"]
)  # fmt: skip
INPUT = st.one_of(st.binary(max_size=600), st.lists(FRAGMENTS, max_size=20).map(b"".join))


@settings(max_examples=500, deadline=None)
@given(chunks=st.lists(INPUT, max_size=4), eof=st.booleans())
def test_any_bytes_give_a_defined_event(chunks: list[bytes], eof: bool) -> None:
    conn = SaslauthdServerConnection(max_password_bytes=512)
    event: NeedData | Request | Rejected = NeedData()
    for chunk in [*chunks, *([b""] if eof else [])]:
        event = conn.receive_data(chunk)
        assert isinstance(event, NeedData | Request | Rejected)
        assert conn.buffered_bytes <= conn.max_request_bytes + len(chunk)
    if eof:
        assert not isinstance(event, NeedData)
    if isinstance(event, Request):
        account = event.request.credentials.authzid
        assert account
        assert not any(ord(c) < 0x20 for c in account)
        assert event.request.credentials.token.isprintable()
    if isinstance(event, Rejected):
        assert event.verdict.outcome is Outcome.FAIL
        reply = encode_reply(event.verdict)
        assert reply[2:4] == b"NO"


@settings(max_examples=300, deadline=None)
@given(
    login=st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x2FF, exclude_categories=["Cc"]),
        min_size=1,
        max_size=40,
    ),
    realm=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40),
    token=st.binary(min_size=1, max_size=200).map(lambda b: bytes(0x21 + x % 94 for x in b)),
    split=st.integers(min_value=1, max_value=400),
)
def test_round_trip_any_split(login: str, realm: str, token: bytes, split: int) -> None:
    data = counted(login.encode(), token, b"smtp", realm.encode())
    conn = SaslauthdServerConnection()
    first = conn.receive_data(data[:split])  # b"" would mean EOF: split >= 1
    event = conn.receive_data(data[split:]) if split < len(data) else first
    assert isinstance(event, Request)
    assert event.request.credentials.token == token.decode()
    assert event.request.credentials.authzid == account_name(login, realm)
