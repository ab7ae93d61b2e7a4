"""The sans-I/O Dovecot auth-client protocol (server side): no sockets here."""

from __future__ import annotations

import base64
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saslauthd_oidc.core.outcome import DiscoveryHint, Reason, Verdict
from saslauthd_oidc.core.request import Mechanism
from saslauthd_oidc.protocol.dovecot import (
    DovecotServerConnection,
    NeedVerdict,
    ProtocolError,
    decode_base64,
    fail_fields,
    tab_escape,
    tab_unescape,
)

ALL_MECHS = [Mechanism.OAUTHBEARER, Mechanism.XOAUTH2, Mechanism.PLAIN, Mechanism.LOGIN]
TOKEN = "MARKERtok3n.neverEchoed-7f3a"
USER = "alice@example.org"
COOKIE = "0123456789abcdef0123456789abcdef"
OK = Verdict(reason=Reason.OK, account=USER)
REFUSED = Verdict(
    reason=Reason.BAD_SIGNATURE,
    detail="signature did not verify (secret detail)",
    hint=DiscoveryHint(
        openid_configuration="https://idp.example.org/.well-known/openid-configuration",
        scope="email",
    ),
)
TEMPFAIL = Verdict(reason=Reason.PROVIDER_UNAVAILABLE, detail="idp down")

POSTFIX_PARAMS = "service=smtp\tnologin\tlip=127.0.0.1\trip=127.0.0.3\tno-penalty\tsecured"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def oauthbearer_ir(token: str = TOKEN, user: str = USER) -> bytes:
    return f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()


def xoauth2_ir(token: str = TOKEN, user: str = USER) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


PLAIN_IR = b"\0" + USER.encode() + b"\0" + TOKEN.encode()
PLAIN_IR_B64 = b64(PLAIN_IR)


def make(mechanisms: list[Mechanism] | None = None, **kw: int) -> DovecotServerConnection:
    return DovecotServerConnection(
        ALL_MECHS if mechanisms is None else mechanisms, spid=4242, cuid=7, cookie=COOKIE, **kw
    )


def feed(conn: DovecotServerConnection, data: str | bytes) -> tuple[list[NeedVerdict], list[str]]:
    raw = data.encode() if isinstance(data, str) else data
    needs = [e for e in conn.receive_data(raw) if isinstance(e, NeedVerdict)]
    return needs, lines(conn)


def errors(conn: DovecotServerConnection, data: str | bytes) -> list[ProtocolError]:
    """The ProtocolError events for ``data`` (the replies are left for ``lines``)."""
    raw = data.encode() if isinstance(data, str) else data
    return [e for e in conn.receive_data(raw) if isinstance(e, ProtocolError)]


def lines(conn: DovecotServerConnection) -> list[str]:
    out = conn.data_to_send().decode()
    assert out == "" or out.endswith("\n")
    return out.splitlines()


def client(version: str = "1\t2") -> DovecotServerConnection:
    conn = make()
    assert feed(conn, f"VERSION\t{version}\nCPID\t999\n") == ([], [])
    return conn


def auth(
    conn: DovecotServerConnection, rid: int, ir: bytes, mech: str = "OAUTHBEARER"
) -> NeedVerdict:
    needs, out = feed(conn, f"AUTH\t{rid}\t{mech}\t{POSTFIX_PARAMS}\tresp={b64(ir)}\n")
    assert out == []
    assert [n.request_id for n in needs] == [rid]
    return needs[0]


def cont_payload(line: str, rid: int) -> bytes:
    prefix = f"CONT\t{rid}\t"
    assert line.startswith(prefix)
    return base64.b64decode(line[len(prefix) :], validate=True)


# ---------------------------------------------------------------- escaping


def test_escape_exact() -> None:
    assert tab_escape("a\x01b\tc\rd\ne") == "a\x011b\x01tc\x01rd\x01ne"
    assert tab_escape("plain=text ümlaut") == "plain=text ümlaut"
    assert tab_escape("\x00") == "\x00"  # NUL is not escaped by the encoder


def test_unescape_exact() -> None:
    assert tab_unescape("a\x011b\x01tc\x01rd\x01ne") == "a\x01b\tc\rd\ne"
    assert tab_unescape("x\x010y") == "x\x00y"
    assert tab_unescape("\x01X\x01=") == "X="
    assert tab_unescape("abc\x01") == "abc"  # trailing lone escape dropped
    assert tab_unescape("\x01\x01") == "\x01"


