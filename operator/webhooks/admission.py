"""The admission webhook server: `/inject/pod`, `/inject/namespace`, `/validate` and `/validate/ephemeral`, over HTTPS.

Served by the leading replica behind the `meshward-webhook` Service, with the operator's
serving certificate from the mesh CA (re-issued after a CA rotation; each new TLS
handshake presents the current one, and the CA loop keeps the webhook configurations'
caBundle equal to the trust bundle, old and new roots during a rotation, so no admission
fails across it). The decisions are pure (domain/admission.py); this module only moves
bytes, and never answers 500: a malformed review gets 400 with the reason, and an
unexpected error while injecting an opted-in pod refuses the pod (it must never run
unprotected) rather than letting it through. Reading a review and deciding it (compiling
an AuthPolicy's CEL, building an injection patch) runs in a worker thread: the operator's
event loop also streams configs to every agent and renews leases (issue 21).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from meshward.operator.domain.admission import (
    ReviewError,
    ephemeral_response,
    inject_response,
    parse_review,
    review,
    services_needed,
    services_unavailable_response,
    validate_response,
)
from meshward.operator.domain.inject import InjectSettings

# An AdmissionReview carries the object twice on update; pods with large env or many containers stay far below.
MAX_REVIEW_BYTES = 8 * 1024 * 1024
log = logging.getLogger("meshward.operator.webhook")
T = TypeVar("T")


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


class _ServicesUnavailable(Exception):
    """The Services of `namespace` could not be listed for an injection."""

    def __init__(self, namespace: str, reason: str) -> None:
        super().__init__(reason)
        self.namespace = namespace
        self.reason = reason


class AdmissionWebhooks:
    """The routes, with the settings and clock they decide with."""

    def __init__(self, settings: InjectSettings, trust_domain: str, clock: Callable[[], dt.datetime],
                 registry: CollectorRegistry | None = None, *,
                 offload: Callable[..., Awaitable[Any]] = _in_thread,
                 services: Callable[[str], Awaitable[Sequence[Mapping[str, Any]]]] | None = None,
                 egress_locked: Callable[[str], bool] | None = None) -> None:
        """Decide reviews with these settings; `offload` runs fn(*args) away from the event loop.

        `services` lists a namespace's Services: the ports they declare TCP are declared on the pods they select
        (None: no Service is read). `egress_locked(namespace)`: whether its egress is locked (outbound exclusions
        are then refused).
        """
        self._offload = offload
        self._egress_locked = egress_locked or (lambda _ns: False)
        self._services = services
        self._settings = settings
        self._trust_domain = trust_domain
        self._clock = clock
        self._reviews = Counter("meshward_admission_reviews", "Admission reviews answered, by webhook and result.",
                                ["webhook", "result"], registry=registry)

    def _decide(self, webhook: str, request: dict[str, Any], now: dt.datetime,
                services: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if webhook == "validate":
            return validate_response(request, self._trust_domain, now)
        if webhook == "ephemeral":
            return ephemeral_response(request)
        try:
            return inject_response(request, self._settings, namespace_opted_in=webhook == "namespace",
                                   services=services,
                                   egress_locked=self._egress_locked(str(request.get("namespace") or "")))
        except Exception as e:  # never a 500, never an unprotected opted-in pod
            log.exception("injection failed")
            return {"uid": request["uid"], "allowed": False,
                    "status": {"code": 500, "message": f"meshward: injection failed ({type(e).__name__}); "
                                                       "see the operator's log"}}

    async def _services_of(self, webhook: str, request: dict[str, Any]) -> Sequence[Mapping[str, Any]]:
        """The Services an injection reads (none for other reviews); raise _ServicesUnavailable if unlistable."""
        if self._services is None or webhook not in ("pod", "namespace"):
            return ()
        namespace = services_needed(request, self._settings, webhook == "namespace")
        if namespace is None:
            return ()
        try:
            return await self._services(namespace)
        except Exception as e:  # the pod is refused, not injected without the ports its Services declare TCP
            log.warning("listing the Services of %s for an injection failed: %s", namespace, e)
            raise _ServicesUnavailable(namespace, f"{type(e).__name__}: {e}") from e

    async def _handle(self, webhook: str, req: web.Request) -> web.Response:
        try:
            request = await self._offload(parse_review, await req.read())
            try:
                services = await self._services_of(webhook, request)
            except _ServicesUnavailable as e:
                response = services_unavailable_response(request, e.namespace, e.reason)
            else:
                response = await self._offload(self._decide, webhook, request, self._clock(), services)
        except ReviewError as e:
            self._reviews.labels(webhook, "malformed").inc()
            return web.Response(status=400, text=f"meshward: {e}\n")
        except web.HTTPRequestEntityTooLarge:
            self._reviews.labels(webhook, "malformed").inc()
            return web.Response(status=413, text=f"meshward: reviews are limited to {MAX_REVIEW_BYTES} bytes\n")
        result = "patched" if "patch" in response else "allowed" if response["allowed"] else "denied"
        self._reviews.labels(webhook, result).inc()
        if not response["allowed"]:
            log.info("%s denied %s %s/%s: %s", webhook, request.get("operation"), request.get("namespace", ""),
                     request.get("name", ""), response["status"]["message"])
        return web.Response(text=json.dumps(review(response)), content_type="application/json")

    def app(self) -> web.Application:
        """The aiohttp application serving the routes."""
        app = web.Application(client_max_size=MAX_REVIEW_BYTES)

        async def pod(req: web.Request) -> web.Response:
            return await self._handle("pod", req)

        async def namespace(req: web.Request) -> web.Response:
            return await self._handle("namespace", req)

        async def validate(req: web.Request) -> web.Response:
            return await self._handle("validate", req)

        async def ephemeral(req: web.Request) -> web.Response:
            return await self._handle("ephemeral", req)

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        app.add_routes([web.post("/inject/pod", pod), web.post("/inject/namespace", namespace),
                        web.post("/validate", validate), web.post("/validate/ephemeral", ephemeral),
                        web.get("/healthz", healthz)])
        return app


def _memory_file(data: bytes) -> int:
    """An anonymous in-memory file holding `data` (Linux memfd), as a descriptor."""
    fd = os.memfd_create("meshward-tls", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def rotating_context(current: Callable[[], tuple[bytes, bytes]]) -> ssl.SSLContext:
    """A server TLS context presenting `current()` = (chain, key), rechecked on every handshake."""

    def context_for(chain: bytes, key: bytes) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # load_cert_chain reads paths only: the key goes through anonymous memory files, never a disk (the
        # root filesystem is read-only and has no /tmp anyway).
        fds = [_memory_file(chain), _memory_file(key)]
        try:
            ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        finally:
            for fd in fds:
                os.close(fd)
        return ctx

    loaded = [current()]
    base = context_for(*loaded[0])
    latest = [base]

    def pick(sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        pem = current()
        if pem != loaded[0]:
            loaded[0], latest[0] = pem, context_for(*pem)
        if latest[0] is not base:
            sock.context = latest[0]

    base.sni_callback = pick
    return base


async def serve_webhooks(webhooks: AdmissionWebhooks, address: str,
                         certificate: Callable[[], tuple[bytes, bytes]]) -> web.AppRunner:
    """Start the webhooks on `address` (host:port) with TLS from `certificate()`; stop with `runner.cleanup()`."""
    host, _, port = address.rpartition(":")
    runner = web.AppRunner(webhooks.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host or "0.0.0.0", int(port), ssl_context=rotating_context(certificate))  # noqa: S104
    await site.start()
    return runner
