"""Leader election for operator replicas: one leads (runs Kopf and the servers), the others wait.

A standby retries every RENEW_EVERY_S; the leader renews as often and steps down
(its process exits, so nothing half-led lingers) when it cannot renew within the
lease duration or finds the lease taken. On a graceful stop the leader releases the
lease, so a rolling update hands over at once instead of after a lease duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from typing import Protocol

from meshward.operator.clients.kube import KubeError
from meshward.operator.domain.lease import LEASE_DURATION_S, RENEW_EVERY_S, LeaseView, claim, released

LEASE_NAME = "meshward-operator"
log = logging.getLogger("meshward.operator.leader")


class LeaseApi(Protocol):
    """The Lease calls election needs (clients.kube.KubeClient)."""

    def read_lease(self, namespace: str, name: str) -> LeaseView | None:
        """Read the lease."""
        ...

    def write_lease(self, namespace: str, name: str, lease: LeaseView) -> LeaseView | None:
        """Write the lease conditionally."""
        ...


class PodLabels(Protocol):
    """The Pod call the leader marker needs (clients.kube.KubeClient)."""

    def label_pod(self, namespace: str, name: str, labels: dict[str, str | None]) -> bool:
        """Merge labels into a Pod's."""
        ...


# The label the leading replica puts on its own Pod: the chart's signer and policy Services select
# it, so traffic reaches the one replica that serves while every replica can be Ready.
LEADER_LABEL = "meshward.io/leader"


class LeaderMarker:
    """Marks this replica's Pod as the leader, and unmarks it (no-op outside a Pod: no pod name)."""

    def __init__(self, api: PodLabels, namespace: str, pod_name: str) -> None:
        self._api = api
        self._namespace = namespace
        self._pod = pod_name

    async def mark(self, leading: bool) -> None:
        """Set or remove the leader label on this replica's Pod; failures are logged, never raised."""
        if not self._pod:
            return
        try:
            await asyncio.to_thread(self._api.label_pod, self._namespace, self._pod,
                                    {LEADER_LABEL: "true" if leading else None})
        except KubeError as e:
            log.warning("could not %s Pod %s/%s as the leader: %s", "label" if leading else "unlabel",
                        self._namespace, self._pod, e)


class LeaderElection:
    """Acquires, holds and releases the operator's Lease."""

    def __init__(self, api: LeaseApi, namespace: str, identity: str, clock: Callable[[], dt.datetime],
                 monotonic: Callable[[], float]) -> None:
        self._api = api
        self._namespace = namespace
        self.identity = identity
        self._clock = clock
        self._monotonic = monotonic
        self._held: LeaseView | None = None

    @property
    def leading(self) -> bool:
        """Whether this replica holds the lease."""
        return self._held is not None

    async def _try(self) -> bool:
        current = await asyncio.to_thread(self._api.read_lease, self._namespace, LEASE_NAME)
        want = claim(current, self.identity, self._clock())
        if want is None:
            return False
        written = await asyncio.to_thread(self._api.write_lease, self._namespace, LEASE_NAME, want)
        self._held = written
        return written is not None

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this replica leads (True) or `stop` is set (False)."""
        waiting_logged = False
        while not stop.is_set():
            try:
                if await self._try():
                    log.info("%s leads (Lease %s/%s)", self.identity, self._namespace, LEASE_NAME)
                    return True
            except KubeError as e:
                log.warning("leader election: %s", e)
            if not waiting_logged:
                log.info("%s is standby: another replica holds Lease %s/%s", self.identity, self._namespace,
                         LEASE_NAME)
                waiting_logged = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RENEW_EVERY_S)
        return False

    async def hold(self) -> None:
        """Renew until leadership is lost (then return); cancel to stop renewing."""
        last_ok = self._monotonic()
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            try:
                if await self._try():
                    last_ok = self._monotonic()
                    continue
                log.error("%s lost the Lease to another replica; stepping down", self.identity)
                return
            except KubeError as e:
                log.warning("lease renewal failed: %s", e)
            if self._monotonic() - last_ok >= LEASE_DURATION_S:
                log.error("%s could not renew the Lease for %s s; stepping down", self.identity, LEASE_DURATION_S)
                self._held = None
                return

    async def release(self) -> None:
        """Give the lease up (graceful stop)."""
        if self._held is None:
            return
        try:
            current = await asyncio.to_thread(self._api.read_lease, self._namespace, LEASE_NAME)
            if current is not None and current.holder == self.identity:
                await asyncio.to_thread(self._api.write_lease, self._namespace, LEASE_NAME, released(current))
        except KubeError as e:
            log.warning("could not release the Lease (the standby takes over after %s s): %s", LEASE_DURATION_S, e)
        self._held = None
