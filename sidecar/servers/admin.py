"""The admin endpoints: /healthz (process alive), /readyz (keys loaded), /metrics (Prometheus)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshward.sidecar.servers.http1 import Request, Response


class Admin:
    """Routes the admin port."""

    def __init__(self, ready: Callable[[], bool], readiness: Callable[[], str], registry: CollectorRegistry) -> None:
        self._ready = ready
        self._readiness = readiness
        self._registry = registry

    def __call__(self, req: Request) -> Response:
        """Answer one admin request."""
        path = req.target.split("?", 1)[0]
        if req.method != "GET":
            return Response(405)
        if path == "/healthz":
            return Response(200, [("content-type", "text/plain")], b"ok\n")
        if path == "/readyz":
            body = self._readiness().encode()
            return Response(200 if self._ready() else 503, [("content-type", "application/json")], body)
        if path == "/metrics":
            return Response(200, [("content-type", CONTENT_TYPE_LATEST)], generate_latest(self._registry))
        return Response(404)
