"""Fuzzing beyond the per-module property tests: structure-aware lines, the trio shell, memory.

The per-module properties (tests/test_protocol_dovecot.py,
tests/test_protocol_saslauthd.py, tests/test_sasl_property.py) feed random
bytes to each parser. This file adds:

* structure-aware Dovecot requests (real verbs, ids, mechanisms, escaped
  parameters and base64 SASL payloads built from SASL-ish fragments), where
  every AUTH with a readable id must get exactly one final reply;
* the same inputs through the trio shell (``handle_dovecot_stream`` on a
  memory stream with a stub engine): it never raises and answers a good
  request that follows;
* memory bounds measured with ``tracemalloc``: megabytes of hostile input
  fed to each parser allocate at most a small, fixed amount.
"""

from __future__ import annotations

import base64
import functools
import re
import struct
import tracemalloc
from collections.abc import Callable

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saslauthd_oidc.core.outcome import Reason, Verdict
from saslauthd_oidc.core.request import Mechanism
from saslauthd_oidc.frontends.dovecot import handle_dovecot_stream
from saslauthd_oidc.protocol.dovecot import DovecotServerConnection, NeedVerdict
from saslauthd_oidc.protocol.sasl import decode_oauthbearer, decode_plain, decode_xoauth2
from saslauthd_oidc.protocol.saslauthd import NeedData, SaslauthdServerConnection
from tests.support import MECHS, Stub, auth_line

REPLY = re.compile(r"(OK|FAIL|CONT)\t\d+(\t[^\t\n]*)*")

SASL_FRAGMENTS = st.sampled_from(
    [b"n,", b"a=", b"alice@example.org", b",", b"\x01", b"auth=Bearer ", b"auth=", b"host=",
     b"port=", b"587", b"user=", b"p=tls-unique,", b"y,", b"=2C", b"=3D", b"=", b"\x00",
     b"eyJhbGciOiJFUzI1NiJ9.e30.", b"A" * 100, b"\xff", b"\t", b"\n", b"Bearer"]
)  # fmt: skip
SASL = st.one_of(st.binary(max_size=120), st.lists(SASL_FRAGMENTS, max_size=16).map(b"".join))
PARAM_VALUE = st.text(
    st.characters(codec="utf-8", exclude_characters="\t\n"), max_size=30
) | st.sampled_from(["\\t", "\\n", "\\1", "\\", "127.0.0.1", "::1", "smtp", "587"])
PARAM = st.one_of(
    st.tuples(
        st.sampled_from(
            [
                "service",
                "protocol",
                "lip",
                "rip",
                "lport",
                "rport",
                "local_name",
                "secured",
                "session",
                "nologin",
                "valid-client-cert",
                "x",
                "",
            ]
        ),
        PARAM_VALUE,
    ).map(lambda kv: f"{kv[0]}={kv[1]}" if kv[1] else kv[0]),
    PARAM_VALUE,
)
RID = st.one_of(st.integers(1, 20), st.sampled_from(["0", "-1", "x", "", "4294967296", "07"]))
MECH = st.sampled_from(["OAUTHBEARER", "xoauth2", "PLAIN", "LOGIN", "GSSAPI", "", "oauthbearer"])


@st.composite
def dovecot_line(draw: st.DrawFn) -> str:
    verb = draw(st.sampled_from(["AUTH", "CONT", "CANCEL", "VERSION", "CPID", "BOGUS", "auth"]))
    rid = draw(RID)
    if verb.upper() == "AUTH":
        fields = [verb, str(rid), draw(MECH), *draw(st.lists(PARAM, max_size=5))]
        if draw(st.booleans()):
            fields.append("resp=" + base64.b64encode(draw(SASL)).decode())
            fields += draw(st.lists(PARAM, max_size=1))  # a parameter after resp= (refused)
        return "\t".join(fields)
    if verb == "CONT":
        data = draw(st.one_of(SASL.map(lambda b: base64.b64encode(b).decode()), PARAM_VALUE))
        return f"CONT\t{rid}\t{data}"
    if verb == "VERSION":
        return f"VERSION\t{draw(st.sampled_from(['1', '2', 'x']))}\t{draw(st.integers(0, 9))}"
    return "\t".join([verb, str(rid), *draw(st.lists(PARAM_VALUE, max_size=3))])


