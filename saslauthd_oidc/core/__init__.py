"""The decision: what a request is (request), which rules may take it (rules), the
account it maps to (identity), the verdict and its closed reason (outcome), and the
engine that runs those steps and asks the providers for what it needs (engine).
The documents a client reads to find how to log in come from the same rules:
resource_metadata (RFC 9728) and autoconfig (Mail Autoconfig, PACC)."""
