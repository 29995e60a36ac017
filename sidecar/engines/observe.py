"""Audit log lines and Prometheus metrics for decisions, JWKS fetches and config reloads.

Metrics live in a registry the caller owns (no module-level state), so tests and
several agents in one process never share counters.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections.abc import Callable, Iterator
from json.encoder import encode_basestring_ascii as _esc
from typing import Any, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from meshward.sidecar.domain.decision import AuditRecord, Decision

log = logging.getLogger("meshward.sidecar.audit")

# Audit lines are written in batches, at most this long after the first pending line.
# Each write and flush is a syscall plus, under grpc.aio, an extra event-loop iteration:
# written once per loop iteration they cost ~7 µs per decision over HTTP/1.1 and ~20 µs
# over gRPC under load (interleaved runs through Envoy); batched like this, the same as
# no audit log within the noise. 50 ms bounds what a crash (not a shutdown, which
# flushes) can lose; Envoy's own access log buffers up to 10 s by default.
DEFAULT_AUDIT_FLUSH_S = 0.05


class JsonLineAudit:
    """Writes each decision as one JSON line (the raw token and query strings are never in a record).

    Records have a fixed, flat schema (AuditRecord), so each line is formatted
    directly with the C string escaper. Lines are collected and written together
    `flush_interval` seconds after the first pending one, at once when BATCH lines are
    pending, and by `flush()` (the agent calls it on shutdown). A `flush_interval` of 0
    writes once per event-loop iteration. Without a running loop (tests, tools) every
    line is written at once.

    A stream that cannot be written (a closed or broken log pipe) never changes a
    decision: the lines are counted through `dropped` and logged once per outage.
    """

    BATCH = 256

    def __init__(self, stream: TextIO, flush_interval: float = DEFAULT_AUDIT_FLUSH_S,
                 dropped: Callable[[int], None] | None = None) -> None:
        if not 0 <= flush_interval < float("inf"):
            raise ValueError(f"audit flush interval must be a finite number of seconds >= 0, got {flush_interval}")
        self._stream = stream
        self._interval = flush_interval
        self._pending: list[str] = []
        self._timer: asyncio.Handle | None = None
        self._dropped = dropped
        self._failing = False

    def write(self, r: AuditRecord) -> None:
        """Queue one record; it reaches the stream within the flush interval."""
        e = _esc
        self._pending.append(
            f'{{"ts":{r.ts:.3f},"decision_id":{e(r.decision_id)},"workload":{e(r.workload)},'
            f'"transport":{e(r.transport)},"outcome":{e(r.outcome)},'
            f'"would_deny":{"true" if r.would_deny else "false"},"policy":{e(r.policy)},"rule":{e(r.rule)},'
            f'"reason":{e(r.reason)},"peer":{e(r.peer)},"subject_hash":{e(r.subject_hash)},'
            f'"method":{e(r.method)},"path":{e(r.path)},"request_id":{e(r.request_id)},'
            f'"latency_us":{r.latency_us:.1f}'
            + (f',"parent":{e(r.parent)},"act":{e(r.act)}' if r.parent else "")
            + (f',"destination":{e(r.destination)}' if r.destination else "")
            + (f',"port":{r.port:d}' if r.port is not None else "") + "}\n")
        if self._timer is not None:
            if len(self._pending) >= self.BATCH:
                self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._timer = (loop.call_later(self._interval, self.flush) if self._interval > 0
                       else loop.call_soon(self.flush))

    def flush(self) -> None:
        """Write and flush every queued line."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            self._stream.write("".join(lines))
            self._stream.flush()
        except (OSError, ValueError) as e:  # ValueError: the stream was closed
            if not self._failing:
                log.error("cannot write audit lines, dropping them until the stream works again "  # noqa: TRY400
                          "(meshward_audit_lines_dropped_total): %s", e)
                self._failing = True
            if self._dropped is not None:
                self._dropped(len(lines))
            return
        if self._failing:
            log.warning("audit lines are written again")
            self._failing = False


class NullAudit:
    """Discards records (benchmarks of the transport alone)."""

    def write(self, r: AuditRecord) -> None:
        """Discard one record."""


# Decision latency buckets: the fast path is tens of µs; a JWKS refetch is milliseconds.
LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 5e-3, 25e-3, 0.1, 1.0)


class _DecisionStats:
    """Decision counters and latency histograms kept as plain ints, exported on scrape.

    prometheus_client's Counter and Histogram take a lock and several calls per update
    (~4 µs per decision measured here); the hot path only bumps integers in its own
    event loop thread, and this collector turns them into metric families when scraped.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.hist: dict[str, list[float]] = {}  # per transport: bucket counts..., +Inf count, sum

    def observe(self, transport: str, outcome: str, seconds: float) -> None:
        key = (transport, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1
        h = self.hist.get(transport)
        if h is None:
            h = self.hist[transport] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        h[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        h[-1] += seconds

    def collect(self) -> Iterator[Any]:
        c = CounterMetricFamily("meshward_authz_decisions", "Authorization decisions.", labels=["transport", "outcome"])
        for (transport, outcome), n in sorted(self.counts.items()):
            c.add_metric([transport, outcome], n)
        yield c
        h = HistogramMetricFamily("meshward_authz_decision_seconds", "Time to decide, inside the agent.",
                                  labels=["transport"])
        for transport, values in sorted(self.hist.items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), values[:-1], strict=True):
                cumulative += count
                buckets.append((repr(bound) if bound != float("inf") else "+Inf", cumulative))
            h.add_metric([transport], buckets, values[-1])
        yield h


class Metrics:
    """The agent's Prometheus metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._stats = _DecisionStats()
        registry.register(self._stats)
        self.would_deny = Counter("meshward_authz_would_deny_total",
                                  "Requests allowed only because an Audit-mode policy or rule observed them.",
                                  ["policy"], registry=registry)
        # By result only: /metrics answers any pod that reaches this one (Prometheus scrapes the pod's address), and
        # the issuers a workload trusts are its namespace's business; which one failed is in the agent's log and
        # in /readyz from inside the pod (docs/security.md).
        self.jwks_fetches = Counter("meshward_jwks_fetches_total", "JWKS fetches by result (of every issuer).",
                                    ["result"], registry=registry)
        self.reloads = Counter("meshward_config_reloads_total", "Config loads by result.", ["result"],
                               registry=registry)
        self.audit_dropped = Counter("meshward_audit_lines_dropped_total",
                                     "Audit lines the log stream did not take (closed or broken).",
                                     registry=registry)
        self.config_generation = Gauge("meshward_config_info", "The config in force.", ["generation"],
                                       registry=registry)

    def observe(self, decision: Decision, transport: str, seconds: float) -> None:
        """Count and time one decision."""
        self._stats.observe(transport, decision.outcome, seconds)
        if decision.would_deny:
            self.would_deny.labels(decision.would_deny_policy or "-").inc()

    def jwks_fetched(self, _issuer: str, ok: bool) -> None:
        """Count one JWKS fetch (not by issuer)."""
        self.jwks_fetches.labels("success" if ok else "failure").inc()

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
