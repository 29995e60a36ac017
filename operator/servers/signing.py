"""The certificate signing service: gRPC over TLS, the caller's ServiceAccount token in metadata.

Method `/meshward.identity.v1.Identity/Sign`. Messages are small JSON documents
(request `{"csr": "<PEM>"}`, response `{"spiffeId", "certificateChain", "trustBundle",
"notAfter"}`), so agents need no generated stubs; the token travels as
`authorization: Bearer <projected ServiceAccount token>` metadata. The server's own
certificate comes from the mesh CA, so agents verify it with the trust bundle.
Refusals carry the gRPC status the issuance engine chose, with its message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from meshward.operator.engines.issuance import IssuanceEngine, IssuanceError
from meshward.operator.servers.wire import dumps, loads, rotating_credentials

SERVICE = "meshward.identity.v1.Identity"
METHOD = f"/{SERVICE}/Sign"
# Requests larger than this are not CSRs.
MAX_MESSAGE_BYTES = 64 * 1024


class SigningService:
    """Adapts gRPC calls to the issuance engine."""

    def __init__(self, engine: IssuanceEngine) -> None:
        self._engine = engine

    async def sign(self, request: Any, context: grpc.aio.ServicerContext) -> dict[str, str]:
        """Handle one Sign call."""
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                token = value[7:].strip()
        csr = request.get("csr") if isinstance(request, dict) else None
        if not isinstance(csr, str):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, 'request must be {"csr": "<PEM>"}')
            raise AssertionError("unreachable")  # noqa: TRY004 - abort() raises; this line never runs
        try:
            issued = await self._engine.sign(token, csr.encode())
        except IssuanceError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), str(e))
            raise AssertionError("unreachable") from e
        return {"spiffeId": issued.spiffe_id, "certificateChain": issued.certificate_pem,
                "trustBundle": issued.trust_bundle_pem, "notAfter": issued.not_after.isoformat()}

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler registering the Sign method."""
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Sign": grpc.unary_unary_rpc_method_handler(self.sign, request_deserializer=loads,
                                                        response_serializer=dumps)})


async def serve(engine: IssuanceEngine, address: str, cert_pem: bytes, key_pem: bytes) -> grpc.aio.Server:
    """Start the signing service with TLS on `address` and a fixed certificate."""
    return await serve_rotating(engine, address, lambda: (cert_pem, key_pem))


async def serve_rotating(engine: IssuanceEngine, address: str,
                         certificate: Callable[[], tuple[bytes, bytes]]) -> grpc.aio.Server:
    """Start the signing service on `address`; each new handshake uses the current `(chain, key)`."""
    creds = rotating_credentials(lambda: (*certificate(), None))
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    server.add_generic_rpc_handlers((SigningService(engine).handler(),))
    server.add_secure_port(address, creds)
    await server.start()
    return server
