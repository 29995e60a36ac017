"""Propagation to 50 subscribers: every applied version reaches every one of them, none lost in a burst.

Subscribers are 50 real subscription engines with their own agents in this process
(tests/support/fleet.py); the operator and the API server are real. The latencies are
recorded as test properties (`policy_propagation_p50_ms`/`p99_ms`); the speed target
itself is measured by `make bench` (bench/policy_bench.py), not asserted here.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kube import Cluster, opted_in_pod, service_identity, wait_until
from tests.support.fleet import Fleet, has_rule, percentile, pod_tokens, sign
from tests.support.procs import Operator

pytestmark = pytest.mark.integration
API = "meshward.io/v1alpha1"
N = 50


def policy(ns: str, rule: str) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "AuthPolicy", "metadata": {"name": "fleet", "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": "fleet"}},
                     "rules": [{"name": rule, "to": {"paths": ["/orders/*"]}}]}}


@pytest.fixture(scope="module")
def fleet(crds: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str, Fleet]]:
    wd = tmp_path_factory.mktemp("fleet")
    op_ns, ns = crds.new_namespace("mw"), crds.new_namespace("fleet")
    operator = Operator(wd, crds.kubeconfig, op_ns, "--status-interval", "2").start()
    crds.kubectl("-n", ns, "create", "serviceaccount", "fleet")
    pods = [f"fleet-{i}" for i in range(N)]
    crds.apply(service_identity(ns, "fleet"), *[opted_in_pod(ns, p, "fleet", app="fleet") for p in pods])
    bundle = crds.trust_bundle(ns)
    tokens = pod_tokens(str(crds.kubeconfig), ns, "fleet", pods)
    name = f"meshward-signer.{op_ns}.svc"
    creds = asyncio.run(sign(f"127.0.0.1:{operator.signer_port}", name, bundle.encode(), tokens[pods[0]],
                             f"spiffe://cluster.local/ns/{ns}/sa/fleet"))
    f = Fleet(f"127.0.0.1:{operator.policy_port}", name, pods, creds, tokens)
    try:
        yield crds, ns, f
    finally:
        f.close()
        operator.stop()
        for n in (ns, op_ns):
            crds.kubectl("delete", "namespace", n, "--wait=false", check=False)


def test_every_version_reaches_all_50_subscribers(fleet: tuple[Cluster, str, Fleet],
                                                  record_property: Any) -> None:
    cluster, ns, f = fleet
    wait_until("all subscribed", lambda: all(s.synced for s in f.subs), timeout=30)
    latencies: list[float] = []
    for i in range(5):
        rule = f"version-{i}"
        start = time.monotonic()
        cluster.apply(policy(ns, rule))
        marker = has_rule(rule)
        wait_until(f"{rule} applied by all {N}", functools.partial(f.all_applied, marker), timeout=30)
        latencies += [t - start for p in f.applied if (t := f.first_time(p, marker)) is not None]
    assert len(latencies) == 5 * N
    record_property("policy_propagation_p50_ms", round(percentile(latencies, 0.5) * 1000, 1))
    record_property("policy_propagation_p99_ms", round(percentile(latencies, 0.99) * 1000, 1))
    print(f"policy_propagation_p50_ms={percentile(latencies, 0.5) * 1000:.1f} "
          f"policy_propagation_p99_ms={percentile(latencies, 0.99) * 1000:.1f}")


def test_a_burst_of_applies_ends_with_every_subscriber_on_the_last(fleet: tuple[Cluster, str, Fleet]) -> None:
    cluster, ns, f = fleet
    for i in range(10):
        cluster.apply(policy(ns, f"burst-{i}"))
    last = has_rule("burst-9")
    wait_until("the last version everywhere", lambda: all(
        f.applied[p] and last(f.applied[p][-1][1]) for p in f.applied), timeout=30)
