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
