"""The meshed-destination map, kept current from pod and Service events and sent to every agent.

Watch events update the directory; one loop recomputes the map (domain/destinations.py)
at most every DEBOUNCE_S, so a rollout of many pods costs a few maps, not one per pod,
and publishes it only when it changed. Every subscription stream waits on `next` and
sends each new map to its agent (servers/policy.py). The directory also answers which
opted-in pods run without the mesh (the safety net: engines/safety_net.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from meshward.operator.domain.destinations import (
    MeshPod,
    MeshService,
    mesh_destinations,
    mesh_pod,
    mesh_service,
    version_of,
    view_for,
)

# A burst of pod events (a rollout) is folded into one map this long after its first event.
DEBOUNCE_S = 0.2


class MeshDirectory:
    """Pods and Services as the map needs them, and the map last published."""

    def __init__(self, trust_domain: str, debounce_s: float = DEBOUNCE_S) -> None:
        self._trust_domain = trust_domain
        self._debounce_s = debounce_s
        self._pods: dict[str, MeshPod] = {}
        self._services: dict[str, MeshService] = {}
        self._dirty = asyncio.Event()
        self._published = asyncio.Event()
        self.version = ""
        self.document: dict[str, Any] = {}
        self._views: dict[str, dict[str, Any]] = {}  # of `document`, by the receiving agents' namespace

    def apply_pod(self, body: Mapping[str, Any]) -> None:
        """Record a pod (one without an address yet, or leaving, is forgotten)."""
        self._put(self._pods, body, mesh_pod(body))

    def remove_pod(self, namespace: str, name: str) -> None:
        """Forget a pod."""
        self._drop(self._pods, f"{namespace}/{name}")

    def apply_service(self, body: Mapping[str, Any]) -> None:
        """Record a Service (one the map has no use for is forgotten)."""
        self._put(self._services, body, mesh_service(body))

    def remove_service(self, namespace: str, name: str) -> None:
        """Forget a Service."""
        self._drop(self._services, f"{namespace}/{name}")

    def _put(self, store: dict[str, Any], body: Mapping[str, Any], item: Any) -> None:
        """Keep `item` as what `body` is to the map (None: forget it); the map is dirty if that changed it."""
        meta = body.get("metadata", {})
        key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        if item is None:
            self._drop(store, key)
        elif store.get(key) != item:
            store[key] = item
            self._dirty.set()

    def _drop(self, store: dict[str, Any], key: str) -> None:
        if store.pop(key, None) is not None:
            self._dirty.set()

    def publish(self) -> bool:
        """Recompute the map now; whether it changed (and was published)."""
        self._dirty.clear()
        doc = mesh_destinations(self._pods.values(), self._services.values(), self._trust_domain)
        version = version_of(doc)
        if version == self.version:
            return False
        self.version, self.document, self._views = version, doc, {}
        published, self._published = self._published, asyncio.Event()
        published.set()
        return True

    def view(self, namespace: str) -> dict[str, Any]:
        """The current map as agents of `namespace` receive it (domain/destinations.py, view_for)."""
        if namespace not in self._views:
            self._views[namespace] = view_for(self.document, namespace, self._trust_domain)
        return self._views[namespace]

    async def next(self, after: str, namespace: str) -> tuple[str, dict[str, Any]]:
        """Wait for a map other than version `after` (the first one, for ""): its version and `namespace`'s view."""
        while not self.version or self.version == after:
            published = self._published
            await published.wait()
        return self.version, self.view(namespace)

    async def run(self) -> None:
        """Publish the first map, then a new one after each burst of changes, until cancelled."""
        self.publish()
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self._debounce_s)
            self.publish()
