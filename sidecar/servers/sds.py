"""Envoy's Secret Discovery Service (`envoy.service.secret.v3`) for the workload's certificate.

Envoy asks for resources by name over a streaming gRPC call on a Unix socket (never
a TCP port: the private key travels on it). Names served:
- `default`: the workload's `tls_certificate` (chain and in-memory key);
- `ROOTCA`: a `validation_context` with the trust bundle and a URI SAN matcher that
  admits any SPIFFE ID of the trust domain (inbound: who may call is the policy's job);
- `BUNDLE`: the trust bundle alone (outbound clusters add an exact SAN match for the
  one peer they expect; Envoy ORs SAN matchers, so they must not inherit ROOTCA's).
Every certificate change is pushed on every open stream with a new version, so
Envoy rotates without a restart or a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2

from meshward.sidecar.domain.certificate import WorkloadCert
from meshward.sidecar.engines.certificate import IdentityManager

TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
CERT, ROOTCA, BUNDLE = "default", "ROOTCA", "BUNDLE"
log = logging.getLogger("meshward.sidecar.sds")


def secret(name: str, cert: WorkloadCert, trust_domain: str) -> Any:
    """The SDS Secret `name` for the current certificate, or None for an unknown name."""
    if name == CERT:
        return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=cert.chain_pem),
            private_key=base_pb2.DataSource(inline_bytes=cert.key_pem)))
    if name in (ROOTCA, BUNDLE):
        ctx = common_pb2.CertificateValidationContext(trusted_ca=base_pb2.DataSource(inline_bytes=cert.bundle_pem))
        if name == ROOTCA:
            ctx.match_typed_subject_alt_names.append(common_pb2.SubjectAltNameMatcher(
                san_type=common_pb2.SubjectAltNameMatcher.URI,
                matcher=string_pb2.StringMatcher(prefix=f"spiffe://{trust_domain}/")))
        return secret_pb2.Secret(name=name, validation_context=ctx)
    return None


def response(names: list[str], cert: WorkloadCert, version: int, trust_domain: str) -> Any:
    """A DiscoveryResponse with the named secrets at `version`."""
    resources = []
    for n in names:
        s = secret(n, cert, trust_domain)
        if s is None:
            log.warning("Envoy asked for unknown SDS secret %r (known: %s, %s, %s)", n, CERT, ROOTCA, BUNDLE)
            continue
        packed = any_pb2.Any()
        packed.Pack(s)
        resources.append(packed)
    return discovery_pb2.DiscoveryResponse(version_info=str(version), resources=resources, type_url=TYPE_URL,
                                           nonce=f"{version}")


class SecretDiscovery(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves the identity manager's certificate to Envoy."""

    def __init__(self, identity: IdentityManager, trust_domain: str) -> None:
        self._identity = identity
        self._trust_domain = trust_domain

    async def _wait_newer(self, version: int) -> WorkloadCert:
        async with self._identity.changed:
            await self._identity.changed.wait_for(
                lambda: self._identity.current is not None and self._identity.version > version)
        assert self._identity.current is not None  # the predicate above guarantees it
        return self._identity.current

    async def StreamSecrets(self, requests: AsyncIterator[Any],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """Push the requested secrets now and after every rotation."""
        names: list[str] = []
        renamed = asyncio.Event()
        done = asyncio.Event()

        async def read() -> None:
            try:
                async for req in requests:
                    if req.error_detail.code:
                        log.warning("Envoy rejected SDS version %s: %s", req.version_info, req.error_detail.message)
                    if req.resource_names and list(req.resource_names) != names:
                        names[:] = list(req.resource_names)
                        renamed.set()
            finally:
                done.set()

        reader = asyncio.create_task(read())
        sent = 0
        try:
            while True:
                waits = {asyncio.ensure_future(self._wait_newer(sent)), asyncio.ensure_future(renamed.wait()),
                         asyncio.ensure_future(done.wait())}
                _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for p in pending:
                    p.cancel()
                if done.is_set():
                    return
                cert = self._identity.current
                if cert is None or not names:
                    renamed.clear()
                    continue
                renamed.clear()
                sent = self._identity.version
                yield response(list(names), cert, sent, self._trust_domain)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def FetchSecrets(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Answer one fetch with the current secrets."""
        cert = await self._wait_newer(0)
        return response(list(request.resource_names), cert, self._identity.version, self._trust_domain)


# The socket file's mode: the private key travels on this socket, so only the agent's own user (which
# Envoy runs as) may connect.
SOCKET_MODE = 0o600


async def serve_sds(servicer: SecretDiscovery, address: str,
                    also: Callable[[grpc.aio.Server], None] | None = None) -> grpc.aio.Server:
    """Start the SDS server on `address` (unix:/path only), its socket mode 0600 from the moment it exists.

    `also` registers more of Envoy's discovery services on the same socket (LDS and CDS in an injected pod).
    """
    if not address.startswith("unix:/"):
        raise ValueError(f"SDS listens on a Unix socket only (unix:/path), not {address!r}: it serves the private key")
    path = address.removeprefix("unix:")
    server = grpc.aio.server()
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(servicer, server)
    if also is not None:
        also(server)
    old = os.umask(0o777 & ~SOCKET_MODE)  # bind creates the socket file with 0600, never wider for a moment
    try:
        server.add_insecure_port(address)
        await server.start()
    finally:
        os.umask(old)
    os.chmod(path, SOCKET_MODE)
    return server
