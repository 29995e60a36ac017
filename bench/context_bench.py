"""What context propagation costs: per hop in the agent (µs), and on a three-hop chain of real pods (RPS).

Per hop, in this process with the agent's own code (real keys and certificates from the mesh CA's functions):
mint (a first exchange: the token and its hop proof, two ECDSA P-256 signatures), verify (both x5c chains to the
bundle and both signatures, nothing cached), and the two things an
agent does per request, cold (nothing cached) and hot (the caches a busy user fills): the inbound check of a
context token from the peer with the app's token minted, and the outbound exchange for the next workload.

On kind: client -> frontend -> checkout -> payments, each app calling the next, the first with an end-user JWT,
twice: with C++ apps (Envoy proxying on kept-alive connections: the apps never bound the run, so what the
mesh and the context cost shows) and with Python apps (the echo test app, a new connection per onward call, as
many real apps do). Measured in the same run on the same pods, interleaved: the apps forwarding the context
header (every hop verifies, mints for its app, exchanges for the next) and not forwarding it (the user stops at
frontend); with the three agents' CPU per chain request.
Then, per length of the call path (1, 2, 4, 8 workloads before the receiver), the size of the header a receiver
gets (the token and one hop proof per workload) and what checking it costs the receiver the first time (every
proof's signature; the minters' certificate chains already known), since the act chain is proven, not asserted.
Last lines: `context_chain_rps_ratio=<x>` (with / without, C++ apps), `context_chain_rps_ratio_python_apps=<x>`,
`context_hop_hot_us=<x>`, `context_hop_cold_us=<x>` and `context_path8_bytes=<x>`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jwt  # noqa: E402
from bench.mesh_hop_bench import PROC, app_bootstrap, app_manifests  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402
from tests.e2e.conftest import installed  # noqa: E402
from tests.kube import Cluster, kind_session_for, service_identity, wait_until  # noqa: E402
from tests.support.idp import SigningKey  # noqa: E402
from tests.support.sidecar import config, harness, policy, request  # noqa: E402

from meshward.operator.domain.ca import check_csr, generate_root, issue_leaf, random_serial  # noqa: E402
from meshward.sidecar.domain.certificate import WorkloadCert, accept, build_csr, new_key  # noqa: E402
from meshward.sidecar.domain.context import WIRE_HEADER, mint, roots_of, verify_context  # noqa: E402
from meshward.sidecar.domain.request import CheckInput  # noqa: E402
from meshward.sidecar.engines.context import ContextKeys, ContextService  # noqa: E402
from meshward.sidecar.engines.token_cache import TokenCache  # noqa: E402

TD = "spiffe://cluster.local/ns/shop/sa"
FRONTEND, ORDERS, PAYMENTS = f"{TD}/frontend", f"{TD}/orders", f"{TD}/payments"
ISSUER = "https://idp.meshward.test"
CHAIN = ("frontend", "checkout", "payments")


# Distinct tokens prepared for the cold measurements (each used once).
COLD = 500


# How the in-process part reads time: wall time by default; --cpu-time reads this process's CPU time instead,
# which a shared machine's other tenants disturb far less (the agent's work is single-threaded CPU either way).
Clock = Callable[[], float]


def per_call_us(fn: Callable[[], object], clock: Clock, seconds: float = 1.0, calls: int | None = None) -> float:
    """Mean µs per call of `fn`: exactly `calls` calls, or as many as fit in about `seconds` (at least 200)."""
    n, t0 = 0, clock()
    while (n < calls) if calls is not None else (n < 200 or clock() - t0 < seconds):
        fn()
        n += 1
    return (clock() - t0) / n * 1e6


def in_process(clock: Clock) -> dict[str, float]:
    """µs of minting, verifying, and an agent's inbound check and outbound exchange, cold and hot."""
    now = time.time()
    ca = generate_root("cluster.local", dt.datetime.fromtimestamp(now - 60, dt.UTC))

    def cert(spiffe: str) -> WorkloadCert:
        key = new_key()
        at = dt.datetime.fromtimestamp(now, dt.UTC)
        leaf = issue_leaf(ca, check_csr(build_csr(key, spiffe), spiffe), spiffe, dt.timedelta(hours=1), at,
                          random_serial(os.urandom))
        return accept(spiffe, leaf.public_bytes(Encoding.PEM), ca.cert_pem(), key, at)

    front, orders = cert(FRONTEND), cert(ORDERS)
    front_key = ContextKeys(lambda: front).minting()
    assert front_key is not None
    roots = roots_of(ca.cert_pem())
    claims = {"sub": "alice", "tenant": "acme"}
    token, _ = mint(front_key, ORDERS, ISSUER, claims, (FRONTEND,), "d", now, 30)
    out = {
        "mint": per_call_us(lambda: mint(front_key, ORDERS, ISSUER, claims, (FRONTEND,), "d", now, 30), clock),
        "verify": per_call_us(lambda: verify_context(token, FRONTEND, ORDERS, roots, now), clock),
    }
    cfg = config(policy("orders", rules=[{"name": "anyone"}]),
                 context={"claims": ["tenant"], "ttlSeconds": 30, "destinations": {PAYMENTS: ["sub", "tenant"]}})
    hot = harness(cfg, context=ContextService(ContextKeys(lambda: orders), time.time)).pipeline
    inbound = request(peer=FRONTEND, **{WIRE_HEADER: token})
    hot.decide_now(inbound, "http")
    out["inbound_hot"] = per_call_us(lambda: hot.decide_now(inbound, "http"), clock)
    # Cold: a token (a user, a request) the agent has not seen, from a minter it has (its chain checked once).
    fresh = iter([request(peer=FRONTEND, **{WIRE_HEADER: mint(front_key, ORDERS, ISSUER, claims, (FRONTEND,),
                                                               f"d{n}", now, 30)[0]}) for n in range(COLD)])
    apps: list[str] = []

    def inbound_cold() -> None:
        d = hot.decide_now(next(fresh), "http")
        apps.append(dict(d.headers_to_set)[WIRE_HEADER])  # type: ignore[union-attr]
    out["inbound_cold"] = per_call_us(inbound_cold, clock, calls=COLD)
    app = dict(hot.decide_now(inbound, "http").headers_to_set)[WIRE_HEADER]  # type: ignore[union-attr]
    outbound = request(peer=None, **{WIRE_HEADER: app})
    outbound.destination = PAYMENTS
    hot.exchange(outbound, "outbound")
    out["exchange_hot"] = per_call_us(lambda: hot.exchange(outbound, "outbound"), clock)

    def app_request(token: str) -> CheckInput:
        inp = request(peer=None, **{WIRE_HEADER: token})
        inp.destination = PAYMENTS
        return inp
    # Cold: the app forwards the token its agent just minted for a new user (the hop proofs it carries were
    # checked by that inbound check, as in a real hop).
    outbound_cold = iter([app_request(token) for token in apps])
    out["exchange_cold"] = per_call_us(lambda: hot.exchange(next(outbound_cold), "outbound"), clock, calls=COLD)
    none = request(peer=FRONTEND)
    out["inbound_without_context"] = per_call_us(lambda: hot.decide_now(none, "http"), clock)
    return out


