"""The policy plane's watches: AuthPolicies, Revocations, pods and ServiceAccount deletions.

Each event goes straight into the policy hub (which validates and recompiles in a worker
thread and pushes configs to subscribed sidecars) and to the status writers. The handlers
are `async def`: Kopf runs plain functions in executor threads, and the hub belongs to
the operator's event loop. There are no change handlers: they would store the whole spec
in an annotation (which a large policy overflows) and Kopf's progress next to it; an
invalid AuthPolicy is reported on its own status (InvalidSpec) with an Event, and its last
valid generation stays in force.
"""

from __future__ import annotations

from typing import Any

import kopf

from meshward.operator.api.schema import GROUP, VERSION
from meshward.operator.engines.policy_hub import PolicyHub
from meshward.operator.engines.status_writer import StatusWriter
from meshward.operator.engines.token_review import TokenReviewer


def register(registry: kopf.OperatorRegistry, hub: PolicyHub, reviewer: TokenReviewer, policies: StatusWriter,
             revocations: StatusWriter) -> None:
    """Register the policy plane's watches on `registry`."""

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
            reviewer.forget_pod(meta.get("namespace", ""), meta.get("name", ""), str(meta.get("uid") or ""))
        else:
            hub.apply_pod(body)
            reviewer.pod_changed(body)

    @kopf.on.event("", "v1", "serviceaccounts", id="serviceaccount-deletions", registry=registry)
    async def service_account_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        if type == "DELETED":
            meta = body.get("metadata", {})
            reviewer.forget_service_account(meta.get("namespace", ""), meta.get("name", ""),
                                            str(meta.get("uid") or ""))
