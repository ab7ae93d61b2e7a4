"""Server side of the Dovecot auth-client protocol v1.2, sans I/O.

This module owns the wire format spoken on the auth socket: tab-escaping,
line framing (with a hard line cap), the handshake, parsing of the client's
VERSION/CPID/AUTH/CONT/CANCEL lines, and the OK/CONT/FAIL replies. It drives
one :class:`~saslauthd_oidc.protocol.sasl.SaslExchange` per request id and asks its
caller for a verdict through :class:`NeedVerdict` events; client mistakes worth
logging come out of the same stream as :class:`ProtocolError` events. Like
h11, it does no I/O, reads no clock and imports no trio: bytes in, events and
bytes out.

The mapping from a failed :class:`~saslauthd_oidc.core.outcome.Verdict` to FAIL
fields lives in exactly one place, :func:`fail_fields`.
"""

from __future__ import annotations

import binascii
import enum
import functools
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from saslauthd_oidc.core.outcome import Outcome, Reason, Verdict
from saslauthd_oidc.core.request import AuthRequest, Mechanism, RequestContext
from saslauthd_oidc.protocol.sasl import (
    Authenticate,
    Challenge,
    Failed,
    SaslExchange,
    Step,
    Succeeded,
)

__all__ = [
    "PROTOCOL_VERSION",
    "DovecotServerConnection",
    "Event",
    "NeedVerdict",
    "ProtocolError",
    "decode_base64",
    "fail_fields",
    "tab_escape",
    "tab_unescape",
]

PROTOCOL_VERSION = (1, 2)
MAX_REQUEST_ID = 2**32 - 1

# Fixed texts for failures that the protocol layer detects itself. None of
# them says anything about a token.
TEXT_UNSUPPORTED_MECHANISM = "Unsupported mechanism"
TEXT_INVALID_BASE64_INITIAL = "Invalid base64 data in initial response"
TEXT_INVALID_BASE64_CONTINUED = "Invalid base64 data in continued response"
TEXT_UNKNOWN_ID = "Authentication request timed out"
TEXT_UNEXPECTED_CONT = "Unexpected continuation"
TEXT_FAILED = "Authentication failed"
TEXT_TEMPFAIL = "Temporary authentication failure"

_ESCAPES = {"\x01": "\x011", "\t": "\x01t", "\r": "\x01r", "\n": "\x01n"}
_ESCAPE_RE = re.compile("[\x01\t\r\n]")
_UNESCAPES = {"1": "\x01", "t": "\t", "r": "\r", "n": "\n", "0": "\x00"}
_UNESCAPE_RE = re.compile("\x01(.?)", re.DOTALL)
# Enough of an over-long line's beginning to read "AUTH\t<id>" or "CONT\t<id>".
_ID_PREFIX_RE = re.compile(rb"(AUTH|CONT)\t([0-9]{1,10})(?:\t|\r?$)")
_ID_PREFIX_LEN = 16


def tab_escape(value: str) -> str:
    """Escape as Dovecot's ``str_append_tabescaped``: only \\001, TAB, CR and LF."""
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group(0)], value)


def tab_unescape(value: str) -> str:
    """Unescape as Dovecot's ``str_tabunescape``; a trailing lone \\001 is dropped."""
    if "\x01" not in value:
        return value
    return _UNESCAPE_RE.sub(lambda m: _UNESCAPES.get(m.group(1), m.group(1)), value)


