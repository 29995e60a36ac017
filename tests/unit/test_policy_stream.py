"""The policy stream's last guard (operator/servers/policy.py): no message over gRPC's limit is ever sent.

A message over the limit ends the stream with RESOURCE_EXHAUSTED, and the agent, reconnecting, is sent the
same message again: it never receives anything more (issue 18). In-process, with the real hub and directory and
a stand-in for gRPC's servicer context; the stream over real gRPC is tests/integration/test_policy_plane.py's.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from meshward.operator.engines.mesh_directory import MeshDirectory
from meshward.operator.engines.policy_hub import PolicyHub, Subscriber
from meshward.operator.servers.policy import MAX_MESSAGE_BYTES, PolicyService

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
TD = "cluster.local"


class Context:
    """What the service uses of grpc.aio.ServicerContext."""

    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def add_done_callback(self, fn: Any) -> None:
        self.callbacks.append(fn)

    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


async def _requests() -> AsyncIterator[Any]:
    await asyncio.Event().wait()  # the agent sends nothing more
    yield {}


def test_a_message_over_grpcs_limit_is_not_sent_and_the_stream_goes_on() -> None:
    """Stream kill by one oversized message: with the directory's bounds lifted, a 5 MB map is refused (logged with
    the pod, counted) and the agent still receives its config on the same stream."""
    async def scenario() -> tuple[list[dict[str, Any]], int]:
        hub = PolicyHub(lambda: NOW, TD)
        directory = MeshDirectory(TD, max_namespace_bytes=10**9, max_map_bytes=10**9)
        hub.apply_pod({"metadata": {"namespace": "shop", "name": "o-1", "labels": {"meshward.io/inject": "enabled"},
                                    "uid": "u"}, "spec": {"serviceAccountName": "orders"}})
        ports = ",".join(str(65535 - p) for p in range(64))  # the most the injector admits
        for n in range(12000):
            directory.apply_pod({"metadata": {"namespace": "evil", "name": f"e-{n}",
                                              "labels": {"meshward.io/inject": "enabled"}},
                "spec": {"serviceAccountName": "s", "initContainers": [
                    {"name": "meshward-init", "command": ["meshward-init", "--exclude-inbound-ports", ports]},
                    {"name": "meshward-agent"}]},
                "status": {"podIP": f"10.{n // 62500}.{n // 250 % 250}.{n % 250}", "phase": "Running"}})
        directory.publish()
        service = PolicyService(hub, None, directory)  # type: ignore[arg-type]

        async def admit(requests: Any, context: Any) -> Subscriber:
            return hub.subscribe("shop", "orders", "o-1", f"spiffe://{TD}/ns/shop/sa/orders")
        service._admit = admit  # type: ignore[method-assign]
        stream = cast(AsyncGenerator[bytes, None], service.subscribe(_requests(), Context()))
        compiling = asyncio.create_task(hub.run())
        first = await asyncio.wait_for(anext(stream), 30)
        compiling.cancel()
        await stream.aclose()
        return [json.loads(first) if isinstance(first, bytes) else first], getattr(hub, "messages_refused", 0)
    got, refused = asyncio.run(scenario())
    assert refused == 1
    assert "config" in got[0] and "destinations" not in got[0]
    assert all(len(json.dumps(m)) < MAX_MESSAGE_BYTES for m in got)
