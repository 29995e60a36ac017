"""The policy plane's state: what is applied, who is connected, what each one enforces.

Watch events update the hub (policies, revocations, opted-in pods) and mark what they
affect dirty; one background loop recompiles the configs of the connected workloads
they affect and pushes those that changed, so a burst of applies costs one push per
workload. What keeps one tenant from hurting another (docs/security.md):
- work follows the change: a policy or pod change recompiles the connected workloads of
  its namespace only; only a Revocation (cluster-scoped, a platform team's) or an
  expiring entry touches every workload;
- compiling (and validating a policy, which compiles its CEL) runs in a worker thread on
  copies of the inputs: the event loop that serves the sidecars' streams only moves
  results, however large a namespace's objects are;
- a config never carries another namespace's objects (domain/compile.py), only, for context
  tokens crossing namespaces (issue 19), each other namespace's claim-name union, bounded per
  namespace and in total (compile.namespace_claims) and left out of a config that would
  otherwise be too large; one over MAX_CONFIG_BYTES is not sent: the workload keeps its
  last config and the policies selecting it report ConfigTooLarge, in their own namespace;
- a namespace's claim-name union is recomputed (in the worker thread) when its policies
  or pods change; only when the bounded map of unions changes does every connected
  workload recompile, as for a Revocation: a policy change that references no new claim
  name stays in its namespace;
- every live subscription of a pod receives every update (a second stream never
  silences the first);
- only configs of connected workloads are compiled, so a cached config may predate a
  change made while its agent was away: a subscriber is sent a cached config only if no
  input it depends on (its namespace's policies and pods, the Revocations) changed
  since it was compiled, otherwise a fresh one; a result compiled from inputs that have
  changed since is never a first config (an agent that restarted must not enforce
  yesterday's policy, nor miss a Revocation applied while it was down).
A policy update that fails validation never removes the policy from workloads: its
last valid generation stays in force (dropping it could open access) and its status
says so. Acknowledgements from sidecars drive AuthPolicy and Revocation status, and so
do the agents that are missing: an injected pod that runs with no live subscription for
longer than DISCONNECTED_GRACE_S enforces nothing new (issue 18: agents that could not
receive their stream left "all 0 connected workloads deny" reading Ready), so the
policies selecting it and every Revocation count it as a workload that does not enforce
(reason NotConnected), the metric meshward_policy_workloads_disconnected counts it, and
the operator logs the pod when its last stream ends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from meshward.operator.domain.compile import (
    Compiled,
    PolicyInvalid,
    PolicyObject,
    RevocationEntry,
    Workload,
    applies_to,
    claims_of_namespace,
    destination_claims,
    namespace_claims,
    policy_object,
    revocation_entries,
    selects,
    validate,
    workload_config,
    workload_of,
)
from meshward.operator.domain.inject import INJECT_LABEL, is_injected
from meshward.sidecar.config.schema import hashed_revocation

log = logging.getLogger("meshward.operator.policy")
T = TypeVar("T")
# gRPC's default message limit is 4 MiB; a config this big is refused before it is sent, leaving room for the
# envelope. No single AuthPolicy comes close (the API server stores at most ~1.5 MiB per object).
MAX_CONFIG_BYTES = 3 * 1024 * 1024
# An injected pod running this long without a live subscription counts as not connected. Longer than an agent's
# reconnect (its backoff reaches 5 s, then a handshake and a TokenReview) and an operator failover's, so neither
# an agent restart nor a new leader turns every status to NotConnected for a moment.
DISCONNECTED_GRACE_S = 30.0


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


@dataclass(eq=False)
class Subscriber:
    """One live subscription (a pod may have several, e.g. across an agent restart)."""

    workload: Workload
    spiffe_id: str
    latest: Compiled | None = None
    acked: Compiled | None = None
    error: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sent: dict[str, Compiled] = field(default_factory=dict)
    closed: str | None = None  # why the hub ended this subscription (the stream closes with it)

    def push(self, compiled: Compiled) -> None:
        """Make `compiled` the next config to send."""
        self.latest = compiled
        self.sent[compiled.version] = compiled
        self.wake.set()

    def close(self, why: str) -> None:
        """End the subscription: its stream closes with `why`."""
        self.closed = why
        self.wake.set()

    async def next(self, after: str | None) -> Compiled | None:
        """Wait for a config newer than version `after`; None once the subscription was closed."""
        while self.closed is None and (self.latest is None or self.latest.version == after):
            self.wake.clear()
            await self.wake.wait()
        return None if self.closed is not None else self.latest


@dataclass(frozen=True)
class Enforcement:
    """Who a policy (or revocation) reaches, who enforces it, and why the others do not (not connected first).

    Selected are the connected workloads and those running with the mesh but not connected past the grace.
    """

    selected: list[str]
    enforcing: list[str]
    lagging: list[str]
    disconnected: list[str] = field(default_factory=list)  # running, injected, and no live subscription


class SubscriptionRefused(Exception):
    """A sidecar may not subscribe as the pod it named; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class _Job:
    """One workload to compile, with copies of everything it is compiled from."""

    workload: Workload
    policies: tuple[PolicyObject, ...]
    neighbours: tuple[Workload, ...]  # the opted-in pods of its namespace (context destinations)
    epoch: int


