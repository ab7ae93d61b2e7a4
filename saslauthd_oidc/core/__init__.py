"""The decision: what a request is (request), which rules may take it (rules), the
account it maps to (identity), the verdict and its closed reason (outcome), and the
engine that runs those steps and asks the providers for what it needs (engine).
resource_metadata builds the RFC 9728 protected-resource documents."""
