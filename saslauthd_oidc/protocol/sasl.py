"""SASL payloads for the token mechanisms, and one exchange's state machine.

Owns the decoding of OAUTHBEARER (RFC 7628 §3.1 with the RFC 5801 GS2 header),
XOAUTH2, PLAIN and LOGIN client messages into :class:`Credentials`; the
failure challenges sent before a refusal (RFC 7628 §3.2.2 JSON, XOAUTH2 JSON);
and :class:`SaslExchange`, which sequences one exchange: server challenge,
client message, engine verdict, failure dialogue. Pure: bytes and values in,
values out. No I/O, no clock, no exceptions for bad input.

Nothing produced here (``Refusal.detail``, ``Verdict.detail``) ever holds a
token or echoes raw client bytes.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from saslauthd_oidc.core.outcome import DiscoveryHint, Outcome, Reason, Refusal, Verdict
from saslauthd_oidc.core.request import Credentials, Mechanism

__all__ = [
    "Authenticate",
    "Challenge",
    "Failed",
    "SaslExchange",
    "Step",
    "Succeeded",
    "decode_oauthbearer",
    "decode_plain",
    "decode_xoauth2",
    "oauth_status",
    "oauthbearer_failure",
    "xoauth2_failure",
]

_KVSEP = b"\x01"
_BEARER = b"bearer "

_KEY = re.compile(rb"[A-Za-z]+")
_VALUE = re.compile(rb"[\x21-\x7e \t\r\n]*")
_PRINTABLE = re.compile(rb"[\x21-\x7e]+")
_PORT = re.compile(rb"[1-9][0-9]{0,4}")
_CB_NAME = re.compile(rb"[A-Za-z0-9.-]+")
_HEADERLESS = re.compile(rb"[A-Za-z]+=")


def _malformed(detail: str) -> Refusal:
    return Refusal(Reason.MALFORMED_SASL, detail)


def _is_control(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F


def _has_control(text: str) -> bool:
    if text.isascii() and text.isprintable():
        return False  # printable ASCII has no control character
    return any(map(_is_control, text))


def _identity(raw: bytes, what: str) -> str | Refusal:
    """A user name as the client sent it: UTF-8, no control character (the Dovecot
    protocol is TAB/LF framed, so one must never reach an ``OK user=`` line)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _malformed(f"{what} is not valid UTF-8")
    if _has_control(text):
        return _malformed(f"{what} contains a control character")
    return text


def _token(raw: bytes) -> str | Refusal:
    if not raw:
        return Refusal(Reason.MISSING_TOKEN, "empty bearer token")
    if _PRINTABLE.fullmatch(raw) is None:
        return Refusal(Reason.MALFORMED_TOKEN, "bearer token has a byte outside 0x21-0x7e")
    return raw.decode("ascii")


def _bearer_token(value: bytes) -> str | Refusal:
    if not value or value.lower() == _BEARER.rstrip():
        return Refusal(Reason.MISSING_TOKEN, "auth carries no bearer token")
    if value[: len(_BEARER)].lower() != _BEARER:
        return Refusal(Reason.MALFORMED_TOKEN, "auth value is not 'Bearer <token>'")
    return _token(value[len(_BEARER) :])


# --- OAUTHBEARER -------------------------------------------------------------


def _unescape_saslname(raw: bytes) -> bytes | Refusal:
    head, *escaped = raw.split(b"=")
    out = bytearray(head)
    for part in escaped:
        if part[:2] == b"2C":
            out += b","
        elif part[:2] == b"3D":
            out += b"="
        else:
            return _malformed("authzid has an '=' that is not =2C or =3D")
        out += part[2:]
    return bytes(out)


def _gs2_authzid(segment: bytes) -> str | Refusal | None:
    if not segment:
        return None
    if segment.startswith(b"a="):
        raw = _unescape_saslname(segment[2:])
        if isinstance(raw, Refusal):
            return raw
    elif segment.startswith(b"user="):
        # RFC 7628 §4.4's own example header, "n,user=someuser@example.com,": no escaping.
        raw = segment[5:]
    else:
        return _malformed("unknown GS2 header attribute")
    if not raw:
        return _malformed("empty authzid in GS2 header")
    return _identity(raw, "authzid")


