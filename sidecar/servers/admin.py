"""The admin endpoints: /healthz, /readyz, /metrics, and an injected pod's app probes.

/healthz says the process is alive, /readyz that it can decide (keys loaded, and with an
operator a certificate and the first policy), /metrics is Prometheus; in an injected pod
the app's own probes answer under /app-health/<container>/<kind> (domain/probes.py).

Why details only to the pod itself: in an injected pod this port listens on the pod's
address, uncaptured, for kubelet, so any pod of any namespace reaches it. Kubelet needs a
status code; /readyz's JSON (issuer URLs, their errors, the config generation) and a
probe's detail go only to requests from this pod (a Unix socket or loopback:
`kubectl exec` into the agent's container). /metrics is for Prometheus, which scrapes
the pod's address: what it shows is in docs/security.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshward.sidecar.domain.probes import AppProbe
from meshward.sidecar.servers.http1 import Request, Response

Prober = Callable[[AppProbe], Awaitable[tuple[bool, str]]]
_TEXT = [("content-type", "text/plain")]
# What a caller from outside the pod (kubelet, or any other pod) reads besides the status code.
_VERDICT = {True: b"ok\n", False: b"not ready\n"}


class Admin:
    """Routes the admin port."""

    def __init__(self, ready: Callable[[], bool], readiness: Callable[[], str], registry: CollectorRegistry,
                 probes: Mapping[str, AppProbe] | None = None, prober: Prober | None = None) -> None:
        self._ready = ready
        self._readiness = readiness
        self._registry = registry
        self._probes = dict(probes or {})
        self._prober = prober

    async def _app_health(self, probe: AppProbe, local: bool) -> Response:
        assert self._prober is not None  # set whenever probes are
        ok, detail = await self._prober(probe)
        return Response(200 if ok else 503, _TEXT, f"{detail}\n".encode() if local else _VERDICT[ok])

    def __call__(self, req: Request) -> Response | Awaitable[Response]:
        """Answer one admin request."""
        path = req.target.split("?", 1)[0]
        if req.method != "GET":
            return Response(405)
        probe = self._probes.get(path)
        if probe is not None and self._prober is not None:
            return self._app_health(probe, req.local)
        if path == "/healthz":
            return Response(200, _TEXT, b"ok\n")
        if path == "/readyz":
            ready = self._ready()
            if not req.local:
                return Response(200 if ready else 503, _TEXT, _VERDICT[ready])
            return Response(200 if ready else 503, [("content-type", "application/json")], self._readiness().encode())
        if path == "/metrics":
            return Response(200, [("content-type", CONTENT_TYPE_LATEST)], generate_latest(self._registry))
        return Response(404)
