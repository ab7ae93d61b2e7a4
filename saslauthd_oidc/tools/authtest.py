"""The operator's Dovecot auth-client: ``saslauthd-oidc auth-test``.

This module owns the client half of the Dovecot auth-client protocol as far as
an operator needs it: connect to an auth socket (ours or Dovecot's own), check
the handshake, run one SASL exchange with a bearer token, follow the failure
challenge, and report the outcome with a transcript. The transcript never
holds the raw token, only its fingerprint. The message builders are pure
functions; :func:`run_auth_test` is the only I/O.
"""

from __future__ import annotations

import binascii
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from saslauthd_oidc.core.outcome import Outcome
from saslauthd_oidc.core.request import Mechanism, token_fingerprint
from saslauthd_oidc.protocol.dovecot import decode_base64, tab_escape, tab_unescape

__all__ = [
    "AuthTestError",
    "AuthTestResult",
    "build_auth_line",
    "build_initial_response",
    "client_answer",
    "redact",
    "run_auth_test",
    "sasl_escape",
    "show_sasl",
]

REQUEST_ID = 1
_MAX_LINE = 65536
_MAX_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class AuthTestResult:
    outcome: Outcome
    user: str | None
    transcript: list[str]
    challenge: dict[str, object] | None


class AuthTestError(Exception):
    """The test could not run (socket, handshake, protocol); not an authentication result."""

    def __init__(self, message: str, transcript: list[str] | None = None) -> None:
        super().__init__(message)
        self.transcript: list[str] = transcript or []


# --------------------------------------------------------------- pure helpers


def sasl_escape(value: str) -> str:
    """RFC 5801 saslname: ``=`` → ``=3D``, ``,`` → ``=2C``."""
    return value.replace("=", "=3D").replace(",", "=2C")


def build_initial_response(
    mechanism: Mechanism,
    token: str,
    *,
    user: str | None,
    host: str | None = None,
    port: int | None = None,
) -> bytes | None:
    """The client's first SASL message; ``None`` for LOGIN, which has none."""
    if mechanism is Mechanism.OAUTHBEARER:
        authzid = f"a={sasl_escape(user)}" if user else ""
        kvpairs = ""
        if host is not None:
            kvpairs += f"host={host}\x01"
        if port is not None:
            kvpairs += f"port={port}\x01"
        return f"n,{authzid},\x01{kvpairs}auth=Bearer {token}\x01\x01".encode()
    if mechanism is Mechanism.XOAUTH2:
        return f"user={user or ''}\x01auth=Bearer {token}\x01\x01".encode()
    if mechanism is Mechanism.PLAIN:
        return f"\x00{user or ''}\x00{token}".encode()
    return None


def build_auth_line(
    request_id: int,
    mechanism: Mechanism,
    *,
    service: str,
    initial_response: bytes | None,
    params: Sequence[str] = (),
) -> str:
    """An AUTH line; ``params`` (``lip=…``, ``secured``) go between service= and resp=."""
    fields = ["AUTH", str(request_id), mechanism.value, "service=" + tab_escape(service)]
    fields += [tab_escape(p) for p in params]
    if initial_response is not None:
        fields.append("resp=" + _b64(initial_response))
    return "\t".join(fields)


def redact(text: str, token: str) -> str:
    """``text`` with every occurrence of ``token`` replaced by its fingerprint."""
    if not token:
        return text
    return text.replace(token, f"<token sha256:{token_fingerprint(token)}>")


def show_sasl(data: bytes, token: str) -> str:
    """A SASL message for the transcript: token redacted, control bytes visible."""
    text = redact(data.decode("utf-8", "replace"), token)
    return "".join(f"^{chr(ord(c) + 64)}" if ord(c) < 32 else c for c in text)


def _shown_cont(reply: bytes, token: str) -> str | None:
    """How a CONT we send appears in the transcript when its base64 would hide the token."""
    if token and token.encode() in reply:
        return f"CONT\t{REQUEST_ID}\t<{show_sasl(reply, token)}>"
    return None


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _named(fields: list[str], name: str) -> str | None:
    prefix = name + "="
    for value in fields:
        if value.startswith(prefix):
            return tab_unescape(value[len(prefix) :])
    return None


def _parse_challenge(data: bytes) -> dict[str, object] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# ------------------------------------------------------------------------ I/O


class _Client:
    def __init__(self, stream: trio.abc.Stream, token: str) -> None:
        self._stream = stream
        self._token = token
        self._buffer = bytearray()
        self.transcript: list[str] = []

    def note(self, line: str) -> None:
        self.transcript.append(line)

    async def send(self, line: str, shown: str | None = None) -> None:
        self.note("C: " + redact(shown if shown is not None else line, self._token))
        await self._stream.send_all((line + "\n").encode())

    async def read_line(self) -> list[str]:
        while b"\n" not in self._buffer:
            if len(self._buffer) > _MAX_LINE:
                raise AuthTestError("server sent an over-long line", self.transcript)
            data = await self._stream.receive_some(_MAX_LINE)
            if not data:
                raise AuthTestError("connection closed by the server", self.transcript)
            self._buffer += data
        raw, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        fields = line.split("\t")
        # Dovecot's login processes prove themselves to its auth-master with the cookie.
        shown = "COOKIE\t<redacted>" if fields[0] == "COOKIE" else line
        self.note("S: " + redact(shown, self._token))
        return fields


