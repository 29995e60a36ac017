"""AuthPolicy and Revocation status as pure functions of what the hub knows.

`kubectl get authpolicies` must tell the truth: READY is True only when every
selected workload enforces the current generation; otherwise the message says which
workloads are behind and why, and an invalid update says which generation stays in
force instead. A selected pod that runs with the mesh but whose agent is not subscribed
counts as selected and not enforcing (reason NotConnected): "all 0 connected workloads
deny" once read Ready while every agent had lost its stream (issue 18). The same holds
for Revocations.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from meshward.operator.domain.conditions import condition

# Status lists at most this many lagging workloads (the CRD's maxItems).
MAX_LAGGING = 50


@dataclass(frozen=True)
class PolicyView:
    """What the hub says about one AuthPolicy."""

    generation: int
    in_force: int | None
    invalid: str | None
    selected: list[str]
    enforcing: list[str]
    lagging: list[str]
    conflict: str | None = None
    # Exact peer principals the rules name for which no ServiceIdentity exists (they can never call).
    unknown_principals: tuple[str, ...] = ()
    # Why a selected workload did not get its config (the config would exceed what a sidecar accepts).
    oversized: str | None = None
    # Selected pods running with the mesh whose agent is not subscribed (also in `lagging`), with why.
    disconnected: tuple[str, ...] = ()
    # Why this namespace is left out of the destination map (domain/destinations.py, bounded), if it is.
    destinations_cut: str | None = None
    # `namespace/pod:port` of selected workloads' declared ports excluded from capture (outside the mesh).
    outside_mesh: tuple[str, ...] = ()
    # `rule: namespace/pod:port`: Allow rules with HTTP-only fields covering a port declared TCP (they admit none).
    http_on_tcp: tuple[str, ...] = ()


def policy_status(v: PolicyView, old_conditions: list[dict[str, Any]], now: dt.datetime) -> dict[str, Any]:
    """The AuthPolicy `.status` (transition times kept while a condition holds)."""
    n, e = len(v.selected), len(v.enforcing)
    if v.invalid is not None:
        ready, reason = False, "InvalidSpec"
        kept = (f"generation {v.in_force} stays in force" if v.in_force is not None
                else "nothing of this policy is in force")
        message = f"generation {v.generation} rejected: {v.invalid}; {kept}"
    elif e < n:
        ready, reason = False, "NotConnected" if v.disconnected else "WorkloadsLagging"
        message = f"{e} of {n} selected workloads enforce generation {v.generation}; " + "; ".join(v.lagging[:5])
    else:
        ready, reason = True, "Enforced"
        message = (f"all {n} selected workloads enforce generation {v.generation}" if n
                   else "no connected workload is selected yet")
    outside = ""
    if v.outside_mesh:
        outside = (f"plaintext reaches {', '.join(v.outside_mesh[:5])} outside the mesh: the port is excluded from "
                   "capture (annotation meshward.io/exclude-inbound-ports), so no policy applies there")
        message = f"{message}; but {outside}" if ready else message
    degraded = v.invalid is not None or v.oversized is not None or v.conflict is not None or bool(
        v.unknown_principals) or v.destinations_cut is not None or bool(v.outside_mesh) or bool(v.http_on_tcp)
    if v.invalid is not None:
        d_reason, d_message = "InvalidSpec", message
    elif outside:
        d_reason, d_message = "PortsOutsideMesh", outside
    elif v.oversized:
        d_reason, d_message = "ConfigTooLarge", v.oversized
    elif v.destinations_cut:
        d_reason, d_message = "DestinationsCut", v.destinations_cut
    elif v.conflict:
        d_reason, d_message = "IssuerConflict", v.conflict
    elif v.unknown_principals:
        d_reason = "UnknownPrincipal"
        d_message = (f"no ServiceIdentity admits {', '.join(v.unknown_principals[:5])}: these peers cannot get a "
                     "certificate, so rules naming them never match; check the names or create the ServiceIdentity")
    elif v.http_on_tcp:
        d_reason = "HttpRulesOnTcpPorts"
        d_message = (f"Allow rules with HTTP-only fields (requestPrincipals, methods, paths, hosts, a when using "
                     f"more than source.principal and source.namespace) admit no TCP "
                     f"connection, Deny rules with them deny every connection their other fields match, and "
                     f"requireJwt does not apply to one; these cover ports declared TCP (meshward.io/tcp-ports, or a "
                     f"Service port's appProtocol or tcp- name): "
                     f"{'; '.join(v.http_on_tcp[:5])}; decide such ports with rules of principals, namespaces and "
                     "ports only")
    else:
        d_reason, d_message = "AsExpected", "nothing to report"
    return {
        "observedGeneration": v.generation,
        "workloads": f"{e}/{n}",
        "selectedWorkloads": n,
        "enforcingWorkloads": e,
        "laggingWorkloads": v.lagging[:MAX_LAGGING],
        "conditions": [
            condition("Ready", ready, reason, message, v.generation, now, old_conditions),
            condition("Degraded", degraded, d_reason, d_message, v.generation, now, old_conditions),
        ],
    }


def revocation_status(generation: int, active: int, expired: int, connected: list[str], enforcing: list[str],
                      lagging: list[str], old_conditions: list[dict[str, Any]], now: dt.datetime,
                      disconnected: list[str] | None = None) -> dict[str, Any]:
    """The Revocation `.status` (`connected` also holds the `disconnected` pods, which do not enforce it)."""
    ready = len(enforcing) == len(connected)
    if ready:
        message = (f"all {len(connected)} connected workloads deny its {active} active entries" if connected
                   else f"no workload is connected yet; its {active} active entries are denied by every agent "
                        "that connects")
    else:
        message = f"{len(enforcing)} of {len(connected)} workloads enforce it; " + "; ".join(lagging[:5])
    reason = "Enforced" if ready else "NotConnected" if disconnected else "WorkloadsLagging"
    return {
        "observedGeneration": generation,
        "activeEntries": active,
        "expiredEntries": expired,
        "workloads": f"{len(enforcing)}/{len(connected)}",
        "conditions": [condition("Ready", ready, reason, message, generation, now, old_conditions)],
    }


def checkable_principals(spec: dict[str, Any], trust_domain: str, namespace: str) -> list[tuple[str, str, str]]:
    """The exact principals whose ServiceIdentity a policy of `namespace` may be told about: its own namespace's.

    A status saying which principals of *other* namespaces lack a ServiceIdentity would tell a tenant which
    ServiceAccounts there have one (write a policy naming guesses, read the status): an enumeration oracle. So a
    typo in another namespace's name goes unreported; docs/policies.md says so.
    """
    return [p for p in exact_principals(spec, trust_domain) if p[1] == namespace]


def exact_principals(spec: dict[str, Any], trust_domain: str) -> list[tuple[str, str, str]]:
    """(SPIFFE ID, namespace, service account) of every exact in-mesh principal the rules name."""
    out = []
    prefix = f"spiffe://{trust_domain}/ns/"
    for rule in spec.get("rules") or []:
        for p in (rule.get("from") or {}).get("principals") or []:
            if "*" in p or not p.startswith(prefix):
                continue
            parts = p.removeprefix(prefix).split("/")
            if len(parts) == 3 and parts[1] == "sa":
                out.append((p, parts[0], parts[2]))
    return out
