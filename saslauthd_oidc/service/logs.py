"""Logging setup (structlog, JSON or console) and the last line of defence against leaks.

Every module logs through ``structlog.get_logger(...)``; :func:`configure_logging`
decides level and format once. Filtered-out levels cost one method call
(``make_filtering_bound_logger``). :func:`redact_secrets` runs on every event
before rendering and replaces anything shaped like a JWT or a bearer
credential with its fingerprint, so a mistake elsewhere cannot put a token in
a log file.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from saslauthd_oidc.config import LoggingConfig
from saslauthd_oidc.core.request import token_fingerprint

_JWT_SHAPED = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)([A-Za-z0-9._~+/=-]{8,})")


def _scrub(text: str) -> str:
    if "eyJ" in text:
        text = _JWT_SHAPED.sub(lambda m: f"<token {token_fingerprint(m.group(0))}>", text)
    if "earer" in text:
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
    processor, a scan per value for tokens that cannot be there, or a new
    ``json`` encoder per line (``json.dumps`` with ``default=`` builds one).
    """

    def __init__(self) -> None:
        self._encode = json.JSONEncoder(default=_json_fallback).encode
        self._second = -1
        self._prefix = ""

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
        for key, value in event.items():
            if isinstance(value, str) and ("eyJ" in value or "earer" in value):
                event[key] = _scrub(value)
        return self._encode(event)


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
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=cache_loggers,
    )