def _compile_all(jobs: list[_Job], revocations: list[RevocationEntry], now: dt.datetime, trust_domain: str,
                 foreign: Mapping[str, list[str]] | None = None, max_bytes: int | None = None
                 ) -> list[tuple[_Job, Compiled | Exception]]:
    """Compile every job (in a worker thread: pure functions on copies).

    A config over `max_bytes` with other namespaces' claim names (`foreign`) is compiled again without them:
    what other namespaces reference never makes a workload's config too large (its calls to them then carry
    the user's `sub` only).
    """
    destinations: dict[str, dict[str, list[str]]] = {}
    out: list[tuple[_Job, Compiled | Exception]] = []
    for job in jobs:
        ns = job.workload.namespace
        try:
            if ns not in destinations:
                destinations[ns] = destination_claims(job.neighbours, job.policies, trust_domain)
            compiled = workload_config(job.workload, job.policies, revocations, now, job.neighbours, trust_domain,
                                       destinations[ns], foreign)
            if foreign and max_bytes is not None and compiled.size > max_bytes:
                compiled = workload_config(job.workload, job.policies, revocations, now, job.neighbours,
                                           trust_domain, destinations[ns])
            out.append((job, compiled))
        except Exception as e:  # a bug compiling one workload must not stop every other's updates
            out.append((job, e))
    return out


def _claim_unions(inputs: Mapping[str, tuple[tuple[PolicyObject, ...], tuple[Workload, ...]]],
                  known: Mapping[str, list[str]], trust_domain: str
                  ) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, str]]:
    """Each namespace's claim-name union, the bounded map of them every config carries, and what was left out.

    `known` holds the unions so far; those of `inputs` are recomputed (in a worker thread: pure functions on copies).
    """
    unions = dict(known)
    for ns, (policies, pods) in inputs.items():
        claims = claims_of_namespace(pods, policies, trust_domain)
        if claims == ["sub"]:
            unions.pop(ns, None)
        else:
            unions[ns] = claims
    foreign, cut = namespace_claims(unions, trust_domain)
    return unions, foreign, cut


def _labels(body: Mapping[str, Any]) -> dict[str, str]:
    return dict(body.get("metadata", {}).get("labels") or {})


