"""The workload's side of identity as pure functions: key, CSR, renewal timing.

Why pure: when a workload renews decides whether rotation ever drops traffic, so the
schedule (half-life with jitter, so a rollout's pods do not renew in lockstep) and the
retry backoff are plain functions of their inputs, table-tested. The private key is
generated here, lives only in the agent's memory and reaches Envoy over SDS; it is
never written to disk.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

# Renew at this fraction of the lifetime, +/- JITTER (so 40%..60%): the old certificate
# stays valid for at least 40% of its life after renewal starts.
RENEW_AT = 0.5
JITTER = 0.1
# Retry a failed request after BACKOFF_BASE * 2^attempt seconds (half to full of it), at most BACKOFF_MAX.
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0


class TokenUnreadable(ValueError):
    """The projected token is not a JWT naming a ServiceAccount; the message says what is wrong."""


@dataclass(frozen=True)
class WorkloadCert:
    """A certificate the workload holds, with its key and the bundle that came with it."""

    spiffe_id: str
    chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes
    not_before: dt.datetime
    not_after: dt.datetime
    serial: int
    # When the agent received it: lifetimes count from here, since the CA backdates NotBefore.
    received_at: dt.datetime


def service_account_of(token: str) -> tuple[str, str]:
    """Return (namespace, name) from a projected ServiceAccount token's `sub` (not verified: the signer does)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError) as e:
        raise TokenUnreadable("the ServiceAccount token is not a JWT; mount a projected token "
                              "(serviceAccountToken volume, audience meshward)") from e
    parts = str(claims.get("sub", "")).split(":") if isinstance(claims, dict) else []
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
        raise TokenUnreadable("the token's sub is not system:serviceaccount:<namespace>:<name>")
    return parts[2], parts[3]


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """The workload's SPIFFE ID."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key (the curve the mesh CA expects)."""
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: ec.EllipticCurvePrivateKey, spiffe: str) -> bytes:
    """A PEM CSR with exactly one URI SAN, the workload's SPIFFE ID, and an empty subject."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=True)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key in PKCS#8 PEM, for Envoy over SDS only."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def accept(spiffe: str, chain_pem: bytes, bundle_pem: bytes, key: ec.EllipticCurvePrivateKey,
           now: dt.datetime) -> WorkloadCert:
    """Check a signed chain belongs to `key` and `spiffe`, and return it as a WorkloadCert; raise ValueError if not."""
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    if leaf.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError("the signed certificate is not for this workload's key")
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    if uris != [spiffe]:
        raise ValueError(f"the signed certificate names {uris}, expected [{spiffe!r}]")
    if not x509.load_pem_x509_certificates(bundle_pem):
        raise ValueError("the signer returned an empty trust bundle")
    return WorkloadCert(spiffe, chain_pem, key_pem(key), bundle_pem, leaf.not_valid_before_utc,
                        leaf.not_valid_after_utc, leaf.serial_number, now)


def renewal_delay(cert: WorkloadCert, now: dt.datetime, rand: float) -> float:
    """Seconds until `cert` should be renewed: at 40-60% of its lifetime (`rand` in [0, 1))."""
    start = max(cert.not_before, cert.received_at)
    lifetime = (cert.not_after - start).total_seconds()
    fraction = RENEW_AT + (2 * rand - 1) * JITTER
    due = start + dt.timedelta(seconds=lifetime * fraction)
    return max(0.0, (due - now).total_seconds())


def retry_delay(attempt: int, rand: float, cert: WorkloadCert | None, now: dt.datetime) -> float:
    """Seconds before retry `attempt` (0-based): exponential with jitter, never past a tenth of what is left."""
    delay: float = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** min(attempt, 16)) * (0.5 + rand / 2)
    if cert is not None:
        left = (cert.not_after - now).total_seconds()
        delay = min(delay, max(BACKOFF_BASE_S, left / 10))
    return delay
