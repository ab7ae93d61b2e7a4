"""saslauthd-oidc: SASL OAUTHBEARER / XOAUTH2 for mail servers against several OpenID providers."""

__version__ = "0.1.0"