@given(st.text())
def test_escape_round_trip(value: str) -> None:
    escaped = tab_escape(value)
    assert not set(escaped) & {"\t", "\r", "\n"}
    assert tab_unescape(escaped) == value


@given(st.text())
def test_unescape_never_raises(value: str) -> None:
    tab_unescape(value)


def test_decode_base64_strict() -> None:
    assert decode_base64("AQ==") == b"\x01"
    assert decode_base64("") == b""
    for bad in ["AQ", "AQ=", "AQ===", "A=Q=", "!!!notb64", "AQ==\x00", "YW Jj", "=", "é"]:
        assert decode_base64(bad) is None, bad


# --------------------------------------------------------------- handshake


def test_handshake_exact_bytes_and_order() -> None:
    assert make().handshake() == (
        b"VERSION\t1\t2\n"
        b"MECH\tOAUTHBEARER\tplaintext\n"
        b"MECH\tXOAUTH2\tplaintext\n"
        b"MECH\tPLAIN\tplaintext\n"
        b"MECH\tLOGIN\tplaintext\n"
        b"SPID\t4242\n"
        b"CUID\t7\n"
        b"COOKIE\t0123456789abcdef0123456789abcdef\n"
        b"DONE\n"
    )


def test_handshake_lists_only_configured_mechanisms() -> None:
    hs = make([Mechanism.XOAUTH2]).handshake().decode()
    assert [line for line in hs.splitlines() if line.startswith("MECH")] == [
        "MECH\tXOAUTH2\tplaintext"
    ]


def test_client_version_and_pid_recorded() -> None:
    conn = client("1\t0")
    assert conn.client_version == (1, 0)
    assert conn.client_pid == 999
    assert not conn.closed


@pytest.mark.parametrize("version", ["2\t0", "0\t9", "x\t1", ""])
def test_incompatible_version_closes(version: str) -> None:
    conn = make()
    feed(conn, f"VERSION\t{version}\n")
    assert conn.closed
    # Nothing more is processed after that.
    assert feed(conn, f"AUTH\t1\tPLAIN\tresp={PLAIN_IR_B64}\n") == ([], [])


def test_eof_closes() -> None:
    conn = client()
    assert conn.receive_data(b"") == []
    assert conn.closed


# ---------------------------------------------------------------- requests


def test_postfix_capture_line_success() -> None:
    conn = client("1\t0")
    raw = f"AUTH\t1\tOAUTHBEARER\t{POSTFIX_PARAMS}\tresp={b64(oauthbearer_ir())}\n"
    needs, out = feed(conn, raw)
    assert out == []
    (need,) = needs
    assert need.request_id == 1
    req = need.request
    assert req.mechanism is Mechanism.OAUTHBEARER
    assert req.credentials.token == TOKEN
    assert req.credentials.authzid == USER
    ctx = req.context
    assert (ctx.frontend, ctx.service, ctx.local_ip, ctx.remote_ip) == (
        "dovecot",
        "smtp",
        "127.0.0.1",
        "127.0.0.3",
    )
    assert ctx.secured is True
    assert (ctx.local_port, ctx.remote_port, ctx.local_name) == (None, None, None)
    conn.conclude(1, OK)
    assert lines(conn) == [f"OK\t1\tuser={USER}"]


def test_context_params_full_and_lenient() -> None:
    conn = client()
    params = (
        "protocol=SMTP\tlip=\trip=not-an-ip\tlport=587\trport=99999999999"
        "\tlocal_name=mail.example.org\tsession=abc\tunknown_flag\tfoo=bar"
    )
    needs, out = feed(conn, f"AUTH\t3\txoauth2\t{params}\tresp={b64(xoauth2_ir())}\n")
    assert out == []
    ctx = needs[0].request.context
    assert ctx.service == "smtp"
    assert ctx.local_ip is None and ctx.remote_ip is None
    assert ctx.local_port == 587 and ctx.remote_port is None
    assert ctx.local_name == "mail.example.org"
    assert ctx.secured is False


def test_secured_with_value_and_ipv6() -> None:
    conn = client()
    needs, _ = feed(
        conn,
        f"AUTH\t1\tOAUTHBEARER\tsecured=tls\trip=::1\trport=40000\tresp={b64(oauthbearer_ir())}\n",
    )
    ctx = needs[0].request.context
    assert ctx.secured is True
    assert ctx.remote_ip == "::1"
    assert ctx.remote_port == 40000
    assert ctx.service is None


