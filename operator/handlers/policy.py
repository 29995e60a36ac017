"""Kopf handlers of the policy plane: AuthPolicies, Revocations and opted-in pods feed the hub.

Watch events go straight into the hub (in memory, on the operator's loop: the index
handlers are `async def` because Kopf runs plain functions in executor threads, and the
hub's dicts and its `asyncio.Event` belong to the loop that serves sidecars); the hub
recompiles and pushes configs to subscribed sidecars. An invalid AuthPolicy is reported on its own
status (InvalidSpec, naming the field) with an Event, and its last valid generation stays in force.
There are no Kopf change handlers: they would store the whole spec in an annotation (which a large
policy overflows) and Kopf's progress next to it. Status is
computed by pure functions from the hub's view and written by a `StatusWriter` (not
Kopf timers, whose finalizers would make deletion wait for the operator), with an
Event whenever a Ready condition changes reason.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import kopf

from meshward.operator.api.schema import GROUP, VERSION
from meshward.operator.clients.kube import KubeClient
from meshward.operator.domain.identity import status_changed
from meshward.operator.domain.policy_status import PolicyView, exact_principals, policy_status, revocation_status
from meshward.operator.engines.identities import IdentityDirectory
from meshward.operator.engines.policy_hub import PolicyHub
from meshward.operator.engines.status_writer import EventNote, Report, StatusWriter
from meshward.operator.engines.token_review import TokenReviewer
from meshward.operator.handlers.lifecycle import shutdown

log = logging.getLogger("meshward.operator.policy")


@dataclass
class PolicyRuntime:
    """What the policy handlers share."""

    hub: PolicyHub
    clock: Callable[[], dt.datetime]
    # Starts the distribution service (servers.policy, wired by the entry point) once the CA is loaded.
    start_server: Callable[[], Awaitable[grpc.aio.Server]]
    # ServiceIdentities known from the identity handlers' watch, to flag principals that cannot exist.
    identities: IdentityDirectory
    kube: KubeClient
    # TokenReviews shared with the signing service: deletions of pods and ServiceAccounts invalidate them.
    reviewer: TokenReviewer
    trust_domain: str = "cluster.local"
    status_interval_s: float = 10.0
    server: grpc.aio.Server | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _transition(old: Mapping[str, Any], new: dict[str, Any]) -> tuple[EventNote, ...]:
    """An Event when the Ready condition changes reason, and a Warning when a Degraded condition begins."""
    def find(conditions: Any, kind: str) -> dict[str, Any]:
        return next((c for c in conditions or [] if c.get("type") == kind), {})

    notes = []
    was, now = find(old.get("conditions"), "Ready"), find(new["conditions"], "Ready")
    if was.get("reason") != now["reason"]:
        notes.append(EventNote("Normal" if now["status"] == "True" else "Warning", now["reason"], now["message"]))
    already = notes[0].reason if notes else ""  # an InvalidSpec is both Ready and Degraded: one Event for it
    was, now = find(old.get("conditions"), "Degraded"), find(new["conditions"], "Degraded")
    if now and now["status"] == "True" and was.get("reason") != now["reason"] and now["reason"] != already:
        notes.append(EventNote("Warning", now["reason"], now["message"]))
    return tuple(notes)


def policy_report(rt: PolicyRuntime, body: Mapping[str, Any]) -> Report:
    """The status an AuthPolicy should show, from the hub's view of it."""
    meta = body.get("metadata", {})
    key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    generation = int(meta.get("generation") or 0)
    hub = rt.hub
    invalid = hub.invalid(key)
    in_force = hub.policy(key)
    enf = hub.policy_enforcement(key)
    unknown = tuple(sorted({p for p, ns, sa in exact_principals(dict(body.get("spec") or {}), rt.trust_domain)
                            if rt.identities.find(ns, sa) is None}))
    view = PolicyView(generation, in_force.generation if in_force else None,
                      invalid[1] if invalid and invalid[0] == generation else None,
                      enf.selected, enf.enforcing, enf.lagging, hub.conflict(key), unknown, hub.oversized(key))
    if in_force is not None and in_force.generation != generation and view.invalid is None:
        return Report()  # the hub has not seen this generation yet; report on the next pass
    old = dict(body.get("status") or {})
    new = policy_status(view, list(old.get("conditions") or []), rt.clock())
    return Report(new, _transition(old, new)) if status_changed(old, new) else Report()


def revocation_report(rt: PolicyRuntime, body: Mapping[str, Any]) -> Report:
    """The status a Revocation should show."""
    now = rt.clock()
    meta = body.get("metadata", {})
    name = meta.get("name", "")
    active, expired = rt.hub.revocation_counts(name)
    enf = rt.hub.revocation_enforcement(name)
    old = dict(body.get("status") or {})
    new = revocation_status(int(meta.get("generation") or 0), active, expired, enf.selected,
                            enf.enforcing, enf.lagging, list(old.get("conditions") or []), now)
    return Report(new, _transition(old, new)) if status_changed(old, new) else Report()


def register(registry: kopf.OperatorRegistry, rt: PolicyRuntime) -> None:
    """Register the policy handlers on `registry`."""
    hub = rt.hub

    async def report_policy(body: Mapping[str, Any]) -> Report:
        return policy_report(rt, body)

    async def report_revocation(body: Mapping[str, Any]) -> Report:
        return revocation_report(rt, body)

    policies = StatusWriter("AuthPolicy", "authpolicies", rt.kube, report_policy, rt.status_interval_s)
    revocations = StatusWriter("Revocation", "revocations", rt.kube, report_revocation, rt.status_interval_s)

    @kopf.on.startup(registry=registry)
    async def start(**_: Any) -> None:
        # Registered after the identity handlers' start-up, so the CA (and its certificates) is loaded.
        rt.server = await rt.start_server()
        rt.tasks.append(asyncio.create_task(hub.run(), name="policy-hub"))
        rt.tasks.append(asyncio.create_task(policies.run(), name="authpolicy-status"))
        rt.tasks.append(asyncio.create_task(revocations.run(), name="revocation-status"))

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        await shutdown(rt.tasks, rt.server, grace_s=1)

    @kopf.on.event(GROUP, VERSION, "authpolicies", id="policy-index", registry=registry)
    async def policy_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        if policies.track(type, body):
            await hub.apply_policy(body)
        else:
            hub.remove_policy(body["metadata"].get("namespace", ""), body["metadata"]["name"])

    @kopf.on.event(GROUP, VERSION, "revocations", id="revocation-index", registry=registry)
    async def revocation_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        if revocations.track(type, body):
            hub.apply_revocation(body)
        else:
            hub.remove_revocation(body["metadata"]["name"])

    # Every pod, not only opted-in ones: a label filter would never deliver the update that removes the
    # meshward.io/inject label (the pod would keep its config), nor a deletion the token reviews must hear of.
    @kopf.on.event("", "v1", "pods", id="pod-index", registry=registry)
    async def pod_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        meta = body.get("metadata", {})
        if type == "DELETED":
            hub.remove_pod(meta.get("namespace", ""), meta.get("name", ""))
            rt.reviewer.forget_pod(meta.get("namespace", ""), meta.get("name", ""), str(meta.get("uid") or ""))
        else:
            hub.apply_pod(body)

    @kopf.on.event("", "v1", "serviceaccounts", id="serviceaccount-deletions", registry=registry)
    async def service_account_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        if type == "DELETED":
            meta = body.get("metadata", {})
            rt.reviewer.forget_service_account(meta.get("namespace", ""), meta.get("name", ""),
                                               str(meta.get("uid") or ""))
