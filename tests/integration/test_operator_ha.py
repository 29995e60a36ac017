"""Two operator replicas: one leads, the other takes over within 15 s of a crash, agents keep enforcing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kube import Cluster, opted_in_pod, service_identity, wait_until
from tests.support.procs import Agent, Operator

pytestmark = pytest.mark.integration
API = "meshward.io/v1alpha1"
FAILOVER_S = 15


def policy(ns: str, paths: list[str]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "AuthPolicy", "metadata": {"name": "ha", "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": "orders"}},
                     "rules": [{"name": "reads", "to": {"methods": ["GET"], "paths": paths}}]}}


@pytest.fixture
def replicas(crds: Cluster, tmp_path: Path) -> Iterator[tuple[Operator, Operator]]:
    ns = crds.new_namespace("mw")
    a = Operator(tmp_path, crds.kubeconfig, ns, "--status-interval", "1", name="operator-a").start()
    b = Operator(tmp_path, crds.kubeconfig, ns, "--status-interval", "1", name="operator-b").start(standby=True)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()
        crds.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_the_standby_takes_over_a_crashed_leader_and_no_update_is_lost(
        crds: Cluster, replicas: tuple[Operator, Operator], namespace: str, tmp_path: Path) -> None:
    a, b = replicas
    assert a.metric("meshward_operator_leader") == 1
    assert b.metric("meshward_operator_leader") == 0  # one active replica
    lease = crds.get_json("-n", a.namespace, "lease", "meshward-operator")
    assert lease["spec"]["holderIdentity"].endswith(str(a.proc.pid if a.proc else ""))
    crds.kubectl("-n", namespace, "create", "serviceaccount", "orders")
    crds.apply(service_identity(namespace, "orders"), opted_in_pod(namespace, "orders-1", "orders", app="orders"),
               policy(namespace, ["/orders/*"]))
    bundle = tmp_path / "bundle.crt"
    bundle.write_text(crds.trust_bundle(namespace))
    token = tmp_path / "token"
    token.write_text(crds.pod_token(namespace, "orders", "orders-1"))
    agent = Agent(tmp_path, None, name="orders-1", extra_args=a.agent_args(
        token, bundle, tmp_path / "sds.sock", "orders-1", replicas=(b,))).start()
    try:
        wait_until("the policy in force", lambda: agent.check("/admin") == 403, timeout=10)
        a.kill()
        crashed = time.monotonic()
        assert agent.check("/admin") == 403 and agent.check("/orders/1") == 200  # enforcing meanwhile
        b.wait_leading(timeout=FAILOVER_S)
        took = time.monotonic() - crashed
        assert took < FAILOVER_S, f"failover took {took:.1f} s"
        crds.apply(policy(namespace, ["/orders/*", "/admin"]))
        wait_until("the change enforced through the new leader", lambda: agent.check("/admin") == 200, timeout=15)
        assert agent.metric("meshward_policy_connected") == 1
    finally:
        agent.stop()
