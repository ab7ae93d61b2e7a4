"""The test-suite's development issuer: :class:`DevIssuer` with fault knobs and a request log.

The shipped :class:`~saslauthd_oidc.tools.devissuer.DevIssuer` is a clean
development issuer; the knobs tests turn to make an IdP fail, stall, redirect or
publish what it should not live here, in :class:`FaultIssuer`, which overrides
its one hook, :meth:`DevIssuer.respond`. It serves as the DevIssuer does
(``serve``, :class:`DevIssuerThread`), in the test's process.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import trio

from saslauthd_oidc.tools.devissuer import (
    DISCOVERY_SUFFIX,
    JWKS_PATH,
    Answer,
    DevIssuer,
    Request,
)


class FaultIssuer(DevIssuer):
    """A DevIssuer whose answers a test can break, and which keeps the latest request.

    * ``fail_status``: every answer is this status with a JSON error body;
    * ``delay``: seconds slept before answering;
    * ``redirect``: every answer is a 302 to this location;
    * ``jwks_override``: the body served on ``/jwks.json`` instead of the key set;
    * ``metadata_cache_control``: a Cache-Control header on discovery and JWKS;
    * ``discovery_overrides``: fields replacing those of the discovery document
      (e.g. a foreign ``jwks_uri``);
    * ``last_request_headers`` / ``last_request_body``: the latest request's.
    """

    def __init__(
        self,
        *,
        algorithms: Iterable[str] = ("ES256",),
        issuer_path: str = "/",
        any_issuer_path: bool = False,
    ) -> None:
        super().__init__(
            algorithms=algorithms, issuer_path=issuer_path, any_issuer_path=any_issuer_path
        )
        self.fail_status: int | None = None
        self.delay: float = 0.0
        self.redirect: str | None = None
        self.jwks_override: bytes | None = None
        self.metadata_cache_control: str | None = None
        self.discovery_overrides: dict[str, Any] = {}
        self.last_request_headers: dict[str, str] = {}
        self.last_request_body: bytes = b""

    def discovery_document(self, issuer: str | None = None) -> dict[str, Any]:
        return {**super().discovery_document(issuer), **self.discovery_overrides}

    async def respond(self, request: Request) -> Answer:
        self.last_request_headers = request.headers
        self.last_request_body = request.body
        if self.delay:
            await trio.sleep(self.delay)
        if self.redirect is not None:
            return 302, [(b"location", self.redirect.encode())], b""
        if self.fail_status is not None:
            return (
                self.fail_status,
                [(b"content-type", b"application/json"), (b"cache-control", b"no-store")],
                b'{"error": "injected failure"}',
            )
        metadata = request.method == "GET" and (
            request.path == JWKS_PATH or request.path.endswith(DISCOVERY_SUFFIX)
        )
        if request.path == JWKS_PATH and metadata and self.jwks_override is not None:
            return 200, [(b"content-type", b"application/json")], self.jwks_override
        status, headers, body = await super().respond(request)
        if metadata and status == 200 and self.metadata_cache_control is not None:
            headers = [*headers, (b"cache-control", self.metadata_cache_control.encode("latin-1"))]
        return status, headers, body
