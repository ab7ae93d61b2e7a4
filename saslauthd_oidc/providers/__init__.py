"""Token verification (the I/O below the decision core): strict JWT peeking and
verification (jwt) under a key policy (keypolicy), the fetches of discovery, keys,
introspection and userinfo (oidc) and what they leave (key_cache), whose issuer a
provider takes (issuers), the answers' checks (answers), outbound HTTP (http), the
verification cache (verification_cache) and the configured providers (registry)."""
