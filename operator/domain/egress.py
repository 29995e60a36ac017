"""Egress control as the platform writes it: the mesh's flags (Helm values) and a Namespace's annotations.

The grammar and the combination are the sidecar's (sidecar/domain/egress.py), so the operator
refuses exactly what an agent would. Namespace annotations, because only those who may edit
Namespaces (the platform, not a namespace's tenants) can write them; a namespace can narrow
the mesh's lock, never widen it (`combine`).

A wrong annotation fails closed: `meshward.io/egress: meshd-only` (a typo) is taken as a lock
with nothing allowed, never as open, and a wrong entry of the allowed list drops the whole list
(nothing allowed) rather than keeping the others, which would allow less than was meant but
silently. Either way the operator says so (engines/mesh_directory.py: a log line and a Warning
Event on the Namespace) with the annotation and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshward.operator.domain.inject import EXCLUDE_OUTBOUND_CIDRS, EXCLUDE_OUTBOUND_PORTS
from meshward.sidecar.domain.egress import DNS_PORT, MODES, Allowed, Egress, ordered, parse_allow, parse_mode

EGRESS = "meshward.io/egress"
EGRESS_ALLOW = "meshward.io/egress-allow"


def mesh_egress(mode: str, allow: str) -> Egress:
    """The mesh-wide egress from the operator's flags; ValueError naming the flag and the fix."""
    try:
        locked = parse_mode(mode)
    except ValueError as e:
        raise ValueError(f"--egress-mode: {e}") from e
    try:
        entries = parse_allow(allow)
    except ValueError as e:
        raise ValueError(f"--egress-allow: {e}") from e
    if entries and not locked:
        raise ValueError("--egress-allow is given but --egress-mode is open: nothing would be restricted; "
                         "set the chart's egress.mode to meshed-only, or drop egress.allow")
    return Egress(locked, entries)


def namespace_egress(annotations: Mapping[str, Any]) -> tuple[Egress, str | None]:
    """A Namespace's own egress (no annotation: open) and, if an annotation is wrong, why (it then locks)."""
    mode = annotations.get(EGRESS)
    allow = annotations.get(EGRESS_ALLOW)
    if mode is None and allow is None:
        return Egress(), None
    if mode is None:
        return Egress(True), (f"{EGRESS_ALLOW} is set without {EGRESS}: egress is locked with nothing allowed; "
                              f"add {EGRESS}: meshed-only to allow the list, or remove {EGRESS_ALLOW}")
    try:
        locked = parse_mode(str(mode))
    except ValueError as e:
        return Egress(True), f"{EGRESS}: {e}; egress is locked with nothing allowed until it is one of {MODES}"
    if not locked:
        return Egress(), (None if allow is None else
                          f"{EGRESS_ALLOW} is ignored: {EGRESS} is open (set it to meshed-only to restrict)")
    try:
        return Egress(True, parse_allow(str(allow or ""))), None
    except ValueError as e:
        return Egress(True), f"{EGRESS_ALLOW}: {e}; egress is locked with nothing allowed until the list is fixed"


# The cluster DNS Service (kubeadm's, kind's and most distributions' name for CoreDNS): its addresses on its TCP
# ports stay reachable from locked pods (DNS over TCP). Settable (--egress-dns-service) for clusters naming it
# otherwise.
DNS_SERVICE = "kube-system/kube-dns"


def dns_entries(service: Mapping[str, Any]) -> tuple[Allowed, ...]:
    """What a locked pod may reach of the cluster DNS Service: each cluster IP on TCP port 53 (not its metrics)."""
    spec = service.get("spec") or {}
    ips = [ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if isinstance(ip, str) and ip
           and ip != "None"]
    out = []
    for ip in ips:
        try:
            out.append(Allowed.host(ip, DNS_PORT))
        except ValueError:
            continue
    return ordered(out)


def with_dns(egress: Egress, dns: tuple[Allowed, ...]) -> Egress:
    """`egress` with the cluster DNS reachable, if it is locked."""
    return Egress(True, ordered([*egress.allow, *dns])) if egress.locked else egress


def exclusions_problem(annotations: Mapping[str, Any]) -> str | None:
    """Why a pod may not be created in a namespace whose egress is locked: outbound exclusions would bypass it."""
    named = [a for a in (EXCLUDE_OUTBOUND_CIDRS, EXCLUDE_OUTBOUND_PORTS) if str(annotations.get(a) or "").strip()]
    if not named:
        return None
    return (f"egress is locked in this namespace (meshed-only) and {' and '.join(named)} would let this pod's app "
            f"connect around it; remove {'them' if len(named) > 1 else 'it'} and have the platform allow the "
            f"destinations instead ({EGRESS_ALLOW} on the Namespace, or the chart's egress.allow)")
