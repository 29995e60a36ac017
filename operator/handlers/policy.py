"""Kopf handlers of the policy plane: AuthPolicies, Revocations and opted-in pods feed the hub.

Watch events go straight into the hub (in memory, on the operator's loop); the hub
recompiles and pushes configs to subscribed sidecars. Change handlers validate each
AuthPolicy (an invalid spec is a `kopf.PermanentError` naming the field); timers
publish status computed by pure functions from the hub's view, and post an Event
whenever a policy's Ready condition changes reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import kopf

from meshward.operator.api.schema import GROUP, VERSION
from meshward.operator.domain.compile import INJECT_LABEL, PolicyInvalid, PolicyObject, validate
from meshward.operator.domain.identity import status_changed
from meshward.operator.domain.policy_status import PolicyView, exact_principals, policy_status, revocation_status
from meshward.operator.engines.identities import IdentityDirectory
from meshward.operator.engines.policy_hub import PolicyHub

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
    trust_domain: str = "cluster.local"
    status_interval_s: float = 10.0
    server: grpc.aio.Server | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _post_transition(body: kopf.Body, old: dict[str, Any], new: dict[str, Any]) -> None:
    was: dict[str, Any] = next((c for c in old.get("conditions") or [] if c.get("type") == "Ready"), {})
    now = new["conditions"][0]
    if was.get("reason") != now["reason"]:
        kopf.event(body, type="Normal" if now["status"] == "True" else "Warning", reason=now["reason"],
                   message=now["message"][:1024])


def register(registry: kopf.OperatorRegistry, rt: PolicyRuntime) -> None:
    """Register the policy handlers on `registry`."""
    hub = rt.hub

    @kopf.on.startup(registry=registry)
    async def start(**_: Any) -> None:
        # Registered after the identity handlers' start-up, so the CA (and its certificates) is loaded.
        rt.server = await rt.start_server()
        rt.tasks.append(asyncio.create_task(hub.run(), name="policy-hub"))

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        for t in rt.tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if rt.server is not None:
            await rt.server.stop(grace=1)

    @kopf.on.event(GROUP, VERSION, "authpolicies", id="policy-index", registry=registry)
    def policy_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        meta = body.get("metadata", {})
        if type == "DELETED" or meta.get("deletionTimestamp"):
            hub.remove_policy(meta.get("namespace", ""), meta.get("name", ""))
        else:
            hub.apply_policy(body)

    @kopf.on.resume(GROUP, VERSION, "authpolicies", id="validate", registry=registry)
    @kopf.on.create(GROUP, VERSION, "authpolicies", id="validate", registry=registry)
    @kopf.on.update(GROUP, VERSION, "authpolicies", id="validate", field="spec", registry=registry)
    def check(body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, namespace: str | None, **_: Any) -> None:
        try:
            validate(PolicyObject(namespace or "", meta.get("name", ""), int(meta.get("generation") or 0), "",
                                  dict(spec)))
        except PolicyInvalid as e:
            raise kopf.PermanentError(f"{e}") from e

    @kopf.timer(GROUP, VERSION, "authpolicies", id="status", interval=rt.status_interval_s, registry=registry)
    def status(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, namespace: str | None, patch: kopf.Patch,
               **_: Any) -> None:
        key = f"{namespace}/{meta.get('name')}"
        generation = int(meta.get("generation") or 0)
        invalid = hub.invalid.get(key)
        in_force = hub.policies.get(key)
        enf = hub.policy_enforcement(key)
        conflict = next((s.latest.conflicts[key] for s in hub.subscribers.values()
                         if s.latest and key in s.latest.conflicts), None)
        unknown = tuple(sorted({p for p, ns, sa in exact_principals(dict(body.get("spec") or {}), rt.trust_domain)
                                if rt.identities.find(ns, sa) is None}))
        view = PolicyView(generation, in_force.generation if in_force else None,
                          invalid[1] if invalid and invalid[0] == generation else None,
                          enf.selected, enf.enforcing, enf.lagging, conflict, unknown)
        if in_force is not None and in_force.generation != generation and view.invalid is None:
            return  # the watch has not delivered this generation yet; report on the next tick
        old = dict(status)
        new = policy_status(view, list(old.get("conditions") or []), rt.clock())
        if status_changed(old, new):
            patch.status.update(new)
            _post_transition(body, old, new)

    @kopf.on.event(GROUP, VERSION, "revocations", id="revocation-index", registry=registry)
    def revocation_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        if type == "DELETED" or body.get("metadata", {}).get("deletionTimestamp"):
            hub.remove_revocation(body["metadata"]["name"])
        else:
            hub.apply_revocation(body)

    @kopf.timer(GROUP, VERSION, "revocations", id="revocation-status", interval=rt.status_interval_s,
                registry=registry)
    def revocation_state(body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status, patch: kopf.Patch,
                         **_: Any) -> None:
        now = rt.clock()
        name = meta.get("name", "")
        entries = hub.revocations.get(name, [])
        active = sum(1 for e in entries if e.expires_at > now)
        if hub.expiry_passed(now):
            hub.touch()  # an entry expired: drop it from every config
        enf = hub.revocation_enforcement(name)
        old = dict(status)
        new = revocation_status(int(meta.get("generation") or 0), active, len(entries) - active, enf.selected,
                                enf.enforcing, enf.lagging, list(old.get("conditions") or []), now)
        if status_changed(old, new):
            patch.status.update(new)
            _post_transition(body, old, new)

    @kopf.on.event("", "v1", "pods", id="pod-index", labels={INJECT_LABEL: "enabled"}, registry=registry)
    def pod_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        meta = body.get("metadata", {})
        if type == "DELETED":
            hub.remove_pod(meta.get("namespace", ""), meta.get("name", ""))
        else:
            hub.apply_pod(body)
