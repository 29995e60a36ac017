"""The policy plane's state: what is applied, who is connected, what each one enforces.

Watch events update the hub (policies, revocations, opted-in pods); every change marks
it dirty and one background loop recompiles the connected workloads' configs and
pushes only those that changed, so a burst of applies costs one push per workload.
A policy update that fails validation never removes the policy from workloads: its
last valid generation stays in force (dropping it could open access) and its status
says so. Acknowledgements from sidecars drive AuthPolicy and Revocation status.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshward.operator.domain.compile import (
    INJECT_LABEL,
    Compiled,
    PolicyInvalid,
    PolicyObject,
    RevocationEntry,
    Workload,
    compile_workload,
    destination_claims,
    policy_object,
    revocation_entries,
    selects,
    validate,
    workload_of,
)

log = logging.getLogger("meshward.operator.policy")


@dataclass(eq=False)
class Subscriber:
    """One connected sidecar."""

    workload: Workload
    spiffe_id: str
    latest: Compiled | None = None
    acked: Compiled | None = None
    error: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sent: dict[str, Compiled] = field(default_factory=dict)

    def push(self, compiled: Compiled) -> None:
        """Make `compiled` the next config to send."""
        self.latest = compiled
        self.sent[compiled.version] = compiled
        self.wake.set()

    async def next(self, after: str | None) -> Compiled:
        """Wait for a config newer than version `after`."""
        while self.latest is None or self.latest.version == after:
            self.wake.clear()
            await self.wake.wait()
        return self.latest


@dataclass(frozen=True)
class Enforcement:
    """Who a policy (or revocation) reaches: selected connected workloads and those that enforce it."""

    selected: list[str]
    enforcing: list[str]
    lagging: list[str]


class SubscriptionRefused(Exception):
    """A sidecar may not subscribe as the pod it named; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _labels(body: Mapping[str, Any]) -> dict[str, str]:
    return dict(body.get("metadata", {}).get("labels") or {})


