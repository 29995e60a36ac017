"""The agent's policy subscription loop survives what it does not expect, keeping its config."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry

from meshward.sidecar.clients.policy import PolicyStreamError
from meshward.sidecar.engines.agent import Agent, load_snapshot
from meshward.sidecar.engines.observe import JsonLineAudit, Metrics
from meshward.sidecar.engines.subscription import PolicySubscription

CONFIG = {"apiVersion": "sidecar.meshward.io/v1alpha1", "kind": "SidecarConfig", "workload": "shop/orders-1",
          "policies": [{"name": "p", "rules": [{"name": "r", "to": {"paths": ["/orders/*"]}}]}]}


class _NoFetch:
    async def get(self, url: str, *, ca_file: str | None, timeout: float) -> bytes:
        raise OSError("no JWKS in this test")


class FlakyClient:
    """Stands in for PolicyClient (whose real failures are PolicyStreamError): the first stream raises an
    unexpected error, as a bug would; the second delivers a config and then ends."""

    def __init__(self) -> None:
        self.calls = 0

    async def subscribe(self, pod: str, apply: Callable[[str, dict[str, Any]], Awaitable[str | None]],
                        connected: Callable[[], None], destinations: Callable[[Any], object] | None = None) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug")
        connected()
        await apply("v1", CONFIG)


def test_an_unexpected_stream_error_does_not_end_the_subscription() -> None:
    async def scenario() -> tuple[int, str | None]:
        registry = CollectorRegistry()
        agent = Agent(load_snapshot(json.dumps({**CONFIG, "policies": []})), _NoFetch(), Metrics(registry),
                      JsonLineAudit(io.StringIO()))
        client = FlakyClient()
        sub = PolicySubscription(client, agent, "orders-1", registry)  # type: ignore[arg-type]
        runner = asyncio.create_task(sub.run())
        try:
            deadline = time.monotonic() + 10
            while sub.version is None and time.monotonic() < deadline and not runner.done():
                await asyncio.sleep(0.01)
            return client.calls, sub.version
        finally:
            runner.cancel()

    calls, version = asyncio.run(scenario())
    assert calls >= 2 and version == "v1"


class ExhaustedClient:
    """Every stream fails as one carrying a message over gRPC's limit did (issue 18)."""

    def __init__(self) -> None:
        self.calls = 0

    async def subscribe(self, pod: str, apply: Callable[[str, dict[str, Any]], Awaitable[str | None]],
                        connected: Callable[[], None], destinations: Callable[[Any], object] | None = None) -> None:
        self.calls += 1
        raise PolicyStreamError("RESOURCE_EXHAUSTED", "Received message larger than max (6497576 vs. 4194304)")


def test_an_agent_whose_stream_keeps_failing_says_so_in_its_metrics() -> None:
    async def scenario() -> CollectorRegistry:
        registry = CollectorRegistry()
        agent = Agent(load_snapshot(json.dumps(CONFIG)), _NoFetch(), Metrics(registry), JsonLineAudit(io.StringIO()))
        client = ExhaustedClient()
        sub = PolicySubscription(client, agent, "orders-1", registry)  # type: ignore[arg-type]
        runner = asyncio.create_task(sub.run())
        try:
            deadline = time.monotonic() + 10
            while client.calls < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return registry
        finally:
            runner.cancel()

    registry = asyncio.run(scenario())
    assert (registry.get_sample_value("meshward_policy_stream_errors_total", {"code": "RESOURCE_EXHAUSTED"}) or 0) >= 2
    assert registry.get_sample_value("meshward_policy_connected") == 0


def test_until_its_first_config_an_agent_answers_unavailable_not_forbidden() -> None:
    """A restarted agent that has not heard from the operator cannot decide: 503, which clients retry, never a
    403 the policy might not mean; its first config ends that."""
    from meshward.sidecar.domain.decision import Outcome
    from meshward.sidecar.domain.request import CheckInput

    registry = CollectorRegistry()
    awaiting = load_snapshot(json.dumps({**CONFIG, "policies": [{"name": "p", "rules": []}]}))
    agent = Agent(awaiting, _NoFetch(), Metrics(registry), JsonLineAudit(io.StringIO()), awaiting="no policy yet")
    first = agent.pipeline.decide_now(CheckInput("GET", "/orders/1"), "http")
    assert first.outcome is Outcome.UNAVAILABLE and first.reason == "no policy yet"  # type: ignore[union-attr]
    agent.reload(json.dumps(CONFIG))
    after = agent.pipeline.decide_now(CheckInput("GET", "/orders/1"), "http")
    assert after.outcome is Outcome.ALLOW  # type: ignore[union-attr]
