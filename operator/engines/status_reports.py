"""What each Meshward object's status should say now, and which Events go with it.

Why an engine: a status report combines the pure status functions (domain.identity_status,
domain.policy_status) with the state other engines hold (the CA, issuance counts, the
policy hub, the ServiceIdentity directory) and one read per ServiceIdentity through the
client. The `StatusWriter`s call these reports; the Kopf handlers only feed objects in.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from meshward.operator.domain.ca import spiffe_id
from meshward.operator.domain.compile import http_rules_on_tcp_ports
from meshward.operator.domain.conditions import DEGRADED, READY, status_changed
from meshward.operator.domain.identity_status import Observation, identity_status
from meshward.operator.domain.policy_status import PolicyView, checkable_principals, policy_status, revocation_status
from meshward.operator.engines.ca_keeper import CaKeeper
from meshward.operator.engines.identity_directory import IdentityDirectory, IssuanceStats
from meshward.operator.engines.mesh_directory import MeshDirectory
from meshward.operator.engines.policy_hub import PolicyHub
from meshward.operator.engines.status_writer import EventNote, Report

# Every namespace with a ServiceIdentity gets the trust bundle under this name (key `ca.crt`).
BUNDLE_CONFIGMAP = "meshward-trust-bundle"
BUNDLE_LABELS = {"app.kubernetes.io/part-of": "meshward", "app.kubernetes.io/component": "trust-bundle"}


class ReportApi(Protocol):
    """The Kubernetes calls reports make (clients.kube.KubeClient)."""

    def service_account_exists(self, namespace: str, name: str) -> bool:
        """Whether a ServiceAccount exists."""
        ...

    def ensure_configmap(self, namespace: str, name: str, data: dict[str, str], labels: dict[str, str]) -> bool:
        """Create or update a ConfigMap."""
        ...


def _find(conditions: Any, kind: str) -> dict[str, Any]:
    return next((c for c in conditions or [] if c.get("type") == kind), {})


def transition(old: Mapping[str, Any], new: dict[str, Any]) -> tuple[EventNote, ...]:
    """An Event when the Ready condition changes reason, and a Warning when a Degraded condition begins."""
    notes = []
    was, now = _find(old.get("conditions"), READY), _find(new["conditions"], READY)
    if was.get("reason") != now["reason"]:
        notes.append(EventNote("Normal" if now["status"] == "True" else "Warning", now["reason"], now["message"]))
    already = notes[0].reason if notes else ""  # an InvalidSpec is both Ready and Degraded: one Event for it
    was, now = _find(old.get("conditions"), DEGRADED), _find(new["conditions"], DEGRADED)
    if now and now["status"] == "True" and was.get("reason") != now["reason"] and now["reason"] != already:
        notes.append(EventNote("Warning", now["reason"], now["message"]))
    return tuple(notes)


class StatusReports:
    """The reports of ServiceIdentities, AuthPolicies and Revocations."""

    def __init__(self, kube: ReportApi, ca: CaKeeper, stats: IssuanceStats, hub: PolicyHub,
                 directory: IdentityDirectory, trust_domain: str, clock: Callable[[], dt.datetime],
                 mesh: MeshDirectory | None = None) -> None:
        self._kube = kube
        self._mesh = mesh
        self._ca = ca
        self._stats = stats
        self._hub = hub
        self._directory = directory
        self._trust_domain = trust_domain
        self._clock = clock
        # issuedCertificates reported before this operator started, per ServiceIdentity uid.
        self._issued_before: dict[str, int] = {}

    async def identity(self, body: Mapping[str, Any]) -> Report:
        """A ServiceIdentity's status and Events; publishes the trust bundle in its namespace on the way."""
        meta, spec = body.get("metadata", {}), body.get("spec", {})
        namespace, sa = meta.get("namespace", ""), spec.get("serviceAccountName", "")
        exists = await asyncio.to_thread(self._kube.service_account_exists, namespace, sa)
        bundle = self._ca.bundle_pem()
        if bundle:
            await asyncio.to_thread(self._kube.ensure_configmap, namespace, BUNDLE_CONFIGMAP, {"ca.crt": bundle},
                                    BUNDLE_LABELS)
        old = dict(body.get("status") or {})
        issued, last = self._stats.counts(namespace, sa)
        before = self._issued_before.setdefault(str(meta.get("uid")), int(old.get("issuedCertificates") or 0))
        if last is None and old.get("lastIssuedAt"):
            last = dt.datetime.fromisoformat(old["lastIssuedAt"])
        obs = Observation(spiffe_id(self._trust_domain, namespace, sa), int(meta.get("generation") or 0), exists,
                          self._ca.signer() is not None, before + issued, last)
        new = identity_status(obs, namespace, sa, list(old.get("conditions") or []), self._clock())
        events: list[EventNote] = []
        changed = status_changed(old, new)
        if changed:
            was = _find(old.get("conditions"), READY)
            now_ready = new["conditions"][0]
            if now_ready["status"] == "False" and was.get("reason") != now_ready["reason"]:
                events.append(EventNote("Warning", now_ready["reason"], now_ready["message"]))
        events += [EventNote("Warning", "CertificateRefused", f"{reason}: {message}")
                   for reason, message in self._stats.take_refusals(namespace, sa)]
        return Report(new if changed else None, tuple(events))

    async def policy(self, body: Mapping[str, Any]) -> Report:
        """The status an AuthPolicy should show, from the hub's view of it."""
        meta = body.get("metadata", {})
        key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        generation = int(meta.get("generation") or 0)
        hub = self._hub
        invalid = hub.invalid(key)
        in_force = hub.policy(key)
        enf = hub.policy_enforcement(key)
        own = checkable_principals(dict(body.get("spec") or {}), self._trust_domain, meta.get("namespace", ""))
        unknown = tuple(sorted({p for p, ns, sa in own if self._directory.find(ns, sa) is None}))
        outside = tuple(f"{w.key}:{port}" for ns, _, pod in (k.partition("/") for k in enf.selected)
                        if (w := hub.workload(ns, pod)) is not None for port in w.uncaptured_ports)
        selected = [w for ns, _, pod in (k.partition("/") for k in enf.selected)
                    if (w := hub.workload(ns, pod)) is not None]
        http_on_tcp = tuple(http_rules_on_tcp_ports(dict(body.get("spec") or {}), selected))
        view = PolicyView(generation, in_force.generation if in_force else None,
                          invalid[1] if invalid and invalid[0] == generation else None,
                          enf.selected, enf.enforcing, enf.lagging, hub.conflict(key), unknown, hub.oversized(key),
                          tuple(enf.disconnected),
                          self._mesh.cut.get(meta.get("namespace", "")) if self._mesh is not None else None,
                          outside, http_on_tcp)
        if in_force is not None and in_force.generation != generation and view.invalid is None:
            return Report()  # the hub has not seen this generation yet; report on the next pass
        old = dict(body.get("status") or {})
        new = policy_status(view, list(old.get("conditions") or []), self._clock())
        return Report(new, transition(old, new)) if status_changed(old, new) else Report()

    async def revocation(self, body: Mapping[str, Any]) -> Report:
        """The status a Revocation should show."""
        meta = body.get("metadata", {})
        name = meta.get("name", "")
        active, expired = self._hub.revocation_counts(name)
        enf = self._hub.revocation_enforcement(name)
        old = dict(body.get("status") or {})
        new = revocation_status(int(meta.get("generation") or 0), active, expired, enf.selected,
                                enf.enforcing, enf.lagging, list(old.get("conditions") or []), self._clock(),
                                enf.disconnected)
        return Report(new, transition(old, new)) if status_changed(old, new) else Report()