def _gs2_header(data: bytes) -> tuple[str | None, int] | Refusal:
    """Parse ``[F,] cbflag "," [authzid] "," %x01``; return the authzid and where kvpairs start."""
    if data.startswith(b"F,"):
        return _malformed("non-standard GS2 flag 'F' is not supported")
    comma = data.find(b",")
    if comma < 0:
        return _malformed("no GS2 header")
    cbflag = data[:comma]
    if cbflag.startswith(b"p="):
        if _CB_NAME.fullmatch(cbflag[2:]) is None:
            return _malformed("bad channel-binding name in GS2 header")
        return Refusal(Reason.CHANNEL_BINDING_UNSUPPORTED, "client requires channel binding")
    if cbflag not in (b"n", b"y"):
        return _malformed("bad GS2 channel-binding flag")
    start = comma + 1
    end = len(data)
    for stop in (b",", _KVSEP):
        found = data.find(stop, start, end)
        if found >= 0:
            end = found
    if data[end : end + 1] != b",":
        return _malformed("GS2 header not terminated by ','")
    if data[end + 1 : end + 2] != _KVSEP:
        return _malformed("GS2 header not followed directly by %x01")
    authzid = _gs2_authzid(data[start:end])
    if isinstance(authzid, Refusal):
        return authzid
    return authzid, end + 2


def _kvpairs(data: bytes, pos: int, wanted: frozenset[bytes]) -> dict[bytes, bytes] | Refusal:
    """Parse ``*kvpair kvsep`` from ``pos`` to the end; keep the ``wanted`` keys."""
    found: dict[bytes, bytes] = {}
    end = len(data)
    while True:
        if pos == end:
            return _malformed("missing final %x01")
        sep = data.find(_KVSEP, pos)
        if sep < 0:
            return _malformed("key/value pair not terminated by %x01")
        if sep == pos:
            if sep + 1 != end:
                return _malformed("trailing bytes after the final %x01")
            return found
        key, eq, value = data[pos:sep].partition(b"=")
        if not eq or _KEY.fullmatch(key) is None:
            return _malformed("key/value pair without an alphabetic key and '='")
        if _VALUE.fullmatch(value) is None:
            return _malformed("forbidden byte in a key/value value")
        if key in wanted:
            if key in found:
                return _malformed(f"duplicate '{key.decode('ascii')}' key")
            found[key] = value
        pos = sep + 1


_OAUTHBEARER_KEYS = frozenset({b"auth", b"host", b"port"})
_HEADERLESS_KEYS = _OAUTHBEARER_KEYS | {b"user"}


def decode_oauthbearer(data: bytes) -> Credentials | Refusal:
    """Decode an OAUTHBEARER client response (RFC 7628 §3.1).

    Strict RFC 7628/5801 grammar, plus two forms real clients send: no GS2 header
    at all (old curl, ``user=`` then gives the authzid) and RFC 7628 §4.4's
    ``n,user=…,`` header. A missing authzid is accepted; the engine decides.
    """
    if not data:
        return _malformed("empty OAUTHBEARER message")
    if data == _KVSEP:  # a lone kvsep where no failure challenge was sent: the client gives up
        return Refusal(Reason.CANCELLED, "client aborted")
    if _HEADERLESS.match(data) is not None and not data.startswith(b"p="):
        authzid: str | None = None
        pairs = _kvpairs(data, 0, _HEADERLESS_KEYS)
        if isinstance(pairs, Refusal):
            return pairs
        if b"user" in pairs:
            if not pairs[b"user"]:
                return _malformed("empty user")
            user = _identity(pairs[b"user"], "user")
            if isinstance(user, Refusal):
                return user
            authzid = user
    else:
        header = _gs2_header(data)
        if isinstance(header, Refusal):
            return header
        authzid, start = header
        pairs = _kvpairs(data, start, _OAUTHBEARER_KEYS)
        if isinstance(pairs, Refusal):
            return pairs

    host: str | None = None
    if b"host" in pairs:
        if _PRINTABLE.fullmatch(pairs[b"host"]) is None:
            return _malformed("host is empty or not printable ASCII")
        host = pairs[b"host"].decode("ascii")
    port: int | None = None
    if b"port" in pairs:
        raw_port = pairs[b"port"]
        if _PORT.fullmatch(raw_port) is None or int(raw_port) > 65535:
            return _malformed("port is not a decimal 1-65535 without leading zeros")
        port = int(raw_port)
    if b"auth" not in pairs:
        return Refusal(Reason.MISSING_TOKEN, "no auth key")
    token = _bearer_token(pairs[b"auth"])
    if isinstance(token, Refusal):
        return token
    return Credentials(token, authzid, host, port)


# --- XOAUTH2, PLAIN, LOGIN ---------------------------------------------------


