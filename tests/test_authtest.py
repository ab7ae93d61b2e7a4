"""The operator's auth-test client against the real Dovecot frontend."""

from __future__ import annotations

import base64
import functools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from saslauthd_oidc.core.outcome import DiscoveryHint, Outcome, Reason, Verdict
from saslauthd_oidc.core.request import SASL_MECHANISMS, AuthRequest, Mechanism, token_fingerprint
from saslauthd_oidc.frontends.dovecot import serve_dovecot_listener
from saslauthd_oidc.tools.authtest import (
    AuthTestError,
    build_auth_line,
    build_initial_response,
    redact,
    run_auth_test,
    sasl_escape,
)

GOOD = "eyJhbGciOiJFUzI1NiJ9.GOOD-marker-token.c2ln"
BAD = "eyJhbGciOiJFUzI1NiJ9.BAD-marker-token.c2ln"
TEMP = "eyJhbGciOiJFUzI1NiJ9.TEMP-marker-token.c2ln"
SLOW = "eyJhbGciOiJFUzI1NiJ9.SLOW-marker-token.c2ln"
DISCOVERY = "https://idp.example.org/.well-known/openid-configuration"


class Stub:
    def __init__(self) -> None:
        self.seen: list[AuthRequest] = []

    async def __call__(self, request: AuthRequest) -> Verdict:
        self.seen.append(request)
        token = request.credentials.token
        if token == GOOD:
            return Verdict(reason=Reason.OK, account="alice@example.org")
        if token == TEMP:
            return Verdict(reason=Reason.PROVIDER_UNAVAILABLE)
        if token == SLOW:
            await trio.sleep(30)
        return Verdict(
            reason=Reason.EXPIRED,
            hint=DiscoveryHint(openid_configuration=DISCOVERY, scope="openid email"),
        )


@pytest.fixture
def socket_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="at", dir="/tmp")
    yield str(Path(directory) / "auth")
    shutil.rmtree(directory, ignore_errors=True)


async def serve(
    nursery: trio.Nursery, path: str, stub: Stub, mechanisms: list[Mechanism] | None = None
) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(16)
    await nursery.start(
        functools.partial(
            serve_dovecot_listener,
            trio.SocketListener(sock),
            stub,
            mechanisms=mechanisms or list(SASL_MECHANISMS),
        )
    )


def assert_no_token(transcript: list[str], token: str, initial: bytes | None) -> None:
    text = "\n".join(transcript)
    assert token not in text
    if initial is not None:
        assert base64.b64encode(initial).decode() not in text
    assert token_fingerprint(token) in text


# ------------------------------------------------------------ pure helpers


def test_sasl_escape() -> None:
    assert sasl_escape("a,b=c@d") == "a=2Cb=3Dc@d"


def test_initial_responses_exact() -> None:
    assert (
        build_initial_response(Mechanism.OAUTHBEARER, "tok", user="a,b=c", host="mx", port=587)
        == b"n,a=a=2Cb=3Dc,\x01host=mx\x01port=587\x01auth=Bearer tok\x01\x01"
    )
    assert (
        build_initial_response(Mechanism.OAUTHBEARER, "tok", user=None)
        == b"n,,\x01auth=Bearer tok\x01\x01"
    )
    assert (
        build_initial_response(Mechanism.XOAUTH2, "tok", user="u@x")
        == b"user=u@x\x01auth=Bearer tok\x01\x01"
    )
    assert build_initial_response(Mechanism.PLAIN, "tok", user="u@x") == b"\x00u@x\x00tok"
    assert build_initial_response(Mechanism.LOGIN, "tok", user="u@x") is None


def test_auth_line() -> None:
    assert (
        build_auth_line(1, Mechanism.XOAUTH2, service="smtp", initial_response=b"\x01")
        == "AUTH\t1\tXOAUTH2\tservice=smtp\tresp=AQ=="
    )
    assert (
        build_auth_line(2, Mechanism.LOGIN, service="imap", initial_response=None)
        == "AUTH\t2\tLOGIN\tservice=imap"
    )


def test_redact() -> None:
    assert redact("x tok y tok", "tok") == f"x <token sha256:{token_fingerprint('tok')}> y " + (
        f"<token sha256:{token_fingerprint('tok')}>"
    )
    assert redact("abc", "") == "abc"


# --------------------------------------------------------- against the frontend


