"""Policy plane at mesh scale: 2,000 subscribed sidecars, 1,000 AuthPolicies in 40 namespaces, one change at a time.

Istio publishes its control plane at a 2,000-sidecar mesh (istiod: 1 vCPU, 1.5 GB). Here, on one machine:
a local control plane, the real operator process, 2,000 opted-in pods (50 in each of 40 namespaces, 5 apps
of 10 pods each) and 2,000 subscribers (the agent's subscription engine and config loader, each with its
own pod-bound token and its namespace's workload certificate; tests/support/fleet.py). Each of `--changes`
applies modifies one AuthPolicy and is timed until every subscriber it selects enforces it.

Printed: propagation p50/p99 to every affected subscriber, the baseline of a plain API watch seeing the same
change (what any controller pays before it can react), the operator's CPU seconds per change and the workload
configs it compiled per change (work follows what a change affects, not the mesh), and the operator's RSS.
Last lines: `policy_propagation_p99_ms_2000=<x>` and `operator_rss_mb_2000=<x>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kubernetes import client, config, watch  # noqa: E402
from tests.kube import Cluster, opted_in_pod, service_identity, throwaway_cluster, wait_until  # noqa: E402
from tests.support.fleet import Fleet, has_rule, percentile, pod_tokens, sign  # noqa: E402
from tests.support.procs import Operator  # noqa: E402

API = "meshward.io/v1alpha1"
APPS = 5


def policy(ns: str, n: int, marker: str = "") -> dict[str, Any]:
    """The n-th policy of a namespace: it selects app-(n % APPS), with a deny, an allow and a CEL condition."""
    rules: list[dict[str, Any]] = [
        {"name": "no-admin", "action": "Deny", "to": {"paths": ["/admin/**"]}},
        {"name": "reads", "from": {"namespaces": [ns]}, "to": {"methods": ["GET"], "paths": [f"/{n}/*"]},
         "when": ["request.method == 'GET'"]}]
    if marker:
        rules.append({"name": marker, "to": {"paths": ["/marker"]}})
    return {"apiVersion": API, "kind": "AuthPolicy", "metadata": {"name": f"policy-{n}", "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": f"app-{n % APPS}"}}, "rules": rules}}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def setup(cluster: Cluster, operator: Operator, namespaces: int, pods_per_ns: int, policies: int
          ) -> tuple[Fleet, dict[str, list[str]]]:
    """Namespaces, pods, policies and the subscribed fleet; returns it and each app's pods by `ns/app`."""
    names = [f"mesh-{i:02d}" for i in range(namespaces)]
    docs: list[dict[str, Any]] = []
    by_app: dict[str, list[str]] = {}
    pods: list[str] = []
    owner: dict[str, str] = {}
    for ns in names:
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl("-n", ns, "create", "serviceaccount", "bench")
        docs.append(service_identity(ns, "bench"))
        for i in range(pods_per_ns):
            pod = f"{ns}-w{i}"
            docs.append(opted_in_pod(ns, pod, "bench", app=f"app-{i % APPS}"))
            by_app.setdefault(f"{ns}/app-{i % APPS}", []).append(pod)
            pods.append(pod)
            owner[pod] = ns
    per_ns = policies // namespaces
    docs += [policy(ns, n) for ns in names for n in range(per_ns)]
    for start in range(0, len(docs), 500):
        cluster.apply(*docs[start:start + 500])
    name = f"meshward-signer.{operator.namespace}.svc"
    tokens: dict[str, str] = {}
    for ns in names:
        tokens |= pod_tokens(str(cluster.kubeconfig), ns, "bench", [p for p in pods if owner[p] == ns])
    creds = {}
    for ns in names:
        bundle = cluster.trust_bundle(ns, timeout=120)
        token = tokens[next(p for p in pods if owner[p] == ns)]  # the signer wants a pod-bound token
        creds[ns] = asyncio.run(sign(f"127.0.0.1:{operator.signer_port}", name, bundle.encode(), token,
                                     f"spiffe://cluster.local/ns/{ns}/sa/bench"))
    fleet = Fleet(f"127.0.0.1:{operator.policy_port}", name, pods, {p: creds[owner[p]] for p in pods}, tokens)
    wait_until("every subscriber synced", lambda: all(s.synced for s in fleet.subs), timeout=600, interval=1)
    return fleet, by_app