def test_lowercase_mechanism_name() -> None:
    conn = client("1\t0")
    needs, out = feed(
        conn, f"AUTH\t1\toauthbearer\t{POSTFIX_PARAMS}\tresp={b64(oauthbearer_ir())}\n"
    )
    assert out == []
    assert needs[0].request.mechanism is Mechanism.OAUTHBEARER


def test_escaped_auth_fields_are_unescaped() -> None:
    conn = client()
    needs, _ = feed(
        conn,
        f"AUTH\t1\tXOAUTH2\tlocal_name=a\x01tb\tresp={b64(xoauth2_ir())}\n",
    )
    assert needs[0].request.context.local_name == "a\tb"


def test_exim_empty_resp_minor_0_is_absent() -> None:
    conn = client("1\t0")
    needs, out = feed(conn, "AUTH\t1\tXOAUTH2\tservice=smtp\tsecured\tresp=\n")
    assert needs == []
    assert out == ["CONT\t1\t"]  # empty challenge, TAB kept
    needs, out = feed(conn, f"CONT\t1\t{b64(xoauth2_ir())}\n")
    assert out == []
    assert needs[0].request.credentials.token == TOKEN
    conn.conclude(1, OK)
    assert lines(conn) == [f"OK\t1\tuser={USER}"]


def test_absent_resp_gives_empty_challenge() -> None:
    conn = client()
    needs, out = feed(conn, "AUTH\t7\tPLAIN\tservice=smtp\n")
    assert (needs, out) == ([], ["CONT\t7\t"])
    needs, out = feed(conn, f"CONT\t7\t{PLAIN_IR_B64}\n")
    assert out == []
    assert needs[0].request.credentials.token == TOKEN
    assert needs[0].request.mechanism is Mechanism.PLAIN


def test_auth_before_version_is_accepted() -> None:
    conn = make()
    needs, out = feed(conn, f"AUTH\t1\tOAUTHBEARER\tresp={b64(oauthbearer_ir())}\n")
    assert out == [] and len(needs) == 1


@pytest.mark.parametrize("resp", ["resp=", "resp=="])
def test_present_empty_response_minor_2(resp: str) -> None:
    conn = client("1\t2")
    needs, out = feed(conn, f"AUTH\t1\tOAUTHBEARER\tservice=smtp\t{resp}\n")
    assert needs == []
    # An empty OAUTHBEARER message is decoded (and refused), not taken as "no IR".
    (line,) = out
    assert json.loads(cont_payload(line, 1)) == {"status": "invalid_request"}


def test_resp_equals_minor_0_is_present_empty() -> None:
    conn = client("1\t0")
    needs, out = feed(conn, "AUTH\t10\tPLAIN\tservice=smtp\tresp==\n")
    assert needs == []
    assert out == ["FAIL\t10\treason=Authentication failed"]


def test_invalid_base64_initial_response() -> None:
    conn = client()
    needs, out = feed(conn, "AUTH\t9\tOAUTHBEARER\tservice=smtp\tresp=!!!notb64\n")
    assert needs == []
    assert out == ["FAIL\t9\tcode=invalid_base64\treason=Invalid base64 data in initial response"]


def test_trailing_cr_tolerated() -> None:
    conn = make()
    feed(conn, "VERSION\t1\t2\r\n")
    assert conn.client_version == (1, 2)
    needs, out = feed(conn, f"AUTH\t1\tOAUTHBEARER\tresp={b64(oauthbearer_ir())}\r\n")
    assert out == [] and needs[0].request.credentials.token == TOKEN


def test_lines_split_across_chunks() -> None:
    conn = client()
    raw = f"AUTH\t1\tOAUTHBEARER\tresp={b64(oauthbearer_ir())}\n".encode()
    needs: list[NeedVerdict] = []
    for i in range(len(raw)):
        needs += feed(conn, raw[i : i + 1])[0]
    assert [n.request_id for n in needs] == [1]


# ----------------------------------------------------------- bad requests


@pytest.mark.parametrize("mech", ["FOO", "SCRAM-SHA-256", "", "GSSAPI"])
def test_unknown_mechanism_fails_request_only(mech: str) -> None:
    conn = client()
    needs, out = feed(conn, f"AUTH\t12\t{mech}\tservice=smtp\n")
    assert needs == []
    assert out == ["FAIL\t12\treason=Unsupported mechanism"]
    assert not conn.closed
    assert auth(conn, 13, oauthbearer_ir()).request_id == 13


