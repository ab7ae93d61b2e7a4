"""Harnesses that run real external peers (Postfix, Dovecot, Exim, ...) for tests.

Each module exposes an ``*_available() -> str | None`` probe (``None`` means
usable, otherwise the reason it is not) and a context manager that starts a
private, loopback-only instance and always stops it again.  Tests gate on the
probe through ``tests.conftest.require_peer`` so that a missing peer is a skip
locally and a failure in CI (``SASLAUTHD_OIDC_REQUIRE_PEERS=1``).
"""
