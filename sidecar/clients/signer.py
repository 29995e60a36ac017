"""The client of the operator's signing service (`/meshward.identity.v1.Identity/Sign`).

gRPC over TLS; the server's certificate is checked against the trust bundle the
workload holds (the mounted ConfigMap plus the bundle of its last certificate, so a
CA rotation never locks a workload out). Messages are JSON, as on the server.
A new channel per call: renewals are minutes apart and the roots may have changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc

METHOD = "/meshward.identity.v1.Identity/Sign"
# A signing call that takes longer than this is retried with backoff.
CALL_TIMEOUT_S = 10.0


class SignerError(Exception):
    """The signing service refused or could not be reached; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class SignerClient:
    """Sends CSRs to the signing service."""

    def __init__(self, address: str, server_name: str, roots: Callable[[], bytes]) -> None:
        self._address = address
        self._server_name = server_name
        self._roots = roots

    async def sign(self, token: str, csr_pem: bytes) -> dict[str, Any]:
        """Ask for a certificate; return the response document or raise SignerError."""
        roots = self._roots()
        if not roots:
            raise SignerError("FAILED_PRECONDITION", "no trust bundle to verify the signing service with; "
                                                     "mount the meshward-trust-bundle ConfigMap (--trust-bundle)")
        creds = grpc.ssl_channel_credentials(root_certificates=roots)
        options = [("grpc.ssl_target_name_override", self._server_name)] if self._server_name else []
        try:
            async with grpc.aio.secure_channel(self._address, creds, options=options) as channel:
                call = channel.unary_unary(METHOD, request_serializer=lambda d: json.dumps(d).encode(),
                                           response_deserializer=json.loads)
                response = await call({"csr": csr_pem.decode()}, timeout=CALL_TIMEOUT_S,
                                      metadata=(("authorization", f"Bearer {token}"),))
        except grpc.aio.AioRpcError as e:
            raise SignerError(e.code().name, e.details() or "") from e
        if not isinstance(response, dict):
            raise SignerError("INTERNAL", "the signing service answered something other than a JSON object")
        return response
