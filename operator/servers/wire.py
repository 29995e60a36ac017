"""What the operator's gRPC services share: JSON messages and TLS credentials that follow the CA.

Both services (signing, policy) speak small JSON documents so agents need no
generated stubs, and both present a certificate from the mesh CA that is re-issued
after a CA rotation: each new handshake picks up the current certificate (and, for
services that verify clients, the current trust bundle) without a restart.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc


def loads(data: bytes) -> Any:
    """Decode a JSON message (empty → {})."""
    return json.loads(data) if data else {}


def dumps(value: Any) -> bytes:
    """Encode a JSON message compactly."""
    return json.dumps(value, separators=(",", ":")).encode()


def rotating_credentials(current: Callable[[], tuple[bytes, bytes, bytes | None]]) -> grpc.ServerCredentials:
    """TLS credentials reread per handshake from `current()` = (chain, key, client roots or None).

    With client roots, clients must present a certificate that chains to them (mutual TLS).
    """
    first = current()
    last = first

    def config(c: tuple[bytes, bytes, bytes | None]) -> Any:
        return grpc.ssl_server_certificate_configuration([(c[1], c[0])], root_certificates=c[2])

    def fetch() -> Any:
        nonlocal last
        latest = current()
        if latest == last:
            return None
        last = latest
        return config(latest)

    return grpc.dynamic_ssl_server_credentials(config(first), fetch,
                                               require_client_authentication=first[2] is not None)
