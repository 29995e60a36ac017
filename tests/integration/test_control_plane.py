"""The local control plane is a real one: TokenRequest/TokenReview and controllers work."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.kube import Cluster, wait_until

pytestmark = pytest.mark.integration


def token_review(cluster: Cluster, token: str, audiences: list[str]) -> dict[str, Any]:
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
              "spec": {"token": token, "audiences": audiences}}
    out = cluster.kubectl("create", "-f", "-", "-o", "json", stdin=json.dumps(review)).stdout
    status: dict[str, Any] = json.loads(out)["status"]
    return status


def test_server_reports_kubernetes_1_34(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert (version["major"], version["minor"].rstrip("+")) == ("1", "34") or cluster.flavour != "local"
    assert version["gitVersion"].startswith("v1.")


def test_token_request_and_token_review_accept_a_bound_token(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "create", "serviceaccount", "orders")
    token = cluster.kubectl("-n", namespace, "create", "token", "orders", "--audience", "meshward",
                            "--duration", "10m").stdout.strip()
    status = token_review(cluster, token, ["meshward"])
    assert status["authenticated"] is True
    assert status["user"]["username"] == f"system:serviceaccount:{namespace}:orders"
    assert status["audiences"] == ["meshward"]


def test_token_review_rejects_a_token_for_another_audience(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "create", "serviceaccount", "orders")
    token = cluster.kubectl("-n", namespace, "create", "token", "orders", "--audience", "not-meshward",
                            ).stdout.strip()
    status = token_review(cluster, token, ["meshward"])
    assert status.get("authenticated") is not True
    assert "audience" in status.get("error", "")


def test_token_review_rejects_a_tampered_signature(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "create", "serviceaccount", "orders")
    token = cluster.kubectl("-n", namespace, "create", "token", "orders", "--audience", "meshward"
                            ).stdout.strip()
    head, payload, sig = token.split(".")
    forged = f"{head}.{payload}.{sig[:-4]}{'AAAA' if not sig.endswith('AAAA') else 'BBBB'}"
    assert token_review(cluster, forged, ["meshward"]).get("authenticated") is not True


def test_deployment_gets_a_replicaset_and_pending_pods(cluster: Cluster, namespace: str) -> None:
    """Controller-manager runs; no kubelet runs, so pods are created but stay Pending unscheduled."""
    cluster.kubectl("-n", namespace, "create", "deployment", "web", "--image=registry.invalid/web:1",
                    "--replicas=2")
    rs = wait_until("a ReplicaSet owned by the Deployment", lambda: [
        r for r in cluster.get_json("-n", namespace, "replicasets")["items"]
        if r["metadata"].get("ownerReferences", [{}])[0].get("name") == "web"])
    pods = wait_until("2 pods owned by the ReplicaSet", lambda: (lambda items: items if len(items) == 2
                      else None)([p for p in cluster.get_json("-n", namespace, "pods")["items"]
                                  if p["metadata"]["ownerReferences"][0]["name"] == rs[0]["metadata"]["name"]]))
    for pod in pods:
        assert pod["status"].get("phase") == "Pending"
        if cluster.flavour == "local":
            assert not pod["spec"].get("nodeName")