def decode_base64(value: str) -> bytes | None:
    """Strict standard-alphabet base64 with padding; ``None`` when invalid."""
    try:
        return binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def fail_fields(verdict: Verdict, text: str | None = None) -> list[str]:
    """The FAIL fields for a failed verdict: the one place that maps verdicts to FAIL.

    ``reason=`` is a fixed text that never says why authentication failed;
    ``verdict.detail`` and anything token-related stay out. ``text`` lets the
    protocol layer name its own request-format errors with the fixed texts above.
    """
    fields: list[str] = []
    if verdict.outcome is Outcome.TEMPFAIL:
        fields.append("code=temp_fail")
        default = TEXT_TEMPFAIL
    elif verdict.reason is Reason.INVALID_BASE64:
        fields.append("code=invalid_base64")
        default = TEXT_INVALID_BASE64_INITIAL
    elif verdict.reason is Reason.UNSUPPORTED_MECHANISM:
        default = TEXT_UNSUPPORTED_MECHANISM
    else:
        default = TEXT_FAILED
    fields.append("reason=" + tab_escape(text or default))
    return fields


@dataclass(frozen=True, slots=True)
class NeedVerdict:
    """The caller must authenticate ``request`` and hand the verdict to ``conclude``."""

    request_id: int
    request: AuthRequest


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """A client mistake worth logging. ``message`` never contains client data."""

    request_id: int | None
    message: str


#: What :meth:`DovecotServerConnection.receive_data` returns a list of.
Event = NeedVerdict | ProtocolError


class _State(enum.Enum):
    WAIT_CLIENT = "wait_client"  # we sent CONT; the client's CONT is due
    WAIT_VERDICT = "wait_verdict"  # a NeedVerdict is out; conclude() is due
    STARTING = "starting"


@dataclass(slots=True)
class _Request:
    mechanism: Mechanism
    context: RequestContext
    exchange: SaslExchange
    state: _State = _State.STARTING
    # Cancelled while a verdict is out: the id stays taken until conclude()
    # arrives, so a late verdict can never answer a newer request with that id.
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class _AuthParams:
    context: RequestContext
    resp: str | None
    malformed: bool


