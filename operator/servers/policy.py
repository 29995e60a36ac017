"""The policy distribution service: sidecars subscribe to their workload's config over mTLS.

Method `/meshward.policy.v1.Policy/Subscribe`, a bidirectional stream of JSON messages.
The sidecar's client certificate (required, verified against the mesh trust bundle)
says which namespace and ServiceAccount it is; its pod's projected ServiceAccount token
(audience `meshward`, in `authorization: Bearer …` metadata) proves which pod: the API
server's TokenReview names the pod a token is bound to, and that must be the pod the
first message names (`{"pod": "<name>"}`), running as that ServiceAccount. So a sidecar
only ever receives its own workload's config, and no pod can subscribe as a sibling
that shares its ServiceAccount. The server sends `{"version", "config"}` whenever the
config changes (at once on connect, which is how a reconnect resumes); the sidecar
answers `{"ack": "<version>"}` or `{"ack": "<version>", "error": "..."}`. Between configs
the server sends the meshed-destination map, `{"destinations": {"version", "peers"}}`, at
once and whenever it changes (engines/mesh_directory.py); it is not acknowledged. A pod
may hold several streams (an agent restart); each receives every update until it ends.

No message is ever sent over MAX_MESSAGE_BYTES: gRPC would end the stream with
RESOURCE_EXHAUSTED, and the agent, reconnecting, would be sent the same message again
and never receive anything more (issue 18). The hub and the directory bound what they
produce (MAX_CONFIG_BYTES, domain/destinations.py); this service measures each encoded
message as the last guard, and one over the limit is not sent but logged with its pod
and counted (meshward_policy_messages_refused), while the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from cryptography import x509

from meshward.operator.engines.mesh_directory import MeshDirectory
from meshward.operator.engines.policy_hub import PolicyHub, Subscriber, SubscriptionRefused
from meshward.operator.engines.token_review import PodToken, TokenRefused, TokenReviewer
from meshward.operator.servers.wire import dumps, loads, rotating_credentials

SERVICE = "meshward.policy.v1.Policy"
_SPIFFE = re.compile(r"^spiffe://[^/]+/ns/([^/]+)/sa/([^/]+)$")
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# An agent sends its first message as it opens the stream; a caller silent this long is refused.
FIRST_MESSAGE_TIMEOUT_S = 10.0


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


def _bearer(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            return value[7:].strip()
    return ""


def _encoded(message: bytes) -> bytes:
    """Messages are encoded (and measured) before they are sent."""
    return message


class PolicyService:
    """Adapts Subscribe streams to the policy hub."""

    def __init__(self, hub: PolicyHub, reviewer: TokenReviewer, directory: MeshDirectory | None = None) -> None:
        self._hub = hub
        self._reviewer = reviewer
        self._directory = directory

    async def _admit(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Subscriber:
        """Check the certificate, the pod-bound token and the pod named; SubscriptionRefused says why not."""
        who = peer_identity(context)
        if who is None:
            raise SubscriptionRefused("UNAUTHENTICATED", "a workload certificate with a SPIFFE ID is required")
        namespace, sa, spiffe = who
        # The first message is read before any refusal: an abort while the client is still writing it reaches
        # grpc-python clients as INTERNAL, not as the refusal (seen in tests). Bounded, so no caller holds a stream.
        try:
            first = await asyncio.wait_for(anext(aiter(requests), None), FIRST_MESSAGE_TIMEOUT_S)
        except TimeoutError as e:
            raise SubscriptionRefused("INVALID_ARGUMENT", 'no first message {"pod": "<name>"} within '
                                                          f"{FIRST_MESSAGE_TIMEOUT_S:.0f} s") from e
        token = await self._pod_token(context, namespace, sa)
        pod = first.get("pod") if isinstance(first, dict) else None
        if not isinstance(pod, str) or not pod:
            raise SubscriptionRefused("INVALID_ARGUMENT", 'the first message must be {"pod": "<name>"}')
        if pod != token.pod:
            raise SubscriptionRefused("PERMISSION_DENIED", f"the token belongs to pod {namespace}/{token.pod}, "
                                                           f"which cannot subscribe as {namespace}/{pod}")
        return self._hub.subscribe(namespace, sa, pod, spiffe, token.pod_uid)

    async def _pod_token(self, context: grpc.aio.ServicerContext, namespace: str, sa: str) -> PodToken:
        """The pod the caller's token proves (the signer's check), which must run as the certificate's account."""
        try:
            who = await self._reviewer.pod_token(_bearer(context))
        except TokenRefused as e:
            raise SubscriptionRefused(e.code, str(e)) from e
        if (who.namespace, who.service_account) != (namespace, sa):
            raise SubscriptionRefused("PERMISSION_DENIED", f"the token is {who.namespace}/{who.service_account}'s, "
                                                           f"not that of the certificate's ServiceAccount "
                                                           f"{namespace}/{sa}")
        return who

    async def subscribe(self, requests: AsyncIterator[Any],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Serve one sidecar's subscription."""
        try:
            sub = await self._admit(requests, context)
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
        reader = asyncio.create_task(self._read_acks(sub, requests))
        end = asyncio.ensure_future(ended.wait())
        try:
            async for update in self._updates(sub, reader, end):
                if update is None:
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"subscription ended: {sub.closed}")
                    return
                data = dumps(update)
                if len(data) > MAX_MESSAGE_BYTES:
                    what = "the destination map" if "destinations" in update else f"config {update.get('version')}"
                    self._hub.refused_message(sub, what, len(data), MAX_MESSAGE_BYTES)
                    continue
                yield data
        finally:
            reader.cancel()
            end.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
            self._hub.unsubscribe(sub)

    async def _read_acks(self, sub: Subscriber, requests: AsyncIterator[Any]) -> None:
        """Record each acknowledgement the sidecar sends, until its side of the stream ends."""
        async for msg in requests:
            if isinstance(msg, dict) and isinstance(msg.get("ack"), str):
                err = msg.get("error")
                self._hub.ack(sub, msg["ack"], err if isinstance(err, str) else None)

    async def _updates(self, sub: Subscriber, *stops: asyncio.Future[Any]) -> AsyncIterator[dict[str, Any] | None]:
        """Each message for `sub`: new destination maps and configs (None once the hub closed it), until a stop."""
        sent: str | None = None
        mapped = ""
        while not any(s.done() for s in stops):
            config = asyncio.ensure_future(sub.next(sent))
            waits: set[asyncio.Future[Any]] = {config, *stops}
            destinations = None
            if self._directory is not None:
                destinations = asyncio.ensure_future(self._directory.next(mapped, sub.workload.namespace))
                waits.add(destinations)
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if destinations is not None:
                if destinations.done():
                    mapped, peers, egress = destinations.result()
                    yield {"destinations": {"version": mapped, "peers": peers, "egress": egress}}
                else:
                    destinations.cancel()
            if not config.done():
                config.cancel()
                continue
            compiled = config.result()
            if compiled is None:
                yield None
                return
            sent = compiled.version
            yield {"version": compiled.version, "config": compiled.document}

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler registering Subscribe."""
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Subscribe": grpc.stream_stream_rpc_method_handler(self.subscribe, request_deserializer=loads,
                                                               response_serializer=_encoded)})


async def serve_policy(hub: PolicyHub, reviewer: TokenReviewer, address: str,
                       credentials: Callable[[], tuple[bytes, bytes, bytes]],
                       directory: MeshDirectory | None = None) -> grpc.aio.Server:
    """Start the service on `address`; `credentials()` gives (chain, key, trust bundle), reread per handshake."""
    creds = rotating_credentials(credentials)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.keepalive_time_ms", 10_000)])
    server.add_generic_rpc_handlers((PolicyService(hub, reviewer, directory).handler(),))
    server.add_secure_port(address, creds)
    await server.start()
    return server
