"""One pod-to-pod hop through the mesh, on a kind cluster: the same client and server with and without it.

Meshed: the client's Envoy (outbound capture, mTLS originated for the server's SPIFFE ID), then the server's
Envoy (inbound capture, mTLS terminated, HTTP ext_authz to its agent on a Unix socket: an end-user JWT checked
from the agent's token cache, a rule on the caller's SPIFFE ID), then the app. Baseline, measured in the same
run: the same two pods without the mesh. The app is Envoy answering directly (a C++ server, so the app never
bounds the comparison); the load comes from wrk in the client pod.

Printed: requests per second for both (wrk, 16 connections, `--seconds`), the ratio; latency at a fixed
moderate rate (`--rate` requests per second on one keep-alive connection, timed in the client pod) as
p50/p90/p99 for both and what the mesh adds; the sidecars' CPU during the throughput run (all four: both
Envoys, both agents) as vCPU per 1,000 rps, and their memory. Everything shares this machine's cores (kind
runs one node here): read the numbers as this machine's, next to the baseline of the same run.
Last lines: `mesh_hop_rps_ratio=<x>`, `mesh_hop_p90_added_ms=<x>` and `mesh_sidecar_vcpu_per_1000rps=<x>`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jwt  # noqa: E402
from tests.e2e.conftest import envoy_admin, installed  # noqa: E402
from tests.kube import Cluster, kind_session_for, service_identity  # noqa: E402
from tests.support.idp import SigningKey  # noqa: E402

ISSUER = "https://idp.meshward.test"
SIDECARS = ("meshward-proxy", "meshward-agent")
# Sequential requests at a fixed pace on one keep-alive connection, each timed: what one caller sees.
LATENCY = r"""
import http.client, json, sys, time
host, rate, seconds, token = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
conn, samples, errors = http.client.HTTPConnection(host, 80, timeout=5), [], 0
headers = {"authorization": "Bearer " + token}
start = time.monotonic()
for n in range(int(rate * seconds)):
    due = start + n / rate
    pause = due - time.monotonic()
    if pause > 0:
        time.sleep(pause)  # the fixed pace
    t0 = time.perf_counter()
    try:
        conn.request("GET", "/latency", headers=headers)
        r = conn.getresponse(); r.read()
        if r.status != 200: errors += 1
    except Exception:
        errors += 1; conn.close(); conn = http.client.HTTPConnection(host, 80, timeout=5)
    samples.append((time.perf_counter() - t0) * 1000)
