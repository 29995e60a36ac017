"""The operator's start-up and shutdown, in one explicit order, and Kopf's login.

Start-up: load the CA (create it on the first start), then start the signing service and
the policy service (both present certificates of that CA), set the webhooks' caBundle and
start the admission webhooks, then the loops: CA rotation (which keeps the caBundle
current), the policy hub, the destination map, and the status writers of the three kinds.
Nothing depends on the order in which handler modules were registered. Shutdown stops the
loops, then the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import kopf
from aiohttp import web

from meshward.operator.clients.kube import KubeClient, KubeError
from meshward.operator.engines.ca_keeper import CaKeeper
from meshward.operator.engines.ca_store import SECRET_NAME, CaStoreError
from meshward.operator.engines.mesh_directory import MeshDirectory
from meshward.operator.engines.policy_hub import PolicyHub
from meshward.operator.engines.status_writer import StatusWriter
from meshward.operator.engines.webhook_bundle import WebhookBundle

# Kubernetes API hiccups at start-up are retried after this many seconds.
RETRY_DELAY_S = 5
log = logging.getLogger("meshward.operator")


@dataclass
class Runtime:
    """What the operator runs once it leads: built by the entry point, started and stopped here."""

    kube: KubeClient
    namespace: str
    trust_domain: str
    ca: CaKeeper
    hub: PolicyHub
    # Start the signing and the policy service (servers.signing, servers.policy; wired by the entry point).
    start_signer: Callable[[], Awaitable[grpc.aio.Server]]
    start_policy: Callable[[], Awaitable[grpc.aio.Server]]
    writers: list[StatusWriter]
    ca_interval_s: float = 30.0
    # The destination map's loop, the admission webhooks and the caBundle keeper (None: not run).
    mesh: MeshDirectory | None = None
    start_webhooks: Callable[[], Awaitable[web.AppRunner]] | None = None
    webhook_bundle: WebhookBundle | None = None
    # Called once every server listens: the leader labels its Pod then, so the Services never send it traffic
    # it cannot take yet.
    on_serving: Callable[[], Awaitable[None]] | None = None
    # Fills the mesh directory's namespace egress before the policy service and webhooks start (fails: retried).
    prime_mesh: Callable[[], Awaitable[None]] | None = None
    servers: list[grpc.aio.Server] = field(default_factory=list)
    runners: list[web.AppRunner] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def shutdown(tasks: list[asyncio.Task[None]], servers: list[grpc.aio.Server], grace_s: float) -> None:
    """Cancel `tasks` and wait for them, then stop `servers` letting in-flight calls finish for `grace_s`."""
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
    for server in servers:
        await server.stop(grace=grace_s)


def register(registry: kopf.OperatorRegistry, rt: Runtime) -> None:
    """Register login, start-up and shutdown on `registry`."""

    async def secret_event(type_: str, reason: str, message: str) -> None:
        # The rotation loop runs outside any Kopf handler, so it posts through the client, not kopf.event.
        try:
            await asyncio.to_thread(rt.kube.post_event, rt.namespace, "Secret", SECRET_NAME, type_, reason, message)
        except KubeError as e:
            log.warning("%s", e)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A private registry has none of Kopf's default login handlers: kubeconfig, then in-cluster.
        return kopf.login_with_kubeconfig(**kwargs) or kopf.login_with_service_account(**kwargs)

    @kopf.on.startup(registry=registry)
    async def start(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.WARNING
        try:
            await rt.ca.load()
        except KubeError as e:
            raise kopf.TemporaryError(f"cannot read the CA Secret: {e}", delay=RETRY_DELAY_S) from e
        except CaStoreError as e:
            raise kopf.PermanentError(str(e)) from e
        if rt.prime_mesh is not None:
            try:
                await rt.prime_mesh()
            except KubeError as e:
                raise kopf.TemporaryError(f"cannot read the namespaces' egress: {e}", delay=RETRY_DELAY_S) from e
        rt.servers.append(await rt.start_signer())
        rt.servers.append(await rt.start_policy())
        if rt.webhook_bundle is not None:
            await rt.webhook_bundle.sync()
        if rt.start_webhooks is not None:
            rt.runners.append(await rt.start_webhooks())
        if rt.on_serving is not None:
            await rt.on_serving()
        after_tick = rt.webhook_bundle.sync if rt.webhook_bundle is not None else None
        rt.tasks.append(asyncio.create_task(rt.ca.run(rt.ca_interval_s, secret_event, after_tick),
                                            name="ca-rotation"))
        rt.tasks.append(asyncio.create_task(rt.hub.run(), name="policy-hub"))
        if rt.mesh is not None:
            rt.tasks.append(asyncio.create_task(rt.mesh.run(), name="mesh-directory"))
        rt.tasks += [asyncio.create_task(w.run(), name=f"{w.plural}-status") for w in rt.writers]
        log.info("mesh CA loaded (trust domain %s); signing and policy services started", rt.trust_domain)

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        await shutdown(rt.tasks, rt.servers, grace_s=1)
        for runner in rt.runners:
            await runner.cleanup()
