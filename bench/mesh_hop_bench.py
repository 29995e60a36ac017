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
Its last lines: `mesh_hop_rps_ratio=<x>`, `mesh_hop_p90_added_ms=<x>` and `mesh_sidecar_vcpu_per_1000rps=<x>`.

Then a gRPC hop (issue 19), once the HTTP/1.1 pods are gone so both hops meet the same idle node: the same
client and server pods with and without the mesh, the server being the compat image's greeter (Debian's
python3-grpcio, helloworld.Greeter) and the client the compat image's h2load sending unary SayHello calls
(a pre-encoded message with gRPC's 5-byte prefix, `content-type: application/grpc`, `te: trailers`, the
end user's JWT as `authorization` metadata; `--grpc-connections` connections of `--grpc-streams` concurrent
streams each), the server's policy naming the gRPC method. h2load counts HTTP statuses, not gRPC ones, so
each run is also checked where gRPC's status lives: the same request by nghttp ends in `grpc-status: 0`, the
server logged exactly one SayHello per request of the run (each run sends its own name), and the latency
run is grpcio's client (any status but OK counts as an error). The app is a Python server here, unlike the
HTTP/1.1 hop's: it bounds the baseline, so the ratio says what the mesh costs a real grpcio service on these
cores, and the added p90 is the hop's own. Its last lines: `mesh_grpc_hop_rps_ratio=<x>`,
`mesh_grpc_hop_p90_added_ms=<x>` and `mesh_grpc_sidecar_vcpu_per_1000rps=<x>`.

Then a TCP hop (issue 20), on its own idle node too: the compat image's iperf3 and redis-server in one server
pod, which meshed declares both ports TCP (meshward.io/tcp-ports: every connection tunnelled over mTLS and
decided by an L4 rule), and a client pod. Throughput is iperf3's (one stream, `--tcp-seconds`, bytes received
by the server); the connection rate is new connections per second, each a redis PING answered +PONG then
closed, from `--tcp-workers` threads in the client pod (meshed, each is a new mTLS connection, a tunnel and a
decision: what a client without a connection pool costs). Its last lines: `mesh_tcp_hop_throughput_ratio=<x>`,
`mesh_tcp_connect_rate_ratio=<x>` and `mesh_tcp_sidecar_vcpu_per_1000_connections=<x>`. `--hops` picks the
hops to run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jwt  # noqa: E402
from tests.e2e.conftest import envoy_admin, installed  # noqa: E402
from tests.kube import Cluster, kind_session_for, service_identity, wait_until  # noqa: E402
from tests.support.idp import SigningKey  # noqa: E402

ISSUER = "https://idp.meshward.test"
# The hops, in the order they run.
HOPS = ("http", "grpc", "tcp")
SIDECARS = ("meshward-proxy", "meshward-agent")
# The gRPC hop: the greeter of the compat image (hack/images/compat/greeter.py) and the method h2load calls.
GREETER_PORT = 50051
SAY_HELLO = "/helloworld.Greeter/SayHello"
# h2load's first run on each side: warms connections, caches and the greeter, and measures a rate from which
# the measured run's request count is set (h2load's timed mode would end with requests in flight).
GRPC_WARM_UP_REQUESTS = 2000
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


def sidecar_usage(c: Cluster, ns: str, apps: tuple[str, ...] = ("client-mesh", "server-mesh")) -> dict[
        str, dict[str, float]]:
    """CPU seconds and RSS of every sidecar's main process (PID 1 of its container) on the meshed pods `apps`."""
    out = {}
    for app in apps:
        pod = pod_of(c, ns, app)
        for container in SIDECARS:
            text = c.kubectl("-n", ns, "exec", pod, "-c", container, "--", "python3", "-c", PROC).stdout
            out[f"{app}/{container}"] = json.loads(text)
    return out


# Upstream requests and connections of the outbound (mesh) clusters.
STATS = "/stats?filter=" + urllib.parse.quote("^cluster[.]outbound[|].*upstream_(cx|rq)_total$")


