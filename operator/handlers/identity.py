"""Kopf handlers of workload identity: the CA at start-up, ServiceIdentity status, trust bundles.

Each handler parses, calls a pure function (domain.identity, domain.rotation via the
CA keeper) and applies the result through the Kubernetes client. ServiceIdentity status
is written by a `StatusWriter` fed from the watch, not by Kopf timers (whose finalizers
would make `kubectl delete` wait for the operator). Transient API
failures are `kopf.TemporaryError` with a delay; an unusable CA Secret stops the
start-up with a message that says how to recover.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping
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
from meshward.operator.engines.status_writer import EventNote, Report, StatusWriter
from meshward.operator.handlers.lifecycle import shutdown

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
        except Exception:  # a bug in one check must not end rotation and expiry warnings for good
            log.exception("CA check failed, retrying in %s s", rt.ca_interval_s)
            continue
        if step is not None:
            await _secret_event(rt, "Normal", step.reason, step.message)
        warning = rt.ca.expiry_warning()
        if warning and warning != rt.last_warning:
            log.warning(warning)
            await _secret_event(rt, "Warning", "CaExpiring", warning)
        rt.last_warning = warning


async def identity_report(rt: Runtime, body: Mapping[str, Any]) -> Report:
    """A ServiceIdentity's status and Events; publishes the trust bundle in its namespace on the way."""
    meta, spec = body.get("metadata", {}), body.get("spec", {})
    namespace, sa = meta.get("namespace", ""), spec.get("serviceAccountName", "")
    exists = await asyncio.to_thread(rt.kube.service_account_exists, namespace, sa)
    bundle = rt.ca.bundle_pem()
    if bundle:
        await asyncio.to_thread(rt.kube.ensure_configmap, namespace, BUNDLE_CONFIGMAP, {"ca.crt": bundle},
                                BUNDLE_LABELS)
    old = dict(body.get("status") or {})
    issued, last = rt.engine.stats.counts(namespace, sa)
    before = rt.issued_before.setdefault(str(meta.get("uid")), int(old.get("issuedCertificates") or 0))
    if last is None and old.get("lastIssuedAt"):
        last = dt.datetime.fromisoformat(old["lastIssuedAt"])
    obs = Observation(spiffe_id(rt.trust_domain, namespace, sa), int(meta.get("generation") or 0), exists,
                      rt.ca.signer() is not None, before + issued, last)
    new = identity_status(obs, namespace, sa, list(old.get("conditions") or []), rt.clock())
    events: list[EventNote] = []
    changed = status_changed(old, new)
    if changed:
        was: dict[str, Any] = next((c for c in old.get("conditions") or [] if c.get("type") == "Ready"), {})
        now_ready = new["conditions"][0]
        if now_ready["status"] == "False" and was.get("reason") != now_ready["reason"]:
            events.append(EventNote("Warning", now_ready["reason"], now_ready["message"]))
    events += [EventNote("Warning", "CertificateRefused", f"{reason}: {message}")
               for reason, message in rt.engine.stats.take_refusals(namespace, sa)]
    return Report(new if changed else None, tuple(events))


def register(registry: kopf.OperatorRegistry, rt: Runtime) -> None:
    """Register the identity handlers on `registry`."""

    async def report(body: Mapping[str, Any]) -> Report:
        return await identity_report(rt, body)

    statuses = StatusWriter("ServiceIdentity", "serviceidentities", rt.kube, report, rt.status_interval_s)

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
        rt.tasks.append(asyncio.create_task(statuses.run(), name="serviceidentity-status"))
        log.info("mesh CA loaded (trust domain %s); signing service started", rt.trust_domain)

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        await shutdown(rt.tasks, rt.server, grace_s=2)

    @kopf.on.event(GROUP, VERSION, "serviceidentities", id="index", registry=registry)
    async def index(type: str | None, body: kopf.Body, **_: Any) -> None:
        if statuses.track(type, body):
            rt.directory.upsert(body)
        else:
            rt.directory.remove(body)
