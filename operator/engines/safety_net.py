"""The safety net: opted-in pods that run without the mesh are reported, not silently trusted.

A pod can run opted in yet uninjected: created while the webhook was bypassed or before
it existed, or labelled (or its namespace labelled) after it started. Such a pod takes
plaintext from anyone and is invisible to policy. From pod and namespace events this
engine keeps the set of such pods; each new one gets a Warning Event on the pod (once),
the metric `meshward_unprotected_pods` counts them, and `meshward check` lists them.
The fix is a restart (`kubectl rollout restart`), which the Event says.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from meshward.operator.domain.inject import ENABLED, INJECT_LABEL, unprotected

log = logging.getLogger("meshward.operator.safety")
# post(namespace, pod name, pod uid, message)
Post = Callable[[str, str, str, str], Coroutine[Any, Any, None]]


class SafetyNet:
    """Opted-in pods without the mesh, from the watches."""

    def __init__(self, operator_namespace: str, post: Post) -> None:
        self._operator_namespace = operator_namespace
        self._post = post
        self._pods: dict[str, Mapping[str, Any]] = {}
        self._namespaces: set[str] = set()
        self._reported: set[str] = set()  # pod UIDs an Event was posted for
        self._posting: set[asyncio.Task[None]] = set()
        self.unprotected: list[str] = []

    def apply_namespace(self, body: Mapping[str, Any], deleted: bool = False) -> None:
        """Record whether a namespace opts its pods in."""
        meta = body.get("metadata", {})
        if not deleted and (meta.get("labels") or {}).get(INJECT_LABEL) == ENABLED:
            self._namespaces.add(meta.get("name", ""))
        else:
            self._namespaces.discard(meta.get("name", ""))
        self._refresh()

    def apply_pod(self, body: Mapping[str, Any], deleted: bool = False) -> None:
        """Record a pod (its metadata, phase and init containers are all that matter)."""
        meta = body.get("metadata", {})
        key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        if deleted:
            self._pods.pop(key, None)
            self._reported.discard(str(meta.get("uid") or key))
        else:
            self._pods[key] = {"metadata": {k: meta.get(k) for k in ("namespace", "name", "uid", "labels",
                                                                     "deletionTimestamp")},
                               "spec": {"initContainers": [{"name": c.get("name")} for c in
                                                           body.get("spec", {}).get("initContainers") or []]},
                               "status": {"phase": body.get("status", {}).get("phase")}}
        self._refresh()

    def _refresh(self) -> None:
        self.unprotected = unprotected(list(self._pods.values()), self._namespaces, self._operator_namespace)
        for key in self.unprotected:
            uid = str(self._pods[key]["metadata"].get("uid") or key)
            if uid in self._reported:
                continue
            self._reported.add(uid)
            namespace, name = key.split("/", 1)
            log.warning("pod %s opted in to the mesh but runs without it", key)
            message = ("this pod opted in to the mesh (label meshward.io/inject) but runs without its sidecar: it "
                       "accepts plaintext from anyone and no policy applies. It was created while the injection "
                       "webhook was bypassed, or labelled afterwards; restart it (kubectl rollout restart) to "
                       "inject it.")
            task = asyncio.get_running_loop().create_task(self._post(namespace, name, uid, message))
            self._posting.add(task)
            task.add_done_callback(self._posting.discard)
