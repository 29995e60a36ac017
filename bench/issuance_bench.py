"""Certificate issuance benchmark: CSRs signed per second through the TLS signing service,
each with a fresh ServiceAccount token, so every request pays a real TokenReview against
the local kube-apiserver (started here from the hack/ binaries).

Prints the rate, p50/p99 latency and, last, `csr_per_second=<x>`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from kubernetes import client  # noqa: E402
from tests.kube import throwaway_cluster  # noqa: E402
from tests.support.pki import spiffe_csr  # noqa: E402
from tests.support.procs import free_port  # noqa: E402

from meshward.operator.clients.kube import KubeClient  # noqa: E402
from meshward.operator.domain.ca import generate_root, issue_server_cert, random_serial  # noqa: E402
from meshward.operator.engines.issuance import IssuanceEngine  # noqa: E402
from meshward.operator.servers.signing import METHOD, serve  # noqa: E402


async def run(kubeconfig: str, requests: int, concurrency: int, accounts: int) -> list[float]:
    kube = KubeClient.from_kubeconfig(kubeconfig)
    api_client = kube._auth.api_client
    core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
    ns = "bench"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    jobs: list[tuple[str, str]] = []
    per_account = -(-requests // accounts)
    for n in range(accounts):
        sa = f"w{n}"
        core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=sa)))
        custom.create_namespaced_custom_object("meshward.io", "v1alpha1", ns, "serviceidentities", {
            "apiVersion": "meshward.io/v1alpha1", "kind": "ServiceIdentity", "metadata": {"name": sa},
            "spec": {"serviceAccountName": sa}})
        request = spiffe_csr(f"spiffe://cluster.local/ns/{ns}/sa/{sa}").decode()
        # The signer wants a token bound to a pod of the ServiceAccount, as kubelet projects it.
        pod = core.create_namespaced_pod(ns, client.V1Pod(
            metadata=client.V1ObjectMeta(name=f"{sa}-pod"), spec=client.V1PodSpec(
                service_account_name=sa, containers=[client.V1Container(name="app", image="registry.invalid/app:1")])))
        bound = client.V1BoundObjectReference(kind="Pod", api_version="v1", name=pod.metadata.name,
                                              uid=pod.metadata.uid)
        for _ in range(per_account):
            tr = core.create_namespaced_service_account_token(sa, ns, client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=["meshward"], expiration_seconds=3600,
                                               bound_object_ref=bound)))
            jobs.append((tr.status.token, request))
    jobs = jobs[:requests]
    ca = generate_root("cluster.local", dt.datetime.now(dt.UTC))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_server_cert(ca, key, ("meshward-identity",), ("127.0.0.1",), dt.timedelta(hours=1),
                             dt.datetime.now(dt.UTC), random_serial(os.urandom))
    engine = IssuanceEngine(kube, lambda: ca, lambda: ca.cert_pem().decode(), "cluster.local",
                            lambda: dt.datetime.now(dt.UTC), random_serial(os.urandom), time.monotonic)
    port = free_port()
    server = await serve(engine, f"127.0.0.1:{port}", cert.public_bytes(serialization.Encoding.PEM),
                         key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}",
                                       grpc.ssl_channel_credentials(root_certificates=ca.cert_pem())) as ch:
        sign = ch.unary_unary(METHOD, request_serializer=lambda v: json.dumps(v).encode(),
                              response_deserializer=json.loads)

        async def one(token: str, request: str) -> None:
            async with sem:
                t0 = time.perf_counter()
                await sign({"csr": request}, metadata=(("authorization", f"Bearer {token}"),))
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(one(t, r) for t, r in jobs))
        elapsed = time.perf_counter() - start
    await server.stop(None)
    latencies.append(elapsed)  # last element: the wall time
    return latencies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--accounts", type=int, default=50, help="ServiceAccounts (each has its own rate limit)")
    args = ap.parse_args()
    with throwaway_cluster() as cluster:
        lat = asyncio.run(run(str(cluster.kubeconfig), args.requests, args.concurrency, args.accounts))
    wall, lat = lat[-1], sorted(lat[:-1])
    rate = len(lat) / wall
    print(f"signed {len(lat)} CSRs in {wall:.2f} s with {args.concurrency} concurrent clients, "
          f"each with a fresh token (TokenReview every time)")
    print(f"p50_ms={statistics.median(lat) * 1000:.1f} p99_ms={lat[int(len(lat) * 0.99) - 1] * 1000:.1f}")
    print(f"csr_per_second={rate:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