def outbound_reuse(c: Cluster, ns: str, client: str = "client-mesh") -> tuple[int, int]:
    """Requests and connections the client's Envoy sent upstream to meshed destinations (its admin stats)."""
    text = envoy_admin(c, ns, pod_of(c, ns, client), STATS)
    totals = {"rq": 0, "cx": 0}
    for match in re.finditer(r"upstream_(cx|rq)_total: (\d+)", text):
        totals[match.group(1)] += int(match.group(2))
    return totals["rq"], totals["cx"]


# ------------------------------------------------------------------------------------------------ the gRPC hop

# grpcio's client at a fixed pace, one call at a time on one channel, each timed (what one caller sees); any
# status but OK, or a wrong reply, is an error. Runs in the compat image (Debian's python3 has its grpcio).
GRPC_LATENCY = r"""
import json, sys, time
sys.path.insert(0, "/compat")
import grpc
from greeter import SERVICE, decode, hello_request
target, rate, seconds, token = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
grpc.channel_ready_future(channel).result(timeout=20)
say, metadata, request = channel.unary_unary(f"/{SERVICE}/SayHello"), (("authorization", "Bearer " + token),), \
    hello_request("latency")
samples, errors, start = [], {}, time.monotonic()
for n in range(int(rate * seconds)):
    pause = start + n / rate - time.monotonic()
    if pause > 0:
        time.sleep(pause)  # the fixed pace
    t0 = time.perf_counter()
    try:
        if decode(say(request, metadata=metadata, timeout=5))[1] != "Hello, latency!":
            errors["wrong reply"] = errors.get("wrong reply", 0) + 1
    except grpc.RpcError as e:
        errors[e.code().name] = errors.get(e.code().name, 0) + 1
    samples.append((time.perf_counter() - t0) * 1000)
print(json.dumps({"samples": samples, "errors": errors}))
"""
# A SayHello request as h2load and nghttp send it: the gRPC frame (uncompressed flag, 4-byte big-endian length)
# of HelloRequest{name: argv[1]}, written to argv[2].
GRPC_FRAME = ("import sys; sys.path.insert(0, '/compat'); from greeter import hello_request; "
              "m = hello_request(sys.argv[1]); open(sys.argv[2], 'wb').write(b'\\0' + len(m).to_bytes(4, 'big') + m)")


def grpc_workloads(ns: str, compat: str, meshed: bool, key: SigningKey) -> list[dict[str, Any]]:
    """The greeter (server) and the gRPC client pod of one side, with the greeter's policy naming the method."""
    side = "mesh" if meshed else "plain"
    labels: dict[str, str] = {"meshward.io/inject": "enabled"} if meshed else {}
    security = {"runAsNonRoot": True, "allowPrivilegeEscalation": False}

    def deployment(name: str, sa: str, container: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
                "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
                    "metadata": {"labels": {"app": name, **labels}},
                    "spec": {"serviceAccountName": sa, "terminationGracePeriodSeconds": 5, "containers": [
                        {"name": "app", "image": compat, "imagePullPolicy": "Never", "securityContext": security,
                         **container}]}}}}
    docs: list[dict[str, Any]] = [
        deployment(f"greeter-{side}", "server", {
            "args": ["greeter"], "ports": [{"name": "grpc", "containerPort": GREETER_PORT}],
            "readinessProbe": {"tcpSocket": {"port": GREETER_PORT}, "periodSeconds": 2}}),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"greeter-{side}", "namespace": ns},
         "spec": {"selector": {"app": f"greeter-{side}"},
                  "ports": [{"name": "grpc", "port": GREETER_PORT, "targetPort": GREETER_PORT}]}},
        deployment(f"grpc-client-{side}", "client", {"args": ["idle"]}),
    ]
    if meshed:
        docs.append({"apiVersion": "meshward.io/v1alpha1", "kind": "AuthPolicy",
                     "metadata": {"name": "greeter", "namespace": ns},
                     "spec": {"selector": {"matchLabels": {"app": "greeter-mesh"}},
                              "jwt": [{"issuer": ISSUER, "audiences": ["bench"], "algorithms": ["ES256"],
                                       "jwks": json.dumps({"keys": [key.jwk]})}],
                              "rules": [{"name": "client", "from": {"principals": [
                                  f"spiffe://cluster.local/ns/{ns}/sa/client"]},
                                  "to": {"methods": ["POST"], "paths": [SAY_HELLO]}}]}})
    return docs


