"""Keeps the workload's certificate fresh: request, renew at half-life, retry, never drop the old one early.

The key is generated in memory for each request; the projected token is reread for
each request (the kubelet rotates it). Until the new certificate arrives the old one
keeps being served, and a failed renewal is retried with backoff well inside what is
left of the old certificate's life. Subscribers (the SDS server) wait on `changed`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshward.sidecar.clients.signer import SignerError
from meshward.sidecar.domain.certificate import (
    TokenUnreadable,
    WorkloadCert,
    accept,
    build_csr,
    new_key,
    renewal_delay,
    retry_delay,
    service_account_of,
    spiffe_id,
)

log = logging.getLogger("meshward.sidecar.identity")


class Signer(Protocol):
    """What the manager needs of the signing service (clients.signer.SignerClient)."""

    async def sign(self, token: str, csr_pem: bytes) -> dict[str, Any]:
        """Sign a CSR."""
        ...


class _Expiry(Collector):
    def __init__(self, manager: IdentityManager) -> None:
        self._m = manager

    def collect(self) -> list[Metric]:
        cert = self._m.current
        if cert is None:
            return []
        return [GaugeMetricFamily("meshward_workload_cert_expiry_timestamp_seconds",
                                  "When the workload certificate being served expires (Unix time).",
                                  value=cert.not_after.timestamp())]


class IdentityManager:
    """Obtains and renews the workload certificate."""

    def __init__(self, signer: Signer, read_token: Callable[[], str], trust_domain: str,
                 clock: Callable[[], dt.datetime], rand: Callable[[], float], registry: CollectorRegistry) -> None:
        self._signer = signer
        self._read_token = read_token
        self._trust_domain = trust_domain
        self._clock = clock
        self._rand = rand
        self.current: WorkloadCert | None = None
        self.version = 0
        self.changed = asyncio.Condition()
        self._renewals = Counter("meshward_workload_cert_requests", "Certificate requests by result.", ["result"],
                                 registry=registry)
        registry.register(_Expiry(self))

    async def obtain(self) -> WorkloadCert:
        """Request one certificate now; raise SignerError, TokenUnreadable or ValueError on failure."""
        token = self._read_token().strip()
        namespace, sa = service_account_of(token)
        me = spiffe_id(self._trust_domain, namespace, sa)
        key = new_key()
        doc = await self._signer.sign(token, build_csr(key, me))
        try:
            return accept(me, str(doc["certificateChain"]).encode(), str(doc["trustBundle"]).encode(), key,
                          self._clock())
        except KeyError as e:
            raise ValueError(f"the signing service's answer lacks {e}") from e

    async def _publish(self, cert: WorkloadCert) -> None:
        async with self.changed:
            self.current = cert
            self.version += 1
            self.changed.notify_all()

    async def run(self) -> None:
        """Obtain, then renew forever (cancel to stop)."""
        attempt = 0
        while True:
            try:
                cert = await self.obtain()
            except (SignerError, TokenUnreadable, ValueError, OSError) as e:
                self._renewals.labels("error").inc()
                delay = retry_delay(attempt, self._rand(), self.current, self._clock())
                attempt += 1
                log.warning("certificate request failed (attempt %d, retrying in %.1f s): %s", attempt, delay, e)
            except Exception:  # a bug must not end renewal: the certificate would expire under traffic
                self._renewals.labels("error").inc()
                delay = retry_delay(attempt, self._rand(), self.current, self._clock())
                attempt += 1
                log.exception("certificate request failed (attempt %d, retrying in %.1f s)", attempt, delay)
            else:
                self._renewals.labels("ok").inc()
                attempt = 0
                await self._publish(cert)
                delay = renewal_delay(cert, self._clock(), self._rand())
                log.info("certificate for %s (serial %x) valid until %s; renewing in %.1f s", cert.spiffe_id,
                         cert.serial, cert.not_after.isoformat(), delay)
            await asyncio.sleep(delay)