print(json.dumps({"samples": samples, "errors": errors}))
"""


def app_bootstrap(port: int = 8080) -> dict[str, Any]:
    """The app's Envoy bootstrap: one listener on `port`, 200 `ok` to everything."""
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": "app",
           "route_config": {"virtual_hosts": [{"name": "app", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {"static_resources": {"listeners": [{
        "name": "app", "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}]}]}}


def app_manifests(ns: str, name: str, image: str, labels: dict[str, str], service_account: str,
                  bootstrap: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The app: a ConfigMap with its bootstrap (default `app_bootstrap()`), a Deployment running Envoy from `image`,
    and a Service."""
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-envoy", "namespace": ns},
         "data": {"envoy.json": json.dumps(bootstrap or app_bootstrap())}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
         "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
             "metadata": {"labels": {"app": name, **labels}},
             "spec": {"serviceAccountName": service_account,
                      "volumes": [{"name": "cfg", "configMap": {"name": f"{name}-envoy"}}],
                      "containers": [{"name": "app", "image": image, "imagePullPolicy": "Never",
                                      "command": ["envoy", "-c", "/cfg/envoy.json", "--concurrency", "1",
                                                  "--log-level", "error", "--disable-hot-restart"],
                                      "ports": [{"containerPort": 8080}],
                                      "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
         "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}},
    ]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def workloads(ns: str, echo: str, meshward: str, meshed: bool, key: SigningKey) -> list[dict[str, Any]]:
    """The server (Envoy answering directly) and the client (wrk, python) of one side, with the server's policy."""
    side = "mesh" if meshed else "plain"
    labels: dict[str, str] = {"meshward.io/inject": "enabled"} if meshed else {}
    docs: list[dict[str, Any]] = [
        *app_manifests(ns, f"server-{side}", meshward, labels, "server"),
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": f"client-{side}", "namespace": ns},
         "spec": {"selector": {"matchLabels": {"app": f"client-{side}"}}, "template": {
             "metadata": {"labels": {"app": f"client-{side}", **labels}},
             "spec": {"serviceAccountName": "client", "containers": [
                 {"name": "app", "image": echo, "imagePullPolicy": "Never", "command": ["sleep", "infinity"]}]}}}},
    ]
    if meshed:
        docs.append({"apiVersion": "meshward.io/v1alpha1", "kind": "AuthPolicy",
                     "metadata": {"name": "server", "namespace": ns},
                     "spec": {"selector": {"matchLabels": {"app": "server-mesh"}},
                              "jwt": [{"issuer": ISSUER, "audiences": ["bench"], "algorithms": ["ES256"],
                                       "jwks": json.dumps({"keys": [key.jwk]})}],
                              "rules": [{"name": "client", "from": {"principals": [
                                  f"spiffe://cluster.local/ns/{ns}/sa/client"]}, "to": {"methods": ["GET"]}}]}})
    return docs


def pod_of(c: Cluster, ns: str, app: str) -> str:
    name: str = c.get_json("-n", ns, "pods", "-l", f"app={app}")["items"][0]["metadata"]["name"]
    return name


def wrk(c: Cluster, ns: str, side: str, token: str, seconds: int) -> float:
    out = c.kubectl("-n", ns, "exec", pod_of(c, ns, f"client-{side}"), "-c", "app", "--", "wrk", "-t", "2", "-c",
                    "16", "-d", f"{seconds}s", "-H", f"authorization: Bearer {token}", f"http://server-{side}/",
                    timeout=seconds + 60).stdout
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non_2xx:
        raise SystemExit(f"{side}: {non_2xx.group(1)} requests failed:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise SystemExit(f"no wrk result for {side}:\n{out}")
    return float(match.group(1))


def latency(c: Cluster, ns: str, side: str, token: str, rate: float, seconds: float) -> list[float]:
    out = c.kubectl("-n", ns, "exec", pod_of(c, ns, f"client-{side}"), "-c", "app", "--", "python3", "-c", LATENCY,
                    f"server-{side}", str(rate), str(seconds), token, timeout=seconds + 60).stdout
    doc = json.loads(out)
    if doc["errors"]:
        raise SystemExit(f"{side}: {doc['errors']} requests failed in the latency run")
    samples: list[float] = doc["samples"][int(rate):]  # the first second warms connections and caches
    return samples


PROC = "import json; s=open('/proc/1/stat').read().rsplit(')',1)[1].split(); " \
       "m=[l for l in open('/proc/1/status') if l.startswith('VmRSS:')][0].split()[1]; " \
       "print(json.dumps({'cpu': (int(s[11])+int(s[12]))/100, 'rss_mb': int(m)/1024}))"


def sidecar_usage(c: Cluster, ns: str) -> dict[str, dict[str, float]]:
    """CPU seconds and RSS of every sidecar's main process (PID 1 of its container) on both meshed pods."""
    out = {}
    for app in ("client-mesh", "server-mesh"):
        pod = pod_of(c, ns, app)
        for container in SIDECARS:
            text = c.kubectl("-n", ns, "exec", pod, "-c", container, "--", "python3", "-c", PROC).stdout
            out[f"{app}/{container}"] = json.loads(text)
    return out


# Upstream requests and connections of the outbound (mesh) clusters.
STATS = "/stats?filter=" + urllib.parse.quote("^cluster[.]outbound[|].*upstream_(cx|rq)_total$")


def outbound_reuse(c: Cluster, ns: str) -> tuple[int, int]:
    """Requests and connections the client's Envoy sent upstream to meshed destinations (its admin stats)."""
    text = envoy_admin(c, ns, pod_of(c, ns, "client-mesh"), STATS)
    totals = {"rq": 0, "cx": 0}
    for match in re.finditer(r"upstream_(cx|rq)_total: (\d+)", text):
        totals[match.group(1)] += int(match.group(2))
    return totals["rq"], totals["cx"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=20, help="each throughput run")
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second of the latency runs")
    ap.add_argument("--latency-seconds", type=float, default=20.0)
    args = ap.parse_args()
    key = SigningKey("ES256")
    now = int(time.time())
    token = jwt.encode({"iss": ISSUER, "aud": "bench", "sub": "alice", "iat": now, "exp": now + 3600},
                       key.private, algorithm="ES256", headers={"kid": key.kid})
    with kind_session_for(None, lambda: False) as session, installed(session) as release:
        c = session.cluster
        ns = c.new_namespace("bench")
        for sa in ("server", "client"):
            c.kubectl("-n", ns, "create", "serviceaccount", sa)
        c.apply(service_identity(ns, "server"), service_identity(ns, "client"))
        c.trust_bundle(ns, timeout=60)
        echo = session.images["echo"]
        docs = workloads(ns, echo, release.image, True, key)
        docs += workloads(ns, echo, release.image, False, key)
        c.apply(*docs)
        for d in docs:
            if d["kind"] == "Deployment":
                c.kubectl("-n", ns, "rollout", "status", f"deployment/{d['metadata']['name']}", "--timeout=180s",
                          timeout=200)
        results: dict[str, Any] = {}
        for side in ("plain", "mesh"):
            wrk(c, ns, side, token, 3)  # warm-up: connections, caches, Envoy's first config
        before = sidecar_usage(c, ns)
        results["mesh_rps"] = wrk(c, ns, "mesh", token, args.seconds)
        after = sidecar_usage(c, ns)
        requests, connections = outbound_reuse(c, ns)
        results["plain_rps"] = wrk(c, ns, "plain", token, args.seconds)
        cpu = sum(after[k]["cpu"] - before[k]["cpu"] for k in after) / args.seconds
        for side in ("plain", "mesh"):
            results[f"{side}_latency"] = latency(c, ns, side, token, args.rate, args.latency_seconds)
        ratio = results["mesh_rps"] / results["plain_rps"]
        print(f"throughput (wrk, 16 connections, {args.seconds} s): without the mesh {results['plain_rps']:.0f} "
              f"rps, through the mesh {results['mesh_rps']:.0f} rps")
        print(f"latency at {args.rate:g} rps (ms)      p50     p90     p99")
        for side in ("plain", "mesh"):
            lat = results[f"{side}_latency"]
            print(f"  {'without the mesh' if side == 'plain' else 'through the mesh':16}  "
                  f"{percentile(lat, 50):6.2f}  {percentile(lat, 90):6.2f}  {percentile(lat, 99):6.2f}")
        added = {p: percentile(results["mesh_latency"], p) - percentile(results["plain_latency"], p)
                 for p in (50, 90, 99)}
        print(f"  added by the hop  {added[50]:6.2f}  {added[90]:6.2f}  {added[99]:6.2f}")
        print(f"sidecar CPU during the mesh run: {cpu:.2f} vCPU for {results['mesh_rps']:.0f} rps (both Envoys and "
              "both agents)")
        print(f"the client's Envoy sent {requests} requests upstream over {connections} mTLS connections")
        for name, usage in after.items():
            print(f"  {name:35} {(usage['cpu'] - before[name]['cpu']) / args.seconds:5.2f} vCPU  "
                  f"{usage['rss_mb']:6.1f} MB RSS")
        print(f"mesh_hop_rps_ratio={ratio:.2f}")
        print(f"mesh_hop_p90_added_ms={added[90]:.2f}")
        print(f"mesh_sidecar_vcpu_per_1000rps={cpu / (results['mesh_rps'] / 1000):.3f}")
        c.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
