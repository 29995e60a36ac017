"""The only sidecar code doing network I/O to other services: JWKS, OIDC discovery, the operator's services."""
