"""The meshed-destination map: which addresses answer with mTLS, and as whom.

Every injected pod's Envoy sends a connection to a meshed address over mTLS, pinned
to the SPIFFE IDs that may answer there, and any other connection through untouched
(sidecar/domain/envoy.py, outbound_resources). The map holds, by address of either
family (every address of `status.podIPs` and `spec.clusterIPs`: on a dual-stack cluster a
pod or Service is in it by its IPv4 and its IPv6 address, with the same entry):
- each injected pod's IPs: its ServiceAccount's SPIFFE ID, and the ports it leaves
  uncaptured as plaintext. Both are read from the pod's spec as the injector made it (the
  opt-in label and the mesh's containers; the capture container's exclusions), never from
  annotations, which anyone who can edit the pod can write after admission: an annotation
  naming a pod injected made its meshed callers fail (503), and a huge one inflated
  every agent's map;
- each injected pod's ports declared TCP (its proxy's `--tcp-ports`, from the spec too), where
  callers tunnel what is not HTTP over mTLS (sidecar/domain/envoy.py, TCP_ALPN), and a Service's
  service ports whose target port every endpoint declares TCP;
- each ClusterIP Service whose selected pods are all injected: the SPIFFE IDs of those
  pods, and as plaintext the service ports whose target port every one of its endpoints
  leaves uncaptured (a named target port resolved per pod against its containers' ports,
  as for the Service's EndpointSlices; before, only numeric ones were, so a caller sent
  mTLS to an excluded port behind a name and failed). A Service with any non-injected pod behind it is not meshed:
  its callers speak plaintext, which injected pods behind it refuse unless they allow
  plaintext while migrating (docs/app-teams.md).
Each agent receives its namespace's view (`view_for`): the identities of its own
namespace exact, those of other namespaces cut to `spiffe://<td>/ns/<ns>/sa/*` (the
client's Envoy then accepts any workload of that namespace there). So no pod learns
another namespace's ServiceAccounts; it learns which addresses are meshed and their
namespaces, which cluster DNS tells any pod already (docs/security.md, what a pod can
learn). Addresses and identities only, no policy.

Bounded per namespace, so that no tenant's size reaches another's stream (docs/security.md,
tenant isolation; issue 18: 17 pods with a 256 KiB exclusion annotation pushed the map past
gRPC's 4 MiB and every agent of the mesh lost its stream):
- a pod's excluded inbound ports (its capture container's) count only within the
  injector's bounds (inject.ANNOTATION_BOUNDS): a pod made where no webhook runs, whose
  exclusions are over them or unparsable, gets none and is reported;
- one namespace's entries (its pods and Services) may take MAX_NAMESPACE_BYTES of the
  map; a namespace over that is left out of the map as a whole, in every view;
- the whole map may take MAX_MAP_BYTES, under gRPC's 4 MiB with room for the envelope;
  while it is over, the largest namespaces are left out, one at a time.
Leaving a namespace out fails closed for that namespace only: its addresses are not
meshed, so callers' Envoys pass their connections through in plaintext, which its
meshed pods refuse (unless they allow plaintext while migrating, where callers arrive
with no peer principal). Every other namespace's entries, and every agent's stream, are
unaffected; the engine reports what it left out (engines/mesh_directory.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from meshward.operator.domain.inject import (
    ENABLED,
    EXCLUDE_INBOUND_PORTS,
    INJECT_LABEL,
    TCP_PORTS,
    annotation_problem,
    declared_ports,
    declared_tcp_ports,
    excluded_inbound_ports,
    is_injected,
    service_tcp_ports,
)
from meshward.sidecar.domain.capture import CaptureError, parse_ports
from meshward.sidecar.domain.envoy import canonical_address

# One namespace's share of the map. An entry is ~100 bytes (an address, one identity, a few ports), ~500 with the
# 64 ports the injector allows a pod; so this holds thousands of pods and Services (half as many on a dual-stack
# cluster, where each has an entry per family; sizes are counted from the entries as sent, so the bound holds
# whatever the families), and six namespaces at the cap still fit in MAX_MAP_BYTES.
MAX_NAMESPACE_BYTES = 512 * 1024
# The whole map, as sent: gRPC's default message limit is 4 MiB (servers/policy.py, MAX_MESSAGE_BYTES), and the
# `{"destinations": {"version", "peers"}}` envelope around it is a few dozen bytes.
MAX_MAP_BYTES = 3 * 1024 * 1024


@dataclass(frozen=True)
class MeshPod:
    """What the map needs of a pod."""

    namespace: str
    name: str
    ips: tuple[str, ...]  # every address of status.podIPs (both families on a dual-stack cluster), canonical
    service_account: str
    labels: tuple[tuple[str, str], ...]
    injected: bool
    plaintext_ports: tuple[int, ...] = ()
    ignored: str = ""  # why its exclude-inbound-ports annotation was ignored (over the injector's bounds, unparsable)
    uid: str = ""
    port_names: tuple[tuple[str, int], ...] = ()  # its containers' named TCP ports (a Service's targetPort names one)
    tcp_ports: tuple[int, ...] = ()  # the ports it declares TCP (its proxy's --tcp-ports): tunnelled over mTLS


@dataclass(frozen=True)
class MeshService:
    """What the map needs of a Service: its cluster IPs, selector and port -> target port."""

    namespace: str
    name: str
    cluster_ips: tuple[str, ...]
    selector: tuple[tuple[str, str], ...]
    ports: tuple[tuple[int, int | str], ...]


def _addresses(texts: Iterable[Any]) -> tuple[str, ...]:
    """The first IPv4 and the first IPv6 address among `texts`, canonical, in their order.

    Anything else (`None`, a zone, a second address of a family) is left out. Kubernetes gives a pod
    (`status.podIPs`) and a Service (`spec.clusterIPs`) at most one address per family; the map takes no more
    whatever it is sent, so an entry's count is bounded where it enters.
    """
    out: dict[int, str] = {}
    for address in filter(None, map(canonical_address, texts)):
        out.setdefault(6 if ":" in address else 4, address)
    return tuple(out.values())


def mesh_pod(body: Mapping[str, Any]) -> MeshPod | None:
    """The pod as the map sees it, by every address of `status.podIPs`; None without an address or on its way out."""
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {})
    ips = _addresses([*(p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, Mapping)),
                      status.get("podIP")])
    if not ips or meta.get("deletionTimestamp") or spec.get("hostNetwork") or \
            status.get("phase") in ("Succeeded", "Failed"):
        return None
    labels = meta.get("labels") or {}
    injected = labels.get(INJECT_LABEL) == ENABLED and is_injected(body)
    # The injector refuses such values; a pod created around the injector (where no webhook runs) gets no plaintext
    # ports (its callers use mTLS on every port) and is reported, so its size never reaches the map.
    plaintext, ignored = _bounded_ports(EXCLUDE_INBOUND_PORTS, excluded_inbound_ports(body) if injected else "",
                                        "--exclude-inbound-ports")
    tcp = tcp_ports_of(body) if injected else ()
    return MeshPod(meta.get("namespace", ""), meta.get("name", ""), ips, spec.get("serviceAccountName") or "default",
                   tuple(sorted(labels.items())), injected, plaintext, ignored, str(meta.get("uid") or ""),
                   tuple(sorted(declared_ports(body).items())), tcp)


def tcp_ports_of(pod: Mapping[str, Any]) -> tuple[int, ...]:
    """The ports an injected pod declares TCP, from its spec (its proxy's --tcp-ports), within the injector's bounds.

    The injector refuses values over its bounds or malformed: a pod made around it (no webhook) declares none.
    """
    return _bounded_ports(TCP_PORTS, declared_tcp_ports(pod), "--tcp-ports")[0]


def _bounded_ports(annotation: str, value: str, flag: str) -> tuple[tuple[int, ...], str]:
    """The ports of `value` (as a mesh container's `flag` holds them), or none and why.

    Why: over the injector's bounds for `annotation`, or unparsable.
    """
    problem = annotation_problem(annotation, value)
    if problem:
        return (), problem
    try:
        return parse_ports(value, flag), ""
    except CaptureError as e:
        return (), str(e)


def uncaptured_app_ports(pod: Mapping[str, Any]) -> tuple[int, ...]:
    """The TCP ports the pod's containers declare that its capture container leaves uncaptured (exclude-inbound-ports).

    Traffic to them reaches the app in plaintext, from anyone, and no AuthPolicy applies; the policies selecting
    the pod and `meshward check` say so. "The app's own ports" are the declared container ports: the ports the
    pod says it serves (a Service's targetPort names one of them, or a number the app may not even listen on).
    """
    spec = pod.get("spec") or {}
    try:
        excluded = set(parse_ports(excluded_inbound_ports(pod), "--exclude-inbound-ports"))
    except CaptureError:
        return ()  # the injector refuses such a pod
    declared = {p.get("containerPort") for c in spec.get("containers") or [] for p in c.get("ports") or []
                if p.get("protocol", "TCP") == "TCP"}
    return tuple(sorted(port for port in excluded if port in declared))


def _live_injected(pods: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """The injected pods that run or will: not being deleted, not finished."""
    for pod in pods:
        if is_injected(pod) and not (pod.get("metadata") or {}).get("deletionTimestamp") and \
                (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            yield pod


def ports_outside_mesh(pods: Iterable[Mapping[str, Any]]) -> list[tuple[str, tuple[int, ...]]]:
    """(`namespace/pod`, its uncaptured declared ports) of every injected, live pod that has any."""
    out = []
    for pod in _live_injected(pods):
        meta = pod.get("metadata") or {}
        ports = uncaptured_app_ports(pod)
        if ports:
            out.append((f"{meta.get('namespace', '')}/{meta.get('name', '')}", ports))
    return sorted(out)


def tcp_declarations_pending(pods: Iterable[Mapping[str, Any]], services: Iterable[Mapping[str, Any]]
                             ) -> list[tuple[str, dict[int, str]]]:
    """(`namespace/pod`, {port: Service port}) of each injected, live pod a Service declares TCP on ports it does not.

    The pod was created before (the injector reads Services at creation), so its callers still speak HTTP to it
    there until it restarts. Ports the pod excludes from capture are left out.
    """
    by_namespace: dict[str, list[Mapping[str, Any]]] = {}
    for svc in services:
        by_namespace.setdefault(str((svc.get("metadata") or {}).get("namespace") or ""), []).append(svc)
    out = []
    for pod in _live_injected(pods):
        meta = pod.get("metadata") or {}
        have = set(tcp_ports_of(pod)) | set(_bounded_ports(EXCLUDE_INBOUND_PORTS, excluded_inbound_ports(pod),
                                                           "--exclude-inbound-ports")[0])
        pending = {port: by for port, by in service_tcp_ports(by_namespace.get(meta.get("namespace", ""), []),
                                                               pod).items() if port not in have}
        if pending:
            out.append((f"{meta.get('namespace', '')}/{meta.get('name', '')}", pending))
    return sorted(out)


def mesh_service(body: Mapping[str, Any]) -> MeshService | None:
    """The Service as the map sees it, by every address of `spec.clusterIPs`; None without a selector or cluster IP."""
    meta, spec = body.get("metadata", {}), body.get("spec", {})
    ips = _addresses(spec.get("clusterIPs") or [spec.get("clusterIP")])
    selector = spec.get("selector") or {}
    if not ips or not selector or spec.get("type") == "ExternalName":
        return None
    ports = tuple((int(p["port"]), p.get("targetPort", p["port"])) for p in spec.get("ports") or []
                  if p.get("protocol", "TCP") == "TCP" and isinstance(p.get("port"), int))
    return MeshService(meta.get("namespace", ""), meta.get("name", ""), ips, tuple(sorted(selector.items())), ports)


def _every_endpoint(target: int | str, pods: list[MeshPod], ports: str) -> bool:
    """Whether every endpoint of a Service port with `target` among `pods` has it among its `ports`.

    `ports` names the MeshPod field: `plaintext_ports` or `tcp_ports`. A named target port resolves per pod, as
    for the Service's EndpointSlices: a pod whose containers do not name it is no endpoint of that port. With no
    endpoint at all it stays plain mTLS (there is nothing to reach either way).
    """
    resolved = [(p, dict(p.port_names).get(target) if isinstance(target, str) else target) for p in pods]
    endpoints = [(p, port) for p, port in resolved if port is not None]
    return bool(endpoints) and all(port in getattr(p, ports) for p, port in endpoints)


def _entry(identities: list[str], plaintext: list[int], tcp: list[int]) -> dict[str, list[Any]]:
    """One address's entry in the wire form.

    `tcpPorts` only when some port is declared TCP: the map stays as small as before for everyone else.
    """
    entry: dict[str, list[Any]] = {"identities": identities, "plaintextPorts": plaintext}
    if tcp:
        entry["tcpPorts"] = tcp
    return entry


def _spiffe(trust_domain: str, pod: MeshPod) -> str:
    return f"spiffe://{trust_domain}/ns/{pod.namespace}/sa/{pod.service_account}"


Entries = dict[str, dict[str, list[Any]]]


def namespace_entries(pods: Iterable[MeshPod], services: Iterable[MeshService], trust_domain: str
                      ) -> dict[str, Entries]:
    """Each namespace's entries by address: `{"identities": [...], "plaintextPorts": [...]}` (the wire form).

    A pod or Service with an address of each family (dual-stack) has the same entry at each.
    """
    out: dict[str, Entries] = {}
    by_namespace: dict[str, list[MeshPod]] = {}
    for pod in pods:
        by_namespace.setdefault(pod.namespace, []).append(pod)
        if pod.injected:
            for ip in pod.ips:
                out.setdefault(pod.namespace, {})[ip] = _entry([_spiffe(trust_domain, pod)], list(pod.plaintext_ports),
                                                              list(pod.tcp_ports))
    for svc in services:
        selected = [p for p in by_namespace.get(svc.namespace, []) if set(svc.selector) <= set(p.labels)]
        if not selected or not all(p.injected for p in selected):
            continue
        identities = sorted({_spiffe(trust_domain, p) for p in selected})
        plaintext = sorted(port for port, target in svc.ports if _every_endpoint(target, selected, "plaintext_ports"))
        tcp = sorted(port for port, target in svc.ports if _every_endpoint(target, selected, "tcp_ports"))
        for ip in svc.cluster_ips:
            out.setdefault(svc.namespace, {})[ip] = _entry(identities, plaintext, tcp)
    return {ns: dict(sorted(entries.items())) for ns, entries in sorted(out.items())}


def _size(value: Any) -> int:
    """Bytes of `value` in the wire's compact JSON (servers/wire.py, dumps)."""
    return len(json.dumps(value, separators=(",", ":")))


def bounded(by_namespace: Mapping[str, Entries], max_namespace_bytes: int = MAX_NAMESPACE_BYTES,
            max_map_bytes: int = MAX_MAP_BYTES) -> tuple[Entries, dict[str, str]]:
    """The map with every namespace over its share left out, then the largest while the map is over its bound.

    Returns the map by address and, for each namespace left out, why (naming the bound and the fix). Sizes are
    of the full form, which no view exceeds (views only shorten and merge other namespaces' identities).
    """
    sizes = {ns: _size(entries) for ns, entries in by_namespace.items()}
    cut: dict[str, str] = {}
    for ns, size in sizes.items():
        if size > max_namespace_bytes:
            cut[ns] = (f"namespace {ns}'s {len(by_namespace[ns])} meshed addresses would take {size} bytes of the "
                       f"destination map, more than the {max_namespace_bytes} one namespace may; they are left out "
                       "of every agent's map, so meshed callers reach them in plaintext, which they refuse. Fewer "
                       "pods or Services, or shorter meshward.io/exclude-inbound-ports lists, bring them back")
    total = 2 + sum(size + 1 for ns, size in sizes.items() if ns not in cut)  # braces and commas
    for ns in sorted((n for n in sizes if n not in cut), key=lambda n: (-sizes[n], n)):
        if total <= max_map_bytes:
            break
        cut[ns] = (f"the destination map would take {total} bytes, more than the {max_map_bytes} an agent's message "
                   f"carries; namespace {ns}, the largest left ({sizes[ns]} bytes, {len(by_namespace[ns])} "
                   "addresses), is left out of every agent's map, so meshed callers reach it in plaintext, which it "
                   "refuses. The mesh holds fewer addresses than the cluster has")
        total -= sizes[ns] + 1
    out: Entries = {}
    for ns, entries in by_namespace.items():
        if ns not in cut:
            out.update(entries)
    return dict(sorted(out.items())), cut


def mesh_destinations(pods: Iterable[MeshPod], services: Iterable[MeshService], trust_domain: str) -> Entries:
    """The map by address, every namespace included (unbounded: `bounded` is what agents receive)."""
    return dict(sorted((ip, entry) for entries in namespace_entries(pods, services, trust_domain).values()
                       for ip, entry in entries.items()))


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