def test_auth_without_mechanism_field() -> None:
    conn = client()
    assert feed(conn, "AUTH\t12\n") == ([], ["FAIL\t12\treason=Unsupported mechanism"])


def test_mechanism_not_advertised() -> None:
    conn = make([Mechanism.OAUTHBEARER, Mechanism.XOAUTH2])
    needs, out = feed(conn, f"AUTH\t1\tPLAIN\tresp={PLAIN_IR_B64}\n")
    assert (needs, out) == ([], ["FAIL\t1\treason=Unsupported mechanism"])


def test_parameter_after_resp() -> None:
    conn = client()
    needs, out = feed(conn, f"AUTH\t1\tOAUTHBEARER\tresp={b64(oauthbearer_ir())}\tsecured\n")
    assert needs == []
    assert out == ["FAIL\t1\treason=Authentication failed"]
    assert auth(conn, 2, oauthbearer_ir()).request_id == 2


def test_duplicate_in_flight_id() -> None:
    conn = client()
    auth(conn, 1, oauthbearer_ir())
    needs, out = feed(conn, f"AUTH\t1\tOAUTHBEARER\tresp={b64(oauthbearer_ir())}\n")
    assert needs == []
    assert out == ["FAIL\t1\treason=Authentication failed"]
    # The earlier request is silenced: exactly one reply per id.
    conn.conclude(1, OK)
    assert lines(conn) == []
    # Once its verdict is in, the id is free again.
    auth(conn, 1, oauthbearer_ir())
    conn.conclude(1, OK)
    assert lines(conn) == [f"OK\t1\tuser={USER}"]


def test_duplicate_id_while_waiting_for_client() -> None:
    conn = client()
    feed(conn, "AUTH\t5\tXOAUTH2\n")
    needs, out = feed(conn, f"AUTH\t5\tXOAUTH2\tresp={b64(xoauth2_ir())}\n")
    assert (needs, out) == ([], ["FAIL\t5\treason=Authentication failed"])
    assert feed(conn, f"CONT\t5\t{b64(xoauth2_ir())}\n")[1] == [
        "FAIL\t5\treason=Authentication request timed out"
    ]


@pytest.mark.parametrize("rid", ["0", "abc", "-1", "+1", "4294967296", "", "١", "99999999999"])
def test_bad_ids_get_no_reply(rid: str) -> None:
    conn = client()
    reported = []
    for line in (
        f"AUTH\t{rid}\tOAUTHBEARER\tresp={b64(oauthbearer_ir())}\n",
        f"CONT\t{rid}\tAQ==\n",
        f"CANCEL\t{rid}\n",
    ):
        reported += errors(conn, line)
        assert lines(conn) == []
    assert not conn.closed
    assert [e.request_id for e in reported] == [None, None, None]


def test_max_id_accepted() -> None:
    conn = client()
    auth(conn, 4294967295, oauthbearer_ir())
    conn.conclude(4294967295, OK)
    assert lines(conn) == [f"OK\t4294967295\tuser={USER}"]


def test_cont_for_unknown_id() -> None:
    conn = client()
    assert feed(conn, "CONT\t99\tAQ==\n") == (
        [],
        ["FAIL\t99\treason=Authentication request timed out"],
    )


def test_unexpected_cont_while_verdict_pending() -> None:
    conn = client()
    auth(conn, 1, oauthbearer_ir())
    assert feed(conn, "CONT\t1\tAQ==\n") == ([], ["FAIL\t1\treason=Unexpected continuation"])
    conn.conclude(1, OK)  # late verdict for a request already answered
    assert lines(conn) == []


def test_invalid_base64_in_cont() -> None:
    conn = client()
    feed(conn, "AUTH\t2\tPLAIN\n")
    assert feed(conn, "CONT\t2\tnot base64!\n") == (
        [],
        ["FAIL\t2\tcode=invalid_base64\treason=Invalid base64 data in continued response"],
    )
    assert feed(conn, "CONT\t2\tAQ==\n")[1] == ["FAIL\t2\treason=Authentication request timed out"]


