"""Thin trio shells, one per way a mail server asks: the Dovecot auth socket (dovecot),
the saslauthd socket (saslauthd) and HTTP (http: the ASGI routes; http_replies maps a
Verdict to a reply, http_callers says who may call); accept holds the shared accept
loop and asgi the ASGI types."""
