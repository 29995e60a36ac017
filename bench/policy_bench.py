"""Policy plane benchmark: compiling 1,000 AuthPolicies for 200 workloads, and propagation to 200 subscribers.

1. Compile: validate 1,000 policies (what the operator does per apply) and compile the
   200 workloads' configs (what it does when everything changes at once); wall time and
   peak Python memory (tracemalloc).
2. Propagation: a local control plane, the real operator process, 200 opted-in pods and
   200 subscribers (the agent's subscription engine, tests/support/fleet.py). Each of
   `--changes` kubectl applies is timed until every subscriber enforces it. Baseline in
   the same run: the time until a plain API watch (kubernetes client) sees the same
   change, i.e. what any controller pays before it can react.

Prints p50/p99 and, last, `policy_propagation_p99_ms=<x>`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kubernetes import client, config, watch  # noqa: E402
from tests.kube import opted_in_pod, service_identity, throwaway_cluster, wait_until  # noqa: E402
from tests.support.fleet import Fleet, has_rule, percentile, pod_tokens, sign  # noqa: E402
from tests.support.procs import Operator  # noqa: E402

from meshward.operator.domain.compile import PolicyObject, Workload, compile_workload, validate  # noqa: E402

API = "meshward.io/v1alpha1"


def synthetic(namespaces: int, workloads: int, policies: int) -> tuple[list[Workload], list[PolicyObject]]:
    """Workloads spread over namespaces; each policy selects one app, with JWT, CEL and path rules."""
    ws = [Workload(f"ns-{i % namespaces}", f"pod-{i}", f"sa-{i}", {"app": f"app-{i}", "tier": "api"})
          for i in range(workloads)]
    ps = []
    for j in range(policies):
        w = ws[j % workloads]
        ps.append(PolicyObject(w.namespace, f"policy-{j}", 1, f"2026-01-01T00:00:{j % 60:02d}Z", {
            "selector": {"matchLabels": {"app": w.labels["app"]}},
            "jwt": [{"issuer": "https://idp.example.com", "audiences": [w.labels["app"]]}] if j % 2 else [],
            "rules": [
                {"name": "no-admin", "action": "Deny", "to": {"paths": ["/admin/**"]}},
                {"name": "reads", "from": {"principals": [f"spiffe://cluster.local/ns/{w.namespace}/sa/frontend"]},
                 "to": {"methods": ["GET"], "paths": [f"/{j}/*", "/v*/items/**"]},
                 **({"when": ["'read' in claims.scope.split(' ')"]} if j % 2 else {})},
            ]}))
    for p in ps:
        if not p.spec["jwt"]:
            del p.spec["jwt"]
    return ws, ps


def bench_compile(workloads: int, policies: int) -> None:
    ws, ps = synthetic(20, workloads, policies)
    tracemalloc.start()
    t0 = time.perf_counter()
    for p in ps:
        validate(p)
    t1 = time.perf_counter()
    now = dt.datetime.now(dt.UTC)
    docs = [compile_workload(w, ps, [], now) for w in ws]
    t2 = time.perf_counter()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per = sum(len(c.policies) for c in docs) / len(docs)
    print(f"validated {policies} policies in {t1 - t0:.2f} s ({(t1 - t0) / policies * 1000:.2f} ms each); "
          f"compiled {workloads} workloads ({per:.0f} policies each) in {t2 - t1:.2f} s; "
          f"peak Python memory {peak / 2**20:.1f} MiB")
    print(f"compile_1000_policies_s={t1 - t0 + t2 - t1:.2f} compile_peak_mib={peak / 2**20:.1f}")


def policy(ns: str, rule: str) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "AuthPolicy", "metadata": {"name": "bench", "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": "bench"}},
                     "rules": [{"name": rule, "to": {"paths": ["/orders/*"]}}]}}


def bench_propagation(subscribers: int, changes: int) -> float:
    lat: list[float] = []
    base: list[float] = []
    with throwaway_cluster() as cluster:
        for n in ("meshward-system", "bench"):
            cluster.kubectl("create", "namespace", n)
        operator = Operator(cluster.kubeconfig.parent, cluster.kubeconfig, "meshward-system",
                            "--status-interval", "5").start()
        fleet = None
        try:
            cluster.kubectl("-n", "bench", "create", "serviceaccount", "bench")
            pods = [f"bench-{i}" for i in range(subscribers)]
            cluster.apply(service_identity("bench", "bench"),
                          *[opted_in_pod("bench", p, "bench", app="bench") for p in pods])
            bundle = cluster.trust_bundle("bench")
            tokens = pod_tokens(str(cluster.kubeconfig), "bench", "bench", pods)
            name = "meshward-signer.meshward-system.svc"
            creds = asyncio.run(sign(f"127.0.0.1:{operator.signer_port}", name, bundle.encode(), tokens[pods[0]],
                                     "spiffe://cluster.local/ns/bench/sa/bench"))
            fleet = Fleet(f"127.0.0.1:{operator.policy_port}", name, pods, creds, tokens)
            f = fleet
            wait_until("every subscriber synced", lambda: all(s.synced for s in f.subs), timeout=60)

            # Baseline: a plain watch on AuthPolicies in this process.
            seen: dict[str, float] = {}
            api = client.CustomObjectsApi(config.new_client_from_config(str(cluster.kubeconfig)))
            w = watch.Watch()

            def watcher() -> None:
                try:
                    for ev in w.stream(api.list_namespaced_custom_object, "meshward.io", "v1alpha1", "bench",
                                       "authpolicies"):
                        for r in ev["object"]["spec"].get("rules", []):
                            seen.setdefault(r["name"], time.monotonic())
                except Exception:  # the cluster goes away at the end of the run
                    return

            threading.Thread(target=watcher, daemon=True).start()
            time.sleep(1)  # let the watch start before the first change
            for i in range(changes):
                rule = f"change-{i}"
                marker = has_rule(rule)
                start = time.monotonic()
                cluster.apply(policy("bench", rule))
                wait_until(f"{rule} at every subscriber", functools.partial(f.all_applied, marker), timeout=30,
                           interval=0.005)
                lat += [t - start for p in f.applied if (t := f.first_time(p, marker)) is not None]
                base.append(seen.get(rule, float("nan")) - start)
                time.sleep(0.2)
            w.stop()
        finally:
            if fleet is not None:
                fleet.close()
            operator.stop()
    p50, p99 = percentile(lat, 0.5) * 1000, percentile(lat, 0.99) * 1000
    b50 = percentile(base, 0.5) * 1000
    print(f"{changes} applies x {subscribers} subscribers: p50_ms={p50:.1f} p99_ms={p99:.1f}; baseline (plain API "
          f"watch sees the change) p50_ms={b50:.1f}; ratio p50/baseline={p50 / b50:.1f}")
    print(f"policy_propagation_p99_ms={p99:.1f}")
    return p99


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", type=int, default=200)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--subscribers", type=int, default=200)
    ap.add_argument("--changes", type=int, default=10)
    args = ap.parse_args()
    bench_compile(args.workloads, args.policies)
    bench_propagation(args.subscribers, args.changes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
