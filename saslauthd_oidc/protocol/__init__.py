"""Sans-I/O wire cores: the Dovecot auth-client protocol (dovecot), saslauthd frames
(saslauthd) and the SASL mechanisms OAUTHBEARER, XOAUTH2 and PLAIN (sasl). Bytes in,
events or values out; no sockets, no clocks, no trio, no httpx."""