def test_cont_without_data_field_is_empty() -> None:
    conn = client()
    feed(conn, "AUTH\t4\tXOAUTH2\n")
    needs, out = feed(conn, "CONT\t4\n")
    assert needs == []
    # An empty XOAUTH2 message is refused with the XOAUTH2 failure challenge.
    assert json.loads(cont_payload(out[0], 4))["status"] == "400"


def test_too_many_in_flight() -> None:
    conn = make(max_in_flight=3)
    for rid in (1, 2, 3):
        auth(conn, rid, oauthbearer_ir())
    needs, out = feed(conn, f"AUTH\t4\tOAUTHBEARER\tresp={b64(oauthbearer_ir())}\n")
    assert needs == []
    assert out == ["FAIL\t4\tcode=temp_fail\treason=Temporary authentication failure"]
    conn.conclude(2, OK)
    assert lines(conn) == [f"OK\t2\tuser={USER}"]
    auth(conn, 4, oauthbearer_ir())


def test_unknown_verb_ignored() -> None:
    conn = client()
    assert feed(conn, "HELLO\tworld\nREQUEST\t1\t2\n\n") == ([], [])
    assert not conn.closed
    auth(conn, 1, oauthbearer_ir())


@pytest.mark.parametrize("verb", ["AUTH", "CONT"])
def test_overlong_line_with_readable_id(verb: str) -> None:
    conn = make(max_line=1024)
    feed(conn, "VERSION\t1\t2\n")
    if verb == "CONT":
        feed(conn, "AUTH\t77\tXOAUTH2\n")
    line = f"{verb}\t77\t" + ("A" * 5000) + "\n"
    needs, out = feed(conn, line)
    assert needs == []
    assert out == ["FAIL\t77\treason=Authentication failed"]
    assert conn.buffered_bytes == 0
    assert conn.in_flight == 0
    # The rest of the line is gone and the connection still works.
    auth(conn, 78, oauthbearer_ir())


def test_overlong_line_in_small_chunks_buffers_little() -> None:
    conn = make(max_line=1024)
    needs, out = feed(conn, "AUTH\t5\tOAUTHBEARER\tresp=")
    for _ in range(1000):
        needs, more = feed(conn, "QUFB" * 64)
        out += more
        assert needs == []
        assert conn.buffered_bytes <= 1024
    assert out == ["FAIL\t5\treason=Authentication failed"]
    needs, out = feed(conn, "QUFB\nAUTH\t6\tXOAUTH2\tresp=" + b64(xoauth2_ir()) + "\n")
    assert out == []
    assert [n.request_id for n in needs] == [6]


def test_overlong_line_without_id() -> None:
    conn = make(max_line=1024)
    [reported] = errors(conn, b"\xff" * 3000 + b"\n")
    assert lines(conn) == []
    assert reported.request_id is None
    needs, out = feed(conn, ("x" * 2000) + "\tAUTH\t3\n" + f"AUTH\t3\tPLAIN\tresp={PLAIN_IR_B64}\n")
    assert out == []
    assert [n.request_id for n in needs] == [3]


def test_line_of_exactly_max_line_is_accepted() -> None:
    conn = make(max_line=1024)
    head = "AUTH\t1\tOAUTHBEARER\tresp=" + b64(oauthbearer_ir())
    params_line = (
        f"AUTH\t1\tOAUTHBEARER\t{'p' * (1024 - len(head) - 1)}\tresp={b64(oauthbearer_ir())}"
    )
    assert len(params_line) == 1024
    needs, out = feed(conn, params_line + "\n")
    assert out == [] and len(needs) == 1
    needs, out = feed(conn, params_line.replace("AUTH\t1", "AUTH\t2") + "p\n")
    assert out == ["FAIL\t2\treason=Authentication failed"]


# ------------------------------------------------------------- dialogues


def test_oauthbearer_failure_dialogue() -> None:
    conn = client("1\t0")
    auth(conn, 2, oauthbearer_ir())
    conn.conclude(2, REFUSED)
    (line,) = lines(conn)
    assert json.loads(cont_payload(line, 2)) == {
        "status": "invalid_token",
        "scope": "email",
        "openid-configuration": "https://idp.example.org/.well-known/openid-configuration",
    }
    assert feed(conn, "CONT\t2\tAQ==\n") == ([], ["FAIL\t2\treason=Authentication failed"])
    assert conn.in_flight == 0


