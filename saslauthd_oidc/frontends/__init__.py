"""Thin trio shells, one per way a mail server asks: the Dovecot auth socket (dovecot),
the saslauthd socket (saslauthd) and HTTP (http, an ASGI app); accept holds the
shared accept loop and asgi the ASGI types."""
