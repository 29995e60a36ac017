"""Keeps the agent subscribed to its workload's config on the operator.

Every config received is validated and compiled by the same code as a config file,
from the document as received (never serialized and parsed again) and in a worker
thread, so a large config does not hold up the checks the agent answers meanwhile;
the meshed-destination maps in between go to the xDS side (engines/destinations.py);
an accepted one replaces the pipeline atomically and is acknowledged, a rejected one
is acknowledged with the error and the last good config stays in force. When the
operator is unreachable the agent keeps enforcing what it has (never allow-all),
retries with backoff, and reports how stale its config may be. A stream that keeps
failing (RESOURCE_EXHAUSTED once did, for every agent, issue 18) is visible here too:
each failure is logged with its gRPC code and counted (`meshward_policy_stream_errors`);
the operator sees the same agent as NotConnected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshward.sidecar.clients.policy import PolicyClient, PolicyStreamError
from meshward.sidecar.engines.agent import Agent, ConfigRejected
from meshward.sidecar.engines.destinations import MeshDestinations

# Reconnect after BACKOFF_MIN_S doubling to BACKOFF_MAX_S: a restarted operator is found within seconds.
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
log = logging.getLogger("meshward.sidecar.policy")


class _Staleness(Collector):
    def __init__(self, sub: PolicySubscription) -> None:
        self._sub = sub

    def collect(self) -> list[Metric]:
        return [
            GaugeMetricFamily("meshward_policy_connected", "1 while subscribed to the operator.",
                              value=1.0 if self._sub.connected else 0.0),
            GaugeMetricFamily("meshward_policy_stale_seconds",
                              "Seconds since the subscription was last known live (0 while connected).",
                              value=self._sub.stale_seconds()),
        ]


class PolicySubscription:
    """Subscribes, applies, acknowledges, reconnects."""

    def __init__(self, client: PolicyClient, agent: Agent, pod: str, registry: CollectorRegistry,
                 monotonic: Callable[[], float] = time.monotonic,
                 destinations: MeshDestinations | None = None) -> None:
        self._client = client
        self._agent = agent
        self.destinations = destinations
        self._pod = pod
        self._monotonic = monotonic
        self.connected = False
        self.synced = False
        self.version: str | None = None
        self._last_live = monotonic()
        self._applied = Counter("meshward_policy_snapshots", "Configs received from the operator, by result.",
                                ["result"], registry=registry)
        self._errors = Counter("meshward_policy_stream_errors", "Policy streams that ended or failed, by gRPC code.",
                               ["code"], registry=registry)
        registry.register(_Staleness(self))

    def stale_seconds(self) -> float:
        """0 while connected, else seconds since the last live moment."""
        return 0.0 if self.connected else self._monotonic() - self._last_live

    def _connected(self) -> None:
        self.connected = True
        self._last_live = self._monotonic()

    async def _apply(self, version: str, config: dict[str, Any]) -> str | None:
        if version and version == self.version:
            return None  # a reconnect resumes at the version in force
        try:
            await self._agent.apply(config)
        except ConfigRejected as e:
            self._applied.labels("rejected").inc()
            return str(e)
        self.version = version
        self.synced = True
        self._applied.labels("applied").inc()
        if self.destinations is not None:
            self.destinations.use_context_header(self._agent.pipeline.snapshot.config.context.header)
        return None

    async def run(self) -> None:
        """Subscribe until cancelled."""
        delay = BACKOFF_MIN_S
        while True:
            try:
                await self._client.subscribe(self._pod, self._apply, self._connected,
                                             self.destinations.update if self.destinations else None)
            except PolicyStreamError as e:
                self._errors.labels(e.code).inc()
                if self.connected:
                    delay = BACKOFF_MIN_S
                level = logging.WARNING if e.code != "FAILED_PRECONDITION" else logging.DEBUG
                log.log(level, "policy subscription: %s; keeping config %s, retrying in %.1f s", e, self.version,
                        delay)
            except Exception:  # a bug must not end the subscription: the config would go stale for good
                self._errors.labels("INTERNAL").inc()
                log.exception("policy subscription failed; keeping config %s, retrying in %.1f s", self.version, delay)
            if self.connected:
                self._last_live = self._monotonic()
            self.connected = False
            await asyncio.sleep(delay)
            delay = min(BACKOFF_MAX_S, delay * 2)