# Call path lengths measured, in workloads before the receiver (8 is MAX_ACT_DEPTH), and distinct users per length.
PATHS = (1, 2, 4, 8)
PATH_USERS = 40


def path_costs(clock: Clock) -> dict[int, tuple[int, float]]:
    """Per path length: the header's bytes at the receiver, and µs to verify it there cold (new user, known minters)."""
    now = time.time()
    ca = generate_root("cluster.local", dt.datetime.fromtimestamp(now - 60, dt.UTC))
    at = dt.datetime.fromtimestamp(now, dt.UTC)
    spiffes = [f"{TD}/hop{n}" for n in range(max(PATHS) + 1)]

    def keys_of(spiffe: str) -> ContextKeys:
        key = new_key()
        leaf = issue_leaf(ca, check_csr(build_csr(key, spiffe), spiffe), spiffe, dt.timedelta(hours=1), at,
                          random_serial(os.urandom))
        cert = accept(spiffe, leaf.public_bytes(Encoding.PEM), ca.cert_pem(), key, at)
        return ContextKeys(lambda: cert)
    keys = {spiffe: keys_of(spiffe) for spiffe in spiffes}
    roots = roots_of(ca.cert_pem())

    def path(length: int, user: str) -> str:
        """What hop `length` receives from hop `length - 1` when `user` came in at hop 0."""
        first = keys[spiffes[0]].minting()
        assert first is not None
        presentation = mint(first, spiffes[1], ISSUER, {"sub": user, "tenant": "acme"}, (spiffes[0],), "d", now, 30)[0]
        for n in range(1, length):
            ctx = verify_context(presentation, spiffes[n - 1], spiffes[n], roots, now)
            key = keys[spiffes[n]].minting()
            assert key is not None
            presentation = mint(key, spiffes[n + 1], ISSUER, {"sub": user, "tenant": "acme"}, (spiffes[n], *ctx.act),
                                f"d{n}", now, 30, ctx.expires_at, ctx.proofs)[0]
        return presentation

    out = {}
    for length in PATHS:
        receiver, sender = spiffes[length], spiffes[length - 1]
        service = ContextService(keys[receiver], time.time)
        warm = path(length, "warm-up")
        service.verify(warm, TokenCache.key(warm), sender, receiver)  # the minters' chains, once per bundle
        users = iter([path(length, f"user{n}") for n in range(PATH_USERS)])

        def check(service: ContextService = service, users: Iterator[str] = users, sender: str = sender,
                  receiver: str = receiver) -> None:
            raw = next(users)
            service.verify(raw, TokenCache.key(raw), sender, receiver)
        out[length] = (len(warm), per_call_us(check, clock, calls=PATH_USERS))
    return out