class PolicyHub:
    """Applied objects, connected sidecars, and the configs between them."""

    def __init__(self, clock: Callable[[], dt.datetime], trust_domain: str = "cluster.local") -> None:
        self._clock = clock
        self._trust_domain = trust_domain
        self._destinations: dict[str, list[str]] | None = None
        self.policies: dict[str, PolicyObject] = {}       # last valid generation of each policy
        self.invalid: dict[str, tuple[int, str]] = {}     # key -> (rejected generation, why)
        self.revocations: dict[str, list[RevocationEntry]] = {}
        self.pods: dict[str, Workload] = {}
        self.subscribers: dict[str, Subscriber] = {}
        self._dirty = asyncio.Event()
        self.pushes = 0
        self.recompiles = 0
        self.recompile_seconds = 0.0
        self.compile_errors = 0

    # ---------------------------------------------------------------- watch input

    def _changed(self) -> None:
        self._destinations = None
        self._dirty.set()

    def apply_policy(self, body: Mapping[str, Any]) -> PolicyInvalid | None:
        """Record an added or changed AuthPolicy; return why it is invalid, if it is."""
        p = policy_object(body)
        try:
            validate(p)
        except PolicyInvalid as e:
            self.invalid[p.key] = (p.generation, str(e))
            return e
        self.invalid.pop(p.key, None)
        self.policies[p.key] = p
        self._changed()
        return None

    def remove_policy(self, namespace: str, name: str) -> None:
        """Forget a deleted AuthPolicy."""
        key = f"{namespace}/{name}"
        self.policies.pop(key, None)
        self.invalid.pop(key, None)
        self._changed()

    def apply_revocation(self, body: Mapping[str, Any]) -> None:
        """Record an added or changed Revocation."""
        name = body["metadata"]["name"]
        self.revocations[name] = revocation_entries(body)
        self._changed()

    def remove_revocation(self, name: str) -> None:
        """Forget a deleted Revocation."""
        self.revocations.pop(name, None)
        self._changed()

    def apply_pod(self, body: Mapping[str, Any]) -> None:
        """Record an opted-in pod (one losing the opt-in label is removed)."""
        meta = body["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        if _labels(body).get(INJECT_LABEL) != "enabled" or meta.get("deletionTimestamp"):
            self.pods.pop(key, None)
        else:
            self.pods[key] = workload_of(body)
        self._changed()

    def remove_pod(self, namespace: str, name: str) -> None:
        """Forget a deleted pod."""
        self.pods.pop(f"{namespace}/{name}", None)
        self._changed()

    def next_expiry_s(self) -> float | None:
        """Seconds until the next revocation entry expires and configs must drop it; None when none will."""
        now = self._clock()
        later = [e.expires_at for e in self._all_revocations() if e.expires_at > now]
        return (min(later) - now).total_seconds() if later else None

    # ---------------------------------------------------------------- sidecars

    def subscribe(self, namespace: str, service_account: str, pod: str, spiffe_id: str) -> Subscriber:
        """Admit a sidecar as `namespace/pod` if that opted-in pod runs as its ServiceAccount."""
        w = self.pods.get(f"{namespace}/{pod}")
        if w is None:
            raise SubscriptionRefused("NOT_FOUND", f"no opted-in pod {namespace}/{pod} (label "
                                                   f"{INJECT_LABEL}=enabled); is the pod name right?")
        if w.service_account != service_account:
            raise SubscriptionRefused("PERMISSION_DENIED", f"pod {namespace}/{pod} runs as ServiceAccount "
                                                           f"{w.service_account}, not {service_account}")
        sub = Subscriber(w, spiffe_id)
        old = self.subscribers.get(w.key)
        if old is not None:
            old.wake.set()
        self.subscribers[w.key] = sub
        sub.push(self.compile(w))
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Forget a disconnected sidecar (unless it reconnected meanwhile)."""
        if self.subscribers.get(sub.workload.key) is sub:
            del self.subscribers[sub.workload.key]

    def ack(self, sub: Subscriber, version: str, error: str | None) -> None:
        """Record what a sidecar enforces (or why it rejected a version)."""
        compiled = sub.sent.get(version)
        if error:
            sub.error = f"rejected version {version}: {error}"
            log.warning("%s %s", sub.workload.key, sub.error)
            return
        if compiled is not None:
            sub.acked = compiled
            sub.error = None
            for old in [v for v in sub.sent if v not in (version, sub.latest.version if sub.latest else None)]:
                del sub.sent[old]

    # ---------------------------------------------------------------- compiling

    def _all_revocations(self) -> list[RevocationEntry]:
        return [e for entries in self.revocations.values() for e in entries]

    def compile(self, w: Workload) -> Compiled:
        """The config workload `w` should enforce now."""
        if self._destinations is None:
            self._destinations = destination_claims(self.pods.values(), list(self.policies.values()),
                                                    self._trust_domain)
        return compile_workload(w, list(self.policies.values()), self._all_revocations(), self._clock(),
                                self._destinations)

    def refresh(self) -> int:
        """Recompile every connected workload, push what changed; return how many were pushed."""
        pushed = 0
        self._destinations = None
        for sub in list(self.subscribers.values()):
            current = self.pods.get(sub.workload.key)
            if current is not None:
                sub.workload = current
            try:
                c = self.compile(sub.workload)
            except Exception:  # a bug compiling one workload must not stop every other's updates
                self.compile_errors += 1
                log.exception("compiling the config of %s failed; it keeps enforcing its last one", sub.workload.key)
                continue
            if sub.latest is None or c.version != sub.latest.version:
                sub.push(c)
                pushed += 1
        self.pushes += pushed
        return pushed

    async def run(self) -> None:
        """Recompile whenever something changed or a revocation entry expired, until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.next_expiry_s())
            self._dirty.clear()
            t0 = time.perf_counter()
            self.refresh()
            self.recompiles += 1
            self.recompile_seconds += time.perf_counter() - t0

    def lagging(self) -> int:
        """Connected sidecars that have not acknowledged their latest config."""
        return sum(1 for s in self.subscribers.values()
                   if s.latest is not None and (s.acked is None or s.acked.version != s.latest.version))

    def config_bytes(self) -> list[int]:
        """The size of each connected sidecar's latest config."""
        return [s.latest.size for s in self.subscribers.values() if s.latest is not None]

    # ---------------------------------------------------------------- status

    def policy_enforcement(self, key: str) -> Enforcement:
        """Which connected workloads the policy selects and which of them enforce its latest valid generation."""
        p = self.policies.get(key)
        selected, enforcing, lagging = [], [], []
        if p is None:
            return Enforcement([], [], [])
        for sub in self.subscribers.values():
            w = sub.workload
            if w.namespace != p.namespace or not selects(p.spec, w.labels):
                continue
            selected.append(w.key)
            got = sub.acked.policies.get(key) if sub.acked else None
            if got == p.generation:
                enforcing.append(w.key)
            else:
                why = sub.error or ("has not acknowledged a config yet" if got is None and sub.acked is None
                                    else f"enforces generation {got}" if got is not None
                                    else "enforces a config without it")
                lagging.append(f"{w.key}: {why}")
        return Enforcement(sorted(selected), sorted(enforcing), sorted(lagging))

    def revocation_enforcement(self, name: str) -> Enforcement:
        """Which connected workloads enforce every active entry of revocation `name`."""
        now = self._clock()
        active = [e for e in self.revocations.get(name, []) if e.expires_at > now]
        selected, enforcing, lagging = [], [], []
        for sub in self.subscribers.values():
            selected.append(sub.workload.key)
            doc = sub.acked.document.get("revocations", {}) if sub.acked else {}
            if all(e.value in doc.get(e.kind, []) for e in active):
                enforcing.append(sub.workload.key)
            else:
                lagging.append(f"{sub.workload.key}: {sub.error or 'not yet acknowledged'}")
        return Enforcement(sorted(selected), sorted(enforcing), sorted(lagging))