class PolicyHub:
    """Applied objects, connected sidecars, and the configs between them."""

    def __init__(self, clock: Callable[[], dt.datetime], trust_domain: str = "cluster.local", *,
                 max_config_bytes: int = MAX_CONFIG_BYTES,
                 offload: Callable[..., Awaitable[Any]] = _in_thread) -> None:
        self._clock = clock
        self._trust_domain = trust_domain
        self._max_bytes = max_config_bytes
        self._offload = offload
        self._policies: dict[str, dict[str, PolicyObject]] = {}  # namespace -> key -> last valid generation
        self._invalid: dict[str, tuple[int, str]] = {}            # key -> (rejected generation, why)
        self.revocations: dict[str, list[RevocationEntry]] = {}
        self._pods: dict[str, dict[str, Workload]] = {}          # namespace -> pod key -> workload
        self._subs: dict[str, list[Subscriber]] = {}             # pod key -> live subscriptions
        self._compiled: dict[str, tuple[int, Compiled]] = {}     # pod key -> (epoch, latest config)
        self._too_large: dict[str, str] = {}                     # pod key -> why its config was not sent
        self._running: dict[str, dt.datetime] = {}               # injected running pod key -> since when
        self._left: dict[str, dt.datetime] = {}                  # pod key -> when its last subscription ended
        self._started = clock()                                  # agents reconnect to a new operator within grace
        self._epoch = 0
        self._changed: dict[str, int] = {}                      # namespace -> epoch of its last input change
        self._changed_everywhere = 0                             # epoch of the last change every workload sees
        self._dirty_namespaces: set[str] = set()
        self._claims_dirty: set[str] = set()                    # namespaces whose claim-name union may have changed
        self._claims: dict[str, list[str]] = {}                  # namespace -> its claim-name union (beyond `sub`)
        self._foreign: dict[str, list[str]] = {}                 # the bounded union map every config carries
        self.claims_left_out: dict[str, str] = {}                # namespace -> why its claim names are not carried
        self._dirty_pods: set[str] = set()
        self._dirty_everything = False
        self._dirty = asyncio.Event()
        self.pushes = 0
        self.recompiles = 0
        self.recompile_seconds = 0.0
        self.compiled_workloads = 0
        self.compile_errors = 0
        self.messages_refused = 0  # messages a stream did not send: over gRPC's limit (servers/policy.py)

    # ---------------------------------------------------------------- watch input

    def _touch(self, namespace: str | None = None, pod: str | None = None) -> None:
        """Something changed: recompile what it affects (a namespace, one pod, or with neither, everything)."""
        self._epoch += 1
        if pod is not None:
            self._dirty_pods.add(pod)  # inputs unchanged: its config is (re)compiled, e.g. for a new subscriber
        elif namespace is not None:
            self._dirty_namespaces.add(namespace)
            self._claims_dirty.add(namespace)
            self._changed[namespace] = self._epoch
        else:
            self._dirty_everything = True
            self._changed_everywhere = self._epoch
        self._dirty.set()

    def _current(self, key: str, epoch: int) -> bool:
        """Whether a config of pod `key` compiled at `epoch` saw every change of the inputs it depends on."""
        return epoch >= max(self._changed.get(key.split("/", 1)[0], 0), self._changed_everywhere)

    async def apply_policy(self, body: Mapping[str, Any]) -> PolicyInvalid | None:
        """Record an added or changed AuthPolicy (validated off the loop); return why it is invalid, if it is."""
        p = policy_object(body)
        current = self._policies.get(p.namespace, {}).get(p.key)
        if current is not None and current.generation == p.generation:
            return None  # a status update (the operator's own): nothing to validate or recompile
        rejected = self._invalid.get(p.key)
        if rejected is not None and rejected[0] == p.generation:
            return PolicyInvalid("spec", rejected[1])  # already judged
        try:
            await self._offload(validate, p)
        except PolicyInvalid as e:
            if p.generation >= self._invalid.get(p.key, (0, ""))[0]:
                self._invalid[p.key] = (p.generation, str(e))
            return e
        current = self._policies.get(p.namespace, {}).get(p.key)  # again: others may have run meanwhile
        if current is not None and current.generation >= p.generation:
            return None  # an older event validated after a newer one: keep the newer
        self._invalid.pop(p.key, None)
        self._policies.setdefault(p.namespace, {})[p.key] = p
        self._touch(p.namespace)
        return None

    def remove_policy(self, namespace: str, name: str) -> None:
        """Forget a deleted AuthPolicy."""
        key = f"{namespace}/{name}"
        self._policies.get(namespace, {}).pop(key, None)
        self._invalid.pop(key, None)
        self._touch(namespace)

    def apply_revocation(self, body: Mapping[str, Any]) -> None:
        """Record an added or changed Revocation (every workload enforces it)."""
        self.revocations[body["metadata"]["name"]] = revocation_entries(body)
        self._touch()

    def remove_revocation(self, name: str) -> None:
        """Forget a deleted Revocation."""
        self.revocations.pop(name, None)
        self._touch()

    def apply_pod(self, body: Mapping[str, Any]) -> None:
        """Record a pod: opted in (label meshward.io/inject=enabled) it is a workload; otherwise it is none."""
        meta = body["metadata"]
        namespace, key = meta["namespace"], f"{meta['namespace']}/{meta['name']}"
        if _labels(body).get(INJECT_LABEL) != "enabled" or meta.get("deletionTimestamp"):
            self.remove_pod(namespace, meta["name"], "the pod no longer opts in (label meshward.io/inject)")
            return
        if (body.get("status") or {}).get("phase") == "Running" and is_injected(body):
            self._running.setdefault(key, self._clock())
        else:
            self._running.pop(key, None)
        w = workload_of(body)
        pods = self._pods.setdefault(namespace, {})
        if pods.get(key) == w:
            return  # a status-only update: nothing a config depends on changed
        pods[key] = w
        for sub in self._subs.get(key, []):
            sub.workload = w
        self._touch(namespace)

    def remove_pod(self, namespace: str, name: str, why: str = "the pod was deleted") -> None:
        """Forget a pod; its subscriptions end (visibly: their streams close)."""
        key = f"{namespace}/{name}"
        self._running.pop(key, None)
        self._left.pop(key, None)
        if self._pods.get(namespace, {}).pop(key, None) is None:
            return
        for sub in self._subs.pop(key, []):
            sub.close(why)
        self._compiled.pop(key, None)
        self._too_large.pop(key, None)
        self._touch(namespace)

    def next_expiry_s(self) -> float | None:
        """Seconds until the next revocation entry expires and configs must drop it; None when none will."""
        now = self._clock()
        later = [e.expires_at for e in self._all_revocations() if e.expires_at > now]
        return (min(later) - now).total_seconds() if later else None

    # ---------------------------------------------------------------- sidecars

    def workload(self, namespace: str, pod: str) -> Workload | None:
        """The opted-in pod `namespace/pod`, if the hub knows it."""
        return self._pods.get(namespace, {}).get(f"{namespace}/{pod}")

    def subscribe(self, namespace: str, service_account: str, pod: str, spiffe_id: str, pod_uid: str = ""
                  ) -> Subscriber:
        """Admit a sidecar as `namespace/pod` if that opted-in pod runs as its ServiceAccount (and has `pod_uid`)."""
        w = self.workload(namespace, pod)
        if w is None:
            raise SubscriptionRefused("NOT_FOUND", f"no opted-in pod {namespace}/{pod} (label "
                                                   f"{INJECT_LABEL}=enabled); is the pod name right?")
        if w.service_account != service_account:
            raise SubscriptionRefused("PERMISSION_DENIED", f"pod {namespace}/{pod} runs as ServiceAccount "
                                                           f"{w.service_account}, not {service_account}")
        if pod_uid and w.uid and pod_uid != w.uid:
            raise SubscriptionRefused("PERMISSION_DENIED", f"the token belongs to an earlier pod named {namespace}/"
                                                           f"{pod} (uid {pod_uid}), not the one running now")
        sub = Subscriber(w, spiffe_id)
        self._subs.setdefault(w.key, []).append(sub)
        self._left.pop(w.key, None)
        hit = self._compiled.get(w.key)
        if hit is not None and self._current(w.key, hit[0]):
            sub.push(hit[1])
        else:  # never compiled, or compiled before a change made while nobody was subscribed: compile it now
            self._touch(pod=w.key)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Forget a subscription that ended."""
        subs = self._subs.get(sub.workload.key, [])
        if sub in subs:
            subs.remove(sub)
            if not subs and sub.closed is None and sub.workload.key in self._running:
                self._left[sub.workload.key] = self._clock()
                log.warning("%s: its agent's last policy stream ended; the pod keeps enforcing its last config "
                            "and misses every change until the agent reconnects (it counts as NotConnected after "
                            "%.0f s)", sub.workload.key, DISCONNECTED_GRACE_S)
        if not subs:
            self._subs.pop(sub.workload.key, None)

    def refused_message(self, sub: Subscriber, what: str, size: int, limit: int) -> None:
        """A stream did not send `what` to `sub`: it was `size` bytes, over gRPC's `limit` (log and count it)."""
        self.messages_refused += 1
        log.error("not sending %s to %s: %d bytes, more than the %d its stream carries; it keeps its last one",
                  what, sub.workload.key, size, limit)

    def _disconnected(self, key: str) -> str | None:
        """Why pod `key` counts as not connected (running injected, no subscription past the grace), or None."""
        since = self._running.get(key)
        if since is None or self._subs.get(key):
            return None
        missing = max(since, self._left.get(key, since), self._started)
        if (self._clock() - missing).total_seconds() < DISCONNECTED_GRACE_S:
            return None
        return (f"running with the mesh but its agent has had no policy stream since "
                f"{missing.strftime('%Y-%m-%dT%H:%M:%SZ')} (see its meshward-agent log)")

    def disconnected(self) -> list[str]:
        """Every injected running pod counted as not connected, with why."""
        return [f"{key}: {why}" for key in sorted(self._running) if (why := self._disconnected(key)) is not None]

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

    def subscriptions(self) -> list[Subscriber]:
        """Every live subscription."""
        return [s for subs in self._subs.values() for s in subs]

    # ---------------------------------------------------------------- compiling

    def _all_revocations(self) -> list[RevocationEntry]:
        return [e for entries in self.revocations.values() for e in entries]

    def _take_jobs(self) -> list[_Job]:
        """The subscribed workloads the dirty marks affect, with copies of their inputs; clears the marks."""
        if self._dirty_everything:
            keys = set(self._subs)
        else:
            keys = {k for k in self._subs if k.split("/", 1)[0] in self._dirty_namespaces}
            keys |= {k for k in self._dirty_pods if k in self._subs}
        self._dirty_everything = False
        self._dirty_namespaces.clear()
        self._dirty_pods.clear()
        jobs = []
        by_namespace: dict[str, tuple[tuple[PolicyObject, ...], tuple[Workload, ...]]] = {}
        for key in sorted(keys):
            ns = key.split("/", 1)[0]
            w = self._pods.get(ns, {}).get(key)
            if w is None:
                continue
            if ns not in by_namespace:
                by_namespace[ns] = (tuple(self._policies.get(ns, {}).values()), tuple(self._pods.get(ns, {}).values()))
            jobs.append(_Job(w, *by_namespace[ns], self._epoch))
        return jobs

    def _apply(self, job: _Job, result: Compiled | Exception) -> int:
        """Install one compile result (on the loop); return 1 when it was pushed."""
        key = job.workload.key
        if isinstance(result, Exception):
            self.compile_errors += 1
            log.error("compiling the config of %s failed; it keeps enforcing its last one", key, exc_info=result)
            return 0
        subs = self._subs.get(key)
        last = self._compiled.get(key)
        if not subs or (last is not None and last[0] > job.epoch):
            return 0  # gone, or a newer result is already in place
        if result.size > self._max_bytes:
            biggest = sorted(result.policies, key=lambda k: -len(json.dumps(getattr(self._policy(k), "spec", {}))))
            self._too_large[key] = (f"the config of {key} would be {result.size} bytes, more than the "
                                    f"{self._max_bytes} a sidecar accepts; it keeps its last config. Largest "
                                    f"selecting policies: {', '.join(biggest[:3])}")
            return 0
        self._too_large.pop(key, None)
        self._compiled[key] = (job.epoch, result)
        current = self._current(key, job.epoch)
        if not current:
            self._touch(pod=key)  # its inputs changed while it compiled: a current config follows
        pushed = 0
        for sub in subs:
            if sub.latest is None and not current:
                continue  # a first config must be today's: never start an agent on superseded inputs
            if sub.latest is None or sub.latest.version != result.version:
                sub.push(result)
                pushed = 1
        return pushed

    async def settle(self) -> int:
        """Compile what is dirty now (in a worker thread) and push what changed.

        Returns how many workloads got a new config.
        """
        t0 = time.perf_counter()
        await self._settle_claims()
        jobs = self._take_jobs()
        if not jobs:
            return 0
        results = await self._offload(_compile_all, jobs, self._all_revocations(), self._clock(), self._trust_domain,
                                      self._foreign, self._max_bytes)
        pushed = sum(self._apply(job, result) for job, result in results)
        self.recompiles += 1
        self.compiled_workloads += len(jobs)
        self.recompile_seconds += time.perf_counter() - t0
        self.pushes += pushed
        return pushed

    async def _settle_claims(self) -> None:
        """Recompute the claim-name unions of the namespaces that changed.

        When the map every config carries changes, every connected workload recompiles (the configs taken next).
        """
        if not self._claims_dirty:
            return
        inputs = {ns: (tuple(self._policies.get(ns, {}).values()), tuple(self._pods.get(ns, {}).values()))
                  for ns in sorted(self._claims_dirty)}
        self._claims_dirty.clear()
        self._claims, foreign, cut = await self._offload(_claim_unions, inputs, dict(self._claims),
                                                         self._trust_domain)
        for ns, why in cut.items():
            if self.claims_left_out.get(ns) != why:
                log.warning("context claims of namespace %s are not carried to other namespaces: %s", ns, why)
        self.claims_left_out = cut
        if foreign != self._foreign:
            self._foreign = foreign
            self._touch()

    async def run(self) -> None:
        """Recompile whenever something changed or a revocation entry expired, until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), self.next_expiry_s())
            except TimeoutError:
                self._touch()  # an entry expired: every workload drops it
            self._dirty.clear()
            try:
                await self.settle()
            except Exception:  # a bug must not end policy distribution for good
                log.exception("recompiling configs failed; retrying on the next change")

    # ---------------------------------------------------------------- queries (status, metrics)

    def _policy(self, key: str) -> PolicyObject | None:
        return self._policies.get(key.split("/", 1)[0], {}).get(key)

    def policy(self, key: str) -> PolicyObject | None:
        """The last valid generation of AuthPolicy `namespace/name`, if any."""
        return self._policy(key)

    def invalid(self, key: str) -> tuple[int, str] | None:
        """(generation, why) when the latest update of the policy was rejected."""
        return self._invalid.get(key)

    def policy_counts(self) -> tuple[int, int]:
        """(valid, invalid) AuthPolicies."""
        return sum(len(p) for p in self._policies.values()), len(self._invalid)

    def conflict(self, key: str) -> str | None:
        """An issuer conflict the policy causes in some workload's config, if any."""
        ns = key.split("/", 1)[0]
        for pod, (_, compiled) in self._compiled.items():
            if pod.startswith(f"{ns}/") and key in compiled.conflicts:
                return compiled.conflicts[key]
        return None

    def oversized(self, key: str) -> str | None:
        """Why a workload the policy selects did not get its config (too large), if one did not."""
        p = self._policy(key)
        if p is None:
            return None
        for pod, why in sorted(self._too_large.items()):
            w = self._pods.get(p.namespace, {}).get(pod)
            if w is not None and selects(p.spec, w.labels):
                return why
        return None

    def _enforces(self, subs: Iterable[Subscriber], check: Callable[[Subscriber], bool]) -> str | None:
        """None when every live subscription of a pod passes `check`, else why one does not."""
        for sub in subs:
            if not check(sub):
                return sub.error or ("has not acknowledged a config yet" if sub.acked is None
                                     else "enforces an older config")
        return None

    def policy_enforcement(self, key: str) -> Enforcement:
        """Which connected workloads the policy selects and which of them enforce its latest valid generation."""
        p = self._policy(key)
        if p is None:
            return Enforcement([], [], [])
        selected, enforcing, lagging, disconnected = [], [], [], []
        for w in self._pods.get(p.namespace, {}).values():
            if not selects(p.spec, w.labels):
                continue
            subs = self._subs.get(w.key)
            if not subs:
                gone = self._disconnected(w.key)
                if gone is not None:
                    selected.append(w.key)
                    disconnected.append(f"{w.key}: {gone}")
                continue
            selected.append(w.key)
            why = self._enforces(subs, lambda s: s.acked is not None and s.acked.policies.get(key) == p.generation)
            if why is None:
                enforcing.append(w.key)
            else:
                got = [g for s in subs if s.acked is not None and (g := s.acked.policies.get(key)) is not None]
                lagging.append(f"{w.key}: enforces generation {min(got)}" if got else f"{w.key}: {why}")
        return Enforcement(sorted(selected), sorted(enforcing), sorted(disconnected) + sorted(lagging),
                           sorted(disconnected))

    def revocation_counts(self, name: str) -> tuple[int, int]:
        """(active, expired) entries of Revocation `name`."""
        now = self._clock()
        entries = self.revocations.get(name, [])
        active = sum(1 for e in entries if e.expires_at > now)
        return active, len(entries) - active

    def revocation_enforcement(self, name: str) -> Enforcement:
        """Which connected workloads enforce every active entry of revocation `name` that applies to them."""
        now = self._clock()
        active = [e for e in self.revocations.get(name, []) if e.expires_at > now]
        selected, enforcing, lagging = [], [], []
        for key, subs in self._subs.items():
            selected.append(key)

            def has_all(sub: Subscriber) -> bool:
                if sub.acked is None:
                    return False
                doc = sub.acked.document
                issuers = [i["issuer"] for p in doc.get("policies", []) for i in p.get("jwt", [])]
                section = doc.get("revocations", {})
                return all(hashed_revocation(e.value) in section.get(e.kind, []) for e in active
                           if applies_to(e, issuers))

            why = self._enforces(subs, has_all)
            if why is None:
                enforcing.append(key)
            else:
                lagging.append(f"{key}: {why}")
        disconnected = self.disconnected()
        selected += [d.split(": ", 1)[0] for d in disconnected]
        # Connected laggards first: any tenant can run a pod with no stream (a NetworkPolicy suffices), and a status
        # listing only the first few must not let such pods hide the workloads that really fail to enforce.
        return Enforcement(sorted(selected), sorted(enforcing), sorted(lagging) + disconnected, disconnected)

    def lagging(self) -> int:
        """Live subscriptions that have not acknowledged their latest config."""
        return sum(1 for s in self.subscriptions()
                   if s.latest is not None and (s.acked is None or s.acked.version != s.latest.version))

    def config_bytes(self) -> list[int]:
        """The size of each subscribed workload's latest config."""
        return [c.size for _, c in self._compiled.values()]
