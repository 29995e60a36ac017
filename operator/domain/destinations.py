"""The meshed-destination map: which addresses answer with mTLS, and as whom.

Every injected pod's Envoy sends a connection to a meshed address over mTLS, pinned
to the SPIFFE IDs that may answer there, and any other connection through untouched
(sidecar/domain/envoy.py, outbound_resources). The map holds:
- each injected pod's IP: its ServiceAccount's SPIFFE ID, and the ports it leaves
  uncaptured (annotation meshward.io/exclude-inbound-ports) as plaintext;
- each ClusterIP Service whose selected pods are all injected: the SPIFFE IDs of those
  pods, and as plaintext the service ports whose (numeric) target port every one of
  them leaves uncaptured. A Service with any non-injected pod behind it is not meshed:
  its callers speak plaintext, which injected pods behind it refuse unless they allow
  plaintext while migrating (docs/app-teams.md).
Each agent receives its namespace's view (`view_for`): the identities of its own
namespace exact, those of other namespaces cut to `spiffe://<td>/ns/<ns>/sa/*` (the
client's Envoy then accepts any workload of that namespace there). So no pod learns
another namespace's ServiceAccounts; it learns which addresses are meshed and their
namespaces, which cluster DNS tells any pod already (docs/security.md, what a pod can
learn). Addresses and identities only, no policy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshward.operator.domain.inject import EXCLUDE_INBOUND_PORTS, INJECTED_ANNOTATION
from meshward.sidecar.domain.capture import CaptureError, parse_ports


@dataclass(frozen=True)
class MeshPod:
    """What the map needs of a pod."""

    namespace: str
    name: str
    ip: str
    service_account: str
    labels: tuple[tuple[str, str], ...]
    injected: bool
    plaintext_ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class MeshService:
    """What the map needs of a Service: its cluster IPs, selector and port -> target port."""

    namespace: str
    name: str
    cluster_ips: tuple[str, ...]
    selector: tuple[tuple[str, str], ...]
    ports: tuple[tuple[int, int | str], ...]


def mesh_pod(body: Mapping[str, Any]) -> MeshPod | None:
    """The pod as the map sees it; None for a pod without an IPv4 address yet or on its way out."""
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {})
    ip = status.get("podIP") or ""
    if not ip or ":" in ip or meta.get("deletionTimestamp") or spec.get("hostNetwork") or \
            status.get("phase") in ("Succeeded", "Failed"):
        return None
    annotations = meta.get("annotations") or {}
    try:
        plaintext = parse_ports(str(annotations.get(EXCLUDE_INBOUND_PORTS, "")), EXCLUDE_INBOUND_PORTS)
    except CaptureError:
        plaintext = ()  # the injector refused such a pod; one created around it gets no exception
    return MeshPod(meta.get("namespace", ""), meta.get("name", ""), ip, spec.get("serviceAccountName") or "default",
                   tuple(sorted((meta.get("labels") or {}).items())), INJECTED_ANNOTATION in annotations, plaintext)


def uncaptured_app_ports(pod: Mapping[str, Any]) -> tuple[int, ...]:
    """The TCP ports the pod's containers declare that its meshward.io/exclude-inbound-ports leaves uncaptured.

    Traffic to them reaches the app in plaintext, from anyone, and no AuthPolicy applies; the policies selecting
    the pod and `meshward check` say so. "The app's own ports" are the declared container ports: the ports the
    pod says it serves (a Service's targetPort names one of them, or a number the app may not even listen on).
    """
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    try:
        excluded = set(parse_ports(str((meta.get("annotations") or {}).get(EXCLUDE_INBOUND_PORTS, "")),
                                   EXCLUDE_INBOUND_PORTS))
    except CaptureError:
        return ()  # the injector refuses such a pod
    declared = {p.get("containerPort") for c in spec.get("containers") or [] for p in c.get("ports") or []
                if p.get("protocol", "TCP") == "TCP"}
    return tuple(sorted(port for port in excluded if port in declared))


def ports_outside_mesh(pods: Iterable[Mapping[str, Any]]) -> list[tuple[str, tuple[int, ...]]]:
    """(`namespace/pod`, its uncaptured declared ports) of every injected, live pod that has any."""
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if INJECTED_ANNOTATION not in (meta.get("annotations") or {}) or meta.get("deletionTimestamp") or \
                (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        ports = uncaptured_app_ports(pod)
        if ports:
            out.append((f"{meta.get('namespace', '')}/{meta.get('name', '')}", ports))
    return sorted(out)


def mesh_service(body: Mapping[str, Any]) -> MeshService | None:
    """The Service as the map sees it; None for Services that select no pods or have no cluster IP."""
    meta, spec = body.get("metadata", {}), body.get("spec", {})
    ips = tuple(ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")])
                if ip and ip != "None" and ":" not in ip)
    selector = spec.get("selector") or {}
    if not ips or not selector or spec.get("type") == "ExternalName":
        return None
    ports = tuple((int(p["port"]), p.get("targetPort", p["port"])) for p in spec.get("ports") or []
                  if p.get("protocol", "TCP") == "TCP" and isinstance(p.get("port"), int))
    return MeshService(meta.get("namespace", ""), meta.get("name", ""), ips, tuple(sorted(selector.items())), ports)


def _spiffe(trust_domain: str, pod: MeshPod) -> str:
    return f"spiffe://{trust_domain}/ns/{pod.namespace}/sa/{pod.service_account}"


def mesh_destinations(pods: Iterable[MeshPod], services: Iterable[MeshService], trust_domain: str
                      ) -> dict[str, dict[str, list[Any]]]:
    """The map, by IPv4 address: `{"identities": [...], "plaintextPorts": [...]}` (the wire form agents read)."""
    out: dict[str, dict[str, list[Any]]] = {}
    by_namespace: dict[str, list[MeshPod]] = {}
    for pod in pods:
        by_namespace.setdefault(pod.namespace, []).append(pod)
        if pod.injected:
            out[pod.ip] = {"identities": [_spiffe(trust_domain, pod)], "plaintextPorts": list(pod.plaintext_ports)}
    for svc in services:
        selected = [p for p in by_namespace.get(svc.namespace, []) if set(svc.selector) <= set(p.labels)]
        if not selected or not all(p.injected for p in selected):
            continue
        identities = sorted({_spiffe(trust_domain, p) for p in selected})
        plaintext = sorted(port for port, target in svc.ports
                           if isinstance(target, int) and all(target in p.plaintext_ports for p in selected))
        for ip in svc.cluster_ips:
            out[ip] = {"identities": identities, "plaintextPorts": plaintext}
    return dict(sorted(out.items()))


def version_of(destinations: Mapping[str, Any]) -> str:
    """A short content hash: equal maps, equal versions."""
    return hashlib.sha256(json.dumps(destinations, sort_keys=True).encode()).hexdigest()[:16]


# An identity of the wire form that stands for every workload of one namespace.
ANY_SERVICE_ACCOUNT = "*"


def view_for(destinations: Mapping[str, Mapping[str, list[Any]]], namespace: str, trust_domain: str
             ) -> dict[str, dict[str, list[Any]]]:
    """The map as agents of `namespace` receive it: other namespaces' identities cut to `.../ns/<ns>/sa/*`."""
    prefix = f"spiffe://{trust_domain}/ns/"
    own = f"{prefix}{namespace}/sa/"
    out: dict[str, dict[str, list[Any]]] = {}
    for ip, entry in destinations.items():
        ids = set()
        for identity in entry["identities"]:
            if identity.startswith(own) or not identity.startswith(prefix):
                ids.add(identity)
            else:
                ns = identity[len(prefix):].split("/", 1)[0]
                ids.add(f"{prefix}{ns}/sa/{ANY_SERVICE_ACCOUNT}")
        out[ip] = {**entry, "identities": sorted(ids)}
    return out
