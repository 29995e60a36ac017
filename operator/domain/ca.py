"""The mesh CA as pure functions: root generation, CSR checks, leaf issuance.

Why pure: every security property of workload identity is decided here and must be
testable with attack vectors, without a cluster:
- a CSR must carry exactly one URI SAN, equal to the SPIFFE ID the caller's
  ServiceAccount maps to, and no other SAN of any kind (DNS, IP, email, other URIs);
- the CSR's signature must verify (proof of possession of the private key);
- keys are ECDSA P-256 or P-384; RSA and other curves are refused;
- leaves get a random 128-bit serial, NotAfter clamped to the issuer's, and only the
  extensions Meshward chooses (nothing is copied from the CSR, subject included).
The clock and randomness come in as arguments.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshward.operator.domain.duration import parse_duration

# Workload keys the mesh accepts: NIST P-256 (the default everywhere) and P-384.
ALLOWED_CURVES = ("secp256r1", "secp384r1")
# Tolerance for workloads whose clock runs slightly behind the CA's.
BACKDATE = dt.timedelta(minutes=1)
# Certificate lifetimes a ServiceIdentity may ask for (the CRD enforces the same bounds).
MIN_TTL = dt.timedelta(minutes=5)
MAX_TTL = dt.timedelta(hours=24)
DEFAULT_TTL = dt.timedelta(hours=1)
# The mesh root lives long and is rotated well before it expires (docs/identity.md).
ROOT_LIFETIME = dt.timedelta(days=365)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class CsrRejected(Exception):
    """A CSR does not qualify for a certificate; the message says which check failed."""


@dataclass(frozen=True)
class CertificateAuthority:
    """A signing certificate and its key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        """The certificate in PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key in PKCS#8 PEM (for the CA Secret only)."""
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        """Load a CA from PEM; raise ValueError if the key is not an EC key matching the certificate."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key must be an ECDSA key")  # noqa: TRY004 - a bad Secret, not a caller bug
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise ValueError("the CA key does not match the CA certificate")
        return cls(cert, key)


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """The SPIFFE ID of a ServiceAccount: spiffe://<trust-domain>/ns/<ns>/sa/<sa>."""
    if not _TRUST_DOMAIN.match(trust_domain):
        raise ValueError(f"trust domain {trust_domain!r} must be lowercase letters, digits, '-' and '.'")
    for what, value in (("namespace", namespace), ("service account", service_account)):
        if not value or len(value) > 253 or not all(_DNS_LABEL.match(p) for p in value.split(".")):
            raise ValueError(f"{what} {value!r} is not a valid Kubernetes name")
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def parse_ttl(text: str, minimum: dt.timedelta = MIN_TTL, maximum: dt.timedelta = MAX_TTL) -> dt.timedelta:
    """Parse a Go-style duration ("1h", "90m", "1h30m") and check it lies within [minimum, maximum]."""
    ttl = parse_duration(text)
    if not minimum <= ttl <= maximum:
        raise ValueError(f"{text!r} must be between {minimum} and {maximum}")
    return ttl


def generate_root(trust_domain: str, now: dt.datetime, lifetime: dt.timedelta = ROOT_LIFETIME,
                  serial: int | None = None) -> CertificateAuthority:
    """Create a self-signed mesh root (ECDSA P-256) for `trust_domain`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshward"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"meshward mesh CA {now:%Y-%m-%dT%H:%M:%SZ}")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert, key)


def check_csr(csr_pem: bytes, expected_id: str) -> x509.CertificateSigningRequest:
    """Parse and check a CSR for `expected_id`; raise CsrRejected naming the failed check."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise CsrRejected("csr: not a PEM-encoded PKCS#10 certificate request") from e
    if not csr.is_signature_valid:
        raise CsrRejected("csr: signature does not verify (the CSR must be signed by its own key)")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CsrRejected(f"csr: key type {type(key).__name__.removesuffix('PublicKey').lstrip('_')} is not "
                          f"allowed; use ECDSA P-256")
    if key.curve.name not in ALLOWED_CURVES:
        raise CsrRejected(f"csr: curve {key.curve.name} is not allowed; use ECDSA P-256 (secp256r1)")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as e:
        raise CsrRejected(f"csr: no subjectAltName; it must hold exactly the URI {expected_id}") from e
    except ValueError as e:
        raise CsrRejected("csr: extensions cannot be parsed") from e
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    others = [g for g in san if not isinstance(g, x509.UniformResourceIdentifier)]
    if others:
        kinds = sorted({type(g).__name__ for g in others})
        raise CsrRejected(f"csr: subjectAltName may hold only the URI {expected_id}; remove {', '.join(kinds)}")
    if uris != [expected_id]:
        raise CsrRejected(f"csr: subjectAltName URIs are {uris}; they must be exactly [{expected_id!r}]")
    return csr


def issue_leaf(ca: CertificateAuthority, csr: x509.CertificateSigningRequest, spiffe: str, ttl: dt.timedelta,
               now: dt.datetime, serial: Callable[[], int]) -> x509.Certificate:
    """Sign a workload certificate for a checked CSR; NotAfter never exceeds the CA's."""
    not_after = min(now + ttl, ca.cert.not_valid_after_utc)
    if not_after <= now:
        raise CsrRejected("ca: the signing certificate has expired; rotate the mesh CA")
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(csr.public_key())
        .serial_number(serial())
        .not_valid_before(max(now - BACKDATE, ca.cert.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        # An X.509-SVID with an empty subject must mark its SAN critical (RFC 5280 §4.2.1.6).
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def random_serial(randbytes: Callable[[int], bytes]) -> Callable[[], int]:
    """A serial source: 128 random bits (CA/B Forum asks for at least 64), never zero."""
    return lambda: int.from_bytes(randbytes(16), "big") or 1


def issue_server_cert(ca: CertificateAuthority, key: ec.EllipticCurvePrivateKey, dns: tuple[str, ...],
                      ips: tuple[str, ...], ttl: dt.timedelta, now: dt.datetime,
                      serial: Callable[[], int]) -> x509.Certificate:
    """Sign a serving certificate (the operator's own endpoints) for DNS names and IPs."""
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0] if dns else "meshward")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial())
        .not_valid_before(max(now - BACKDATE, ca.cert.not_valid_before_utc))
        .not_valid_after(min(now + ttl, ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