def remove(c: Cluster, ns: str, docs: list[dict[str, Any]]) -> None:
    """Delete the Deployments of `docs` and wait for their pods to be gone (the next hop gets an idle node)."""
    names = [d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"]
    c.kubectl("-n", ns, "delete", "deployment", *names, "--wait=true", timeout=180)
    for name in names:
        c.kubectl("-n", ns, "wait", "--for=delete", "pod", "-l", f"app={name}", "--timeout=120s", timeout=150)


def grpc_exec(c: Cluster, ns: str, side: str, *argv: str, timeout: float = 60,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    """`argv` run in the gRPC client pod of `side`."""
    return c.kubectl("-n", ns, "exec", pod_of(c, ns, f"grpc-client-{side}"), "-c", "app", "--", *argv,
                     timeout=timeout, check=check)


def grpc_frame(c: Cluster, ns: str, side: str, name: str) -> str:
    """Write the SayHello request for `name` in the client pod of `side`; returns its path there."""
    path = f"/tmp/grpc-{name}"
    grpc_exec(c, ns, side, "/usr/bin/python3", "-c", GRPC_FRAME, name, path)
    return path


def grpc_headers(token: str) -> list[str]:
    """The request headers of a gRPC call, as -H arguments (h2load's and nghttp's)."""
    return ["-H", "content-type: application/grpc", "-H", "te: trailers", "-H", f"authorization: Bearer {token}"]


def grpc_url(side: str) -> str:
    return f"http://greeter-{side}:{GREETER_PORT}{SAY_HELLO}"


def grpc_answers(c: Cluster, ns: str, side: str, token: str, timeout: float = 90) -> None:
    """Wait until the request h2load sends, sent by nghttp, ends in HTTP 200 and `grpc-status: 0` (the trailer
    h2load does not read); this is also the wait for the Service to be routable."""
    body = grpc_frame(c, ns, side, f"sample-{side}")
    deadline, out = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        out = grpc_exec(c, ns, side, "nghttp", "-v", "-d", body, *grpc_headers(token), grpc_url(side),
                        check=False).stdout
        out = re.sub(r"\x1b\[[\d;]*m", "", out)  # nghttp colours names on a terminal
        seen = dict(re.findall(r"recv \(stream_id=\d+[^)]*\) (:status|grpc-status|grpc-message): (.*)", out))
        if seen.get(":status") == "200" and seen.get("grpc-status") == "0":
            return
        time.sleep(1)
    raise SystemExit(f"{side}: SayHello as h2load sends it did not end in grpc-status 0 within {timeout:g} s:\n"
                     f"{out[-3000:]}")


def h2load(c: Cluster, ns: str, side: str, token: str, requests: int, name: str,
           args: argparse.Namespace) -> tuple[float, float]:
    """(requests per second, seconds) of `requests` unary SayHello calls from h2load; every one must be answered
    2xx and be logged by the greeter (its log line has the run's `name`)."""
    body = grpc_frame(c, ns, side, name)
    connections = args.grpc_connections
    out = grpc_exec(c, ns, side, "h2load", "-n", str(requests), "-c", str(connections), "-m", str(args.grpc_streams),
                    "-t", str(min(2, connections)), "-d", body, *grpc_headers(token), grpc_url(side),
                    timeout=600).stdout
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    codes = re.search(r"status codes: (\d+) 2xx", out)
    rate = re.search(r"finished in ([\d.]+)(s|ms|us), ([\d.]+) req/s", out)
    if not (counts and codes and rate) or int(counts.group(3)) != requests or int(codes.group(1)) != requests:
        raise SystemExit(f"{side}: not every one of {requests} gRPC requests succeeded:\n{out}")
    greeter = pod_of(c, ns, f"greeter-{side}")
    needle = f'"name": "{name}"'

    def logged() -> int:
        log = c.kubectl("-n", ns, "logs", greeter, "-c", "app", timeout=120).stdout
        return sum(1 for line in log.splitlines() if needle in line)
    # The greeter logs each call as it answers it; kubelet's log lags a little behind.
    count = wait_until(f"{requests} SayHello calls named {name} in {greeter}'s log (kubelet keeps the last 10 MiB)",
                       lambda: (n := logged()) >= requests and n, timeout=60, interval=2)
    if count != requests:
        raise SystemExit(f"{side}: the greeter logged {count} calls named {name}, h2load sent {requests}")
    took = float(rate.group(1)) / {"s": 1, "ms": 1e3, "us": 1e6}[rate.group(2)]
    return float(rate.group(3)), took


def grpc_latency(c: Cluster, ns: str, side: str, token: str, rate: float, seconds: float) -> list[float]:
    out = grpc_exec(c, ns, side, "/usr/bin/python3", "-c", GRPC_LATENCY, f"greeter-{side}:{GREETER_PORT}",
                    str(rate), str(seconds), token, timeout=seconds + 60).stdout
    doc = json.loads(out)
    if doc["errors"]:
        raise SystemExit(f"{side}: gRPC calls failed in the latency run: {doc['errors']}")
    samples: list[float] = doc["samples"][int(rate):]  # the first second warms the channel and caches
    return samples


def grpc_hop(c: Cluster, ns: str, compat: str, key: SigningKey, token: str,
             args: argparse.Namespace) -> list[dict[str, Any]]:
    """The gRPC hop, printed: h2load's throughput, grpcio's latency at a fixed rate, the sidecars' CPU."""
    docs = grpc_workloads(ns, compat, True, key) + grpc_workloads(ns, compat, False, key)
    c.apply(*docs)
    rolled_out(c, ns, docs)
    requests: dict[str, int] = {}
    for side in ("plain", "mesh"):
        grpc_answers(c, ns, side, token)
        # The warm-up also sets the measured run's length: about --seconds at the warmed-up rate.
        warm, _ = h2load(c, ns, side, token, GRPC_WARM_UP_REQUESTS, f"warm-up-{side}", args)
        requests[side] = max(GRPC_WARM_UP_REQUESTS, int(warm * args.seconds))
    apps = ("grpc-client-mesh", "greeter-mesh")
    before = sidecar_usage(c, ns, apps)
    mesh_rps, took = h2load(c, ns, "mesh", token, requests["mesh"], "run-mesh", args)
    after = sidecar_usage(c, ns, apps)
    upstream, connections = outbound_reuse(c, ns, "grpc-client-mesh")
    plain_rps, _ = h2load(c, ns, "plain", token, requests["plain"], "run-plain", args)
    lat = {side: grpc_latency(c, ns, side, token, args.rate, args.latency_seconds) for side in ("plain", "mesh")}
    # CPU seconds per 1,000 calls is vCPU per 1,000 rps. The window also holds the log check's few seconds after
    # h2load's run, when the sidecars idle: their little CPU then is counted too (slightly high, never low).
    cpu_s = sum(after[k]["cpu"] - before[k]["cpu"] for k in after)
    cpu = cpu_s / took
    print(f"gRPC throughput (h2load, unary SayHello, {args.grpc_connections} connections x {args.grpc_streams} "
          f"streams): without the mesh {plain_rps:.0f} rps ({requests['plain']} calls), through the mesh "
          f"{mesh_rps:.0f} rps ({requests['mesh']} calls); every call logged once by the greeter")
    added = print_latency(args.rate, lat["plain"], lat["mesh"], "gRPC latency (grpcio, one channel)")
    print(f"sidecar CPU during the mesh run: {cpu:.2f} vCPU for {mesh_rps:.0f} rps (both Envoys and both agents)")
    print(f"the client's Envoy sent {upstream} requests upstream over {connections} mTLS connections")
    print_usage(before, after, took)
    print(f"mesh_grpc_hop_rps_ratio={mesh_rps / plain_rps:.2f}")
    print(f"mesh_grpc_hop_p90_added_ms={added[90]:.2f}")
    print(f"mesh_grpc_sidecar_vcpu_per_1000rps={cpu_s / (requests['mesh'] / 1000):.3f}", flush=True)
    return docs


# ------------------------------------------------------------------------------------------------ the TCP hop

IPERF3_PORT = 5201
REDIS_PORT = 6379
# New connections for `seconds` from `workers` threads, each a redis PING answered +PONG, then closed (the client
# closes first: its TIME_WAITs spread over the ephemeral range, which holds ~28,000, so a run stays short).
CONNECT_RATE = r"""
import json, socket, sys, threading, time
host, port, seconds, workers = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
done, errors = [0] * workers, {}
end = time.monotonic() + seconds
def run(i):
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    done[i] += 1
                    continue
                errors["wrong reply"] = errors.get("wrong reply", 0) + 1
        except OSError as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
start = time.monotonic()
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"connections": sum(done), "seconds": time.monotonic() - start, "errors": errors}))
"""


def tcp_workloads(ns: str, compat: str, meshed: bool) -> list[dict[str, Any]]:
    """The TCP server (iperf3 and redis, both ports declared TCP when meshed) and client pods of one side."""
    side = "mesh" if meshed else "plain"
    labels: dict[str, str] = {"meshward.io/inject": "enabled"} if meshed else {}
    annotations = {"meshward.io/tcp-ports": f"{IPERF3_PORT},{REDIS_PORT}"} if meshed else {}
    security = {"runAsNonRoot": True, "allowPrivilegeEscalation": False}

    def container(role: str, port: int) -> dict[str, Any]:
        return {"name": role, "image": compat, "imagePullPolicy": "Never", "securityContext": security,
                "args": [role], "ports": [{"name": role, "containerPort": port}],
                "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 2}}

    def deployment(name: str, sa: str, containers: list[dict[str, Any]], notes: dict[str, str]) -> dict[str, Any]:
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
                "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
                    "metadata": {"labels": {"app": name, **labels}, "annotations": notes},
                    "spec": {"serviceAccountName": sa, "terminationGracePeriodSeconds": 5,
                             "containers": containers}}}}
    docs: list[dict[str, Any]] = [
        deployment(f"tcp-server-{side}", "server",
                   [container("iperf3", IPERF3_PORT), container("redis", REDIS_PORT)], annotations),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"tcp-server-{side}", "namespace": ns},
         "spec": {"selector": {"app": f"tcp-server-{side}"},
                  "ports": [{"name": "iperf3", "port": IPERF3_PORT}, {"name": "redis", "port": REDIS_PORT}]}},
        deployment(f"tcp-client-{side}", "client", [{"name": "app", "image": compat, "imagePullPolicy": "Never",
                                                     "securityContext": security, "args": ["idle"]}], {}),
    ]
    if meshed:
        docs.append({"apiVersion": "meshward.io/v1alpha1", "kind": "AuthPolicy",
                     "metadata": {"name": "tcp-server", "namespace": ns},
                     "spec": {"selector": {"matchLabels": {"app": "tcp-server-mesh"}},
                              "rules": [{"name": "client", "from": {"principals": [
                                  f"spiffe://cluster.local/ns/{ns}/sa/client"]},
                                  "to": {"ports": [IPERF3_PORT, REDIS_PORT]}}]}})
    return docs


