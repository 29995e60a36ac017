"""The gRPC ext_authz transport (`envoy.service.auth.v3.Authorization/Check`).

The same data as the HTTP transport, from `CheckRequest.attributes`, parsed with
xds-protos upb messages (~6 µs per request here, vs ~340 µs for envoy-data-plane's
classes). Loaded only when the agent serves gRPC.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import status_pb2

from meshward.sidecar.domain.decision import Decision, Outcome
from meshward.sidecar.domain.request import CheckInput, split_path
from meshward.sidecar.engines.pipeline import Pipeline
from meshward.sidecar.server.authz_http import JSON_HEADER

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def input_from_grpc(req: Any) -> CheckInput:
    """Build the pipeline input from a gRPC CheckRequest."""
    attrs = req.attributes
    http = attrs.request.http
    headers = dict(http.headers)
    path = http.path or headers.get(":path", "/")
    return CheckInput(method=http.method or headers.get(":method", ""), path=split_path(path),
                      host=http.host or headers.get(":authority", ""), headers=headers,
                      peer=attrs.source.principal or None, request_id=headers.get("x-request-id", http.id),
                      port=attrs.destination.address.socket_address.port_value or None)


def grpc_response(d: Decision) -> Any:
    """Build the CheckResponse for a decision."""
    if d.outcome is Outcome.ALLOW:
        ok = external_auth_pb2.OkHttpResponse(
            headers=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v), append_action=_OVERWRITE)
                     for k, v in (*d.headers_to_set, ("x-meshward-decision-id", d.decision_id))],
            headers_to_remove=d.headers_to_remove)
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0), ok_response=ok)
    denied = external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=d.wire.http),
        headers=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v), append_action=_OVERWRITE)
                 for k, v in (*d.deny_headers, JSON_HEADER, ("x-meshward-decision-id", d.decision_id))],
        body=d.body().decode())
    return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=d.wire.grpc, message=d.reason),
                                           denied_response=denied)


class GrpcAuthz(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """The gRPC ext_authz servicer."""

    def __init__(self, pipeline: Callable[[], Pipeline]) -> None:
        self._pipeline = pipeline

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Decide on one CheckRequest."""
        pipeline = self._pipeline()
        inp = input_from_grpc(request)
        d = pipeline.decide_now(inp, "grpc")
        if not isinstance(d, Decision):
            d = await pipeline.decide(inp, "grpc")
        return grpc_response(d)


async def serve_grpc(servicer: GrpcAuthz, address: str) -> grpc.aio.Server:
    """Start a grpc.aio server on `address` (host:port or unix:/path)."""
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    await server.start()
    return server
