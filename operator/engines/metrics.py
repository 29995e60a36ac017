"""The operator's Prometheus metrics, computed at scrape time from the engines' state."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshward.operator.engines.ca_keeper import CaKeeper
from meshward.operator.engines.issuance import IssuanceEngine

PHASES = ("steady", "staged", "retiring")


class _Collector(Collector):
    def __init__(self, ca: CaKeeper, engine: IssuanceEngine) -> None:
        self._ca = ca
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        state = self._ca.state
        if state is not None:
            yield GaugeMetricFamily("meshward_ca_expiry_timestamp_seconds",
                                    "When the signing root of the mesh CA expires (Unix time).",
                                    value=state.active.cert.not_valid_after_utc.timestamp())
            phase = GaugeMetricFamily("meshward_ca_rotation_phase", "1 for the CA's current rotation phase.",
                                      labels=["phase"])
            for p in PHASES:
                phase.add_metric([p], 1.0 if state.phase == p else 0.0)
            yield phase
            yield GaugeMetricFamily("meshward_ca_trust_bundle_roots", "Roots in the trust bundle.",
                                    value=len(state.bundle()))
        yield GaugeMetricFamily("meshward_certificates_issued", "Workload certificates issued since start.",
                                value=self._engine.issued)


def register_metrics(registry: CollectorRegistry, ca: CaKeeper, engine: IssuanceEngine) -> None:
    """Register the operator's collectors on `registry`."""
    registry.register(_Collector(ca, engine))