def tcp_exec(c: Cluster, ns: str, side: str, *argv: str, timeout: float = 120,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    """`argv` run in the TCP client pod of `side`."""
    return c.kubectl("-n", ns, "exec", pod_of(c, ns, f"tcp-client-{side}"), "-c", "app", "--", *argv,
                     timeout=timeout, check=check)


def iperf3(c: Cluster, ns: str, side: str, seconds: int) -> float:
    """Bits per second the server of `side` received in iperf3's run of `seconds` (one stream)."""
    out = tcp_exec(c, ns, side, "iperf3", "--client", f"tcp-server-{side}", "--port", str(IPERF3_PORT),
                   "--time", str(seconds), "--json", timeout=seconds + 60).stdout
    doc = json.loads(out)
    if "error" in doc:
        raise SystemExit(f"{side}: iperf3 failed: {doc['error']}")
    bps: float = doc["end"]["sum_received"]["bits_per_second"]
    return bps


def connect_rate(c: Cluster, ns: str, side: str, seconds: float, workers: int) -> float:
    """New connections per second to the redis of `side` (PING, +PONG, close); any failed one ends the bench."""
    out = tcp_exec(c, ns, side, "/usr/bin/python3", "-c", CONNECT_RATE, f"tcp-server-{side}", str(REDIS_PORT),
                   str(seconds), str(workers), timeout=seconds + 60).stdout
    doc = json.loads(out)
    if doc["errors"]:
        raise SystemExit(f"{side}: connections failed in the connection-rate run: {doc['errors']}")
    rate: float = doc["connections"] / doc["seconds"]
    return rate


def tcp_answers(c: Cluster, ns: str, side: str, timeout: float = 90) -> None:
    """Wait until redis answers PING from the client of `side` (Services and destination maps programmed)."""
    def pong() -> bool:
        out = tcp_exec(c, ns, side, "redis-cli", "-h", f"tcp-server-{side}", "-p", str(REDIS_PORT), "PING",
                       check=False, timeout=30).stdout
        return out.strip() == "PONG"
    wait_until(f"redis of the {side} TCP server answering PING", pong, timeout=timeout, interval=1)


def tcp_hop(c: Cluster, ns: str, compat: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The TCP hop, printed: iperf3's throughput, the connection rate and the sidecars' CPU per connection."""
    docs = tcp_workloads(ns, compat, True) + tcp_workloads(ns, compat, False)
    c.apply(*docs)
    rolled_out(c, ns, docs)
    for side in ("plain", "mesh"):
        tcp_answers(c, ns, side)
        iperf3(c, ns, side, 2)  # warm-up
    bps = {side: iperf3(c, ns, side, args.tcp_seconds) for side in ("mesh", "plain")}
    apps = ("tcp-client-mesh", "tcp-server-mesh")
    connect_rate(c, ns, "mesh", 2, args.tcp_workers)  # warm-up: certificates, the agent's decisions
    before = sidecar_usage(c, ns, apps)
    mesh_rate = connect_rate(c, ns, "mesh", args.connect_seconds, args.tcp_workers)
    after = sidecar_usage(c, ns, apps)
    plain_rate = connect_rate(c, ns, "plain", args.connect_seconds, args.tcp_workers)
    # The CPU window holds the run and the two exec calls around it (the sidecars idle then): slightly high.
    cpu_s = sum(after[k]["cpu"] - before[k]["cpu"] for k in after)
    connections = mesh_rate * args.connect_seconds
    print(f"TCP throughput (iperf3, one stream, {args.tcp_seconds} s): without the mesh {bps['plain'] / 1e9:.2f} "
          f"Gbit/s, through the mesh {bps['mesh'] / 1e9:.2f} Gbit/s")
    print(f"new connections (redis PING, {args.tcp_workers} workers, {args.connect_seconds:g} s): without the mesh "
          f"{plain_rate:.0f}/s, through the mesh {mesh_rate:.0f}/s (each a new mTLS connection, tunnel and decision)")
    print_usage(before, after, args.connect_seconds)
    print(f"mesh_tcp_hop_throughput_ratio={bps['mesh'] / bps['plain']:.2f}")
    print(f"mesh_tcp_connect_rate_ratio={mesh_rate / plain_rate:.2f}")
    print(f"mesh_tcp_sidecar_vcpu_per_1000_connections={cpu_s / (connections / 1000):.3f}", flush=True)
    return docs


def rolled_out(c: Cluster, ns: str, docs: list[dict[str, Any]]) -> None:
    """Wait for every Deployment of `docs` to be rolled out."""
    for d in docs:
        if d["kind"] == "Deployment":
            c.kubectl("-n", ns, "rollout", "status", f"deployment/{d['metadata']['name']}", "--timeout=180s",
                      timeout=200)


def http_hop(c: Cluster, ns: str, echo: str, meshward: str, key: SigningKey, token: str,
             args: argparse.Namespace) -> list[dict[str, Any]]:
    """The HTTP/1.1 hop, printed; returns its manifests (for the caller to remove its pods)."""
    docs = workloads(ns, echo, meshward, True, key)
    docs += workloads(ns, echo, meshward, False, key)
    c.apply(*docs)
    rolled_out(c, ns, docs)
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
    added = print_latency(args.rate, results["plain_latency"], results["mesh_latency"])
    print(f"sidecar CPU during the mesh run: {cpu:.2f} vCPU for {results['mesh_rps']:.0f} rps (both Envoys and "
          "both agents)")
    print(f"the client's Envoy sent {requests} requests upstream over {connections} mTLS connections")
    print_usage(before, after, args.seconds)
    print(f"mesh_hop_rps_ratio={ratio:.2f}")
    print(f"mesh_hop_p90_added_ms={added[90]:.2f}")
    print(f"mesh_sidecar_vcpu_per_1000rps={cpu / (results['mesh_rps'] / 1000):.3f}", flush=True)
    return docs


def print_latency(rate: float, plain: list[float], mesh: list[float], what: str = "latency") -> dict[int, float]:
    """The latency table of both sides; returns what the mesh adds at p50, p90 and p99."""
    print(f"{what} at {rate:g} rps (ms)      p50     p90     p99")
    for name, lat in (("without the mesh", plain), ("through the mesh", mesh)):
        print(f"  {name:16}  {percentile(lat, 50):6.2f}  {percentile(lat, 90):6.2f}  {percentile(lat, 99):6.2f}")
    added = {p: percentile(mesh, p) - percentile(plain, p) for p in (50, 90, 99)}
    print(f"  added by the hop  {added[50]:6.2f}  {added[90]:6.2f}  {added[99]:6.2f}")
    return added


def print_usage(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], seconds: float) -> None:
    """Each sidecar's CPU over a run of `seconds`, and its memory after it."""
    for name, usage in after.items():
        print(f"  {name:35} {(usage['cpu'] - before[name]['cpu']) / seconds:5.2f} vCPU  "
              f"{usage['rss_mb']:6.1f} MB RSS")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=20, help="each throughput run")
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second of the latency runs")
    ap.add_argument("--latency-seconds", type=float, default=20.0)
    ap.add_argument("--hops", default=",".join(HOPS),
                    help="the hops to run, comma-separated, of http, grpc and tcp (the default: all, in that order)")
    ap.add_argument("--grpc-connections", type=int, default=4, help="h2load's connections (-c)")
    ap.add_argument("--grpc-streams", type=int, default=8, help="h2load's concurrent streams per connection (-m)")
    ap.add_argument("--tcp-seconds", type=int, default=10, help="iperf3's run")
    ap.add_argument("--connect-seconds", type=float, default=8.0,
                    help="each connection-rate run (short: the client's TIME_WAITs use up ephemeral ports)")
    ap.add_argument("--tcp-workers", type=int, default=4, help="threads opening connections")
    args = ap.parse_args()
    hops = [h.strip() for h in args.hops.split(",") if h.strip()]
    if not hops or set(hops) - set(HOPS):
        ap.error(f"--hops: {args.hops!r}: name some of {', '.join(HOPS)} (comma-separated)")
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
        # One hop at a time, its pods gone before the next: each meets the same idle node.
        for hop in HOPS:
            if hop not in hops:
                continue
            if hop == "http":
                docs = http_hop(c, ns, session.images["echo"], release.image, key, token, args)
            elif hop == "grpc":
                docs = grpc_hop(c, ns, session.images["compat"], key, token, args)
            else:
                docs = tcp_hop(c, ns, session.images["compat"], args)
            remove(c, ns, docs)
        c.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
