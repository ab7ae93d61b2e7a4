"""Shared test plumbing.  Keep this small: peer harnesses live in tests/peers/."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.peers.postfix import make_shared_tmpdir, postfix_available

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
