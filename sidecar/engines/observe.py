"""Audit log lines and Prometheus metrics for decisions, JWKS fetches and config reloads.

Metrics live in a registry the caller owns (no module-level state), so tests and
several agents in one process never share counters.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshward.sidecar.domain.decision import Decision, Outcome


class JsonLineAudit:
    """Writes each decision as one JSON line (the raw token and query strings are never in a record)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, record: dict[str, Any]) -> None:
        """Write one record."""
        self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")


class NullAudit:
    """Discards records (benchmarks of the transport alone)."""

    def write(self, record: dict[str, Any]) -> None:
        """Discard one record."""


class Metrics:
    """The agent's Prometheus metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = Counter("meshward_authz_decisions_total", "Authorization decisions.",
                                 ["transport", "outcome"], registry=registry)
        self.would_deny = Counter("meshward_authz_would_deny_total",
                                  "Requests allowed only because an Audit-mode policy or rule observed them.",
                                  ["policy"], registry=registry)
        self.latency = Histogram("meshward_authz_decision_seconds", "Time to decide, inside the agent.",
                                 ["transport"], registry=registry,
                                 buckets=(25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 5e-3, 25e-3, 0.1, 1.0))
        self.jwks_fetches = Counter("meshward_jwks_fetches_total", "JWKS fetches by result.",
                                    ["issuer", "result"], registry=registry)
        self.reloads = Counter("meshward_config_reloads_total", "Config loads by result.", ["result"],
                               registry=registry)
        self.config_generation = Gauge("meshward_config_info", "The config in force.", ["generation"],
                                       registry=registry)
        self._children: dict[tuple[str, Outcome], Any] = {}
        self._latency_children: dict[str, Any] = {}

    def observe(self, decision: Decision, transport: str, seconds: float) -> None:
        """Count and time one decision."""
        key = (transport, decision.outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.decisions.labels(transport, decision.outcome.value)
            self._latency_children[transport] = self.latency.labels(transport)
        child.inc()
        self._latency_children[transport].observe(seconds)
        if decision.would_deny:
            self.would_deny.labels(decision.policy or "-").inc()

    def jwks_fetched(self, issuer: str, ok: bool) -> None:
        """Count one JWKS fetch."""
        self.jwks_fetches.labels(issuer, "success" if ok else "failure").inc()

    def reloaded(self, ok: bool, generation: str = "") -> None:
        """Count one config load; on success record its generation."""
        self.reloads.labels("success" if ok else "failure").inc()
        if ok:
            self.config_generation.clear()
            self.config_generation.labels(generation or "-").set(1)

    def cache_size_gauge(self, size: Callable[[], int]) -> None:
        """Expose the token cache's size."""
        g = Gauge("meshward_token_cache_entries", "Verified tokens cached.", registry=self.registry)
        g.set_function(lambda: float(size()))
