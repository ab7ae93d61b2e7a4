"""Whose tokens a provider takes: its issuer exactly, or one tenant of a template.

A multi-tenant provider's ``issuer`` holds ``{tenantid}`` (Entra ID:
``https://login.microsoftonline.com/{tenantid}/v2.0``); an ``iss`` fits when the
text around the placeholder matches exactly and the tenant is one plain label
listed in ``allowed_tenants`` (or ``"*"``, which ``check-config`` warns about).
Pure: values in, values out.
"""

from __future__ import annotations

from saslauthd_oidc.config import TENANT_PLACEHOLDER, TENANT_RE, ProviderConfig


def tenant_of(provider: ProviderConfig, iss: object) -> str | None:
    """The tenant a multi-tenant issuer template gives ``iss``, if it fits and is allowed."""
    if not provider.multi_tenant or not isinstance(iss, str):
        return None
    head, _, tail = provider.issuer.partition(TENANT_PLACEHOLDER)
    if len(iss) <= len(head) + len(tail) or not (iss.startswith(head) and iss.endswith(tail)):
        return None
    tenant = iss[len(head) : len(iss) - len(tail)]
    if not TENANT_RE.fullmatch(tenant):
        return None
    if "*" in provider.allowed_tenants or tenant.lower() in provider.allowed_tenants:
        return tenant
    return None


def accepts_issuer(provider: ProviderConfig, iss: object) -> bool:
    """``iss`` is this provider's issuer (exactly, or through the tenant template)."""
    if provider.multi_tenant:
        return tenant_of(provider, iss) is not None
    return iss == provider.issuer
