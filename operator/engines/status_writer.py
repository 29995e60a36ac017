"""Status of Meshward objects, written by the operator's own loop instead of Kopf timers.

Kopf puts a finalizer on every object that has a timer, so `kubectl delete` would wait
for the operator: for ever while it is down or uninstalled (and a namespace deletion
with it), and for Kopf's 60 s cancellation poll whenever a timer run overlaps the
deletion. Status is a report; deleting an object must never wait for it. So the watch
hands each object's latest body to a `StatusWriter`, which every interval (and at
once for a new object or generation) asks a `report` function what the status should
be and merges it into the status subresource through the client. The writer
remembers what it wrote last, because the watch may deliver an older body after the
write returned; that memory is the "old" status a report compares with, so a
transition Event is posted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from meshward.operator.api.schema import GROUP, VERSION
from meshward.operator.clients.kube import KubeClient, KubeError

log = logging.getLogger("meshward.operator.status")

# Events about cluster-scoped objects go here, as kubectl and Kopf do.
CLUSTER_EVENT_NAMESPACE = "default"


@dataclass(frozen=True)
class EventNote:
    """A Kubernetes Event to post about the reported object."""

    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class Report:
    """What a report function decided: the status to merge (None: unchanged) and Events to post."""

    status: dict[str, Any] | None = None
    events: tuple[EventNote, ...] = ()


# Called with the object's latest body, its `status` replaced by what this writer wrote last.
Reporter = Callable[[Mapping[str, Any]], Awaitable[Report]]


def _key(body: Mapping[str, Any]) -> tuple[str, str]:
    meta = body.get("metadata", {})
    return meta.get("namespace") or "", meta.get("name", "")


class StatusWriter:
    """Keeps the latest body of every object of one kind and writes the status its reporter computes."""

    def __init__(self, kind: str, plural: str, kube: KubeClient, report: Reporter, interval_s: float) -> None:
        self.kind = kind
        self.plural = plural
        self._kube = kube
        self._report = report
        self._interval_s = interval_s
        self._bodies: dict[tuple[str, str], Mapping[str, Any]] = {}
        self._written: dict[tuple[str, str], dict[str, Any]] = {}
        self._due: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self.writes = 0

    def track(self, event_type: str | None, body: Mapping[str, Any]) -> bool:
        """Record or forget an object from a watch event; True while it exists and is not being deleted."""
        meta = body.get("metadata", {})
        if event_type == "DELETED" or meta.get("deletionTimestamp"):
            self.forget(meta.get("namespace"), meta.get("name", ""))
            return False
        self.seen(dict(body))
        return True

    def seen(self, body: Mapping[str, Any]) -> None:
        """Record a body from the watch; a new object or generation is reported without waiting for the tick."""
        key = _key(body)
        before = self._bodies.get(key)
        self._bodies[key] = body
        if before is None or before.get("metadata", {}).get("generation") != body.get("metadata", {}).get(
                "generation"):
            self._due.add(key)
            self._wake.set()

    def forget(self, namespace: str | None, name: str) -> None:
        """Drop a deleted object."""
        key = (namespace or "", name)
        self._bodies.pop(key, None)
        self._written.pop(key, None)
        self._due.discard(key)

    async def report_one(self, key: tuple[str, str]) -> bool:
        """Compute and write one object's status; True when something was written."""
        body = self._bodies.get(key)
        if body is None:
            return False
        written = self._written.get(key)
        view = {**body, "status": written} if written is not None else body
        result = await self._report(view)
        namespace, name = key
        wrote = False
        if result.status is not None:
            if not await asyncio.to_thread(self._kube.patch_custom_status, self.plural, namespace or None, name,
                                           result.status):
                return False  # deleted meanwhile; the watch will say so
            self._written[key] = {**(view.get("status") or {}), **result.status}
            self.writes += 1
            wrote = True
        meta = body.get("metadata", {})
        for ev in result.events:
            await asyncio.to_thread(self._kube.post_event, namespace or CLUSTER_EVENT_NAMESPACE, self.kind, name,
                                    ev.type, ev.reason, ev.message, api_version=f"{GROUP}/{VERSION}",
                                    uid=meta.get("uid", ""))
        return wrote

    async def tick(self, keys: list[tuple[str, str]] | None = None) -> int:
        """Report `keys` (default: every known object); return how many statuses were written."""
        wrote = 0
        for key in list(self._bodies) if keys is None else keys:
            try:
                wrote += await self.report_one(key)
            except KubeError as e:
                log.warning("%s status not written, retrying in %s s: %s", self.kind, self._interval_s, e)
            except Exception:  # one object's failing report must not stop every other's status
                log.exception("%s %s/%s: status report failed, retrying in %s s", self.kind, *key, self._interval_s)
        return wrote

    async def run(self) -> None:
        """Report every object each interval, and new ones as they arrive, until cancelled."""
        loop = asyncio.get_running_loop()
        next_full = loop.time()
        while True:
            if loop.time() >= next_full:
                self._due.clear()
                await self.tick()
                next_full = loop.time() + self._interval_s
            elif self._due:
                due, self._due = sorted(self._due), set()
                await self.tick(due)
            self._wake.clear()
            if not self._due:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, next_full - loop.time()))
