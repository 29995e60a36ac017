"""Certificate issuance against the real API server: TokenRequest tokens, real TokenReview."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshward.operator.clients.kube import KubeClient
from meshward.operator.domain.ca import CertificateAuthority, generate_root, random_serial
from meshward.operator.engines.issuance import BURST, RATE_PER_S, IssuanceEngine, IssuanceError
from tests.kube import Cluster
from tests.support.pki import spiffe_csr as csr_for

pytestmark = pytest.mark.integration
API = "meshward.io/v1alpha1"


def engine(cluster: Cluster, ca: CertificateAuthority | None,
           monotonic: Callable[[], float] = time.monotonic) -> IssuanceEngine:
    return IssuanceEngine(KubeClient.from_kubeconfig(str(cluster.kubeconfig)), lambda: ca,
                          lambda: ca.cert_pem().decode() if ca else "", "cluster.local",
                          lambda: dt.datetime.now(dt.UTC), random_serial(os.urandom), monotonic)


def identity(ns: str, sa: str, name: str | None = None, ttl: str = "2h") -> dict[str, object]:
    return {"apiVersion": API, "kind": "ServiceIdentity", "metadata": {"name": name or sa, "namespace": ns},
            "spec": {"serviceAccountName": sa, "certificate": {"ttl": ttl}}}


def unbound_token(cluster: Cluster, ns: str, sa: str, audience: str = "meshward") -> str:
    """A TokenRequest token bound to no pod (`kubectl create token`)."""
    return cluster.kubectl("-n", ns, "create", "token", sa, "--audience", audience).stdout.strip()


def token(cluster: Cluster, ns: str, sa: str) -> str:
    """A token like the one kubelet projects: bound to a pod of `sa`."""
    return cluster.bound_token(ns, sa)


def refused(e: IssuanceEngine, tok: str, csr: bytes) -> IssuanceError:
    with pytest.raises(IssuanceError) as err:
        asyncio.run(e.sign(tok, csr))
    return err.value


@pytest.fixture
def orders(crds: Cluster, namespace: str) -> str:
    crds.kubectl("-n", namespace, "create", "serviceaccount", "orders")
    crds.apply(identity(namespace, "orders"))
    return namespace


def test_admitted_service_account_gets_its_spiffe_certificate(crds: Cluster, orders: str) -> None:
    ca = generate_root("cluster.local", dt.datetime.now(dt.UTC))
    me = f"spiffe://cluster.local/ns/{orders}/sa/orders"
    issued = asyncio.run(engine(crds, ca).sign(token(crds, orders, "orders"), csr_for(me)))
    cert = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
    cert.verify_directly_issued_by(ca.cert)
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == [me]
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=119) < lifetime <= dt.timedelta(hours=2)  # the ServiceIdentity's 2h
    assert issued.trust_bundle_pem == ca.cert_pem().decode()


def test_a_token_bound_to_no_pod_gets_no_certificate(crds: Cluster, orders: str) -> None:
    """`kubectl create token orders --audience meshward`: whoever may create tokens for the ServiceAccount (or holds
    a leaked one) got the workload's certificate without any pod. The kubelet's projected token is always bound to
    its pod; a token bound to none is refused."""
    ca = generate_root("cluster.local", dt.datetime.now(dt.UTC))
    err = refused(engine(crds, ca), unbound_token(crds, orders, "orders"),
                  csr_for(f"spiffe://cluster.local/ns/{orders}/sa/orders"))
    assert err.code == "PERMISSION_DENIED" and "not bound to a pod" in str(err), err


def test_a_finished_pods_token_gets_no_certificate(crds: Cluster, orders: str) -> None:
    """A pod that Succeeded stays in the API server, which keeps validating its bound token (it checks only that
    the pod exists, with that UID): a token copied out of a finished Job got certificates for its lifetime. Once
    the operator's pod watch sees the phase, its tokens are refused."""
    e = engine(crds, generate_root("cluster.local", dt.datetime.now(dt.UTC)))
    tok, me = token(crds, orders, "orders"), f"spiffe://cluster.local/ns/{orders}/sa/orders"
    asyncio.run(e.sign(tok, csr_for(me)))
    crds.kubectl("-n", orders, "patch", "pod", "orders-token-holder", "--subresource=status", "--type=merge",
                 "-p", '{"status": {"phase": "Succeeded"}}')
    pod = crds.get_json("-n", orders, "pod", "orders-token-holder")
    assert crds.kubectl("create", "-o", "jsonpath={.status.authenticated}", "-f", "-", stdin=json.dumps({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": {"token": tok, "audiences": ["meshward"]}}), check=True).stdout == "true", "the API server still says yes"
    e.reviewer.pod_changed(pod)  # what the operator's pod watch does (handlers/policies.py)
    err = refused(e, tok, csr_for(me))
    assert err.code == "UNAUTHENTICATED" and "finished" in str(err), err


def test_token_for_another_audience_is_refused(crds: Cluster, orders: str) -> None:
    ca = generate_root("cluster.local", dt.datetime.now(dt.UTC))
    err = refused(engine(crds, ca), unbound_token(crds, orders, "orders", audience="vault"),
                  csr_for(f"spiffe://cluster.local/ns/{orders}/sa/orders"))
    assert err.code == "UNAUTHENTICATED"
    assert "audience" in str(err)


def test_forged_token_is_refused(crds: Cluster, orders: str) -> None:
    ca = generate_root("cluster.local", dt.datetime.now(dt.UTC))
    tok = token(crds, orders, "orders")
    head, body, _ = tok.split(".")
    forged = jwt.encode({"sub": f"system:serviceaccount:{orders}:orders"}, ec.generate_private_key(ec.SECP256R1()),
                        algorithm="ES256")
    err = refused(engine(crds, ca), f"{head}.{body}.{forged.split('.')[2]}",
                  csr_for(f"spiffe://cluster.local/ns/{orders}/sa/orders"))
    assert err.code == "UNAUTHENTICATED"


@pytest.mark.localcluster
def test_expired_token_is_refused(crds: Cluster, orders: str) -> None:
    """An expired token signed with the cluster's real ServiceAccount key (TokenRequest cannot mint one)."""
    sa_key = serialization.load_pem_private_key((Path(crds.kubeconfig).parent / "pki" / "sa.key").read_bytes(), None)
    real = jwt.decode(token(crds, orders, "orders"), options={"verify_signature": False})
    header = jwt.get_unverified_header(token(crds, orders, "orders"))
    now = int(time.time())
    expired = jwt.encode({**real, "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}, sa_key,  # type: ignore[arg-type]
                         algorithm="ES256", headers={"kid": header["kid"]})
    err = refused(engine(crds, generate_root("cluster.local", dt.datetime.now(dt.UTC))), expired,
                  csr_for(f"spiffe://cluster.local/ns/{orders}/sa/orders"))
    assert err.code == "UNAUTHENTICATED"
    assert "expired" in str(err)


def test_service_account_without_service_identity_is_refused(crds: Cluster, namespace: str) -> None:
    crds.kubectl("-n", namespace, "create", "serviceaccount", "batch")
    err = refused(engine(crds, generate_root("cluster.local", dt.datetime.now(dt.UTC))),
                  token(crds, namespace, "batch"), csr_for(f"spiffe://cluster.local/ns/{namespace}/sa/batch"))
    assert err.code == "PERMISSION_DENIED"
    assert f"no ServiceIdentity in namespace {namespace} admits ServiceAccount batch" in str(err)


def test_service_identity_in_another_namespace_does_not_count(crds: Cluster, namespace: str) -> None:
    other = crds.new_namespace()
    try:
        crds.kubectl("-n", namespace, "create", "serviceaccount", "orders")
        crds.apply(identity(other, "orders"))
        err = refused(engine(crds, generate_root("cluster.local", dt.datetime.now(dt.UTC))),
                      token(crds, namespace, "orders"), csr_for(f"spiffe://cluster.local/ns/{namespace}/sa/orders"))
        assert err.code == "PERMISSION_DENIED"
        # Nor may the workload ask for the other namespace's identity.
        crds.apply(identity(namespace, "orders"))
        err = refused(engine(crds, generate_root("cluster.local", dt.datetime.now(dt.UTC))),
                      token(crds, namespace, "orders"), csr_for(f"spiffe://cluster.local/ns/{other}/sa/orders"))
        assert err.code == "INVALID_ARGUMENT"
    finally:
        crds.kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_csr_for_another_identity_is_refused(crds: Cluster, orders: str) -> None:
    err = refused(engine(crds, generate_root("cluster.local", dt.datetime.now(dt.UTC))),
                  token(crds, orders, "orders"), csr_for(f"spiffe://cluster.local/ns/{orders}/sa/admin"))
    assert err.code == "INVALID_ARGUMENT"
    assert "must be exactly" in str(err)


def test_deleting_the_service_identity_stops_issuance(crds: Cluster, orders: str) -> None:
    e = engine(crds, generate_root("cluster.local", dt.datetime.now(dt.UTC)))
    tok, me = token(crds, orders, "orders"), f"spiffe://cluster.local/ns/{orders}/sa/orders"
    asyncio.run(e.sign(tok, csr_for(me)))
    crds.kubectl("-n", orders, "delete", "serviceidentity", "orders")
    assert refused(e, tok, csr_for(me)).code == "PERMISSION_DENIED"


def test_per_service_account_rate_limit(crds: Cluster, orders: str) -> None:
    """The bucket's clock is injected and stands still during the burst, so the machine's speed cannot refill it
    (on a loaded machine it once did, and no RESOURCE_EXHAUSTED came); then it moves half a second."""
    now = [1000.0]
    e = engine(crds, generate_root("cluster.local", dt.datetime.now(dt.UTC)), monotonic=lambda: now[0])
    tok, me = token(crds, orders, "orders"), f"spiffe://cluster.local/ns/{orders}/sa/orders"
    req = csr_for(me)

    async def burst(n: int) -> list[str]:
        codes = []
        for _ in range(n):
            try:
                await e.sign(tok, req)
                codes.append("OK")
            except IssuanceError as err:
                codes.append(err.code)
        return codes

    assert asyncio.run(burst(BURST + 5)) == ["OK"] * BURST + ["RESOURCE_EXHAUSTED"] * 5
    now[0] += 0.5  # RATE_PER_S tokens a second come back
    assert asyncio.run(burst(int(RATE_PER_S * 0.5) + 2)) == ["OK"] * int(RATE_PER_S * 0.5) + ["RESOURCE_EXHAUSTED"] * 2


def test_no_ca_yet_means_unavailable() -> None:
    e = IssuanceEngine(None, lambda: None, lambda: "", "cluster.local",  # type: ignore[arg-type]
                       lambda: dt.datetime.now(dt.UTC), random_serial(os.urandom), time.monotonic)
    err = refused(e, "t", b"")
    assert err.code == "UNAVAILABLE"


def test_signing_service_over_tls(crds: Cluster, orders: str) -> None:
    """The gRPC signing service: TLS with a mesh-CA serving certificate, token in metadata, statuses mapped."""
    import json

    import grpc

    from meshward.operator.domain.ca import issue_server_cert
    from meshward.operator.servers.signing import METHOD, serve
    from tests.support.procs import free_port

    ca = generate_root("cluster.local", dt.datetime.now(dt.UTC))
    key = ec.generate_private_key(ec.SECP256R1())
    server_cert = issue_server_cert(ca, key, ("meshward-identity.meshward-system.svc",), ("127.0.0.1",),
                                    dt.timedelta(hours=1), dt.datetime.now(dt.UTC), random_serial(os.urandom))
    port = free_port()
    me = f"spiffe://cluster.local/ns/{orders}/sa/orders"
    tok = token(crds, orders, "orders")

    async def main() -> list[object]:
        server = await serve(engine(crds, ca), f"127.0.0.1:{port}", server_cert.public_bytes(serialization.Encoding.PEM),
                             key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        out: list[object] = []
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem())
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as ch:
                sign = ch.unary_unary(METHOD, request_serializer=lambda v: json.dumps(v).encode(),
                                      response_deserializer=json.loads)
                out.append(await sign({"csr": csr_for(me).decode()}, metadata=(("authorization", f"Bearer {tok}"),)))
                for meta, body in ((("authorization", f"Bearer {tok}"),), {"csr": 7}), ((), {"csr": "x"}):
                    try:
                        await sign(body, metadata=meta)
                    except grpc.aio.AioRpcError as e:
                        out.append((e.code(), e.details()))
            untrusted = grpc.ssl_channel_credentials(root_certificates=generate_root(
                "cluster.local", dt.datetime.now(dt.UTC)).cert_pem())
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", untrusted) as ch:
                try:
                    await ch.unary_unary(METHOD, request_serializer=lambda v: json.dumps(v).encode())(
                        {"csr": "x"}, timeout=5)
                except grpc.aio.AioRpcError as e:
                    out.append(e.code())
        finally:
            await server.stop(None)
        return out

    ok, bad_request, no_token, untrusted_code = asyncio.run(main())
    assert isinstance(ok, dict) and ok["spiffeId"] == me
    x509.load_pem_x509_certificate(ok["certificateChain"].encode()).verify_directly_issued_by(ca.cert)
    assert bad_request == (grpc.StatusCode.INVALID_ARGUMENT, 'request must be {"csr": "<PEM>"}')
    assert no_token[0] == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[index]
    assert "projected token" in no_token[1]  # type: ignore[index]
    assert untrusted_code == grpc.StatusCode.UNAVAILABLE  # the client refuses a server it cannot verify
