"""Bounded HTTP to identity providers: one client factory and one JSON requester.

Every request has a total deadline, a byte cap, no redirects and no
transparent decompression (``Accept-Encoding: identity``; a compressed answer
is refused), so a hostile or broken provider can cost us at most ``timeout``
seconds and ``max_bytes`` of memory. Failures are :class:`FetchError` with a
``kind``. :func:`cache_lifetime` reads ``Cache-Control``/``Age`` so metadata
caches can honour them.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import trio

from saslauthd_oidc import __version__
from saslauthd_oidc.providers.jwt import strict_json_loads

USER_AGENT = f"saslauthd-oidc/{__version__}"
DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_BYTES = 1_048_576
_JSON_DEPTH = 32
#: Outbound requests in flight at once, across all providers (the shared pool's size).
MAX_OUTBOUND = 20

FetchErrorKind = Literal[
    "unreachable", "timeout", "http_status", "too_large", "bad_json", "redirect"
]


class FetchError(Exception):
    """A metadata fetch failed; ``kind`` says how, ``detail`` says what (no secrets),
    ``status`` is the HTTP status when the server answered with one we refuse."""

    def __init__(self, kind: FetchErrorKind, detail: str, *, status: int | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind: FetchErrorKind = kind
        self.detail = detail
        self.status = status


def make_ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """System trust store, or only ``ca_file`` when given (a private CA)."""
    if ca_file:
        return ssl.create_default_context(cafile=ca_file)
    return ssl.create_default_context()


def make_http_client(
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_connections: int = MAX_OUTBOUND,
    ca_file: str | None = None,
) -> httpx.AsyncClient:
    """The shared client: bounded pool, timeouts, no redirects, our User-Agent."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max(1, max_connections // 2),
            keepalive_expiry=30.0,
        ),
        follow_redirects=False,
        verify=make_ssl_context(ca_file),
        headers={"User-Agent": USER_AGENT},
        trust_env=False,
    )


@dataclass(frozen=True, slots=True)
class JsonAnswer:
    """A provider's answer: the status, the JSON object (None when not 200), cache lifetime.

    ``max_age`` is None when the answer says nothing about caching.
    """

    status: int
    doc: dict[str, Any] | None
    max_age: float | None = None


async def fetch_json(
    client: httpx.AsyncClient,
    url: str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """GET ``url`` and return its JSON object; raise :class:`FetchError` otherwise."""
    answer = await request_json(client, "GET", url, max_bytes=max_bytes, timeout=timeout)
    assert answer.doc is not None
    return answer.doc


async def request_json(
    client: httpx.AsyncClient,
    method: Literal["GET", "POST"],
    url: str,
    *,
    data: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    auth: tuple[str, str] | None = None,
    accept_status: Collection[int] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_TIMEOUT,
    limiter: trio.CapacityLimiter | None = None,
) -> JsonAnswer:
    """One bounded request whose 200 answer must be a JSON object.

    A status in ``accept_status`` (such as a userinfo 401) is returned with
    ``doc=None`` instead of raising; any other non-200 raises ``http_status``.
    ``data`` is sent form-encoded; ``auth`` as HTTP Basic. ``limiter`` bounds
    how many requests run at once across every caller sharing it; waiting for
    it counts against ``timeout``.
    """
    try:
        with trio.fail_after(timeout):
            async with limiter if limiter is not None else contextlib.nullcontext():
                status, body, max_age = await _fetch_body(
                    client,
                    method,
                    url,
                    data=data,
                    headers=headers,
                    auth=auth,
                    accept_status=accept_status,
                    max_bytes=max_bytes,
                    timeout=timeout,
                )
    except trio.TooSlowError:
        raise FetchError("timeout", f"no complete answer within {timeout:g}s") from None
    except httpx.TimeoutException:
        raise FetchError("timeout", f"no complete answer within {timeout:g}s") from None
    except httpx.HTTPError as exc:
        raise FetchError("unreachable", f"{type(exc).__name__}: {exc}"[:200]) from None
    if status != 200:
        return JsonAnswer(status, None, max_age)
    try:
        doc = strict_json_loads(body, max_depth=_JSON_DEPTH)
    except (ValueError, RecursionError):
        raise FetchError("bad_json", "answer is not strict UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise FetchError("bad_json", "answer is not a JSON object")
    return JsonAnswer(status, doc, max_age)


async def _fetch_body(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    data: Mapping[str, str] | None,
    headers: Mapping[str, str] | None,
    auth: tuple[str, str] | None,
    accept_status: Collection[int],
    max_bytes: int,
    timeout: float,
) -> tuple[int, bytes, float | None]:
    sent = {"Accept": "application/json", "Accept-Encoding": "identity", **(headers or {})}
    async with client.stream(
        method,
        url,
        headers=sent,
        data=dict(data) if data is not None else None,
        auth=auth,
        timeout=timeout,
        follow_redirects=False,
    ) as response:
        status = response.status_code
        if status in accept_status:
            return status, b"", None
        _check_response(response, max_bytes)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > max_bytes:
                raise FetchError("too_large", f"answer exceeds {max_bytes} bytes")
            chunks.append(chunk)
        max_age = cache_lifetime(response.headers.get("cache-control"), response.headers.get("age"))
    return status, b"".join(chunks), max_age


def cache_lifetime(cache_control: str | None, age: str | None = None) -> float | None:
    """Seconds an answer may be reused, from ``Cache-Control`` and ``Age``.

    ``no-store``/``no-cache`` give 0; ``max-age`` (``s-maxage`` is for shared
    caches and ignored) less ``Age`` gives the rest; None when neither says.
    Malformed directives are ignored rather than trusted.
    """
    if not cache_control:
        return None
    max_age: float | None = None
    for directive in cache_control.lower().split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip()
        if name in ("no-store", "no-cache"):
            return 0.0
        if name == "max-age":
            seconds = _delta_seconds(value.strip().strip('"'))
            if seconds is not None:
                max_age = float(seconds)
    if max_age is None:
        return None
    aged = _delta_seconds(age.strip()) if age is not None else None
    if aged is not None:
        max_age -= aged
    return max(0.0, max_age)


def _delta_seconds(value: str) -> int | None:
    """RFC 9111 delta-seconds (ASCII digits only), capped at 10**9; None when malformed."""
    if not value.isascii() or not value.isdigit():
        return None
    digits = value.lstrip("0") or "0"
    if len(digits) > 10:  # RFC 9111 1.2.2: too large for us means "very large"
        return 10**9
    return min(int(digits), 10**9)


def _check_response(response: httpx.Response, max_bytes: int) -> None:
    status = response.status_code
    if response.is_redirect or 300 <= status < 400:
        target = _host_of(response.headers.get("location", ""))
        raise FetchError(
            "redirect", f"HTTP {status} redirect (to host {target[:80]!r}) refused", status=status
        )
    if status != 200:
        raise FetchError("http_status", f"HTTP {status}", status=status)
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise FetchError("bad_json", f"unexpected content-encoding {encoding[:20]!r}")
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise FetchError("too_large", f"content-length {length} exceeds {max_bytes} bytes")


def _host_of(url: str) -> str:
    try:
        return httpx.URL(url).host or "?"
    except (httpx.InvalidURL, ValueError, TypeError):
        return "?"