def decode_xoauth2(data: bytes) -> Credentials | Refusal:
    """Decode ``user=<u> %x01 auth=Bearer <token> %x01 %x01`` (Google/Microsoft XOAUTH2)."""
    if not data.endswith(b"\x01\x01"):
        return _malformed("XOAUTH2 message does not end with %x01%x01")
    fields: dict[bytes, bytes] = {}
    for field in data[:-2].split(_KVSEP):
        key, eq, value = field.partition(b"=")
        if not eq or not key:
            return _malformed("XOAUTH2 field is not key=value")
        if key in (b"user", b"auth"):
            if key in fields:
                return _malformed(f"duplicate '{key.decode('ascii')}' field")
            fields[key] = value
    user_raw = fields.get(b"user", b"")
    if not user_raw:
        return Refusal(Reason.MISSING_AUTHZID, "XOAUTH2 message has no user")
    user = _identity(user_raw, "user")
    if isinstance(user, Refusal):
        return user
    if b"auth" not in fields:
        return Refusal(Reason.MISSING_TOKEN, "no auth field")
    token = _bearer_token(fields[b"auth"])
    if isinstance(token, Refusal):
        return token
    return Credentials(token, user)


def decode_plain(data: bytes) -> Credentials | Refusal:
    """Decode PLAIN ``authzid NUL authcid NUL password`` (RFC 4616); the password is the token."""
    if data.count(b"\x00") != 2:
        return _malformed("PLAIN message is not authzid NUL authcid NUL password")
    authzid_raw, authcid_raw, password = data.split(b"\x00")
    if not authcid_raw:
        return Refusal(Reason.MISSING_AUTHZID, "empty PLAIN authcid")
    authcid = _identity(authcid_raw, "authcid")
    if isinstance(authcid, Refusal):
        return authcid
    if authzid_raw:
        authzid = _identity(authzid_raw, "authzid")
        if isinstance(authzid, Refusal):
            return authzid
        if authzid != authcid:
            return _malformed("PLAIN authzid differs from authcid")
    token = _token(password)
    if isinstance(token, Refusal):
        return token
    return Credentials(token, authcid)


def _decode_login_user(data: bytes) -> str | Refusal:
    if not data:
        return Refusal(Reason.MISSING_AUTHZID, "empty LOGIN user name")
    return _identity(data, "user name")


# --- Failure challenges ------------------------------------------------------

_REQUEST_SHAPED = frozenset(
    {
        Reason.MALFORMED_SASL,
        Reason.MALFORMED_REQUEST,
        Reason.CHANNEL_BINDING_UNSUPPORTED,
        Reason.MISSING_AUTHZID,
        Reason.UNSUPPORTED_MECHANISM,
        Reason.INVALID_BASE64,
    }
)


def oauth_status(reason: Reason) -> str:
    """The RFC 6750 error code a refusal is reported as."""
    if reason in _REQUEST_SHAPED:
        return "invalid_request"
    if reason is Reason.INSUFFICIENT_SCOPE:
        return "insufficient_scope"
    return "invalid_token"


