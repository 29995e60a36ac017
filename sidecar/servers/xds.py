"""Envoy's listener and cluster discovery (LDS, CDS) for the outbound side of an injected pod.

Served on the SDS socket (one local control plane per pod): the outbound listener and
its mTLS clusters are built from the meshed-destination map the operator sends
(engines/destinations.py, domain/envoy.py `outbound_resources`) and pushed on every
change, state of the world, on each open stream. Envoy's NACKs are logged; the agent
keeps serving the latest map (a NACKed one leaves Envoy on its last good config).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2  # noqa: F401  (Any types ParseDict resolves)
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # noqa: F401  (Any types ParseDict resolves)
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2  # noqa: F401
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: F401
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.listener.v3 import lds_pb2_grpc
from google.protobuf import any_pb2, json_format

from meshward.sidecar.domain.envoy import HttpSettings, outbound_resources
from meshward.sidecar.engines.destinations import MeshDestinations

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
log = logging.getLogger("meshward.sidecar.xds")


def pack_resources(resources: list[dict[str, Any]], message: Callable[[], Any]) -> list[Any]:
    """The resources as protobuf Any messages (every typed config they hold must be imported above)."""
    out = []
    for r in resources:
        packed = any_pb2.Any()
        packed.Pack(json_format.ParseDict(r, message()))
        out.append(packed)
    return out


class OutboundDiscovery(lds_pb2_grpc.ListenerDiscoveryServiceServicer,  # type: ignore[misc]
                        cds_pb2_grpc.ClusterDiscoveryServiceServicer):  # type: ignore[misc]
    """LDS and CDS from the current destination map."""

    def __init__(self, destinations: MeshDestinations, http: HttpSettings | None = None, *, ipv6: bool = False
                 ) -> None:
        self._destinations = destinations
        self._http = http or HttpSettings()
        self._ipv6 = ipv6  # the pod has IPv6: the outbound listener takes [::1] too
        # LDS and CDS of one map are built once (both streams ask for the same version).
        self._built: tuple[int, list[dict[str, Any]], list[dict[str, Any]]] | None = None

    def response(self, type_url: str, version: int) -> Any:
        """The whole state of `type_url` for the map at `version`."""
        d = self._destinations
        if self._built is None or self._built[0] != d.version:
            self._built = (d.version, *outbound_resources(d.current, d.own_ip, d.context_header, self._http,
                                                          self._ipv6, d.egress))
        _, listeners, clusters = self._built
        if type_url == LISTENER_TYPE:
            resources = pack_resources(listeners, listener_pb2.Listener)
        else:
            resources = pack_resources(clusters, cluster_pb2.Cluster)
        return discovery_pb2.DiscoveryResponse(version_info=str(version), resources=resources, type_url=type_url,
                                               nonce=str(version))

    async def _stream(self, type_url: str, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Answer the first request at once, then push every newer map until Envoy goes away."""
        first = asyncio.Event()
        done = asyncio.Event()

        async def read() -> None:
            try:
                async for req in requests:
                    if req.error_detail.code:
                        log.warning("Envoy rejected %s version %s: %s", type_url.rsplit(".", 1)[-1],
                                    req.response_nonce, req.error_detail.message)
                    first.set()
            finally:
                done.set()

        reader = asyncio.create_task(read())
        try:
            waits = {asyncio.ensure_future(first.wait()), asyncio.ensure_future(done.wait())}
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for p in pending:
                p.cancel()
            sent = -1
            while not done.is_set():
                if self._destinations.version != sent:
                    sent = self._destinations.version
                    yield self.response(type_url, sent)
                newer: set[asyncio.Future[Any]] = {asyncio.ensure_future(self._destinations.newer_than(sent)),
                                                   asyncio.ensure_future(done.wait())}
                _, waiting = await asyncio.wait(newer, return_when=asyncio.FIRST_COMPLETED)
                for w in waiting:
                    w.cancel()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    # gRPC's asyncio server streams responses only from methods that are themselves async generators.
    async def StreamListeners(self, requests: AsyncIterator[Any],
                              context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """LDS: the outbound listener."""
        async for response in self._stream(LISTENER_TYPE, requests):
            yield response

    async def StreamClusters(self, requests: AsyncIterator[Any],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """CDS: one mTLS cluster per group of identities."""
        async for response in self._stream(CLUSTER_TYPE, requests):
            yield response


def register(servicer: OutboundDiscovery, server: grpc.aio.Server) -> None:
    """Serve LDS and CDS on `server`."""
    lds_pb2_grpc.add_ListenerDiscoveryServiceServicer_to_server(servicer, server)
    cds_pb2_grpc.add_ClusterDiscoveryServiceServicer_to_server(servicer, server)