async def _read_handshake(client: _Client) -> set[str]:
    mechanisms: set[str] = set()
    version_ok = False
    while True:
        fields = await client.read_line()
        verb = fields[0]
        if verb == "VERSION":
            version_ok = len(fields) > 1 and fields[1] == "1"
            if not version_ok:
                raise AuthTestError(
                    "server speaks an incompatible protocol version", client.transcript
                )
        elif verb == "MECH" and len(fields) > 1:
            mechanisms.add(fields[1].upper())
        elif verb == "DONE":
            break
    if not version_ok:
        raise AuthTestError("server sent no VERSION line", client.transcript)
    return mechanisms


def client_answer(
    mechanism: Mechanism,
    data: bytes,
    *,
    round_no: int,
    initial: bytes | None,
    user: str | None,
    token: str,
) -> bytes:
    """The client's reply to a server challenge."""
    if mechanism is Mechanism.LOGIN:
        return (user or "").encode() if round_no == 0 else token.encode()
    if not data and initial is not None:
        return initial  # the server ignored our initial response and asks again
    if mechanism is Mechanism.OAUTHBEARER:
        return b"\x01"  # RFC 7628 §3.2.3: acknowledge the error challenge
    return b""


async def _exchange(
    client: _Client,
    mechanism: Mechanism,
    *,
    token: str,
    user: str | None,
    service: str,
    host: str | None,
    port: int | None,
) -> AuthTestResult:
    initial = build_initial_response(mechanism, token, user=user, host=host, port=port)
    line = build_auth_line(REQUEST_ID, mechanism, service=service, initial_response=initial)
    shown = None
    if initial is not None:
        shown = line.rpartition("resp=")[0] + f"resp=<{show_sasl(initial, token)}>"
    await client.send(line, shown)
    challenge: dict[str, object] | None = None
    for round_no in range(_MAX_ROUNDS):
        fields = await client.read_line()
        while len(fields) < 2 or fields[1] != str(REQUEST_ID):
            fields = await client.read_line()  # not ours: ignore, as Postfix does
        verb, rest = fields[0], fields[2:]
        if verb == "OK":
            return AuthTestResult(Outcome.OK, _named(rest, "user"), client.transcript, challenge)
        if verb == "FAIL":
            outcome = Outcome.TEMPFAIL if _named(rest, "code") == "temp_fail" else Outcome.FAIL
            return AuthTestResult(outcome, _named(rest, "user"), client.transcript, challenge)
        if verb != "CONT" or len(fields) < 3:
            raise AuthTestError(f"unexpected reply {verb!r}", client.transcript)
        data = decode_base64(fields[2]) if fields[2] not in ("", "=") else b""
        if data is None:
            raise AuthTestError("server sent invalid base64 in CONT", client.transcript)
        if data:
            client.note("   = " + show_sasl(data, token))
            challenge = _parse_challenge(data) or challenge
        reply = client_answer(
            mechanism, data, round_no=round_no, initial=initial, user=user, token=token
        )
        await client.send(f"CONT\t{REQUEST_ID}\t{_b64(reply)}", _shown_cont(reply, token))
    raise AuthTestError("too many challenges from the server", client.transcript)


async def run_auth_test(
    socket_path: str,
    token: str,
    *,
    user: str | None,
    mechanism: str = "OAUTHBEARER",
    service: str = "smtp",
    host: str | None = None,
    port: int | None = None,
    timeout: float = 10.0,
) -> AuthTestResult:
    """Authenticate once against the Dovecot-protocol socket at ``socket_path``.

    Raises :class:`AuthTestError` when the test cannot run (no socket, bad
    handshake, mechanism not offered, protocol error, timeout).
    """
    mech = Mechanism.parse(mechanism)
    if mech is None:
        raise AuthTestError(f"unknown mechanism {mechanism!r}")
    client: _Client | None = None
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(socket_path)
            async with stream:
                client = _Client(stream, token)
                return await _run(
                    client, mech, token=token, user=user, service=service, host=host, port=port
                )
    except trio.TooSlowError as exc:
        transcript = client.transcript if client else []
        raise AuthTestError(f"no answer within {timeout} s", transcript) from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        transcript = client.transcript if client else []
        raise AuthTestError("connection lost", transcript) from exc
    except OSError as exc:
        raise AuthTestError(f"cannot connect to {socket_path}: {exc.strerror or exc}") from exc


async def _run(
    client: _Client,
    mechanism: Mechanism,
    *,
    token: str,
    user: str | None,
    service: str,
    host: str | None,
    port: int | None,
) -> AuthTestResult:
    # A 2.4 Dovecot server waits for our VERSION before its handshake, so send first.
    await client.send("VERSION\t1\t2")
    await client.send(f"CPID\t{os.getpid()}")
    offered = await _read_handshake(client)
    if mechanism.value not in offered:
        raise AuthTestError(
            f"server does not offer {mechanism.value} (offers: {', '.join(sorted(offered))})",
            client.transcript,
        )
    return await _exchange(
        client, mechanism, token=token, user=user, service=service, host=host, port=port
    )
