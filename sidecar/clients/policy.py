"""The client of the operator's policy distribution service (`/meshward.policy.v1.Policy/Subscribe`).

mTLS with the workload certificate the agent holds (the operator learns the agent's
identity from it), and the pod's projected ServiceAccount token in the call's metadata
(the operator learns from TokenReview which pod the token is bound to, so the pod name
the agent sends is proven, not just claimed); JSON messages, as on the server, decoded
in a worker thread: a 3 MiB config takes tens of milliseconds to decode, and the loop
receiving it also answers Envoy's ext_authz checks (issue 21).
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

METHOD = "/meshward.policy.v1.Policy/Subscribe"


class PolicyStreamError(Exception):
    """The subscription ended or could not start; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def _handover(obj: dict[str, Any]) -> dict[str, Any]:
    """Called by json's C parser for each object it built: a Python frame, where the GIL can change hands.

    json.loads is one C call that holds the GIL throughout (30-40 ms for 3 MiB); a waiting thread (the event
    loop, answering Envoy) gets it only where Python code runs. This costs ~10 % of the parse.
    """
    return obj


def _loads(raw: bytes) -> Any:
    """`json.loads(raw)` with the cyclic GC paused (for the whole process), handing the GIL over at each object.

    A 3 MiB message is ~100,000 new containers: enough to trigger full collections in the middle of the
    parse, each scanning the half-built document while holding the GIL (tens of ms, issue 21). Once parsed, the
    document is moved out of the collector's generations (`gc.freeze`): else the first young collection after
    the pause scans all of it (~35 ms). A JSON document has no reference cycles: reference counting frees it,
    frozen or not.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        doc = json.loads(raw, object_hook=_handover)
        gc.freeze()
        return doc
    finally:
        if enabled:
            gc.enable()


async def decode(raw: bytes) -> Any:
    """One stream message decoded from JSON, in a worker thread."""
    return await asyncio.to_thread(_loads, raw)


class PolicyClient:
    """Opens subscriptions to the operator."""

    def __init__(self, address: str, server_name: str,
                 credentials: Callable[[], tuple[bytes, bytes, bytes] | None], token: Callable[[], str]) -> None:
        self._address = address
        self._server_name = server_name
        self._credentials = credentials
        self._token = token

    async def subscribe(self, pod: str, on_config: Callable[[str, dict[str, Any]], Awaitable[str | None]],
                        on_connected: Callable[[], None],
                        on_destinations: Callable[[Any], object] | None = None) -> None:
        """Stream configs to `on_config(version, config)` (which returns an error or None) until the stream ends.

        The meshed-destination maps the operator sends between configs (`{version, peers, egress}`) go to
        `on_destinations`, unacknowledged.
        """
        creds = self._credentials()
        if creds is None:
            raise PolicyStreamError("FAILED_PRECONDITION", "no workload certificate yet")
        roots, key, chain = creds
        try:
            token = self._token().strip()
        except OSError as e:
            raise PolicyStreamError("FAILED_PRECONDITION", f"cannot read the ServiceAccount token: {e}") from e
        channel_creds = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)
        options = [("grpc.ssl_target_name_override", self._server_name),
                   ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                   ("grpc.keepalive_time_ms", 10_000)]
        try:
            async with grpc.aio.secure_channel(self._address, channel_creds, options=options) as channel:
                call = channel.stream_stream(METHOD, request_serializer=lambda d: json.dumps(d).encode())(
                    metadata=(("authorization", f"Bearer {token}"),))
                await call.write({"pod": pod})
                async for raw in call:
                    msg = await decode(raw)
                    on_connected()
                    if "destinations" in msg:
                        if on_destinations is not None:
                            on_destinations(msg["destinations"] if isinstance(msg["destinations"], dict) else None)
                        continue
                    version, config = str(msg.get("version", "")), msg.get("config")
                    error = await on_config(version, config) if isinstance(config, dict) else "no config in message"
                    await call.write({"ack": version, **({"error": error} if error else {})})
        except grpc.aio.AioRpcError as e:
            raise PolicyStreamError(e.code().name, e.details() or "") from e
        raise PolicyStreamError("UNAVAILABLE", "the operator closed the subscription")
