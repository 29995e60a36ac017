"""The policy distribution service: sidecars subscribe to their workload's config over mTLS.

Method `/meshward.policy.v1.Policy/Subscribe`, a bidirectional stream of JSON messages.
The sidecar's first message names its pod (`{"pod": "<name>"}`); its client
certificate (required, verified against the mesh trust bundle) says which namespace
and ServiceAccount it is, and the pod must run as that ServiceAccount, so a sidecar only
ever receives its own workload's config. The server sends `{"version", "config"}`
whenever the config changes (at once on connect, which is how a reconnect resumes);
the sidecar answers `{"ack": "<version>"}` or `{"ack": "<version>", "error": "..."}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from cryptography import x509

from meshward.operator.engines.policy_hub import PolicyHub, SubscriptionRefused
from meshward.operator.servers.wire import dumps, loads, rotating_credentials

SERVICE = "meshward.policy.v1.Policy"
_SPIFFE = re.compile(r"^spiffe://[^/]+/ns/([^/]+)/sa/([^/]+)$")
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def peer_identity(context: grpc.aio.ServicerContext) -> tuple[str, str, str] | None:
    """(namespace, service account, SPIFFE ID) from the verified client certificate, if any."""
    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        return None
    cert = x509.load_pem_x509_certificate(pems[0])
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        return None
    for uri in uris:
        m = _SPIFFE.match(uri)
        if m:
            return m.group(1), m.group(2), uri
    return None


class PolicyService:
    """Adapts Subscribe streams to the policy hub."""

    def __init__(self, hub: PolicyHub) -> None:
        self._hub = hub

    async def subscribe(self, requests: AsyncIterator[Any],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[dict[str, Any]]:
        """Serve one sidecar's subscription."""
        who = peer_identity(context)
        if who is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "a workload certificate with a SPIFFE ID is required")
            return
        namespace, sa, spiffe = who
        first = await anext(aiter(requests), None)
        pod = first.get("pod") if isinstance(first, dict) else None
        if not isinstance(pod, str) or not pod:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, 'the first message must be {"pod": "<name>"}')
            return
        try:
            sub = self._hub.subscribe(namespace, sa, pod, spiffe)
        except SubscriptionRefused as e:
            await context.abort(getattr(grpc.StatusCode, e.code), str(e))
            return

        # However the RPC ends (client gone, cancelled, deadline), the subscriber leaves at once:
        # status must not count a sidecar that is no longer there.
        ended = asyncio.Event()

        def gone(_ctx: object) -> None:
            self._hub.unsubscribe(sub)
            ended.set()

        context.add_done_callback(gone)

        async def read() -> None:
            async for msg in requests:
                if isinstance(msg, dict) and isinstance(msg.get("ack"), str):
                    err = msg.get("error")
                    self._hub.ack(sub, msg["ack"], err if isinstance(err, str) else None)

        reader = asyncio.create_task(read())
        end = asyncio.ensure_future(ended.wait())
        try:
            sent: str | None = None
            while not reader.done() and not ended.is_set():
                waiter = asyncio.ensure_future(sub.next(sent))
                await asyncio.wait({waiter, reader, end}, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    waiter.cancel()
                    break
                if self._hub.subscribers.get(sub.workload.key) is not sub:
                    break  # the same pod reconnected on another stream
                compiled = waiter.result()
                sent = compiled.version
                yield {"version": compiled.version, "config": compiled.document}
        finally:
            reader.cancel()
            end.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
            self._hub.unsubscribe(sub)

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler registering Subscribe."""
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Subscribe": grpc.stream_stream_rpc_method_handler(self.subscribe, request_deserializer=loads,
                                                               response_serializer=dumps)})


async def serve_policy(hub: PolicyHub, address: str,
                       credentials: Callable[[], tuple[bytes, bytes, bytes]]) -> grpc.aio.Server:
    """Start the service on `address`; `credentials()` gives (chain, key, trust bundle), reread per handshake."""
    creds = rotating_credentials(credentials)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.keepalive_time_ms", 10_000)])
    server.add_generic_rpc_handlers((PolicyService(hub).handler(),))
    server.add_secure_port(address, creds)
    await server.start()
    return server