def run(namespaces: int, pods_per_ns: int, policies: int, changes: int, keep_log: Path | None = None
        ) -> tuple[float, float]:
    lat: list[float] = []
    base: list[float] = []
    cpu: list[float] = []
    compiled: list[float] = []
    with throwaway_cluster() as cluster:
        cluster.kubectl("create", "namespace", "meshward-system")
        operator = Operator(cluster.kubeconfig.parent, cluster.kubeconfig, "meshward-system",
                            "--status-interval", "10").start()
        assert operator.proc is not None
        pid = operator.proc.pid
        fleet = None
        try:
            t0 = time.monotonic()
            fleet, by_app = setup(cluster, operator, namespaces, pods_per_ns, policies)
            subscribed = len(fleet.subs)
            print(f"{subscribed} subscribers synced, {policies} AuthPolicies in {namespaces} namespaces, set up in "
                  f"{time.monotonic() - t0:.0f} s; operator RSS {rss_mb(pid):.0f} MB", flush=True)
            seen: dict[str, float] = {}
            api = client.CustomObjectsApi(config.new_client_from_config(str(cluster.kubeconfig)))
            w = watch.Watch()

            def watcher() -> None:
                try:
                    for ev in w.stream(api.list_cluster_custom_object, "meshward.io", "v1alpha1", "authpolicies"):
                        for r in ev["object"]["spec"].get("rules", []):
                            seen.setdefault(r["name"], time.monotonic())
                except Exception:  # the cluster goes away at the end of the run
                    return

            threading.Thread(target=watcher, daemon=True).start()
            time.sleep(2)  # the watch's initial list of 1,000 policies passes before the first change
            per_ns = policies // namespaces
            for i in range(changes):
                ns, n = f"mesh-{(i * 7) % namespaces:02d}", (i * 3) % per_ns
                rule = f"change-{i}"
                affected = by_app[f"{ns}/app-{n % APPS}"]
                marker = has_rule(rule)
                compiles_before = operator.metric("meshward_policy_workload_compiles_total")
                cpu_before = cpu_seconds(pid)
                start = time.monotonic()
                cluster.apply(policy(ns, n, rule))
                wait_until(f"{rule} at its {len(affected)} subscribers",
                           lambda a=affected, m=marker: all(fleet.first_time(p, m) is not None for p in a),
                           timeout=60, interval=0.005)
                lat += [t - start for p in affected if (t := fleet.first_time(p, marker)) is not None]
                base.append(seen.get(rule, float("nan")) - start)
                time.sleep(1.0)  # let status writes for the change land before measuring its CPU
                cpu.append(cpu_seconds(pid) - cpu_before)
                compiled.append(operator.metric("meshward_policy_workload_compiles_total") - compiles_before)
            w.stop()
            rss = rss_mb(pid)
        finally:
            if fleet is not None:
                fleet.close()
            operator.stop()
            if keep_log is not None:
                keep_log.write_bytes(operator.log.read_bytes())
    p50, p99 = percentile(lat, 0.5) * 1000, percentile(lat, 0.99) * 1000
    b50 = percentile(base, 0.5) * 1000
    print(f"{changes} changes, each to the {len(lat) // changes} subscribers it selects of "
          f"{namespaces * pods_per_ns}: p50_ms={p50:.1f} p99_ms={p99:.1f}; baseline (plain API watch sees the "
          f"change) p50_ms={b50:.1f}; ratio p50/baseline={p50 / b50:.1f}")
    print(f"operator per change: {sum(cpu) / len(cpu):.3f} CPU s (including the 1 s after it: status, acks), "
          f"{sum(compiled) / len(compiled):.0f} workload configs compiled (of {namespaces * pods_per_ns}); "
          f"RSS {rss:.0f} MB")
    print(f"policy_propagation_p99_ms_2000={p99:.1f}")
    print(f"operator_rss_mb_2000={rss:.0f}")
    return p99, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--namespaces", type=int, default=40)
    ap.add_argument("--pods-per-namespace", type=int, default=50)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--operator-log", type=Path, help="keep the operator's log here")
    args = ap.parse_args()
    run(args.namespaces, args.pods_per_namespace, args.policies, args.changes, args.operator_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
