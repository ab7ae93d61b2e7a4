"""Shared fixtures (builders and fakes are in tests/support.py; peer harnesses in tests/peers/).

A module that needs another ``issuer`` (a nursery-served one, other algorithms) defines its
own fixture of that name, which takes precedence over the one here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import structlog

from saslauthd_oidc.providers.http import make_http_client
from saslauthd_oidc.tools.devissuer import DevIssuerThread
from tests.peers.dovecot import dovecot_available
from tests.peers.postfix import make_shared_tmpdir, postfix_available
from tests.support import FakeClock
from tests.support_issuer import FaultIssuer

REQUIRE_PEERS_ENV = "SASLAUTHD_OIDC_REQUIRE_PEERS"


def require_peer(name: str, reason: str | None) -> None:
    """Skip (locally) or fail (CI, ``SASLAUTHD_OIDC_REQUIRE_PEERS=1``) if a peer is missing.

    ``reason`` is what the peer's ``*_available()`` probe returned: ``None``
    means the peer is usable and this does nothing.
    """
    if reason is None:
        return
    if os.environ.get(REQUIRE_PEERS_ENV) == "1":
        pytest.fail(f"{name} not available: {reason} ({REQUIRE_PEERS_ENV}=1)", pytrace=False)
    pytest.skip(f"{name} not available: {reason}")


@pytest.fixture(scope="session")
def postfix_ready() -> None:
    """Depend on this before starting a ``tests.peers.postfix.PostfixInstance``."""
    require_peer("postfix", postfix_available())


@pytest.fixture(scope="session")
def dovecot_ready() -> None:
    """Depend on this before starting a ``tests.peers.dovecot.DovecotInstance``."""
    require_peer("dovecot", dovecot_available())


@pytest.fixture
def shared_tmp_path() -> Iterator[Path]:
    """Like ``tmp_path`` but mode 0755 under /tmp: for sockets other users must reach."""
    path = make_shared_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """A test that configures structlog must not leave it writing to its (closed) capture."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def oidc_provider_ready() -> None:
    """Depend on this before starting a ``tests.peers.oidc_provider.OidcProviderPeer``."""
    from tests.peers.oidc_provider import oidc_provider_available

    require_peer("oidc-provider", oidc_provider_available())


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """The daemon's own outbound HTTP client (make_http_client), with a short timeout."""
    async with make_http_client(timeout=2.0) as c:
        yield c


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def issuer() -> Iterator[FaultIssuer]:
    """An ES256 development issuer served from a background thread."""
    with DevIssuerThread(FaultIssuer(algorithms=("ES256",))) as iss:
        yield iss


@pytest.fixture
def socket_path() -> Iterator[str]:
    """A fresh Unix socket path (AF_UNIX paths hold ~108 bytes; tmp_path can be longer)."""
    directory = tempfile.mkdtemp(prefix="dv", dir="/tmp")
    yield str(Path(directory) / "auth")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh short directory under /tmp (for sockets, configs and logs of a subprocess)."""
    d = Path(tempfile.mkdtemp(prefix="wk", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