async def test_ok(nursery: trio.Nursery, socket_path: str) -> None:
    stub = Stub()
    await serve(nursery, socket_path, stub)
    result = await run_auth_test(
        socket_path, GOOD, user="alice@example.org", host="mail.example.org", port=587
    )
    assert result.outcome is Outcome.OK
    assert result.user == "alice@example.org"
    assert result.challenge is None
    (request,) = stub.seen
    assert request.mechanism is Mechanism.OAUTHBEARER
    assert request.credentials.authzid == "alice@example.org"
    assert (request.credentials.host, request.credentials.port) == ("mail.example.org", 587)
    assert request.context.service == "smtp"
    initial = build_initial_response(
        Mechanism.OAUTHBEARER, GOOD, user="alice@example.org", host="mail.example.org", port=587
    )
    assert_no_token(result.transcript, GOOD, initial)
    assert result.transcript[:2] == ["C: VERSION\t1\t2", result.transcript[1]]
    assert result.transcript[1].startswith("C: CPID\t")
    assert "S: DONE" in result.transcript
    assert "S: COOKIE\t<redacted>" in result.transcript
    assert result.transcript[-1] == "S: OK\t1\tuser=alice@example.org"


async def test_oauthbearer_fail_parses_challenge(nursery: trio.Nursery, socket_path: str) -> None:
    await serve(nursery, socket_path, Stub())
    result = await run_auth_test(socket_path, BAD, user="alice@example.org")
    assert result.outcome is Outcome.FAIL
    assert result.challenge == {
        "status": "invalid_token",
        "scope": "openid email",
        "openid-configuration": DISCOVERY,
    }
    assert "C: CONT\t1\tAQ==" in result.transcript
    assert result.transcript[-1] == "S: FAIL\t1\treason=Authentication failed"
    assert_no_token(
        result.transcript,
        BAD,
        build_initial_response(Mechanism.OAUTHBEARER, BAD, user="alice@example.org"),
    )


async def test_xoauth2_fail(nursery: trio.Nursery, socket_path: str) -> None:
    await serve(nursery, socket_path, Stub())
    result = await run_auth_test(socket_path, BAD, user="bob@example.org", mechanism="xoauth2")
    assert result.outcome is Outcome.FAIL
    assert result.challenge == {"status": "401", "schemes": "bearer", "scope": "openid email"}
    assert "C: CONT\t1\t" in result.transcript  # XOAUTH2 answers with an empty response
    assert_no_token(
        result.transcript,
        BAD,
        build_initial_response(Mechanism.XOAUTH2, BAD, user="bob@example.org"),
    )


async def test_tempfail(nursery: trio.Nursery, socket_path: str) -> None:
    await serve(nursery, socket_path, Stub())
    result = await run_auth_test(socket_path, TEMP, user="alice@example.org")
    assert result.outcome is Outcome.TEMPFAIL
    assert result.challenge is None
    assert TEMP not in "\n".join(result.transcript)


async def test_plain_and_login(nursery: trio.Nursery, socket_path: str) -> None:
    stub = Stub()
    await serve(nursery, socket_path, stub)
    for mech in ("PLAIN", "LOGIN"):
        result = await run_auth_test(socket_path, GOOD, user="alice@example.org", mechanism=mech)
        assert result.outcome is Outcome.OK, mech
        assert_no_token(
            result.transcript,
            GOOD,
            build_initial_response(Mechanism(mech), GOOD, user="alice@example.org"),
        )
    assert [r.credentials.authzid for r in stub.seen] == ["alice@example.org"] * 2


async def test_mechanism_not_offered(nursery: trio.Nursery, socket_path: str) -> None:
    await serve(nursery, socket_path, Stub(), mechanisms=[Mechanism.OAUTHBEARER])
    with pytest.raises(AuthTestError, match="does not offer XOAUTH2") as info:
        await run_auth_test(socket_path, GOOD, user="a@b", mechanism="XOAUTH2")
    assert "S: MECH\tOAUTHBEARER\tplaintext" in info.value.transcript


async def test_unknown_mechanism_name() -> None:
    with pytest.raises(AuthTestError, match="unknown mechanism"):
        await run_auth_test("/nonexistent", GOOD, user=None, mechanism="SCRAM-SHA-1")


async def test_no_socket(socket_path: str) -> None:
    with pytest.raises(AuthTestError, match="cannot connect"):
        await run_auth_test(socket_path, GOOD, user=None)


async def test_timeout(nursery: trio.Nursery, socket_path: str) -> None:
    await serve(nursery, socket_path, Stub())
    with pytest.raises(AuthTestError, match="no answer within") as info:
        await run_auth_test(socket_path, SLOW, user="a@b", timeout=0.3)
    assert any(line.startswith("C: AUTH") for line in info.value.transcript)
    assert SLOW not in "\n".join(info.value.transcript)


async def test_incompatible_server(socket_path: str, nursery: trio.Nursery) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(socket_path)
    sock.listen(1)
    listener = trio.SocketListener(sock)

    async def fake_server() -> None:
        stream = await listener.accept()
        await stream.send_all(b"VERSION\t2\t0\nDONE\n")
        await trio.sleep_forever()

    nursery.start_soon(fake_server)
    with pytest.raises(AuthTestError, match="incompatible"):
        await run_auth_test(socket_path, GOOD, user=None)
