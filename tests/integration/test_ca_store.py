"""The mesh CA Secret on a real API server: created once, kept across restarts, one CA under a race."""

from __future__ import annotations

import base64
import datetime as dt
import threading

import pytest

from meshward.operator.clients.kube import KubeClient
from meshward.operator.domain.ca import CertificateAuthority
from meshward.operator.engines.ca_store import SECRET_NAME, CaStoreError, load_or_create
from tests.kube import Cluster

pytestmark = pytest.mark.integration


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_restart_keeps_the_same_ca(cluster: Cluster, namespace: str) -> None:
    first = load_or_create(KubeClient.from_kubeconfig(str(cluster.kubeconfig)), namespace, "cluster.local", now)
    again = load_or_create(KubeClient.from_kubeconfig(str(cluster.kubeconfig)), namespace, "cluster.local", now)
    assert again.cert == first.cert
    data = cluster.get_json("-n", namespace, "secret", SECRET_NAME)["data"]
    assert base64.b64decode(data["tls.crt"]) == first.cert_pem()


def test_concurrent_operator_starts_leave_one_ca(cluster: Cluster, namespace: str) -> None:
    results: list[CertificateAuthority] = []
    barrier = threading.Barrier(6)

    def start() -> None:
        api = KubeClient.from_kubeconfig(str(cluster.kubeconfig))
        barrier.wait()
        results.append(load_or_create(api, namespace, "cluster.local", now))

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6
    assert len({r.cert.fingerprint(r.cert.signature_hash_algorithm) for r in results}) == 1  # type: ignore[arg-type]


def test_a_damaged_ca_secret_is_an_error_with_the_fix(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "create", "secret", "generic", SECRET_NAME, "--from-literal=tls.crt=junk")
    with pytest.raises(CaStoreError, match="does not hold a usable CA"):
        load_or_create(KubeClient.from_kubeconfig(str(cluster.kubeconfig)), namespace, "cluster.local", now)


def test_a_root_near_its_end_warns_and_starts_rotating_by_itself(cluster: Cluster, namespace: str) -> None:
    import asyncio
    import os

    from meshward.operator.domain.ca import generate_root, random_serial
    from meshward.operator.domain.rotation import CaState
    from meshward.operator.engines.ca_keeper import CaKeeper
    from meshward.operator.engines.ca_store import LABELS, encode

    api = KubeClient.from_kubeconfig(str(cluster.kubeconfig))
    old = CaState(generate_root("cluster.local", now(), lifetime=dt.timedelta(days=20)))
    api.create_secret(namespace, SECRET_NAME, encode(old), LABELS)
    keeper = CaKeeper(api, namespace, "cluster.local", now, random_serial(os.urandom), dt.timedelta(hours=1),
                      ("meshward-signer.x.svc",), ("127.0.0.1",))
    asyncio.run(keeper.load())
    warning = keeper.expiry_warning()
    assert warning is not None and "expires in 19 days" in warning and "meshward ca rotate" in warning
    step = asyncio.run(keeper.tick())
    assert step is not None and step.reason == "CaRotationStaged"
    stored = cluster.get_json("-n", namespace, "secret", SECRET_NAME)["data"]
    assert "next.crt" in stored and base64.b64decode(stored["tls.crt"]) == old.active.cert_pem()
