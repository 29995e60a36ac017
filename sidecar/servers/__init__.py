"""Servers of the agent: the HTTP/1.1 and gRPC ext_authz transports, SDS for Envoy, the admin endpoints."""
