"""Keeps the mesh CA in memory, in step with its Secret, and advances rotations.

One `tick` rereads the Secret (another replica, or `meshward ca rotate`, may have
changed it), applies the rotation step that is due, writes it with a resourceVersion
precondition, and re-issues the signing service's own certificate when the signing
key changed or its certificate is half-way through its life; `run` ticks on an
interval and warns before the root expires. Blocking Kubernetes calls run in a worker
thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshward.operator.clients.kube import KubeError
from meshward.operator.domain.ca import CertificateAuthority, generate_root, issue_server_cert
from meshward.operator.domain.rotation import WARN_BEFORE, CaState, Step, advance
from meshward.operator.engines.ca_store import CaStoreError, SecretApi, Stored, load_or_create_state, save

# The signing service's own certificate: short enough to follow a CA rotation quickly.
SERVER_CERT_TTL = dt.timedelta(hours=24)
log = logging.getLogger("meshward.operator.ca")


@dataclass(frozen=True)
class ServerCert:
    """The signing service's serving certificate chain and key, in PEM."""

    cert_pem: bytes
    key_pem: bytes
    not_after: dt.datetime
    issuer_serial: int


class CaKeeper:
    """The operator's view of the mesh CA."""

    def __init__(self, api: SecretApi, namespace: str, trust_domain: str, clock: Callable[[], dt.datetime],
                 serial: Callable[[], int], leaf_lifetime: dt.timedelta, server_dns: tuple[str, ...],
                 server_ips: tuple[str, ...]) -> None:
        self._api = api
        self._namespace = namespace
        self._trust_domain = trust_domain
        self._clock = clock
        self._serial = serial
        self.leaf_lifetime = leaf_lifetime
        self._dns = server_dns
        self._ips = server_ips
        self._stored: Stored | None = None
        self._server: ServerCert | None = None

    @property
    def state(self) -> CaState | None:
        """The CA state last read or written, None before the first load."""
        return self._stored.state if self._stored else None

    def signer(self) -> CertificateAuthority | None:
        """The CA that signs leaves now (None until loaded)."""
        return self._stored.state.active if self._stored else None

    def bundle_pem(self) -> str:
        """The trust bundle workloads must hold now."""
        return self._stored.state.bundle_pem() if self._stored else ""

    def server_cert(self) -> ServerCert:
        """The signing service's certificate, issued by the active CA."""
        if self._server is None:
            raise RuntimeError("server_cert() before load()")
        return self._server

    def _refresh_server_cert(self) -> bool:
        ca = self.signer()
        if ca is None:
            return False
        now = self._clock()
        cur = self._server
        if cur is not None and cur.issuer_serial == ca.cert.serial_number and \
                cur.not_after - now > SERVER_CERT_TTL / 2:
            return False
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_server_cert(ca, key, self._dns, self._ips, SERVER_CERT_TTL, now, self._serial)
        self._server = ServerCert(cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem(),
                                  key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()),
                                  cert.not_valid_after_utc, ca.cert.serial_number)
        return True

    async def load(self) -> None:
        """Read the CA Secret, creating the CA on first start."""
        self._stored = await asyncio.to_thread(load_or_create_state, self._api, self._namespace,
                                               self._trust_domain, self._clock)
        self._refresh_server_cert()

    async def tick(self) -> Step | None:
        """Reread the Secret and apply the rotation step that is due; return the step taken."""
        stored = await asyncio.to_thread(load_or_create_state, self._api, self._namespace, self._trust_domain,
                                         self._clock)
        self._stored = stored
        now = self._clock()
        step = advance(stored.state, now, requested=stored.rotation_requested, leaf_lifetime=self.leaf_lifetime,
                       new_root=lambda: generate_root(self._trust_domain, now))
        if step is None and stored.rotation_requested:
            # A request during a rotation is consumed: the rotation under way already replaces the root.
            step = Step(stored.state, "CaRotationInProgress",
                        f"rotation request ignored: a rotation is already in phase {stored.state.phase}")
        if step is not None:
            if not await asyncio.to_thread(save, self._api, self._namespace, stored, step.state):
                log.info("the CA Secret changed under us; rereading on the next tick")
                return None
            self._stored = await asyncio.to_thread(load_or_create_state, self._api, self._namespace,
                                                   self._trust_domain, self._clock)
            log.info("%s: %s", step.reason, step.message)
        self._refresh_server_cert()
        return step

    def expires_in(self) -> dt.timedelta | None:
        """How long the signing root has left."""
        ca = self.signer()
        return ca.cert.not_valid_after_utc - self._clock() if ca else None

    def expiry_warning(self) -> str | None:
        """A warning when the signing root is close to its end, else None."""
        left = self.expires_in()
        if left is not None and left < WARN_BEFORE:
            return (f"the mesh CA expires in {left.days} days; rotate it now: meshward ca rotate "
                    f"--namespace {self._namespace}")
        return None

    async def run(self, interval_s: float, post_event: Callable[[str, str, str], Awaitable[None]],
                  after_tick: Callable[[], Awaitable[object]] | None = None) -> None:
        """Advance rotation and warn about expiry every `interval_s` until cancelled; Events through `post_event`.

        `after_tick` runs after every check, successful or not (it publishes the bundle where it must follow at once).

        A failed check is logged and retried at the next interval: a bug in one check must not end rotation
        and expiry warnings for good.
        """
        last_warning: str | None = None
        while True:
            await asyncio.sleep(interval_s)
            try:
                step = await self.tick()
            except (KubeError, CaStoreError) as e:
                log.warning("CA check failed, retrying in %s s: %s", interval_s, e)
                continue
            except Exception:
                log.exception("CA check failed, retrying in %s s", interval_s)
                continue
            finally:
                if after_tick is not None:
                    try:
                        await after_tick()
                    except Exception:
                        log.exception("publishing after the CA check failed; retrying in %s s", interval_s)
            if step is not None:
                await post_event("Normal", step.reason, step.message)
            warning = self.expiry_warning()
            if warning and warning != last_warning:
                log.warning(warning)
                await post_event("Warning", "CaExpiring", warning)
            last_warning = warning