class DovecotServerConnection:
    """The server's state for one auth-client connection."""

    def __init__(
        self,
        mechanisms: Sequence[Mechanism],
        *,
        spid: int,
        cuid: int,
        cookie: str,
        max_line: int = 16384,
        max_message_bytes: int = 65536,
        max_in_flight: int = 64,
    ) -> None:
        self._mechanisms = tuple(mechanisms)
        self._spid = spid
        self._cuid = cuid
        self._cookie = cookie
        self._max_line = max_line
        self._max_message_bytes = max_message_bytes
        self._max_in_flight = max_in_flight
        self._buffer = bytearray()
        self._discarding = False
        self._out: list[bytes] = []
        self._requests: dict[int, _Request] = {}
        # Where _error() puts what it reports: the event list being built.
        self._sink: list[Event] = []
        self.client_version: tuple[int, int] | None = None
        self.client_pid: int | None = None
        self.closed = False
        self.last_failure: Verdict | None = None

    # ----------------------------------------------------------------- output

    def handshake(self) -> bytes:
        """Everything the server says on accept, without waiting for the client."""
        lines = [f"VERSION\t{PROTOCOL_VERSION[0]}\t{PROTOCOL_VERSION[1]}"]
        lines += [f"MECH\t{mech.value}\tplaintext" for mech in self._mechanisms]
        lines += [f"SPID\t{self._spid}", f"CUID\t{self._cuid}", f"COOKIE\t{self._cookie}", "DONE"]
        return "".join(line + "\n" for line in lines).encode("ascii")

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def has_output(self) -> bool:
        """Whether :meth:`data_to_send` has anything."""
        return bool(self._out)

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    @property
    def cuid(self) -> int:
        return self._cuid

    @property
    def partial_line(self) -> bool:
        """True while part of a line (or of an overlong line being discarded) has arrived."""
        return bool(self._buffer) or self._discarding

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def _emit(self, *fields: str) -> None:
        self._out.append(("\t".join(fields) + "\n").encode("utf-8"))

    def _fail(self, request_id: int, verdict: Verdict, text: str | None = None) -> None:
        self.last_failure = verdict  # for explain: what a FAIL it just wrote stands for
        self._emit("FAIL", str(request_id), *fail_fields(verdict, text))

    def _error(self, request_id: int | None, message: str) -> None:
        self._sink.append(ProtocolError(request_id, message))

    def _reject(self, request_id: int, reason: Reason, message: str, text: str | None) -> None:
        self._error(request_id, message)
        self._fail(request_id, Verdict(reason=reason, detail=message), text)

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the client; ``b""`` means EOF.

        Returns, in order, the verdicts now needed (:class:`NeedVerdict`) and
        the client's mistakes worth logging (:class:`ProtocolError`).
        """
        if self.closed:
            return []
        if not data:
            self.closed = True
            return []
        events: list[Event] = []
        self._sink = events
        for line in self._split_lines(data):
            need = self._handle_line(line)
            if need is not None:
                events.append(need)
            if self.closed:
                break
        self._sink = []
        return events

    def _split_lines(self, data: bytes) -> list[bytes]:
        """Complete lines in ``data``; never holds more than ``max_line`` bytes back."""
        lines: list[bytes] = []
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            if self._discarding:
                if end < 0:
                    return lines
                self._discarding = False
                start = end + 1
                continue
            chunk_end = len(data) if end < 0 else end
            if len(self._buffer) + chunk_end - start > self._max_line:
                self._overlong(data[start : start + _ID_PREFIX_LEN])
                self._discarding = end < 0
                start = len(data) if end < 0 else end + 1
                continue
            self._buffer += data[start:chunk_end]
            if end < 0:
                return lines
            lines.append(bytes(self._buffer))
            self._buffer.clear()
            start = end + 1
        return lines

    def _overlong(self, tail: bytes) -> None:
        prefix = bytes(self._buffer[:_ID_PREFIX_LEN]) + tail
        self._buffer.clear()
        match = _ID_PREFIX_RE.match(prefix[:_ID_PREFIX_LEN])
        request_id = _parse_id(match.group(2).decode("ascii")) if match else None
        if request_id is None:
            self._error(None, "line too long; no request id readable")
            return
        self._drop(request_id)
        self._reject(request_id, Reason.MALFORMED_REQUEST, "line too long", None)

    def _handle_line(self, raw: bytes) -> NeedVerdict | None:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw:
            return None
        line = raw.decode("utf-8", "replace")
        verb, _, rest = line.partition("\t")
        if verb == "AUTH":
            return self._handle_auth(rest)
        if verb == "CONT":
            return self._handle_cont(rest)
        if verb == "CANCEL":
            self._handle_cancel(rest)
        elif verb == "VERSION":
            self._handle_version(rest)
        elif verb == "CPID":
            self._handle_cpid(rest)
        else:
            self._error(None, "unknown command ignored")
        return None

    def _handle_version(self, rest: str) -> None:
        major, _, minor = rest.partition("\t")
        minor = minor.partition("\t")[0]
        if _parse_uint(major) != 1:
            self._error(None, "incompatible client protocol version")
            self.closed = True
            return
        self.client_version = (1, _parse_uint(minor) or 0)

    def _handle_cpid(self, rest: str) -> None:
        pid = _parse_uint(rest.partition("\t")[0])
        if pid:
            self.client_pid = pid
        else:
            self._error(None, "invalid CPID")

    def _handle_cancel(self, rest: str) -> None:
        request_id = _parse_id(rest.partition("\t")[0])
        if request_id is None:
            self._error(None, "CANCEL without a valid id")
            return
        self._drop(request_id)

    def _drop(self, request_id: int) -> None:
        """Forget a request; one whose verdict is still out stays as a tombstone."""
        entry = self._requests.get(request_id)
        if entry is None:
            return
        if entry.state is _State.WAIT_VERDICT:
            entry.cancelled = True
        else:
            del self._requests[request_id]

    # ------------------------------------------------------------------- AUTH

    def _handle_auth(self, rest: str) -> NeedVerdict | None:
        fields = [tab_unescape(field) for field in rest.split("\t")]
        request_id = _parse_id(fields[0])
        if request_id is None:
            self._error(None, "AUTH without a valid id")
            return None
        if request_id in self._requests:
            # The client can no longer tell two replies with this id apart:
            # answer once, and silence the earlier request.
            self._drop(request_id)
            self._reject(request_id, Reason.MALFORMED_REQUEST, "duplicate request id", None)
            return None
        if len(self._requests) >= self._max_in_flight:
            self._reject(request_id, Reason.OVERLOADED, "too many requests in flight", None)
            return None
        mechanism = Mechanism.parse(fields[1]) if len(fields) > 1 else None
        if mechanism is None or mechanism not in self._mechanisms:
            self._reject(request_id, Reason.UNSUPPORTED_MECHANISM, "unsupported mechanism", None)
            return None
        params = _auth_params(fields[2:])
        if params.malformed:
            self._reject(request_id, Reason.MALFORMED_REQUEST, "parameter after resp=", None)
            return None
        initial = self._initial_response(params.resp)
        if isinstance(initial, _Invalid):
            self._reject(
                request_id,
                Reason.INVALID_BASE64,
                "invalid base64 in initial response",
                TEXT_INVALID_BASE64_INITIAL,
            )
            return None
        exchange = SaslExchange(mechanism, max_message_bytes=self._max_message_bytes)
        entry = _Request(mechanism, params.context, exchange)
        self._requests[request_id] = entry
        return self._apply(request_id, entry, exchange.start(initial))

    def _initial_response(self, resp: str | None) -> bytes | _Invalid | None:
        if resp is None:
            return None
        minor = self.client_version[1] if self.client_version else 0
        if resp == "" and minor < 2:
            return None  # Exim and Postfix (1.0) send an empty resp= for "no initial response"
        if resp in ("", "="):
            return b""
        decoded = decode_base64(resp)
        return _INVALID if decoded is None else decoded

    # ------------------------------------------------------------------- CONT

    def _handle_cont(self, rest: str) -> NeedVerdict | None:
        id_field, _, payload = rest.partition("\t")
        request_id = _parse_id(id_field)
        if request_id is None:
            self._error(None, "CONT without a valid id")
            return None
        entry = self._requests.get(request_id)
        if entry is None or entry.cancelled:
            self._reject(
                request_id, Reason.MALFORMED_REQUEST, "CONT for unknown id", TEXT_UNKNOWN_ID
            )
            return None
        if entry.state is not _State.WAIT_CLIENT:
            self._drop(request_id)
            self._reject(
                request_id, Reason.MALFORMED_REQUEST, "unexpected CONT", TEXT_UNEXPECTED_CONT
            )
            return None
        data = b"" if payload in ("", "=") else decode_base64(payload)
        if data is None:
            self._drop(request_id)
            self._reject(
                request_id,
                Reason.INVALID_BASE64,
                "invalid base64 in CONT",
                TEXT_INVALID_BASE64_CONTINUED,
            )
            return None
        return self._apply(request_id, entry, entry.exchange.receive(data))

    # ---------------------------------------------------------------- verdict

    def conclude(self, request_id: int, verdict: Verdict) -> ProtocolError | None:
        """Hand over the engine's verdict; unknown or cancelled ids are ignored.

        Returns the error to log when the verdict cannot be sent as it is (an
        account name that is not valid Unicode: FAIL instead).
        """
        entry = self._requests.get(request_id)
        if entry is None or entry.state is not _State.WAIT_VERDICT:
            return None
        if entry.cancelled:
            del self._requests[request_id]
            return None
        events: list[Event] = []
        self._sink = events
        self._apply(request_id, entry, entry.exchange.conclude(verdict))
        self._sink = []
        error = events[0] if events else None
        return error if isinstance(error, ProtocolError) else None

    def _apply(self, request_id: int, entry: _Request, step: Step) -> NeedVerdict | None:
        if isinstance(step, Challenge):
            entry.state = _State.WAIT_CLIENT
            self._emit(
                "CONT", str(request_id), binascii.b2a_base64(step.data, newline=False).decode()
            )
            return None
        if isinstance(step, Authenticate):
            entry.state = _State.WAIT_VERDICT
            request = AuthRequest(entry.mechanism, step.credentials, entry.context)
            return NeedVerdict(request_id, request)
        del self._requests[request_id]
        if isinstance(step, Succeeded) and _encodable(step.account):
            self._emit("OK", str(request_id), "user=" + tab_escape(step.account))
        elif isinstance(step, Succeeded):
            self._error(request_id, "account name is not valid Unicode")
            self._fail(request_id, Verdict(reason=Reason.INVALID_ACCOUNT))
        else:
            assert isinstance(step, Failed)
            self._fail(request_id, step.verdict)
        return None


class _Invalid:
    """Marker for an initial response that is not valid base64."""


_INVALID = _Invalid()


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def _parse_uint(field: str) -> int | None:
    """A uint32 in plain ASCII decimal (``int()`` alone would accept "+1", " 1", "١")."""
    if not field.isascii() or not field.isdecimal() or len(field) > 10:
        return None
    value = int(field)
    return value if value <= MAX_REQUEST_ID else None


def _parse_id(field: str) -> int | None:
    value = _parse_uint(field)
    return value if value else None


# The parameters before resp= are the same on every AUTH of a client (service,
# addresses, flags): parsed once (bounded memo), only resp= differs.
_MEMO_PARAMS_MAX = 512


def _auth_params(fields: Sequence[str]) -> _AuthParams:
    """:func:`_parse_auth_params`, memoised on everything but the value of a final resp=."""
    if fields and fields[-1].startswith("resp="):
        key = tuple(fields[:-1])
        if sum(map(len, key)) <= _MEMO_PARAMS_MAX:
            base = _memo_params(key)
            if base.malformed:
                return base
            return _AuthParams(base.context, fields[-1][5:], malformed=False)
    return _parse_auth_params(fields)


@functools.lru_cache(maxsize=256)
def _memo_params(key: tuple[str, ...]) -> _AuthParams:
    return _parse_auth_params([*key, "resp="])


def _parse_auth_params(fields: Sequence[str]) -> _AuthParams:
    values: dict[str, str] = {}
    flags: set[str] = set()
    resp: str | None = None
    for index, field in enumerate(fields):
        name, sep, value = field.partition("=")
        if name == "resp" and sep:
            if index != len(fields) - 1:
                return _AuthParams(RequestContext(), None, malformed=True)
            resp = value
        elif sep:
            values[name] = value
        else:
            flags.add(name)
    service = values.get("service") or values.get("protocol")
    context = RequestContext(
        frontend="dovecot",
        service=service.lower() if service else None,
        local_ip=_parse_ip(values.get("lip")),
        remote_ip=_parse_ip(values.get("rip")),
        local_port=_parse_port(values.get("lport")),
        remote_port=_parse_port(values.get("rport")),
        local_name=values.get("local_name") or None,
        secured="secured" in flags or "secured" in values,
    )
    return _AuthParams(context, resp, malformed=False)


def _parse_ip(value: str | None) -> str | None:
    if not value:
        return None
    if len(value) <= _MEMO_IP_MAX:
        return _canonical_ip_memo(value)
    return _canonical_ip(value)


# Memoised for short values only, so the memo stays small whatever clients send.
_MEMO_IP_MAX = 64


@functools.lru_cache(maxsize=4096)
def _canonical_ip_memo(value: str) -> str | None:
    """:func:`_canonical_ip`, memoised: the same few client addresses repeat."""
    return _canonical_ip(value)


def _canonical_ip(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def _parse_port(value: str | None) -> int | None:
    port = _parse_uint(value) if value is not None else None
    return port if port is not None and port <= 65535 else None
