"""Logging setup (structlog, JSON or console) and the last line of defence against leaks.

Every module logs through ``structlog.get_logger(...)``; :func:`configure_logging`
decides level and format once. Filtered-out levels cost one method call
(``make_filtering_bound_logger``). :func:`redact_secrets` runs on every event
before rendering and replaces anything shaped like a JWT or a bearer
credential with its fingerprint, so a mistake elsewhere cannot put a token in
a log file.

Rendered lines go to :data:`sink` (one per process), which writes each at once
(one flushed ``write``, as structlog's ``PrintLogger`` did) except inside a
round of the Dovecot reactor (:mod:`saslauthd_oidc.frontends.reactor` calls
:meth:`LineSink.hold` and :meth:`LineSink.release` around each round): there
the lines of the round are kept and written together, in one ``write``, when
the round ends or when more than :data:`HELD_LIMIT` characters are kept. A
round never awaits, so nothing else runs while lines are held: every line
logged elsewhere (HTTP, saslauthd, tasks, start-up, workers) is written
before its caller goes on, and the order of the lines is the order of the
calls. What is held is written at exit too (``atexit``, and the daemon's
``finally``). The write blocks as before; only the number of writes changes.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import json.encoder
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

from saslauthd_oidc.config import LoggingConfig
from saslauthd_oidc.core.request import token_fingerprint
from saslauthd_oidc.frontends import reactor

_JWT_SHAPED = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)([A-Za-z0-9._~+/=-]{8,})")


def _scrub(text: str) -> str:
    if "eyJ" in text:
        text = _JWT_SHAPED.sub(lambda m: f"<token {token_fingerprint(m.group(0))}>", text)
    if "earer" in text.lower():  # BEARER, Bearer, bearer
        text = _BEARER.sub(lambda m: f"{m.group(1)}<token {token_fingerprint(m.group(2))}>", text)
    return text


def redact_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = _scrub(value)
    return event


def _json_fallback(obj: Any) -> Any:
    """What structlog's JSONRenderer does with a value JSON has no type for."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


class _JsonLine:
    """The JSON format's processors in one step, for one line per authentication.

    Exactly what ``add_log_level``, ``TimeStamper(fmt="iso", utc=True)``,
    ``format_exc_info``, :func:`redact_secrets` and ``JSONRenderer()`` produce
    one after the other (same keys, same order, same text), without a call per
    processor, a scan per value for tokens that cannot be there (the encoded
    line is scanned once), or a new ``json`` encoder per line (``json.dumps``
    with ``default=`` builds one, and ``JSONEncoder.encode`` its C encoder).
    """

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(default=_json_fallback)
        self._encode = self._encoder.encode
        self._c_encode = self._c_encoder()
        self._second = -1
        self._prefix = ""

    def _c_encoder(self) -> Callable[[Any, int], Any] | None:
        """What ``JSONEncoder.encode`` builds for every call, built once (same arguments)."""
        make = getattr(json.encoder, "c_make_encoder", None)
        if make is None:
            return None
        e = self._encoder
        encoder: Callable[[Any, int], Any] = make(
            {},  # the circular-reference markers; empty again after each encoding
            e.default,
            json.encoder.encode_basestring_ascii,
            e.indent,
            e.key_separator,
            e.item_separator,
            e.sort_keys,
            e.skipkeys,
            e.allow_nan,
        )
        return encoder

    def _json(self, event: MutableMapping[str, Any]) -> str:
        encode = self._c_encode
        if encode is None:
            return self._encode(event)
        try:
            return "".join(encode(event, 0))
        except Exception:
            # Markers left behind by the failure (or by another thread's line, the
            # markers being shared) are dropped; then as ``JSONEncoder.encode``, with
            # its own markers: the same error if this event cannot be encoded.
            self._c_encode = self._c_encoder()
            return self._encode(event)
        except BaseException:
            self._c_encode = self._c_encoder()
            raise

    def _timestamp(self) -> str:
        """What structlog's ISO UTC stamp says; the date part is formatted once a second."""
        now = time.time_ns() // 1000
        second, micro = divmod(now, 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{micro:06d}Z" if micro else f"{self._prefix}Z"

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        event = structlog.processors.add_log_level(logger, method, event)
        event["timestamp"] = self._timestamp()
        if "exc_info" in event:
            event = structlog.processors.format_exc_info(logger, method, event)
        text = self._json(event)
        # A string value holding either holds it in the JSON text too (ASCII is not
        # escaped); text without both needs no scrubbing. Otherwise, as before.
        if "eyJ" in text or "earer" in text.lower():
            for key, value in event.items():
                if isinstance(value, str) and ("eyJ" in value or "earer" in value.lower()):
                    event[key] = _scrub(value)
            text = self._json(event)
        return text


#: Characters held in a round above which they are written at once.
HELD_LIMIT = 65536


class LineSink:
    """Where every rendered line goes: written at once, or held for the rest of a round.

    structlog's logger for every module (its ``logger_factory`` returns this
    one object). The lock keeps a line logged from a thread (the reload's
    configuration read) in order with the others.
    """

    __slots__ = ("_file", "_held", "_holding", "_lock", "_size")

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._held: list[str] = []
        self._size = 0
        self._holding = False
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            if not self._holding:
                self._file.write(message + "\n")
                self._file.flush()
                return
            self._held.append(message)
            self._size += len(message)
            if self._size > HELD_LIMIT:
                self._write_held()

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg
    failure = msg

    def hold(self) -> None:
        """From now on keep the lines (a reactor round starts)."""
        self._holding = True

    def release(self) -> None:
        """Write what was kept, in one ``write``; lines are written at once again.

        A round's end must not take the reactor down: a stream that cannot be
        written loses these lines (as a failed ``write`` loses its line).
        """
        with self._lock:
            self._holding = False
            if self._held:
                with contextlib.suppress(OSError, ValueError):
                    self._write_held()

    def flush(self) -> None:
        """Write what is kept now (exit, shutdown), and keep holding if it was."""
        with self._lock:
            if self._held:
                self._write_held()

    def switch(self, file: TextIO) -> None:
        """Write to ``file`` from now on, after writing what is kept to the old one."""
        with self._lock:
            if self._held:
                self._write_held()
            self._file = file

    def _write_held(self) -> None:
        held, self._held, self._size = self._held, [], 0
        held.append("")
        self._file.write("\n".join(held))
        self._file.flush()


#: The process's one sink; :func:`configure_logging` points it at its stream.
sink = LineSink(sys.stderr)
atexit.register(sink.flush)


def flush_logs() -> None:
    """Write the lines held (the daemon's last step; exit does it too)."""
    sink.flush()


def _sink_factory(*_args: Any) -> LineSink:
    return sink


def configure_logging(
    cfg: LoggingConfig, stream: TextIO | None = None, *, cache_loggers: bool = False
) -> None:
    """Configure structlog once for the process.

    ``cache_loggers`` (the daemon sets it) makes every module's logger bind
    once, on first use, instead of on every call; tests leave it off so that
    they can reconfigure logging between cases.
    """
    level = logging.getLevelNamesMapping()[cfg.level.upper()]
    processors: list[Any] = [structlog.contextvars.merge_contextvars]
    if cfg.format == "json":
        processors.append(_JsonLine())
    else:
        processors += [
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            structlog.dev.ConsoleRenderer(colors=False),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_sink_factory,
        cache_logger_on_first_use=cache_loggers,
    )
    sink.switch(stream or sys.stderr)
    reactor.round_hooks.begin = sink.hold
    reactor.round_hooks.end = sink.release
