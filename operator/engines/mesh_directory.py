"""The meshed-destination map, kept current from pod and Service events and sent to every agent.

Watch events update the directory; one loop recomputes the map (domain/destinations.py)
at most every DEBOUNCE_S, so a rollout of many pods costs a few maps, not one per pod,
and publishes it only when it changed. Every subscription stream waits on `next` and
sends each new map to its agent (servers/policy.py).

The map is bounded per namespace and in all (domain/destinations.py, `bounded`), so one
namespace's size never reaches another's stream. What the bounds leave out is made
visible, never silent: a namespace left out of the map and a pod whose exclusions
(its capture container's) are ignored are logged, counted (engines/metrics.py), and posted as a Warning
Event on a pod of that namespace (`MeshDestinationsCut`, on the pod with the largest entry;
`MeshAnnotationIgnored`, on the pod), and the namespace's AuthPolicies report
`Degraded=True, reason DestinationsCut` (engines/status_reports.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from meshward.operator.domain.destinations import (
    MAX_MAP_BYTES,
    MAX_NAMESPACE_BYTES,
    MeshPod,
    MeshService,
    bounded,
    mesh_pod,
    mesh_service,
    namespace_entries,
    version_of,
    view_for,
)
from meshward.operator.domain.egress import DNS_SERVICE, dns_entries, namespace_egress, with_dns
from meshward.sidecar.domain.egress import Allowed, Egress, combine

# A burst of pod events (a rollout) is folded into one map this long after its first event.
DEBOUNCE_S = 0.2
log = logging.getLogger("meshward.operator.mesh")
# post(namespace, pod name, pod uid, reason, message): a Warning Event on the pod.
Post = Callable[[str, str, str, str, str], Coroutine[Any, Any, None]]
# post_namespace(namespace, reason, message): a Warning Event on the Namespace.
PostNamespace = Callable[[str, str, str], Coroutine[Any, Any, None]]


async def _no_post(namespace: str, name: str, uid: str, reason: str, message: str) -> None:
    return None


async def _no_post_namespace(namespace: str, reason: str, message: str) -> None:
    return None


class MeshDirectory:
    """Pods and Services as the map needs them, and the map last published."""

    def __init__(self, trust_domain: str, debounce_s: float = DEBOUNCE_S, post: Post = _no_post, *,
                 max_namespace_bytes: int = MAX_NAMESPACE_BYTES, max_map_bytes: int = MAX_MAP_BYTES,
                 egress: Egress | None = None, post_namespace: PostNamespace = _no_post_namespace,
                 dns_service: str = DNS_SERVICE) -> None:
        self._trust_domain = trust_domain
        self._mesh_egress = egress or Egress()  # the mesh-wide lock (Helm values), combined with each namespace's
        self._namespace_egress: dict[str, Egress] = {}
        self._dns_service = dns_service  # namespace/name of the cluster DNS Service: reachable from locked pods
        self._dns: tuple[Allowed, ...] = ()
        self._post_namespace = post_namespace
        self.egress_problems: dict[str, str] = {}  # namespace -> what is wrong with its egress annotations
        self._debounce_s = debounce_s
        self._post = post
        self._max_namespace_bytes = max_namespace_bytes
        self._max_map_bytes = max_map_bytes
        self._posting: set[asyncio.Task[None]] = set()
        self._reported: dict[str, set[str]] = {}  # pod key -> why an Event was posted for it (dropped with the pod)
        self.cut: dict[str, str] = {}                 # namespace -> why it is left out of the map
        self.ignored: dict[str, str] = {}             # pod key -> why its exclusion annotation is ignored
        self.map_bytes = 0
        self._pods: dict[str, MeshPod] = {}
        self._services: dict[str, MeshService] = {}
        self._dirty = asyncio.Event()
        self._published = asyncio.Event()
        self.version = ""
        self.document: dict[str, Any] = {}
        self._views: dict[str, dict[str, Any]] = {}  # of `document`, by the receiving agents' namespace

    def apply_pod(self, body: Mapping[str, Any]) -> None:
        """Record a pod (one without an address yet, or leaving, is forgotten)."""
        pod = mesh_pod(body)
        self._put(self._pods, body, pod)
        if pod is None or not pod.injected or not pod.ignored:
            self.ignored.pop(f"{(body.get('metadata') or {}).get('namespace', '')}/"
                             f"{(body.get('metadata') or {}).get('name', '')}", None)
            return
        key = f"{pod.namespace}/{pod.name}"
        if self.ignored.get(key) != pod.ignored:
            self.ignored[key] = pod.ignored
            log.warning("pod %s: its excluded inbound ports are ignored: %s", key, pod.ignored)
            self._report(pod, "MeshAnnotationIgnored",
                         f"{pod.ignored}. The operator ignores this value (the injector refuses it: this pod was "
                         "made where no webhook runs): meshed callers reach every port of this pod over mTLS, so a "
                         "port it leaves uncaptured refuses them. Fix meshward.io/exclude-inbound-ports on the pod "
                         "template and let the webhook inject it.")

    def remove_pod(self, namespace: str, name: str) -> None:
        """Forget a pod."""
        self.ignored.pop(f"{namespace}/{name}", None)
        self._reported.pop(f"{namespace}/{name}", None)
        self._drop(self._pods, f"{namespace}/{name}")

    def _report(self, pod: MeshPod, reason: str, message: str) -> None:
        """Post a Warning Event on `pod`, once per pod and message."""
        reported = self._reported.setdefault(f"{pod.namespace}/{pod.name}", set())
        if f"{pod.uid}/{message}" in reported:
            return
        reported.add(f"{pod.uid}/{message}")
        self._spawn(self._post(pod.namespace, pod.name, pod.uid, reason, message))

    def apply_service(self, body: Mapping[str, Any]) -> None:
        """Record a Service (one the map has no use for is forgotten); the cluster DNS's addresses for egress."""
        meta = body.get("metadata") or {}
        if f"{meta.get('namespace', '')}/{meta.get('name', '')}" == self._dns_service:
            self._set_dns(dns_entries(body))
        self._put(self._services, body, mesh_service(body))

    def remove_service(self, namespace: str, name: str) -> None:
        """Forget a Service."""
        if f"{namespace}/{name}" == self._dns_service:
            self._set_dns(())
        self._drop(self._services, f"{namespace}/{name}")

    def _set_dns(self, entries: tuple[Allowed, ...]) -> None:
        if entries != self._dns:
            self._dns = entries
            self._dirty.set()

    def apply_namespace(self, body: Mapping[str, Any]) -> None:
        """Record a Namespace's egress annotations (reporting a wrong one once, when it first appears)."""
        meta = body.get("metadata") or {}
        name = str(meta.get("name", ""))
        try:
            egress, problem = namespace_egress(meta.get("annotations") or {})
        except Exception as e:
            egress, problem = Egress(True), f"cannot read its egress annotations ({type(e).__name__}: {e})"
        if problem is not None and self.egress_problems.get(name) != problem:
            log.warning("namespace %s: %s", name, problem)
            self._spawn(self._post_namespace(name, "EgressAnnotationInvalid", problem))
        if problem is None:
            self.egress_problems.pop(name, None)
        else:
            self.egress_problems[name] = problem
        if egress == Egress():
            self.remove_namespace(name, keep_problem=True)
        elif self._namespace_egress.get(name) != egress:
            self._namespace_egress[name] = egress
            self._dirty.set()

    def remove_namespace(self, name: str, *, keep_problem: bool = False) -> None:
        """Forget a Namespace's egress."""
        if not keep_problem:
            self.egress_problems.pop(name, None)
        if self._namespace_egress.pop(name, None) is not None:
            self._dirty.set()

    async def prime(self, namespaces: Callable[[], Coroutine[Any, Any, list[dict[str, Any]]]],
                    service: Callable[[str, str], Coroutine[Any, Any, dict[str, Any] | None]]) -> None:
        """Read every Namespace's egress and the cluster DNS Service before anything is served from this directory.

        The watches deliver them too, but only once the operator runs its handlers: until then a namespace locked
        by its annotations would look open to a reconnecting agent and to the webhook (fail open for a moment).
        """
        for body in await namespaces():
            self.apply_namespace(body)
        ns, _, name = self._dns_service.partition("/")
        dns = await service(ns, name)
        if dns is not None:
            self.apply_service(dns)

    def egress(self, namespace: str) -> Egress:
        """The egress in force for pods of `namespace`: the mesh's and the namespace's together."""
        return with_dns(combine(self._mesh_egress, self._namespace_egress.get(namespace, Egress())), self._dns)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the operator's loop (outside one, in tests and tools, it is dropped: the log line says it)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            return
        task = loop.create_task(coro)
        self._posting.add(task)
        task.add_done_callback(self._posting.discard)

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
        by_namespace = namespace_entries(self._pods.values(), self._services.values(), self._trust_domain)
        doc, cut = bounded(by_namespace, self._max_namespace_bytes, self._max_map_bytes)
        self._note_cut(cut, by_namespace)
        # The namespaces' egress moves the version too: every stream then sends its namespace's view again.
        version = version_of({"peers": doc, "egress": {ns: e.to_wire() for ns, e in
                                                       sorted(self._namespace_egress.items())},
                              "dns": [str(a) for a in self._dns]})
        if version == self.version:
            return False
        self.version, self.document, self._views = version, doc, {}
        self.map_bytes = len(json.dumps(doc, separators=(",", ":")))
        published, self._published = self._published, asyncio.Event()
        published.set()
        return True

    def _note_cut(self, cut: dict[str, str], by_namespace: Mapping[str, Mapping[str, Any]]) -> None:
        """Log, and post on the namespace's largest pod entry, each namespace newly left out of the map."""
        for ns in sorted(set(self.cut) - set(cut)):
            log.info("namespace %s is back in the destination map", ns)
        for ns, why in sorted(cut.items()):
            if ns in self.cut:
                continue  # reported when it was first left out (its sizes may change meanwhile)
            log.warning("%s", why)
            entries = by_namespace.get(ns, {})
            pods = [p for p in self._pods.values() if p.namespace == ns and set(p.ips) & set(entries)]
            if pods:
                biggest = max(pods, key=lambda p: (len(p.plaintext_ports), p.name))
                self._report(biggest, "MeshDestinationsCut", why)
        self.cut = cut

    def view(self, namespace: str) -> dict[str, Any]:
        """The current map as agents of `namespace` receive it (domain/destinations.py, view_for)."""
        if namespace not in self._views:
            self._views[namespace] = view_for(self.document, namespace, self._trust_domain)
        return self._views[namespace]

    async def next(self, after: str, namespace: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """Wait for a map other than version `after` (the first, for ""): version, view and egress of `namespace`."""
        while not self.version or self.version == after:
            published = self._published
            await published.wait()
        return self.version, self.view(namespace), self.egress(namespace).to_wire()

    async def run(self) -> None:
        """Publish the first map, then a new one after each burst of changes, until cancelled."""
        self.publish()
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self._debounce_s)
            self.publish()
