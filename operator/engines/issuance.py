"""Certificate issuance: authenticate the caller, find its ServiceIdentity, check the CSR, sign.

The order matters: the token is authenticated (TokenReview, bound audience, bound to a
pod that exists and has not finished: `TokenReviewer.pod_token`, the policy service's
check too) before anything else is looked at, so an anonymous caller learns nothing about
which ServiceIdentities exist. Reviews come from the shared `TokenReviewer` (cached briefly,
dropped when the token's pod or ServiceAccount is deleted). Each ServiceAccount has its
own token bucket, so one misbehaving workload cannot starve the others.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization

from meshward.operator.clients.kube import KubeError, TokenReviewResult
from meshward.operator.domain.ca import (
    DEFAULT_TTL,
    MAX_TTL,
    MIN_TTL,
    CertificateAuthority,
    CsrRejected,
    check_csr,
    issue_leaf,
    parse_ttl,
    spiffe_id,
)
from meshward.operator.engines.identity_directory import IdentityDirectory, IssuanceStats
from meshward.operator.engines.token_review import TokenRefused, TokenReviewer

# Per-ServiceAccount issuance budget: a burst for a rollout, then a steady rate.
BURST = 50
RATE_PER_S = 10.0


class IssuanceError(Exception):
    """Issuance refused; `code` is the gRPC status name the signing service answers with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class KubeApi(Protocol):
    """The Kubernetes calls issuance needs (clients.kube.KubeClient)."""

    def token_review(self, token: str, audiences: list[str]) -> TokenReviewResult:
        """Authenticate a token."""
        ...

    def service_identities(self, namespace: str) -> list[dict[str, Any]]:
        """List ServiceIdentities."""
        ...


@dataclass(frozen=True)
class Issued:
    """A signed workload certificate and what the workload needs with it."""

    spiffe_id: str
    certificate_pem: str
    trust_bundle_pem: str
    not_after: dt.datetime


class _Bucket:
    def __init__(self, now: float) -> None:
        self.tokens = float(BURST)
        self.at = now

    def take(self, now: float) -> bool:
        self.tokens = min(BURST, self.tokens + (now - self.at) * RATE_PER_S)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class IssuanceEngine:
    """Signs workload certificates for authenticated, admitted ServiceAccounts."""

    def __init__(self, kube: KubeApi, ca: Callable[[], CertificateAuthority | None],
                 bundle: Callable[[], str], trust_domain: str, clock: Callable[[], dt.datetime],
                 serial: Callable[[], int], monotonic: Callable[[], float],
                 min_ttl: dt.timedelta = MIN_TTL, ttl_cap: dt.timedelta | None = None,
                 directory: IdentityDirectory | None = None, stats: IssuanceStats | None = None,
                 reviewer: TokenReviewer | None = None) -> None:
        self._kube = kube
        self._ca = ca
        self._bundle = bundle
        self._trust_domain = trust_domain
        self._clock = clock
        self._serial = serial
        self._monotonic = monotonic
        self._min_ttl = min_ttl
        self._ttl_cap = ttl_cap
        self._directory = directory
        self.stats = stats or IssuanceStats()
        # The Kubernetes client blocks; its calls run on a pool sized for a rollout's burst of
        # renewals rather than asyncio's small default executor.
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kube-api")
        self.reviewer = reviewer or TokenReviewer(kube, monotonic, self._pool)
        self._buckets: dict[str, _Bucket] = {}
        self.issued = 0

    async def sign(self, token: str, csr_pem: bytes) -> Issued:
        """Authenticate `token`, admit its ServiceAccount, check `csr_pem` and sign it."""
        ca = self._ca()
        if ca is None:
            raise IssuanceError("UNAVAILABLE", "the mesh CA is not loaded yet; retry")
        try:
            who = await self.reviewer.pod_token(token)
        except TokenRefused as e:
            raise IssuanceError(e.code, str(e)) from e
        namespace, sa = who.namespace, who.service_account
        try:
            issued = await self._admit_and_sign(namespace, sa, csr_pem)
        except IssuanceError as e:
            self.stats.refused(namespace, sa, e.code, str(e))
            raise
        self.stats.issued(namespace, sa, self._clock())
        self.issued += 1
        return issued

    async def _find_identity(self, namespace: str, sa: str) -> dict[str, Any] | None:
        if self._directory is not None:
            hit = self._directory.find(namespace, sa)
            if hit is not None:
                return hit
        try:
            identities = await asyncio.get_running_loop().run_in_executor(self._pool, self._kube.service_identities,
                                                                          namespace)
        except KubeError as e:
            raise IssuanceError("UNAVAILABLE", str(e)) from e
        return next((i for i in identities if i.get("spec", {}).get("serviceAccountName") == sa
                     and not i["metadata"].get("deletionTimestamp")), None)

    async def _admit_and_sign(self, namespace: str, sa: str, csr_pem: bytes) -> Issued:
        ca = self._ca()
        if ca is None:
            raise IssuanceError("UNAVAILABLE", "the mesh CA is not loaded yet; retry")
        bucket = self._buckets.setdefault(f"{namespace}/{sa}", _Bucket(self._monotonic()))
        if not bucket.take(self._monotonic()):
            raise IssuanceError("RESOURCE_EXHAUSTED", f"too many certificate requests for {namespace}/{sa}; "
                                                      "retry with backoff")
        identity = await self._find_identity(namespace, sa)
        if identity is None:
            raise IssuanceError("PERMISSION_DENIED", f"no ServiceIdentity in namespace {namespace} admits "
                                                     f"ServiceAccount {sa}: create one with "
                                                     f"spec.serviceAccountName: {sa}")
        expected = spiffe_id(self._trust_domain, namespace, sa)
        try:
            ttl_text = identity.get("spec", {}).get("certificate", {}).get("ttl")
            ttl = parse_ttl(ttl_text, self._min_ttl, MAX_TTL) if ttl_text else DEFAULT_TTL
            if self._ttl_cap is not None:
                ttl = min(ttl, self._ttl_cap)
        except ValueError as e:
            raise IssuanceError("FAILED_PRECONDITION", f"ServiceIdentity {namespace}/"
                                                       f"{identity['metadata']['name']}: {e}") from e
        try:
            csr = check_csr(csr_pem, expected)
            cert = issue_leaf(ca, csr, expected, ttl, self._clock(), self._serial)
        except CsrRejected as e:
            raise IssuanceError("INVALID_ARGUMENT", str(e)) from e
        return Issued(expected, cert.public_bytes(serialization.Encoding.PEM).decode(), self._bundle(),
                      cert.not_valid_after_utc)
