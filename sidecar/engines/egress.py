"""What leaves the mesh from this pod: counted by destination, and each refused connection audited.

Envoy logs every connection its outbound listener carries out of the mesh (and each plaintext
HTTP request it passes through), and every connection a locked egress refuses, to the agent's
access log service (servers/als.py; domain/envoy.py, EGRESS_LOG). This engine turns those
entries into `meshward_egress_total{destination, protocol, outcome}` and, for a refusal, one
audit line (outcome `forbidden`, method `TCP`, the destination) beside the agent's decisions.

Destinations are `address:port` as the app dialled them. At most MAX_DESTINATIONS distinct
ones are labelled; later ones count under `other` (an app dialling many addresses cannot grow
the agent's memory or Prometheus's series without bound). Refusals are audited at most once per
destination (label) every AUDIT_EVERY_S, the next line saying how many were not written in
between: an app retrying in a loop cannot flood the audit log, and the counter counts them all.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter

from meshward.sidecar.domain.decision import AuditRecord

# Distinct destinations labelled in the counter; the rest count as OTHER.
MAX_DESTINATIONS = 64
OTHER = "other"
# At most one audit line per refused destination this often (the rest counted, and said in the next line).
AUDIT_EVERY_S = 1.0


class AuditSink(Protocol):
    """Where audit records go (engines/observe.py's JsonLineAudit)."""

    def write(self, r: AuditRecord) -> None:
        """Write one record."""


class EgressLog:
    """Counts connections leaving the mesh by destination; audits the refused ones."""

    def __init__(self, registry: CollectorRegistry, audit: AuditSink, workload: Callable[[], str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._audit = audit
        self._workload = workload
        self._clock = clock
        self._seen: set[str] = set()
        self._audited: dict[str, tuple[float, int]] = {}  # label -> (when its last line was written, refusals since)
        self.total = Counter("meshward_egress_total",
                             "Connections (and plaintext HTTP requests) from the app to addresses outside the mesh, "
                             "by destination, protocol (tcp, http) and outcome (allowed, refused).",
                             ["destination", "protocol", "outcome"], registry=registry)

    def _label(self, destination: str) -> str:
        if destination in self._seen:
            return destination
        if len(self._seen) >= MAX_DESTINATIONS:
            return OTHER
        self._seen.add(destination)
        return destination

    def record(self, protocol: str, address: str, port: int, refused: bool, ts: float) -> None:
        """Count one entry; audit it if the connection was refused."""
        destination = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        label = self._label(destination)
        self.total.labels(label, protocol, "refused" if refused else "allowed").inc()
        if not refused:
            return
        now = self._clock()
        last, skipped = self._audited.get(label, (float("-inf"), 0))
        if now - last < AUDIT_EVERY_S:
            self._audited[label] = (last, skipped + 1)
            return
        self._audited[label] = (now, 0)
        reason = "egress is locked (meshed-only) and this address is neither meshed nor allowed"
        if skipped:
            reason += f" ({skipped} more refused since the last line, counted in meshward_egress_total)"
        self._audit.write(AuditRecord(
            ts=ts, decision_id=secrets.token_hex(8), workload=self._workload(), transport="egress",
            outcome="forbidden", would_deny=False, policy="", rule="", reason=reason, peer="", subject_hash="",
            method="TCP", path="", request_id="", latency_us=0.0, destination=destination, port=port))
