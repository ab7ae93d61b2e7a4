"""Logging setup (structlog, JSON or console) and the last line of defence against leaks.

Every module logs through ``structlog.get_logger(...)``; :func:`configure_logging`
decides level and format once. Filtered-out levels cost one method call
(``make_filtering_bound_logger``). :func:`redact_secrets` runs on every event
before rendering and replaces anything shaped like a JWT or a bearer
credential with its fingerprint, so a mistake elsewhere cannot put a token in
a log file.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from saslauthd_oidc.config import LoggingConfig
from saslauthd_oidc.request import token_fingerprint

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


def configure_logging(
    cfg: LoggingConfig, stream: TextIO | None = None, *, cache_loggers: bool = False
) -> None:
    """Configure structlog once for the process.

    ``cache_loggers`` (the daemon sets it) makes every module's logger bind
    once, on first use, instead of on every call; tests leave it off so that
    they can reconfigure logging between cases.
    """
    level = logging.getLevelNamesMapping()[cfg.level.upper()]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if cfg.format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=cache_loggers,
    )
