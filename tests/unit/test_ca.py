"""The mesh CA's pure functions, with CSR attack vectors named after what they try."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from meshward.operator.domain.ca import (
    CertificateAuthority,
    CsrRejected,
    check_csr,
    generate_root,
    issue_leaf,
    parse_ttl,
    random_serial,
    spiffe_id,
)
from tests.support.pki import make_csr as csr

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
ME = "spiffe://cluster.local/ns/shop/sa/orders"


def uri(u: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(u)


def test_valid_csr_yields_a_spiffe_leaf_under_the_root() -> None:
    ca = generate_root("cluster.local", NOW)
    leaf = issue_leaf(ca, check_csr(csr([uri(ME)], cn="admin"), ME), ME, dt.timedelta(hours=1), NOW,
                      random_serial(os.urandom))
    leaf.verify_directly_issued_by(ca.cert)
    assert leaf.subject == x509.Name([])  # nothing copied from the CSR
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [ME]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(hours=1)
    assert leaf.serial_number.bit_length() > 64


def test_leaf_not_after_is_clamped_to_the_ca() -> None:
    ca = generate_root("cluster.local", NOW, lifetime=dt.timedelta(minutes=30))
    leaf = issue_leaf(ca, check_csr(csr([uri(ME)]), ME), ME, dt.timedelta(hours=24), NOW, random_serial(os.urandom))
    assert leaf.not_valid_after_utc == ca.cert.not_valid_after_utc


def test_expired_ca_refuses_to_sign() -> None:
    ca = generate_root("cluster.local", NOW - dt.timedelta(days=2), lifetime=dt.timedelta(days=1))
    with pytest.raises(CsrRejected, match="rotate the mesh CA"):
        issue_leaf(ca, check_csr(csr([uri(ME)]), ME), ME, dt.timedelta(hours=1), NOW, random_serial(os.urandom))


def test_serials_are_random_and_distinct() -> None:
    serial = random_serial(os.urandom)
    assert len({serial() for _ in range(1000)}) == 1000


CSR_ATTACKS: list[tuple[str, Any, str]] = [
    ("wrong-spiffe-id-other-sa", lambda: csr([uri("spiffe://cluster.local/ns/shop/sa/payments")]),
     "must be exactly"),
    ("wrong-spiffe-id-other-namespace", lambda: csr([uri("spiffe://cluster.local/ns/bank/sa/orders")]),
     "must be exactly"),
    ("wrong-trust-domain", lambda: csr([uri("spiffe://evil.example/ns/shop/sa/orders")]), "must be exactly"),
    ("spiffe-id-prefix-extension", lambda: csr([uri(ME + "/admin")]), "must be exactly"),
    ("extra-uri-san", lambda: csr([uri(ME), uri("spiffe://cluster.local/ns/kube-system/sa/admin")]),
     "must be exactly"),
    ("duplicate-uri-san", lambda: csr([uri(ME), uri(ME)]), "must be exactly"),
    ("extra-dns-san", lambda: csr([uri(ME), x509.DNSName("kubernetes.default.svc")]), "remove DNSName"),
    ("extra-ip-san", lambda: csr([uri(ME), x509.IPAddress(__import__("ipaddress").ip_address("10.0.0.1"))]),
     "remove IPAddress"),
    ("extra-email-san", lambda: csr([uri(ME), x509.RFC822Name("admin@example.com")]), "remove RFC822Name"),
    ("no-san", lambda: csr(None), "no subjectAltName"),
    ("rsa-key", lambda: csr([uri(ME)], key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
     "RSA"),
    ("undersized-rsa-key", lambda: csr([uri(ME)], key=rsa.generate_private_key(public_exponent=65537,
                                                                              key_size=1024)), "RSA"),
    ("ed25519-key", lambda: csr([uri(ME)], key=ed25519.Ed25519PrivateKey.generate()), "Ed25519"),
    ("weak-curve-p192", lambda: csr([uri(ME)], key=ec.generate_private_key(ec.SECP192R1())), "secp192r1"),
    ("not-pem", lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n",
     "not a PEM-encoded"),
    ("empty", lambda: b"", "not a PEM-encoded"),
    ("signature-from-another-key", lambda: _swap_key(csr([uri(ME)])), "signature does not verify"),
]


def _swap_key(pem: bytes) -> bytes:
    """Graft another public key into a signed CSR: proof of possession must fail."""
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    mine = x509.load_pem_x509_csr(pem).public_key().public_bytes(serialization.Encoding.DER,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert mine in der and len(mine) == len(other)
    import base64

    swapped = der.replace(mine, other)
    body = base64.encodebytes(swapped).decode().replace("\n", "")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return ("-----BEGIN CERTIFICATE REQUEST-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE REQUEST-----\n").encode()


@pytest.mark.parametrize(("make", "message"), [a[1:] for a in CSR_ATTACKS], ids=[a[0] for a in CSR_ATTACKS])
def test_csr_attack_is_rejected(make: Any, message: str) -> None:
    with pytest.raises(CsrRejected, match=None) as e:
        check_csr(make(), ME)
    assert message in str(e.value)


@pytest.mark.parametrize(("text", "seconds"), [("1h", 3600), ("90m", 5400), ("1h30m", 5400), ("24h", 86400),
                                               ("5m", 300)])
def test_ttl_parsing(text: str, seconds: int) -> None:
    assert parse_ttl(text).total_seconds() == seconds


@pytest.mark.parametrize(("text", "message"), [("4m", "between"), ("25h", "between"), ("1d", "not a duration"),
                                               ("", "empty"), ("h", "not a duration")])
def test_ttl_rejections(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_ttl(text)


def test_ttl_minimum_can_be_lowered_for_tests_and_demos() -> None:
    assert parse_ttl("30s", minimum=dt.timedelta(seconds=10)).total_seconds() == 30


@pytest.mark.parametrize(("td", "ns", "sa", "ok"), [
    ("cluster.local", "shop", "orders", True), ("Cluster", "shop", "orders", False),
    ("cluster.local", "shop/../x", "orders", False), ("cluster.local", "shop", "", False),
])
def test_spiffe_ids(td: str, ns: str, sa: str, ok: bool) -> None:
    if ok:
        assert spiffe_id(td, ns, sa) == f"spiffe://{td}/ns/{ns}/sa/{sa}"
    else:
        with pytest.raises(ValueError, match=r"must be lowercase|is not a valid Kubernetes name"):
            spiffe_id(td, ns, sa)


def test_ca_round_trips_through_pem_and_refuses_a_mismatched_key() -> None:
    ca = generate_root("cluster.local", NOW)
    again = CertificateAuthority.from_pem(ca.cert_pem(), ca.key_pem())
    assert again.cert == ca.cert
    other = generate_root("cluster.local", NOW)
    with pytest.raises(ValueError, match="does not match"):
        CertificateAuthority.from_pem(ca.cert_pem(), other.key_pem())