# ------------------------------------------------------------------------------------------ on kind

# The two kinds of app along the chain: C++ (Envoy proxying to the next hop on kept-alive connections, so the
# apps never bound the run and the mesh's own cost shows) and Python (the echo test app, a new connection per
# onward call, as many real apps do).
APPS = ("cc", "py")


def proxy_bootstrap(upstream: str | None) -> dict[str, Any]:
    """An Envoy app: `/ctx/...` proxied to `upstream` as received, `/plain/...` without the context header (the
    app not forwarding it); the last hop (`upstream` None) answers 200 itself."""
    if upstream is None:
        return app_bootstrap()
    boot = app_bootstrap()
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"] = {"virtual_hosts": [{"name": "app", "domains": ["*"], "routes": [
        {"match": {"prefix": "/ctx"}, "route": {"cluster": "next"}},
        {"match": {"prefix": "/plain"}, "route": {"cluster": "next"}, "request_headers_to_remove": [WIRE_HEADER]}]}]}
    boot["static_resources"]["clusters"] = [{
        "name": "next", "type": "STRICT_DNS", "dns_lookup_family": "V4_ONLY", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "next", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": upstream, "port_value": 80}}}}]}]}}]
    return boot


def chain_manifests(ns: str, echo: str, image: str, key: SigningKey) -> list[dict[str, Any]]:
    """Both chains (C++ and Python apps; each hop's two Deployments share its ServiceAccount and policy), the
    policies (JWT at frontend; each hop admits the last), and the client."""
    def spiffe(sa: str) -> str:
        return f"spiffe://cluster.local/ns/{ns}/sa/{sa}"

    mesh = {"meshward.io/inject": "enabled"}
    docs: list[dict[str, Any]] = []
    previous = "client"
    for n, hop in enumerate(CHAIN):
        nxt = CHAIN[n + 1] if n + 1 < len(CHAIN) else None
        spec: dict[str, Any] = {"selector": {"matchLabels": {"hop": hop}},
                                "rules": [{"name": "caller", "from": {"principals": [spiffe(previous)]}}],
                                "context": {"claims": ["tenant"]}}
        if hop == "frontend":
            spec["jwt"] = [{"issuer": ISSUER, "audiences": ["bench"], "algorithms": ["ES256"],
                            "jwks": json.dumps({"keys": [key.jwk]})}]
        docs.append({"apiVersion": "meshward.io/v1alpha1", "kind": "AuthPolicy",
                     "metadata": {"name": hop, "namespace": ns}, "spec": spec})
        docs += app_manifests(ns, f"{hop}-cc", image, {**mesh, "hop": hop}, hop,
                              proxy_bootstrap(f"{nxt}-cc.{ns}.svc.cluster.local" if nxt else None))
        docs += [
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": f"{hop}-py", "namespace": ns},
             "spec": {"selector": {"matchLabels": {"app": f"{hop}-py"}}, "template": {
                 "metadata": {"labels": {"app": f"{hop}-py", "hop": hop, **mesh}},
                 "spec": {"serviceAccountName": hop, "containers": [
                     {"name": "app", "image": echo, "imagePullPolicy": "Never",
                      "ports": [{"containerPort": 8080}]}]}}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"{hop}-py", "namespace": ns},
             "spec": {"selector": {"app": f"{hop}-py"}, "ports": [{"port": 80, "targetPort": 8080}]}},
        ]
        previous = hop
    docs.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "client", "namespace": ns},
                 "spec": {"selector": {"matchLabels": {"app": "client"}}, "template": {
                     "metadata": {"labels": {"app": "client", **mesh}},
                     "spec": {"serviceAccountName": "client", "containers": [
                         {"name": "app", "image": echo, "imagePullPolicy": "Never",
                          "command": ["sleep", "infinity"]}]}}}})
    return docs


