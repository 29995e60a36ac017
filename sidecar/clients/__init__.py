"""The only sidecar code that does network I/O to other services (JWKS, OIDC discovery)."""
