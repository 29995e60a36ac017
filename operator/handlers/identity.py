"""Kopf handlers of workload identity: the CA at start-up, ServiceIdentity status, trust bundles.

Each handler parses, calls a pure function (domain.identity, domain.rotation via the
CA keeper) and applies the result through the Kubernetes client. Transient API
failures are `kopf.TemporaryError` with a delay; an unusable CA Secret stops the
start-up with a message that says how to recover.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import kopf

from meshward.operator.api.schema import GROUP, VERSION
from meshward.operator.clients.kube import KubeClient, KubeError
from meshward.operator.domain.ca import spiffe_id
from meshward.operator.domain.identity import Observation, identity_status, status_changed
from meshward.operator.engines.ca_keeper import CaKeeper
from meshward.operator.engines.ca_store import SECRET_NAME, CaStoreError
from meshward.operator.engines.identities import IdentityDirectory
from meshward.operator.engines.issuance import IssuanceEngine

# Every namespace with a ServiceIdentity gets the trust bundle under this name (key `ca.crt`).
BUNDLE_CONFIGMAP = "meshward-trust-bundle"
BUNDLE_LABELS = {"app.kubernetes.io/part-of": "meshward", "app.kubernetes.io/component": "trust-bundle"}
# Kubernetes API hiccups are retried after this many seconds.
RETRY_DELAY_S = 5
log = logging.getLogger("meshward.operator")


@dataclass
class Runtime:
    """The operator's collaborators, built by the entry point and shared by its handlers."""

    kube: KubeClient
    ca: CaKeeper
    engine: IssuanceEngine
    directory: IdentityDirectory
    namespace: str
    trust_domain: str
    # Starts the signing service (servers.signing, wired by the entry point) once the CA is loaded.
    start_signer: Callable[[], Awaitable[grpc.aio.Server]]
    clock: Callable[[], dt.datetime]
    status_interval_s: float = 10.0
    ca_interval_s: float = 30.0
    server: grpc.aio.Server | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # issuedCertificates reported before this operator started, per ServiceIdentity uid.
    issued_before: dict[str, int] = field(default_factory=dict)
    last_warning: str | None = None


async def _secret_event(rt: Runtime, type_: str, reason: str, message: str) -> None:
    # The rotation loop runs outside any Kopf handler, so it posts through the client, not kopf.event.
    try:
        await asyncio.to_thread(rt.kube.post_event, rt.namespace, "Secret", SECRET_NAME, type_, reason, message)
    except KubeError as e:
        log.warning("%s", e)


async def _ca_loop(rt: Runtime) -> None:
    """Advance CA rotation and warn about expiry, every `ca_interval_s`."""
    while True:
        await asyncio.sleep(rt.ca_interval_s)
        try:
            step = await rt.ca.tick()
        except (KubeError, CaStoreError) as e:
            log.warning("CA check failed, retrying in %s s: %s", rt.ca_interval_s, e)
            continue
        if step is not None:
            await _secret_event(rt, "Normal", step.reason, step.message)
        warning = rt.ca.expiry_warning()
        if warning and warning != rt.last_warning:
            log.warning(warning)
            await _secret_event(rt, "Warning", "CaExpiring", warning)
        rt.last_warning = warning


def register(registry: kopf.OperatorRegistry, rt: Runtime) -> None:
    """Register the identity handlers on `registry`."""

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A private registry has none of Kopf's default login handlers: kubeconfig, then in-cluster.
        return kopf.login_with_kubeconfig(**kwargs) or kopf.login_with_service_account(**kwargs)

    @kopf.on.startup(registry=registry)
    async def start(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="meshward.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="meshward.io", key="last-handled-configuration")
        settings.posting.level = logging.WARNING
        try:
            await rt.ca.load()
        except KubeError as e:
            raise kopf.TemporaryError(f"cannot read the CA Secret: {e}", delay=RETRY_DELAY_S) from e
        except CaStoreError as e:
            raise kopf.PermanentError(str(e)) from e
        rt.server = await rt.start_signer()
        rt.tasks.append(asyncio.create_task(_ca_loop(rt), name="ca-rotation"))
        log.info("mesh CA loaded (trust domain %s); signing service started", rt.trust_domain)

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        for t in rt.tasks:
            t.cancel()
        for t in rt.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if rt.server is not None:
            await rt.server.stop(grace=2)

    @kopf.on.event(GROUP, VERSION, "serviceidentities", id="index", registry=registry)
    def index(type: str | None, body: kopf.Body, **_: Any) -> None:
        if type == "DELETED":
            rt.directory.remove(body)
        else:
            rt.directory.upsert(body)

    def reconcile(body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status, namespace: str | None,
                  patch: kopf.Patch) -> None:
        if namespace is None:
            raise kopf.PermanentError("ServiceIdentity must be namespaced")
        sa = spec.get("serviceAccountName", "")
        try:
            exists = rt.kube.service_account_exists(namespace, sa)
            bundle = rt.ca.bundle_pem()
            if bundle:
                rt.kube.ensure_configmap(namespace, BUNDLE_CONFIGMAP, {"ca.crt": bundle}, BUNDLE_LABELS)
        except KubeError as e:
            raise kopf.TemporaryError(str(e), delay=RETRY_DELAY_S) from e
        old = dict(status)
        issued, last = rt.engine.stats.counts(namespace, sa)
        before = rt.issued_before.setdefault(str(meta.get("uid")), int(old.get("issuedCertificates") or 0))
        if last is None and old.get("lastIssuedAt"):
            last = dt.datetime.fromisoformat(old["lastIssuedAt"])
        obs = Observation(spiffe_id(rt.trust_domain, namespace, sa), int(meta.get("generation") or 0), exists,
                          rt.ca.signer() is not None, before + issued, last)
        new = identity_status(obs, namespace, sa, list(old.get("conditions") or []), rt.clock())
        if status_changed(old, new):
            patch.status.update(new)
            was: dict[str, Any] = next((c for c in old.get("conditions") or [] if c.get("type") == "Ready"), {})
            now_ready = new["conditions"][0]
            if now_ready["status"] == "False" and was.get("reason") != now_ready["reason"]:
                kopf.warn(body, reason=now_ready["reason"], message=now_ready["message"])
        for reason, message in rt.engine.stats.take_refusals(namespace, sa):
            kopf.warn(body, reason="CertificateRefused", message=f"{reason}: {message}")

    @kopf.on.resume(GROUP, VERSION, "serviceidentities", id="reconcile", registry=registry)
    @kopf.on.create(GROUP, VERSION, "serviceidentities", id="reconcile", registry=registry)
    @kopf.on.update(GROUP, VERSION, "serviceidentities", id="reconcile", registry=registry)
    def changed(body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status, namespace: str | None,
                patch: kopf.Patch, **_: Any) -> None:
        reconcile(body, meta, spec, status, namespace, patch)

    @kopf.timer(GROUP, VERSION, "serviceidentities", id="refresh", interval=rt.status_interval_s,
                registry=registry)
    def refresh(body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status, namespace: str | None,
                patch: kopf.Patch, **_: Any) -> None:
        reconcile(body, meta, spec, status, namespace, patch)
