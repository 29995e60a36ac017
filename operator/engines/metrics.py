"""The operator's Prometheus metrics, computed at scrape time from the engines' state."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from meshward.operator.engines.ca_keeper import CaKeeper
from meshward.operator.engines.issuance import IssuanceEngine
from meshward.operator.engines.mesh_directory import MeshDirectory
from meshward.operator.engines.policy_hub import PolicyHub
from meshward.operator.engines.safety_net import SafetyNet

PHASES = ("steady", "staged", "retiring")


class _Collector(Collector):
    def __init__(self, ca: CaKeeper, engine: IssuanceEngine, hub: PolicyHub | None,
                 safety: SafetyNet | None = None, mesh: MeshDirectory | None = None) -> None:
        self._ca = ca
        self._engine = engine
        self._hub = hub
        self._safety = safety
        self._mesh = mesh

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
        if self._safety is not None:
            yield GaugeMetricFamily("meshward_unprotected_pods",
                                    "Running pods that opted in to the mesh but carry no sidecar (meshward check).",
                                    value=len(self._safety.unprotected))
        if self._mesh is not None:
            yield GaugeMetricFamily("meshward_mesh_destination_map_bytes",
                                    "Size of the destination map every agent receives (bounded, MAX_MAP_BYTES).",
                                    value=self._mesh.map_bytes)
            yield GaugeMetricFamily("meshward_mesh_namespaces_cut",
                                    "Namespaces left out of the destination map for its size bounds (calls "
                                    "toward them fail closed).", value=len(self._mesh.cut))
            yield GaugeMetricFamily("meshward_mesh_annotations_ignored",
                                    "Injected pods whose exclude-inbound-ports annotation the map ignores (over "
                                    "the injector's bounds or unparsable).", value=len(self._mesh.ignored))
        hub = self._hub
        if hub is None:
            return
        yield GaugeMetricFamily("meshward_policy_subscribers", "Live subscriptions of sidecars to their config.",
                                value=len(hub.subscriptions()))
        yield GaugeMetricFamily("meshward_policy_subscribers_lagging",
                                "Subscribed sidecars that have not acknowledged their latest config (version lag).",
                                value=hub.lagging())
        yield GaugeMetricFamily("meshward_policy_workloads_disconnected",
                                "Injected running pods whose agent has had no policy stream for longer than the "
                                "grace (they enforce nothing new; their policies report NotConnected).",
                                value=len(hub.disconnected()))
        yield CounterMetricFamily("meshward_policy_messages_refused",
                                  "Messages not sent to an agent because they exceeded gRPC's message limit.",
                                  value=hub.messages_refused)
        sizes = hub.config_bytes()
        yield GaugeMetricFamily("meshward_policy_config_bytes_max", "The largest config pushed to a sidecar.",
                                value=max(sizes, default=0))
        yield SummaryMetricFamily("meshward_policy_recompile_seconds",
                                  "Time to recompile the connected workloads a change affects (reconcile latency).",
                                  count_value=hub.recompiles, sum_value=hub.recompile_seconds)
        yield CounterMetricFamily("meshward_policy_workload_compiles",
                                  "Workload configs compiled (work per change follows what it affects).",
                                  value=hub.compiled_workloads)
        yield CounterMetricFamily("meshward_policy_pushes", "Configs pushed to sidecars.", value=hub.pushes)
        yield CounterMetricFamily("meshward_policy_compile_errors",
                                  "Workload configs that failed to compile (the workload keeps its last config).",
                                  value=hub.compile_errors)
        valid, invalid = hub.policy_counts()
        states = GaugeMetricFamily("meshward_authpolicies", "AuthPolicies by state.", labels=["state"])
        states.add_metric(["valid"], valid)
        states.add_metric(["invalid"], invalid)
        yield states


def register_metrics(registry: CollectorRegistry, ca: CaKeeper, engine: IssuanceEngine,
                     hub: PolicyHub | None = None, safety: SafetyNet | None = None,
                     mesh: MeshDirectory | None = None) -> None:
    """Register the operator's collectors on `registry`."""
    registry.register(_Collector(ca, engine, hub, safety, mesh))