def chain_url(app: str, forward: bool) -> str:
    """The chain's entry URL for `app` (cc, py); `forward`: each app passes the context header on."""
    if app == "cc":
        return f"http://frontend-cc/{'ctx' if forward else 'plain'}/pay"
    suffix = "" if forward else "&context=0"
    url = "http://payments-py/pay"
    for hop in ("checkout-py", "frontend-py"):
        url = f"http://{hop}/call?url={urllib.parse.quote(url, safe='')}{suffix}"
    return url


# Failed chain requests tolerated in a run (reported either way): more means the numbers measure failures.
MAX_FAILED = 0.001


def wrk(c: Cluster, ns: str, pod: str, url: str, token: str, seconds: int, connections: int) -> float:
    """Successful chain requests per second; failures are printed, and abort the benchmark beyond MAX_FAILED."""
    out = c.kubectl("-n", ns, "exec", pod, "-c", "app", "--", "wrk", "-t", "2", "-c", str(connections), "-d",
                    f"{seconds}s", "-H", f"authorization: Bearer {token}", url, timeout=seconds + 60).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)s", out)
    if not total:
        raise SystemExit(f"no wrk result:\n{out}")
    requests, elapsed = int(total.group(1)), float(total.group(2))
    failed = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    if failed:
        print(f"  {failed} of {requests} chain requests failed ({url})")
    if failed > MAX_FAILED * requests:
        raise SystemExit(f"{failed} of {requests} chain requests failed:\n{out}")
    return (requests - failed) / elapsed


def agents_cpu(c: Cluster, ns: str, app: str) -> float:
    """CPU seconds used so far by the agents of one chain's pods (PID 1 of each meshward-agent container)."""
    total = 0.0
    for hop in CHAIN:
        pod = c.get_json("-n", ns, "pods", "-l", f"app={hop}-{app}")["items"][0]["metadata"]["name"]
        total += json.loads(c.kubectl("-n", ns, "exec", pod, "-c", "meshward-agent", "--", "python3", "-c",
                                      PROC).stdout)["cpu"]
    return total


def context_arrived(c: Cluster, ns: str, pod: str, app: str, token: str) -> str:
    """After one call through the chain: payments' last audit line names the decision its context came from."""
    def through() -> str:
        proc = c.kubectl("-n", ns, "exec", pod, "-c", "app", "--", "curl", "-sS", "-f", "-H",
                         f"authorization: Bearer {token}", chain_url(app, True), check=False)
        if proc.returncode:
            return ""
        logs = c.kubectl("-n", ns, "logs", f"deployment/payments-{app}", "-c", "meshward-agent").stdout
        lines = [json.loads(x) for x in logs.splitlines() if x.startswith('{"ts"')]
        return str(lines[-1].get("act", "")) if lines else ""
    # Ready pods are not yet routable Services (kube-proxy follows moments later): wait for a whole chain.
    act: str = wait_until(f"the {app} chain carrying the context", through, timeout=60)
    return act