def _json(body: dict[str, str]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode("ascii")


def oauthbearer_failure(reason: Reason, hint: DiscoveryHint) -> bytes:
    """RFC 7628 §3.2.2 failure challenge."""
    body = {"status": oauth_status(reason)}
    if hint.scope is not None:
        body["scope"] = hint.scope
    if hint.openid_configuration is not None:
        body["openid-configuration"] = hint.openid_configuration
    return _json(body)


_XOAUTH2_STATUS = {"invalid_request": "400", "insufficient_scope": "403"}


def xoauth2_failure(reason: Reason, hint: DiscoveryHint) -> bytes:
    """XOAUTH2 failure challenge: HTTP status, scheme and scope."""
    body = {"status": _XOAUTH2_STATUS.get(oauth_status(reason), "401"), "schemes": "bearer"}
    if hint.scope is not None:
        body["scope"] = hint.scope
    return _json(body)


# --- The exchange ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``data`` to the client (it may be empty), then wait for its response."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Ask the engine about ``credentials``, then call :meth:`SaslExchange.conclude`."""

    credentials: Credentials


@dataclass(frozen=True, slots=True)
class Succeeded:
    account: str


@dataclass(frozen=True, slots=True)
class Failed:
    """Final: the caller replies FAIL."""

    verdict: Verdict


Step = Challenge | Authenticate | Succeeded | Failed


class _State(enum.Enum):
    START = enum.auto()
    MESSAGE = enum.auto()
    LOGIN_USER = enum.auto()
    LOGIN_PASSWORD = enum.auto()
    VERDICT = enum.auto()
    FAILURE_ACK = enum.auto()
    DONE = enum.auto()


_DECODERS: dict[Mechanism, Callable[[bytes], Credentials | Refusal]] = {
    Mechanism.OAUTHBEARER: decode_oauthbearer,
    Mechanism.XOAUTH2: decode_xoauth2,
    Mechanism.PLAIN: decode_plain,
}

_FAILURE_CHALLENGES: dict[Mechanism, Callable[[Reason, DiscoveryHint], bytes]] = {
    Mechanism.OAUTHBEARER: oauthbearer_failure,
    Mechanism.XOAUTH2: xoauth2_failure,
}


class SaslExchange:
    """One SASL exchange (one request id). Every method returns the next :data:`Step`;
    a call out of order ends the exchange with ``MALFORMED_REQUEST``, never an exception."""

    __slots__ = ("_login_user", "_max", "_mechanism", "_pending", "_state")

    def __init__(self, mechanism: Mechanism, *, max_message_bytes: int = 65536) -> None:
        self._mechanism = Mechanism(mechanism)
        self._max = max_message_bytes
        self._state = _State.START
        self._pending: Verdict | None = None
        self._login_user: str | None = None

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def start(self, initial_response: bytes | None) -> Step:
        """Begin; ``None`` means the client sent no initial response."""
        if self._state is not _State.START:
            return self._unexpected()
        if self._mechanism is Mechanism.LOGIN:
            if initial_response is None:
                self._state = _State.LOGIN_USER
                return Challenge(b"Username:")
            return self._login_username(initial_response)
        if initial_response is None:
            self._state = _State.MESSAGE
            return Challenge(b"")
        return self._message(initial_response)

    def receive(self, response: bytes) -> Step:
        """The client's response to the last :class:`Challenge`."""
        if self._state is _State.MESSAGE:
            return self._message(response)
        if self._state is _State.LOGIN_USER:
            return self._login_username(response)
        if self._state is _State.LOGIN_PASSWORD:
            return self._login_password(response)
        if self._state is _State.FAILURE_ACK and self._pending is not None:
            # RFC 7628 §3.2.3 wants %x01 here, XOAUTH2 an empty reply; whatever arrives,
            # the refusal that caused the challenge is what the exchange ends with.
            return self._fail(self._pending)
        return self._unexpected()

    def conclude(self, verdict: Verdict) -> Step:
        """The engine's verdict on the credentials of the last :class:`Authenticate`."""
        if self._state is not _State.VERDICT:
            return self._unexpected()
        if verdict.ok:
            account = verdict.account
            if not isinstance(account, str) or not account or _has_control(account):
                return self._fail(
                    Verdict(
                        reason=Reason.INTERNAL_ERROR,
                        detail="engine accepted without a usable account name",
                    )
                )
            self._state = _State.DONE
            return Succeeded(account)
        if verdict.outcome is Outcome.TEMPFAIL:
            return self._fail(verdict)
        return self._refuse(verdict)

    def _too_large(self, data: bytes) -> Refusal | None:
        if len(data) > self._max:
            return _malformed(f"client message of {len(data)} bytes exceeds {self._max}")
        return None

    def _message(self, data: bytes) -> Step:
        result = self._too_large(data)
        if result is None:
            if self._mechanism is Mechanism.OAUTHBEARER and data == _KVSEP:
                return self._fail(Verdict(reason=Reason.CANCELLED, detail="client aborted"))
            decoded = _DECODERS[self._mechanism](data)
            if isinstance(decoded, Credentials):
                self._state = _State.VERDICT
                return Authenticate(decoded)
            result = decoded
        return self._refuse(Verdict(reason=result.reason, detail=result.detail))

    def _login_username(self, data: bytes) -> Step:
        user = self._too_large(data) or _decode_login_user(data)
        if isinstance(user, Refusal):
            return self._fail(Verdict(reason=user.reason, detail=user.detail))
        self._login_user = user
        self._state = _State.LOGIN_PASSWORD
        return Challenge(b"Password:")

    def _login_password(self, data: bytes) -> Step:
        token = self._too_large(data) or _token(data)
        if isinstance(token, Refusal):
            return self._fail(Verdict(reason=token.reason, detail=token.detail))
        self._state = _State.VERDICT
        return Authenticate(Credentials(token=token, authzid=self._login_user))

    def _refuse(self, verdict: Verdict) -> Step:
        """A refusal: token mechanisms send their failure challenge first, the others fail."""
        encode = _FAILURE_CHALLENGES.get(self._mechanism)
        if encode is None:
            return self._fail(verdict)
        self._pending = verdict
        self._state = _State.FAILURE_ACK
        return Challenge(encode(verdict.reason, verdict.hint))

    def _fail(self, verdict: Verdict) -> Failed:
        self._state = _State.DONE
        self._pending = None
        return Failed(verdict)

    def _unexpected(self) -> Failed:
        return self._fail(
            Verdict(reason=Reason.MALFORMED_REQUEST, detail="unexpected continuation")
        )
