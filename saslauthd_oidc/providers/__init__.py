"""Token verification (the I/O below the decision core): strict JWT peeking and
verification (jwt), the provider's keys, discovery, introspection and userinfo
(oidc), their answers (answers), outbound HTTP (http), the verification cache
(verification_cache) and the registry of configured providers (registry)."""