def on_kind(seconds: int, rounds: int, connections: int) -> dict[str, list[float]]:
    key = SigningKey("ES256")
    now = int(time.time())
    token = jwt.encode({"iss": ISSUER, "aud": "bench", "sub": "alice", "tenant": "acme", "email": "a@example.com",
                        "iat": now, "exp": now + 3600}, key.private, algorithm="ES256", headers={"kid": key.kid})
    with kind_session_for(None, lambda: False) as session, installed(session) as release:
        c = session.cluster
        ns = c.new_namespace("ctxbench")
        for sa in ("client", *CHAIN):
            c.kubectl("-n", ns, "create", "serviceaccount", sa)
        c.apply(*(service_identity(ns, sa) for sa in ("client", *CHAIN)))
        c.trust_bundle(ns, timeout=60)
        docs = chain_manifests(ns, session.images["echo"], release.image, key)
        c.apply(*docs)
        for d in docs:
            if d["kind"] == "Deployment":
                c.kubectl("-n", ns, "rollout", "status", f"deployment/{d['metadata']['name']}", "--timeout=180s",
                          timeout=200)
        pod: str = c.get_json("-n", ns, "pods", "-l", "app=client")["items"][0]["metadata"]["name"]
        results: dict[str, list[float]] = {}
        for app in APPS:
            print(f"{app}: payments' agent saw the user come through {context_arrived(c, ns, pod, app, token)}")
            for forward in (True, False):
                wrk(c, ns, pod, chain_url(app, forward), token, 3, connections)  # warm-up
            for _ in range(rounds):
                for forward in (False, True):
                    variant = f"{app}_{'with' if forward else 'without'}"
                    before = agents_cpu(c, ns, app)
                    rps = wrk(c, ns, pod, chain_url(app, forward), token, seconds, connections)
                    results.setdefault(variant, []).append(rps)
                    results.setdefault(f"{variant}_cpu_ms", []).append(
                        (agents_cpu(c, ns, app) - before) * 1000 / (rps * seconds))
        c.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=15, help="each chain throughput run")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved runs of each variant")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--in-process-only", action="store_true", help="skip the kind chain")
    ap.add_argument("--cpu-time", action="store_true",
                    help="in-process µs as this process's CPU time (steadier on a shared machine)")
    args = ap.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    us = in_process(clock)
    print("per hop in the agent (µs)")
    print(f"  mint, an exchange (token + hop proof: 2 sigs) {us['mint']:8.1f}")
    print(f"  verify, first sight (x5c chains, 2 sigs)      {us['verify']:8.1f}")
    print(f"  inbound check, context token, cold            {us['inbound_cold']:8.1f}  (new token, known minter)")
    print(f"  inbound check, context token, hot             {us['inbound_hot']:8.1f}")
    print(f"  inbound check, no user (for comparison)       {us['inbound_without_context']:8.1f}")
    print(f"  outbound exchange, cold                       {us['exchange_cold']:8.1f}")
    print(f"  outbound exchange, hot                        {us['exchange_hot']:8.1f}")
    hot, cold = us["inbound_hot"] + us["exchange_hot"], us["inbound_cold"] + us["exchange_cold"]
    paths = path_costs(clock)
    print("per call path length, at the receiver: header bytes (token + one hop proof per workload), first check µs")
    for length, (size, check_us) in paths.items():
        print(f"  {length} workload{'s' if length > 1 else ' '} before it                          "
              f"{size:6d} B {check_us:8.1f} µs")
    if not args.in_process_only:
        r = on_kind(args.seconds, args.rounds, args.connections)
        ratios = {}
        for app, what in (("cc", "Envoy apps (C++)"), ("py", "echo apps (Python)")):
            with_, without = (sum(r[f"{app}_{v}"]) / len(r[f"{app}_{v}"]) for v in ("with", "without"))
            cpu = {v: sum(r[f"{app}_{v}_cpu_ms"]) / len(r[f"{app}_{v}_cpu_ms"]) for v in ("with", "without")}
            print(f"three-hop chain of {what}, wrk {args.connections} connections, {args.rounds} x {args.seconds} s "
                  f"interleaved: without context {without:.0f} rps {[round(x) for x in r[f'{app}_without']]}, "
                  f"with context {with_:.0f} rps {[round(x) for x in r[f'{app}_with']]}")
            print(f"  the three agents' CPU per chain request: without context {cpu['without']:.3f} ms, with "
                  f"{cpu['with']:.3f} ms (+{(cpu['with'] - cpu['without']) * 1000:.0f} µs: two exchanges, two "
                  "inbound checks, their mints)")
            ratios[app] = with_ / without
        print(f"context_chain_rps_ratio={ratios['cc']:.2f}")
        print(f"context_chain_rps_ratio_python_apps={ratios['py']:.2f}")
    print(f"context_hop_hot_us={hot:.1f}")
    print(f"context_hop_cold_us={cold:.1f}")
    print(f"context_path8_bytes={paths[max(PATHS)][0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