LINES = st.lists(dovecot_line(), min_size=1, max_size=25)
VERDICTS = st.sampled_from(
    [
        Verdict(reason=Reason.OK, account="alice@example.org"),
        Verdict(reason=Reason.BAD_SIGNATURE),
        Verdict(reason=Reason.PROVIDER_UNAVAILABLE),
    ]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(LINES, st.lists(VERDICTS, max_size=25), st.integers(1, 64))
def test_structured_requests_get_well_formed_replies(
    lines: list[str], verdicts: list[Verdict], chunk: int
) -> None:
    conn = DovecotServerConnection(list(Mechanism), spid=1, cuid=1, cookie="c" * 32)
    data = "".join(line + "\n" for line in lines).encode()
    needs = []
    for i in range(0, len(data), chunk):
        needs += [e for e in conn.receive_data(data[i : i + chunk]) if isinstance(e, NeedVerdict)]
        if conn.closed:
            break
    for need, verdict in zip(needs, verdicts, strict=False):
        conn.conclude(need.request_id, verdict)
    out = conn.data_to_send().decode("utf-8")
    for reply in out.splitlines():
        assert REPLY.fullmatch(reply), reply
        assert "alice@example.org" not in reply or reply.startswith("OK")
    assert conn.in_flight <= 64


def _shell_run(lines: list[str]) -> bytes:
    """Feed lines to the trio shell, then one good request; return everything it answered."""

    async def main() -> bytes:
        server, client = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    handle_dovecot_stream, server, Stub(), mechanisms=MECHS, spid=1, cuid=1
                )
            )
            payload = "".join(line + "\n" for line in lines)
            await client.send_all(f"{payload}{auth_line(999, 'good-final')}\n".encode())
            got = b""
            with trio.move_on_after(5):
                while True:
                    chunk = await client.receive_some(65536)
                    if not chunk:
                        break
                    got += chunk
                    if b"OK\t999\tuser=final\n" in got:
                        break
            await client.aclose()
        return got

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(LINES)
def test_trio_shell_survives_any_request_sequence(lines: list[str]) -> None:
    got = _shell_run(lines)
    handshake, _, rest = got.partition(b"DONE\n")
    assert handshake.startswith(b"VERSION\t1\t2\n")
    for reply in rest.decode("utf-8").splitlines():
        assert REPLY.fullmatch(reply), reply
    # unless the client's VERSION was incompatible (the connection is closed then),
    # the good request after the junk is served on the same connection
    incompatible = any(
        line.startswith("VERSION\t") and not line.startswith("VERSION\t1\t") for line in lines
    )
    assert incompatible or b"OK\t999\tuser=final\n" in rest, rest[-300:]


# --------------------------------------------------------------------------- memory


def _peak_allocated(feed: Callable[[], None]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        feed()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


CHUNK = bytes(range(256)) * 256  # 64 KiB of every byte value, no newline after the first 10


def test_dovecot_parser_memory_is_bounded_under_megabytes_of_input() -> None:
    conn = DovecotServerConnection(list(Mechanism), spid=1, cuid=1, cookie="c" * 32)
    junk = CHUNK.replace(b"\n", b"x")
    lines = b"".join(f"AUTH\t{i}\tNOPE\n".encode() for i in range(1, 2000))

    def feed() -> None:
        for _ in range(128):  # 8 MiB in one never-ending line
            conn.receive_data(junk)
        conn.receive_data(b"\n")
        for _ in range(20):  # and 40,000 failing requests
            conn.receive_data(lines)
            conn.data_to_send()

    peak = _peak_allocated(feed)
    assert conn.buffered_bytes == 0
    assert peak < 2 << 20, peak  # a line cap's worth, not megabytes


def test_saslauthd_parser_memory_is_bounded() -> None:
    conn = SaslauthdServerConnection(max_password_bytes=16384)
    claim = struct.pack("!H", 200) + b"a" * 200 + struct.pack("!H", 0xFFFF)

    def feed() -> None:
        event = conn.receive_data(claim)
        for _ in range(128):
            if not isinstance(event, NeedData):
                break
            event = conn.receive_data(CHUNK)
        assert not isinstance(event, NeedData)

    peak = _peak_allocated(feed)
    assert peak < 1 << 20, peak


def test_sasl_decoders_refuse_megabytes_without_copying_them_around() -> None:
    big = b"n,a=alice@example.org,\x01auth=Bearer " + b"A" * (1 << 20) + b"\x01\x01"
    inputs = [big, b"\x01" * (1 << 20), b"user=" + b"x" * (1 << 20), b"\x00" * (1 << 20)]

    def feed() -> None:
        for data in inputs:
            decode_oauthbearer(data)
            decode_xoauth2(data)
            decode_plain(data)

    peak = _peak_allocated(feed)
    assert peak < 16 << 20, peak
