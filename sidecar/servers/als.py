"""Envoy's access log service (`envoy.service.accesslog.v3.AccessLogService`) for the egress entries.

Served beside SDS and xDS on the agent's socket (only Envoy, the agent's own user, can connect).
Only entries of the logs named EGRESS_LOG (connections out of the mesh) and EGRESS_REFUSED_LOG (those a
locked egress refused) are read; each goes to the egress engine (engines/egress.py), which counts it and
audits a refusal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from meshward.sidecar.domain.envoy import EGRESS_LOG, EGRESS_REFUSED_LOG
from meshward.sidecar.engines.egress import EgressLog


class AccessLogs(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Reads Envoy's access log streams into the egress engine."""

    def __init__(self, egress: EgressLog) -> None:
        self._egress = egress

    def _entries(self, protocol: str, entries: Any, refused: bool) -> None:
        for entry in entries:
            common = entry.common_properties
            address = common.downstream_local_address.socket_address  # the original destination
            ts = common.start_time.seconds + common.start_time.nanos / 1e9
            self._egress.record(protocol, address.address, address.port_value, refused, ts)

    async def StreamAccessLogs(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        """Read one Envoy stream until it ends (its first message names the log)."""
        name = ""
        async for msg in requests:
            if msg.HasField("identifier"):
                name = msg.identifier.log_name
            if name not in (EGRESS_LOG, EGRESS_REFUSED_LOG):
                continue
            if msg.HasField("tcp_logs"):
                self._entries("tcp", msg.tcp_logs.log_entry, name == EGRESS_REFUSED_LOG)
            elif msg.HasField("http_logs"):
                self._entries("http", msg.http_logs.log_entry, name == EGRESS_REFUSED_LOG)
        return als_pb2.StreamAccessLogsResponse()


def register(servicer: AccessLogs, server: grpc.aio.Server) -> None:
    """Serve the access log service on `server`."""
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(servicer, server)
