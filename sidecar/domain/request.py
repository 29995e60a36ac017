"""What the pipeline decides on: one request, as either Envoy transport reports it.

Both transports (HTTP/1.1 `http_service` and gRPC `Check`) build a `CheckInput`,
so every phase after this point is shared and transport-blind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# What a TCP connection's decision records as its method (audit lines, explain): no HTTP method is involved.
L4_METHOD = "TCP"


@dataclass(slots=True)
class CheckInput:
    """One request to decide on; header names are lowercase."""

    method: str
    path: str
    host: str = ""
    # Read-only here: the HTTP transport's dict, or the gRPC request's own header map
    # (copying it into a dict cost ~2.5 µs per request).
    headers: Mapping[str, str] = field(default_factory=dict)
    peer: str | None = None
    request_id: str = ""
    port: int | None = None
    # Outbound only: the SPIFFE ID of the meshed destination (set by Envoy's outbound listener).
    destination: str | None = None
    # A TCP connection, not an HTTP request (Envoy's inbound TCP chain says so): only the peer and the port are
    # known, and rules decide with Istio's L4 semantics (domain/policy.py, compile_rule).
    l4: bool = False

    @property
    def peer_namespace(self) -> str | None:
        """The namespace in the peer's SPIFFE ID (spiffe://td/ns/<ns>/sa/<sa>), if any."""
        if not self.peer:
            return None
        parts = self.peer.split("/")
        # ['spiffe:', '', td, 'ns', ns, 'sa', sa]
        if len(parts) == 7 and parts[3] == "ns" and parts[5] == "sa":
            return parts[4]
        return None


def connection(host: str, peer: str | None, port: int | None) -> CheckInput:
    """A TCP connection to decide: `peer` to `port` (`host` its original address); no request, no headers."""
    return CheckInput(L4_METHOD, "", host, {}, peer, "", port, None, True)


def split_path(raw: str) -> str:
    """Return the path without query string or fragment (rules match paths only)."""
    if "?" not in raw and "#" not in raw:
        return raw or "/"
    for sep in ("?", "#"):
        i = raw.find(sep)
        if i >= 0:
            raw = raw[:i]
    return raw or "/"