def test_xoauth2_failure_dialogue() -> None:
    conn = client("1\t0")
    auth(conn, 4, xoauth2_ir(), mech="XOAUTH2")
    conn.conclude(4, REFUSED)
    (line,) = lines(conn)
    assert json.loads(cont_payload(line, 4)) == {
        "status": "401",
        "schemes": "bearer",
        "scope": "email",
    }
    assert feed(conn, "CONT\t4\t\n") == ([], ["FAIL\t4\treason=Authentication failed"])


def test_login_dialogue() -> None:
    conn = client()
    assert feed(conn, "AUTH\t3\tLOGIN\tservice=smtp\n") == ([], [f"CONT\t3\t{b64(b'Username:')}"])
    assert feed(conn, f"CONT\t3\t{b64(USER.encode())}\n") == (
        [],
        [f"CONT\t3\t{b64(b'Password:')}"],
    )
    needs, out = feed(conn, f"CONT\t3\t{b64(TOKEN.encode())}\n")
    assert out == []
    assert needs[0].request.credentials.authzid == USER
    conn.conclude(3, OK)
    assert lines(conn) == [f"OK\t3\tuser={USER}"]


def test_tempfail_carries_code() -> None:
    conn = client()
    auth(conn, 1, oauthbearer_ir())
    conn.conclude(1, TEMPFAIL)
    assert lines(conn) == ["FAIL\t1\tcode=temp_fail\treason=Temporary authentication failure"]


@pytest.mark.parametrize("reason", [Reason.TIMEOUT, Reason.INTERNAL_ERROR])
def test_other_temporary_reasons(reason: Reason) -> None:
    conn = client()
    auth(conn, 1, xoauth2_ir(), mech="XOAUTH2")
    conn.conclude(1, Verdict(reason=reason))
    assert lines(conn) == ["FAIL\t1\tcode=temp_fail\treason=Temporary authentication failure"]


def test_ok_user_is_escaped() -> None:
    # sasl refuses control characters in accounts; '=' and non-ASCII pass as they are.
    conn = client()
    auth(conn, 1, oauthbearer_ir())
    conn.conclude(1, Verdict(reason=Reason.OK, account="ünï=code@example.org"))
    assert lines(conn) == ["OK\t1\tuser=ünï=code@example.org"]


def test_unencodable_account_fails_instead_of_raising() -> None:
    conn = client()
    auth(conn, 1, oauthbearer_ir())
    conn.conclude(1, Verdict(reason=Reason.OK, account="bad\ud800@example.org"))
    assert lines(conn) == ["FAIL\t1\treason=Authentication failed"]


def test_many_sequential_requests() -> None:
    conn = client("1\t0")
    for rid in range(1, 301):
        auth(conn, rid, oauthbearer_ir(user=f"u{rid}@example.org"))
        conn.conclude(rid, Verdict(reason=Reason.OK, account=f"u{rid}@example.org"))
        assert lines(conn) == [f"OK\t{rid}\tuser=u{rid}@example.org"]
    assert conn.in_flight == 0


def test_interleaved_requests_out_of_order_verdicts() -> None:
    conn = client()
    batch = "".join(
        f"AUTH\t{rid}\tOAUTHBEARER\tresp={b64(oauthbearer_ir(user=f'u{rid}@x.org'))}\n"
        for rid in (1, 2, 3, 4)
    )
    needs, out = feed(conn, batch)
    assert out == []
    by_id = {n.request_id: n.request.credentials.authzid for n in needs}
    assert by_id == {1: "u1@x.org", 2: "u2@x.org", 3: "u3@x.org", 4: "u4@x.org"}
    conn.conclude(3, Verdict(reason=Reason.OK, account="u3@x.org"))
    conn.conclude(1, TEMPFAIL)
    conn.conclude(4, REFUSED)
    assert lines(conn)[:2] == [
        "OK\t3\tuser=u3@x.org",
        "FAIL\t1\tcode=temp_fail\treason=Temporary authentication failure",
    ]
    conn.conclude(2, Verdict(reason=Reason.OK, account="u2@x.org"))
    assert lines(conn) == ["OK\t2\tuser=u2@x.org"]
    assert feed(conn, "CONT\t4\tAQ==\n")[1] == ["FAIL\t4\treason=Authentication failed"]


