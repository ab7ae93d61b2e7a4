"""Server side of the Cyrus saslauthd "mux" protocol, sans I/O.

The protocol (cyrus-sasl ``saslauthd/ipc_unix.c`` ``do_request``, client in
``lib/checkpw.c`` ``saslauthd_verify_password``): one request per connection,
a sequence of counted strings, each a 2-byte big-endian length and that many
bytes: login, password, service, realm. cyrus-sasl after 2.1.28 sends a fifth
one, the client address (``ip;port``). The reply is one counted string that
starts with ``OK`` or ``NO``; the client reads at most 1023 bytes of it and
looks only at the first two.

Which variant a client speaks is not announced. Clients build the whole
request in one buffer and send it with a single write, so this parser decides
on what has arrived when the fourth field is complete: nothing more means a
four-field request; more bytes mean a fifth field follows.

Mapping to the engine's request: the bearer token is the password; the
account the client claims is the login, or ``login@realm`` when the realm is
not empty and the login has no ``@`` (libsasl splits ``user@realm`` at the
last ``@`` before sending, so this puts the address back together). The
verdict is turned into the reply in exactly one place, :func:`reply_text`.
Like h11, this module does no I/O and reads no clock: bytes in, events and
bytes out.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from saslauthd_oidc.core.outcome import Outcome, Reason, Verdict
from saslauthd_oidc.core.request import AuthRequest, Credentials, Mechanism, RequestContext

__all__ = [
    "MAX_FIELD_BYTES",
    "MAX_REPLY_BYTES",
    "NeedData",
    "Rejected",
    "Request",
    "SaslauthdServerConnection",
    "encode_reply",
    "reply_text",
]

#: Longest login, service, realm or client address accepted: the stock
#: server's ``MAX_REQ_LEN``. The password (the token) has its own limit.
MAX_FIELD_BYTES = 256
#: The client's reply buffer is 1024 bytes including the terminating NUL.
MAX_REPLY_BYTES = 1023

_LENGTH = struct.Struct("!H")
_FIELDS = ("login", "password", "service", "realm", "client address")


@dataclass(frozen=True, slots=True)
class NeedData:
    """The request is not complete yet; feed more bytes."""


@dataclass(frozen=True, slots=True)
class Request:
    """A complete, usable request: ask the engine, then send :func:`encode_reply`."""

    request: AuthRequest
    fields: int  # 4 or 5


@dataclass(frozen=True, slots=True)
class Rejected:
    """A request that cannot be authenticated; reply with ``verdict`` and close.

    ``verdict.detail`` is operator text and never contains client data.
    """

    verdict: Verdict


Event = NeedData | Request | Rejected

_NEED_DATA = NeedData()


def reply_text(verdict: Verdict) -> str:
    """The reply for a verdict: the one place that maps verdicts to saslauthd replies.

    ``OK <reason>`` or ``NO <reason>``, the reason being the closed
    :class:`~saslauthd_oidc.core.outcome.Reason` code (never a token, never
    ``detail``). Cyrus clients only compare the first two bytes, so a
    temporary failure is a refusal to them; the text says it is temporary for
    ``testsaslauthd`` users and logs.
    """
    if verdict.ok:
        return f"OK {verdict.reason.value}"
    if verdict.outcome is Outcome.TEMPFAIL:
        return f"NO temporary failure, try again later: {verdict.reason.value}"
    return f"NO {verdict.reason.value}"


def encode_reply(verdict: Verdict) -> bytes:
    """``reply_text`` as a counted string."""
    text = reply_text(verdict).encode("ascii")[:MAX_REPLY_BYTES]
    return _LENGTH.pack(len(text)) + text


def _reject(reason: Reason, detail: str) -> Rejected:
    return Rejected(Verdict(reason=reason, detail=detail))


def _is_control(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F


def _text(raw: bytes, what: str) -> str | Rejected:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _reject(Reason.MALFORMED_REQUEST, f"{what} is not valid UTF-8")
    if any(_is_control(ch) for ch in text):
        return _reject(Reason.MALFORMED_REQUEST, f"{what} contains a control character")
    return text


def _token(raw: bytes) -> str | Rejected:
    if not raw:
        return _reject(Reason.MISSING_TOKEN, "empty password")
    if any(b < 0x21 or b > 0x7E for b in raw):
        return _reject(Reason.MALFORMED_TOKEN, "password has a byte outside 0x21-0x7e")
    return raw.decode("ascii")


def _client_address(text: str) -> tuple[str | None, int | None]:
    """``ip;port`` as libsasl's SASL_IPREMOTEPORT; anything unparsable is ignored."""
    host, sep, port_text = text.rpartition(";")
    if not sep:
        host, port_text = text, ""
    host = host.removeprefix("[").removesuffix("]")
    try:
        ip: str | None = str(ipaddress.ip_address(host))
    except ValueError:
        ip = None
    port = int(port_text) if port_text.isascii() and port_text.isdecimal() else None
    if port is not None and not 0 < port <= 65535:
        port = None
    return ip, port


