"""Both Envoy ext_authz transports in front of the one pipeline.

HTTP/1.1 (`http_service`, the default): the request line and headers are the
original request's; peer, port and host arrive in `x-meshward-authz-*` headers that
Envoy sets itself (client-sent `x-meshward-*` headers are stripped by Envoy before
any filter). gRPC (`envoy.service.auth.v3.Authorization/Check`): the same data from
`CheckRequest.attributes`, parsed with xds-protos upb messages.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import status_pb2

from meshward.sidecar.domain.decision import Decision, Outcome
from meshward.sidecar.domain.envoy import ATTR_HOST, ATTR_PEER, ATTR_PORT
from meshward.sidecar.domain.request import CheckInput, split_path
from meshward.sidecar.engines.pipeline import Pipeline
from meshward.sidecar.server.http1 import Request, Response

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_JSON = ("content-type", "application/json")


def _port(value: str | None) -> int | None:
    if value and value.isdigit() and len(value) <= 5:
        return int(value)
    return None


def input_from_http(req: Request) -> CheckInput:
    """Build the pipeline input from an HTTP ext_authz request."""
    h = req.headers
    peer = h.pop(ATTR_PEER, None)
    port = _port(h.pop(ATTR_PORT, None))
    host = h.pop(ATTR_HOST, None) or h.get("host", "")
    return CheckInput(method=req.method, path=split_path(req.target), host=host, headers=h,
                      peer=peer if peer and peer != "-" else None, request_id=h.get("x-request-id", ""), port=port)


def http_response(d: Decision) -> Response:
    """Frame a decision for the HTTP transport."""
    if d.outcome is Outcome.ALLOW:
        headers = list(d.headers_to_set)
        headers.append(("x-meshward-decision-id", d.decision_id))
        if d.headers_to_remove:
            headers.append(("x-envoy-auth-headers-to-remove", ", ".join(d.headers_to_remove)))
        return Response(200, headers)
    headers = [*d.deny_headers, _JSON, ("x-meshward-decision-id", d.decision_id)]
    return Response(d.wire.http, headers, d.body())


class HttpAuthz:
    """The HTTP/1.1 ext_authz handler."""

    def __init__(self, pipeline: Callable[[], Pipeline]) -> None:
        self._pipeline = pipeline

    def __call__(self, req: Request) -> Response | Awaitable[Response]:
        """Decide on one request: synchronously unless keys must be refetched."""
        pipeline = self._pipeline()
        inp = input_from_http(req)
        d = pipeline.decide_now(inp, "http")
        if isinstance(d, Decision):
            return http_response(d)
        return self._slow(pipeline, inp)

    async def _slow(self, pipeline: Pipeline, inp: CheckInput) -> Response:
        return http_response(await pipeline.decide(inp, "http"))


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
                 for k, v in (*d.deny_headers, _JSON, ("x-meshward-decision-id", d.decision_id))],
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