def test_cancel_then_late_conclude() -> None:
    conn = client()
    auth(conn, 1, oauthbearer_ir())
    assert feed(conn, "CANCEL\t1\n") == ([], [])
    # The id stays taken until the verdict is in: a late verdict can't answer a newer request.
    assert feed(conn, f"AUTH\t1\tOAUTHBEARER\tresp={b64(oauthbearer_ir())}\n")[1] == [
        "FAIL\t1\treason=Authentication failed"
    ]
    conn.conclude(1, OK)
    assert lines(conn) == []
    assert conn.in_flight == 0
    conn.conclude(1, OK)  # repeated: still nothing
    conn.conclude(12345, OK)  # never existed
    assert lines(conn) == []


def test_cancel_while_waiting_for_client() -> None:
    conn = client()
    feed(conn, "AUTH\t1\tXOAUTH2\n")
    assert feed(conn, "CANCEL\t1\n") == ([], [])
    assert conn.in_flight == 0
    assert feed(conn, "CONT\t1\tAQ==\n")[1] == ["FAIL\t1\treason=Authentication request timed out"]


# ------------------------------------------------------- secrets never echo


def test_fail_fields_never_carry_detail() -> None:
    for reason in Reason:
        if reason is Reason.OK:
            continue
        fields = fail_fields(Verdict(reason=reason, detail=f"detail {TOKEN}"))
        assert TOKEN not in "\t".join(fields)
        assert fields[-1].startswith("reason=")


def test_no_reply_contains_the_token() -> None:
    conn = client("1\t0")
    out: list[str] = []
    for rid, (mech, ir) in enumerate(
        [("OAUTHBEARER", oauthbearer_ir()), ("XOAUTH2", xoauth2_ir())] * 3, start=1
    ):
        auth(conn, rid, ir, mech=mech)
        verdict = [OK, REFUSED, TEMPFAIL][rid % 3]
        conn.conclude(rid, verdict)
        out += lines(conn)
        out += feed(conn, f"CONT\t{rid}\tAQ==\n")[1]
    feed(conn, f"AUTH\t50\tPLAIN\tresp={PLAIN_IR_B64}\n")
    out += lines(conn)
    decoded = [
        cont_payload(line, int(line.split("\t")[1])) for line in out if line.startswith("CONT")
    ]
    assert out
    assert all(TOKEN not in line for line in out)
    assert all(TOKEN.encode() not in payload for payload in decoded)


# ------------------------------------------------------------ property test

REPLY = re.compile(
    r"(CONT\t[1-9][0-9]{0,9}\t[A-Za-z0-9+/]*={0,2}"
    r"|OK\t[1-9][0-9]{0,9}\tuser=[^\t\r\n]+"
    r"|FAIL\t[1-9][0-9]{0,9}(\tcode=(temp_fail|invalid_base64))?\treason=[A-Za-z0-9 ]+)"
)

_fragments = st.sampled_from(
    [
        b"AUTH\t",
        b"CONT\t",
        b"CANCEL\t",
        b"VERSION\t1\t",
        b"CPID\t",
        b"1",
        b"2",
        b"0",
        b"4294967296",
        b"\t",
        b"\n",
        b"\r",
        b"\x01",
        b"OAUTHBEARER",
        b"xoauth2",
        b"PLAIN",
        b"LOGIN",
        b"resp=",
        b"AQ==",
        b"=",
        b"service=smtp",
        b"secured",
        b"n,a=a@b,\x01auth=Bearer t\x01\x01",
        b"bixhPWFAYiwBYXV0aD1CZWFyZXIgdAEB",
        b"A" * 300,
    ]
)
_chunks = st.lists(
    st.one_of(st.binary(max_size=400), st.lists(_fragments, max_size=30).map(b"".join)),
    max_size=40,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_chunks, st.lists(st.sampled_from([OK, REFUSED, TEMPFAIL]), max_size=40))
def test_arbitrary_input_never_raises_and_stays_bounded(
    chunks: list[bytes], verdicts: list[Verdict]
) -> None:
    max_line = 256
    conn = make(max_line=max_line, max_in_flight=8)
    pending: list[int] = []
    for index, chunk in enumerate(chunks):
        pending += [n.request_id for n in feed(conn, chunk)[0]]
        if pending and index < len(verdicts):
            conn.conclude(pending.pop(0), verdicts[index])
        out = conn.data_to_send()
        assert out == b"" or out.endswith(b"\n")
        for line in out.decode("utf-8").splitlines():
            assert REPLY.fullmatch(line), line
        assert conn.buffered_bytes <= max_line
        assert conn.in_flight <= 8
        if conn.closed:
            break