def account_name(login: str, realm: str) -> str:
    """The account a request claims: ``login@realm`` if the realm is set and login has no "@"."""
    if realm and "@" not in login:
        return f"{login}@{realm}"
    return login


class SaslauthdServerConnection:
    """The server's state for one saslauthd connection: one request, one reply."""

    def __init__(
        self,
        *,
        max_password_bytes: int = 16384,
        max_field_bytes: int = MAX_FIELD_BYTES,
    ) -> None:
        self._max_password = max_password_bytes
        self._max_field = max_field_bytes
        self._buffer = bytearray()
        self._eof = False
        self._event: Request | Rejected | None = None

    @property
    def max_request_bytes(self) -> int:
        """The longest request this connection can accept (five fields)."""
        return 5 * 2 + 4 * self._max_field + self._max_password

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def receive_data(self, data: bytes) -> Event:
        """Feed bytes from the client (``b""`` for EOF); returns the request once complete.

        After a :class:`Request` or :class:`Rejected` the connection is done:
        later calls return that same event and ignore their data.
        """
        if self._event is not None:
            return self._event
        if data:
            self._buffer += data
        else:
            self._eof = True
        event = self._parse()
        if not isinstance(event, NeedData):
            self._event = event
            self._buffer.clear()
        return event

    def _parse(self) -> Event:
        raw: list[bytes] = []
        pos = 0
        buf = self._buffer
        for index, name in enumerate(_FIELDS):
            if index == 4 and pos == len(buf):
                break  # four fields and nothing after them: a 2.1.28-style request
            if len(buf) - pos < 2:
                return self._incomplete(name)
            (length,) = _LENGTH.unpack_from(buf, pos)
            limit = self._max_password if name == "password" else self._max_field
            if length > limit:
                if name == "password":
                    return _reject(Reason.TOKEN_TOO_LARGE, f"password longer than {limit} bytes")
                return _reject(Reason.MALFORMED_REQUEST, f"{name} longer than {limit} bytes")
            if len(buf) - pos - 2 < length:
                return self._incomplete(name)
            raw.append(bytes(buf[pos + 2 : pos + 2 + length]))
            pos += 2 + length
        if pos != len(buf):
            return _reject(Reason.MALFORMED_REQUEST, "bytes after the request")
        return _request(raw)

    def _incomplete(self, name: str) -> Event:
        if self._eof:
            return _reject(Reason.MALFORMED_REQUEST, f"connection closed in the {name} field")
        return _NEED_DATA


def _request(raw: list[bytes]) -> Request | Rejected:
    texts: list[str] = []
    for name, value in zip(("login", "service", "realm"), (raw[0], raw[2], raw[3]), strict=True):
        text = _text(value, name)
        if isinstance(text, Rejected):
            return text
        texts.append(text)
    login, service, realm = texts
    if not login:
        return _reject(Reason.MISSING_AUTHZID, "empty login")
    token = _token(raw[1])
    if isinstance(token, Rejected):
        return token
    remote_ip: str | None = None
    remote_port: int | None = None
    if len(raw) == 5:
        address = _text(raw[4], "client address")
        if isinstance(address, Rejected):
            return address
        remote_ip, remote_port = _client_address(address)
    context = RequestContext(
        frontend="saslauthd",
        service=service.lower() or None,
        remote_ip=remote_ip,
        remote_port=remote_port,
    )
    credentials = Credentials(token=token, authzid=account_name(login, realm))
    request = AuthRequest(Mechanism.PLAIN, credentials, context, negotiated=False)
    return Request(request, fields=len(raw))
