"""The log sink: lines written at once outside a reactor round, held and written together in one.

What is written is what structlog's ``PrintLogger`` wrote, byte for byte; the
order of the lines is the order of the calls; nothing held is lost when a
round ends by an exception, when the daemon stops on SIGTERM, or when a
worker exits.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from saslauthd_oidc.config import LoggingConfig
from saslauthd_oidc.core.outcome import Reason, Verdict
from saslauthd_oidc.core.request import AuthRequest, token_fingerprint
from saslauthd_oidc.frontends import reactor
from saslauthd_oidc.service import logs
from saslauthd_oidc.service.logs import HELD_LIMIT, LineSink, configure_logging
from saslauthd_oidc.tools.devissuer import DevIssuer
from tests.support import MECHS, Client, accepts, auth_line, start, wait_for


class CountingRaw(io.RawIOBase):
    """A descriptor's stand-in under the text and buffer layers of ``sys.stderr``: each
    ``write`` here is one ``write(2)`` of the real stream."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.writes.append(bytes(data))
        return len(data)

    @property
    def text(self) -> str:
        return b"".join(self.writes).decode()


def stderr_like() -> tuple[io.TextIOWrapper, CountingRaw]:
    """A text stream built as ``sys.stderr`` is (line-buffered, backslashreplace)."""
    raw = CountingRaw()
    stream = io.TextIOWrapper(
        io.BufferedWriter(raw), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
    return stream, raw


@pytest.fixture
def logged() -> Iterator[CountingRaw]:
    """The process's logging at info/json into a counted stream, put back afterwards."""
    stream, raw = stderr_like()
    configure_logging(LoggingConfig(level="info", format="json"), stream=stream)
    try:
        yield raw
    finally:
        configure_logging(LoggingConfig(level="info", format="json"))


MESSAGES = [
    '{"event": "authentication", "account": "alice@example.org"}',
    "2026-12-01T15:00:00.000001Z [info     ] started      config=/etc/x.toml",
    "päß ✓ \udcff",  # not ASCII; a lone surrogate (backslashreplace)
    "Traceback (most recent call last):\n  File ...\nValueError: boom",
    "",
]


def test_lines_are_what_print_logger_wrote_byte_for_byte() -> None:
    want_stream, want = stderr_like()
    printer = structlog.PrintLogger(file=want_stream)
    at_once_stream, at_once = stderr_like()
    held_stream, held = stderr_like()
    direct, kept = LineSink(at_once_stream), LineSink(held_stream)
    kept.hold()
    for message in MESSAGES:
        printer.msg(message)
        direct.msg(message)
        kept.msg(message)
    assert held.writes == []
    kept.release()
    # print() wrote a line with a newline inside (a traceback) in two writes; one now.
    assert b"".join(at_once.writes) == b"".join(want.writes)
    assert len(at_once.writes) == len(MESSAGES)
    assert len(held.writes) == 1  # the round's lines in one
    assert b"".join(held.writes) == b"".join(want.writes)


def test_outside_a_round_each_line_is_written_before_the_call_returns() -> None:
    stream, raw = stderr_like()
    sink = LineSink(stream)
    sink.info("one")
    assert raw.writes == [b"one\n"]
    sink.warning("two")
    assert raw.writes == [b"one\n", b"two\n"]


def test_held_lines_keep_their_order_and_go_out_past_the_limit() -> None:
    stream, raw = stderr_like()
    sink = LineSink(stream)
    sink.hold()
    big = "x" * (HELD_LIMIT // 4)
    for i in range(3):
        sink.info(f"{i}{big}")
    assert raw.writes == []  # under the limit: all held
    sink.info(f"3{big}")
    sink.info(f"4{big}")  # over it: written now, still in the round
    assert len(raw.writes) == 1
    sink.info("last")
    sink.release()
    assert len(raw.writes) == 2
    assert [line[:1] for line in raw.text.splitlines()] == ["0", "1", "2", "3", "4", "l"]
    sink.info("after")  # the round is over: at once again
    assert raw.writes[-1] == b"after\n"


def test_flush_writes_what_is_held_and_switch_writes_it_to_the_old_stream() -> None:
    first, first_raw = stderr_like()
    second, second_raw = stderr_like()
    sink = LineSink(first)
    sink.hold()
    sink.info("a")
    sink.flush()  # exit, the daemon's end
    assert first_raw.text == "a\n"
    sink.info("b")
    sink.switch(second)  # a reload that changes the logging
    assert (first_raw.text, second_raw.text) == ("a\nb\n", "")
    sink.info("c")
    sink.release()
    assert second_raw.text == "c\n"


def test_a_round_end_that_cannot_write_does_not_raise() -> None:
    stream = io.StringIO()
    sink = LineSink(stream)
    sink.hold()
    sink.info("lost")
    stream.close()
    sink.release()  # the reactor goes on
    with pytest.raises(ValueError):
        sink.info("outside a round a failed write raises to its caller, as before")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_configured_logging_writes_through_the_sink_and_holds_in_a_round(fmt: str) -> None:
    stream, raw = stderr_like()
    configure_logging(LoggingConfig(level="info", format=fmt), stream=stream)  # type: ignore[arg-type]
    try:
        log = structlog.get_logger("test")
        log.info("first", n=1)
        assert len(raw.writes) == 1
        reactor.round_hooks.begin()
        log.info("second", n=2)
        log.warning("third", token="eyJhbGciOiJ.eyJzdWIiOiJ.c2ln")
        assert len(raw.writes) == 1
        reactor.round_hooks.end()
        assert len(raw.writes) == 2
    finally:
        configure_logging(LoggingConfig(level="info", format="json"))
    lines = raw.text.splitlines()
    assert len(lines) == 3
    assert [("first" in x, "second" in x, "third" in x) for x in lines] == [
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ]
    assert "eyJhbGciOiJ" not in raw.text  # still redacted
    if fmt == "json":
        assert [json.loads(x)["event"] for x in lines] == ["first", "second", "third"]


# ------------------------------------------------------------------ in the reactor


class Logging:
    """An engine stand-in that logs one line per request, as the engine does; 'boom' raises."""

    def __init__(self) -> None:
        self.log = structlog.get_logger("saslauthd_oidc.auth")

    def start(self, req: AuthRequest) -> Verdict:
        tok = req.credentials.token
        if tok == "boom":
            raise RuntimeError("engine bug")
        if tok == "fatal":
            self.log.info("authentication", account="before the crash")
            raise _Fatal
        self.log.info("authentication", account=tok)
        return Verdict(reason=Reason.OK, account=tok)

    async def finish(self, pending: Any) -> Verdict:
        raise AssertionError("everything is inline")

    async def authenticate(self, req: AuthRequest) -> Verdict:
        return self.start(req)


class _Fatal(BaseException):
    """Not an ``Exception``: no catch-all takes it, it ends the reactor's round."""


async def _serve(nursery: trio.Nursery, path: str, engine: Logging) -> None:
    from saslauthd_oidc.frontends.dovecot import serve_dovecot_listener

    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(16)
    await nursery.start(
        functools.partial(
            serve_dovecot_listener, trio.SocketListener(sock), engine, mechanisms=MECHS
        )
    )


async def test_a_crashed_request_is_logged_in_order_with_the_others_of_its_round(
    nursery: trio.Nursery, socket_path: str, logged: CountingRaw
) -> None:
    await _serve(nursery, socket_path, Logging())
    client = await Client.connect(socket_path)
    await client.handshake()
    await trio.testing.wait_all_tasks_blocked()
    before = len(logged.writes)
    tokens = ["a", "b", "boom", "c"]
    await client.send(*(auth_line(rid, tok) for rid, tok in enumerate(tokens, 1)))
    replies = [await client.line() for _ in tokens]
    assert [r.split("\t")[0] if r else r for r in replies] == ["OK", "OK", "FAIL", "OK"]
    await trio.testing.wait_all_tasks_blocked()
    assert len(logged.writes) == before + 1  # one round, one write
    events = [json.loads(line) for line in b"".join(logged.writes[before:]).decode().splitlines()]
    assert [(e["event"], e.get("account")) for e in events] == [
        ("authentication", "a"),
        ("authentication", "b"),
        ("authenticate_failed", None),
        ("authentication", "c"),
    ]
    assert "RuntimeError: engine bug" in events[2]["exception"]


async def test_a_round_ended_by_an_exception_writes_what_it_held(
    socket_path: str, logged: CountingRaw
) -> None:
    with pytest.raises(BaseExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            await _serve(nursery, socket_path, Logging())
            client = await Client.connect(socket_path)
            await client.handshake()
            await client.send(auth_line(1, "a"), auth_line(2, "fatal"))
            await trio.sleep_forever()
    assert raised.group_contains(_Fatal, depth=None)
    accounts = [json.loads(line).get("account") for line in logged.text.splitlines()]
    assert accounts[-2:] == ["a", "before the crash"]


def test_round_hooks_seam_is_the_sink_once_logging_is_configured(logged: CountingRaw) -> None:
    assert reactor.round_hooks.begin == logs.sink.hold
    assert reactor.round_hooks.end == logs.sink.release


# ------------------------------------------------------------ a real daemon, SIGTERM


def _pipelined(sock_path: Path, tokens: list[str]) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(str(sock_path))
    lines = [b"VERSION\t1\t2\n", b"CPID\t1\n"]
    for rid, tok in enumerate(tokens, 1):
        ir = base64.b64encode(f"user=alice@example.org\x01auth=Bearer {tok}\x01\x01".encode())
        lines.append(f"AUTH\t{rid}\tXOAUTH2\tservice=smtp\tresp=".encode() + ir + b"\n")
    s.sendall(b"".join(lines))
    return s


def _first_reply(s: socket.socket) -> bytes:
    """What ``s`` received up to its first AUTH reply."""
    data = b""
    while b"\nOK\t" not in data and b"\nFAIL\t" not in data:
        chunk = s.recv(65536)
        assert chunk
        data += chunk
    return data


def _replies(s: socket.socket, data: bytes) -> list[str]:
    """Every AUTH reply the daemon sent on ``s`` (after ``data``) until it closed it."""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:  # closed with requests of ours unread
        pass
    return [x for x in data.decode().splitlines() if x.startswith(("OK\t", "FAIL\t"))]


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_loses_no_line_and_keeps_their_order(
    issuer: DevIssuer, workdir: Path, workers: int
) -> None:
    """Pipelined unique tokens on several connections; SIGTERM while they are answered.
    Every answered request has its line, each connection's in request order, before
    the daemon's (or each worker's) last line."""
    proc, sock = start(workdir, issuer, workers)
    try:
        wait_for(lambda: accepts(sock))
        if workers > 1:
            wait_for(lambda: (workdir / "log").read_text().count('"started"') == workers)
        per_conn = [[issuer.mint() for _ in range(60)] for _ in range(4)]
        first = _pipelined(sock, [issuer.mint()])  # the keys are loaded before the load
        assert b"\nOK\t1\tuser=alice@example.org\n" in _first_reply(first)
        first.close()
        conns = [_pipelined(sock, tokens) for tokens in per_conn]
        received = [_first_reply(s) for s in conns]  # all being answered
        proc.send_signal(signal.SIGTERM)
        answered = [_replies(s, data) for s, data in zip(conns, received, strict=True)]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (workdir / "log").read_text()
    lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    assert len(lines) == len(text.splitlines())  # nothing torn or interleaved mid-line
    fingerprints = [e["token"] for e in lines if e["event"] == "authentication"]
    total = 0
    for tokens, replies in zip(per_conn, answered, strict=True):
        assert all(r.startswith("OK\t") for r in replies)
        ours = [token_fingerprint(t) for t in tokens]
        seen = [f for f in fingerprints if f in set(ours)]
        assert len(seen) >= len(replies)  # every answer has its line
        assert seen == ours[: len(seen)]  # in the order of the requests, none twice
        total += len(replies)
    assert total >= len(conns)
    events = [e["event"] for e in lines]
    # Each worker's last line, then (with workers) the parent's, once they have exited.
    assert events.count("stopped") == workers + (workers > 1)
    assert events[-1] == "stopped"
    last_auth = max(i for i, e in enumerate(events) if e == "authentication")
    assert last_auth < [i for i, e in enumerate(events) if e == "stopped"][workers - 1]
