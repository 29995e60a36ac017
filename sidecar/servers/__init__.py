"""Transports: the HTTP/1.1 and gRPC ext_authz servers and the admin endpoints."""
