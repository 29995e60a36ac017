"""Authorization hot-path benchmark: Meshward against Envoy's native jwt_authn, in one run.

Every scenario runs through the same Envoy binary (`--concurrency 1`) on loopback and
the same load generator (wrk, keep-alive, 1 thread, 16 connections):

  a  Envoy direct response (the ceiling)
  b  Envoy native jwt_authn verifying the same RS256 token (no JWT cache): the baseline
  c  a no-op authorizer on each ext_authz transport (the transport's own cost)
  d  Meshward, hot (cached) token, 5-rule policy, on each transport
  e  Meshward with the token cache off, so every request verifies RS256 (a fresh token)

It prints RPS, p50/p99, the agent's CPU µs per decision and RSS, the ratios to (b),
the RSS after 10,000 distinct cached tokens, and last the two summary lines
`authz_rps_ratio_vs_native_jwt=` (HTTP/1.1, the default) and
`authz_grpc_rps_ratio_vs_native_jwt=`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jwt  # noqa: E402
import yaml  # noqa: E402
from tests.support.idp import SigningKey  # noqa: E402
from tests.support.procs import envoy_binary, free_port, http_status, wait_for  # noqa: E402

from meshward.sidecar.domain.envoy import Endpoint, InboundConfig, build_inbound_bootstrap  # noqa: E402

ISSUER = "https://idp.bench.example"


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    cpu_us: float | None = None
    rss_mb: float | None = None


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    v = float(m.group(1))
    return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v


def wrk(port: int, token: str | None, seconds: int, script: Path | None = None) -> tuple[float, float, float, int, int]:
    cmd = ["wrk", "-t1", "-c16", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}/orders/1"]
    if token:
        cmd[1:1] = ["-H", f"Authorization: Bearer {token}"]
    if script:
        cmd[1:1] = ["-s", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, p50, p99, total, int(m.group(1)) if m else 0


class Envoy:
    def __init__(self, boot: dict[str, Any], workdir: Path, admin: int, name: str) -> None:
        cfg = workdir / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(boot, sort_keys=False))
        self.log = workdir / f"{name}.log"
        self.proc = subprocess.Popen([envoy_binary(), "-c", str(cfg), "--concurrency", "1", "--use-dynamic-base-id",
                                      "--log-level", "error"], stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        wait_for(f"{name} ready", lambda: http_status(f"http://127.0.0.1:{admin}/ready") == 200, proc=self.proc,
                 log=self.log)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def direct_response_bootstrap(port: int, admin: int, filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [{"name": "l", "address": {"socket_address": {
            "address": "127.0.0.1", "port_value": port}}, "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                             "HttpConnectionManager",
                    "stat_prefix": "b", "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
                    ]}]},
                    "http_filters": [*filters, {"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}]},
    }


def jwt_authn_filter(jwk: dict[str, Any]) -> dict[str, Any]:
    return {"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"idp": {"issuer": ISSUER, "audiences": ["orders"], "forward": False,
                              "local_jwks": {"inline_string": json.dumps({"keys": [jwk]})}}},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "idp"}}]}}


def meshward_bootstrap(port: int, admin: int, authz: Endpoint, transport: str) -> dict[str, Any]:
    boot = build_inbound_bootstrap(InboundConfig(listen=Endpoint(port=port), admin=Endpoint(port=admin),
                                                 app=Endpoint(port=free_port()), authz=authz,
                                                 transport=transport))  # type: ignore[arg-type]
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    # Measure authorization, not an upstream: answer from Envoy itself once ext_authz allowed.
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [
        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]
    return boot


def sidecar_config(jwks_port: int, cache: int) -> dict[str, Any]:
    return {
        "apiVersion": "sidecar.meshward.io/v1alpha1", "kind": "SidecarConfig", "workload": "bench/orders",
        "policies": [{"name": "orders-api",
                      "jwt": [{"issuer": ISSUER, "audiences": ["orders"], "jwksUri": f"http://127.0.0.1:{jwks_port}/jwks.json"}],
                      "rules": [
                          {"name": "no-admin", "action": "Deny", "to": {"paths": ["/admin/*"]}},
                          {"name": "no-deletes", "action": "Deny", "to": {"methods": ["DELETE"]}},
                          {"name": "health", "to": {"methods": ["GET"], "paths": ["/healthz"]}},
                          {"name": "readers", "to": {"methods": ["GET"], "paths": ["/orders/*"]}},
                          {"name": "tenant-writes", "to": {"methods": ["POST"]}, "when": ["claims.tenant == 'acme'"]},
                      ]}],
        "limits": {"tokenCacheSize": cache},
    }


class JwksServer:
    """Serves the JWKS over loopback http (allowed for loopback issuers) for the agents."""

    def __init__(self, jwk: dict[str, Any]) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        body = json.dumps({"keys": [jwk]}).encode()

        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Agent:
    def __init__(self, workdir: Path, cfg: dict[str, Any], name: str, grpc: bool = True) -> None:
        self.sock = workdir / f"{name}.sock"
        self.grpc_port = free_port()
        self.admin = free_port()
        cfg_file = workdir / f"{name}.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg))
        exe = Path(sys.executable).parent / "meshward-sidecar"
        self.proc = subprocess.Popen(
            [str(exe), "--config", str(cfg_file), "--http-listen", f"unix:{self.sock}", "--grpc-listen",
             f"127.0.0.1:{self.grpc_port}" if grpc else "off", "--admin-listen", f"127.0.0.1:{self.admin}",
             "--log-level", "WARNING"],
            stdout=(workdir / f"{name}-audit.jsonl").open("wb"), stderr=(workdir / f"{name}.log").open("wb"))
        wait_for(f"{name} ready", lambda: http_status(f"http://127.0.0.1:{self.admin}/readyz") == 200,
                 proc=self.proc, log=workdir / f"{name}.log")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def measure(name: str, port: int, token: str | None, seconds: int, pid: int | None = None,
            script: Path | None = None) -> Result:
    wrk(port, token, 1, script)  # warm-up: connections, caches, JIT-free but page faults
    cpu0 = proc_cpu_s(pid) if pid else 0.0
    rps, p50, p99, total, bad = wrk(port, token, seconds, script)
    cpu_us = (proc_cpu_s(pid) - cpu0) / max(total, 1) * 1e6 if pid else None
    return Result(name, rps, p50, p99, total, bad, cpu_us, proc_rss_mb(pid) if pid else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=8, help="duration of each measured run")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("bench: wrk not found; install it (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    wd = Path(tempfile.mkdtemp(prefix="meshward-bench-"))
    key = SigningKey("RS256", kid="bench")
    now = int(time.time())
    token = jwt.encode({"iss": ISSUER, "aud": "orders", "sub": "alice", "tenant": "acme", "iat": now,
                        "exp": now + 3600}, key.private, algorithm="RS256", headers={"kid": key.kid})
    jwks = JwksServer(key.jwk)
    results: list[Result] = []
    cleanup: list[Any] = []
    try:
        def envoy(boot: dict[str, Any], admin: int, name: str) -> None:
            cleanup.append(Envoy(boot, wd, admin, name))

        p, a = free_port(), free_port()
        envoy(direct_response_bootstrap(p, a, []), a, "a-direct")
        results.append(measure("a  envoy direct response", p, token, args.seconds))
        p, a = free_port(), free_port()
        envoy(direct_response_bootstrap(p, a, [jwt_authn_filter(key.jwk)]), a, "b-jwt-authn")
        results.append(measure("b  envoy jwt_authn RS256", p, token, args.seconds))

        for transport in ("http", "grpc"):
            sock, gport = wd / "noop.sock", free_port()
            addr = f"unix:{sock}" if transport == "http" else f"127.0.0.1:{gport}"
            noop = subprocess.Popen([sys.executable, str(ROOT / "bench" / "noop_authz.py"), transport, addr])
            cleanup.append(noop)
            ep = Endpoint(unix=str(sock)) if transport == "http" else Endpoint(port=gport)
            wait_for("noop authz", lambda s=sock, t=transport, g=gport: s.exists() if t == "http" else _tcp_open(g))
            p, a = free_port(), free_port()
            envoy(meshward_bootstrap(p, a, ep, transport), a, f"c-noop-{transport}")
            results.append(measure(f"c  no-op authorizer ({transport})", p, token, args.seconds, noop.pid))

        # One agent per transport, as deployed: an agent serves the transport its Envoy uses
        # (a grpc.aio server in the same process costs the HTTP path ~7 µs per request).
        for label, cache in (("d  meshward hot token", 10_000), ("e  meshward fresh token", 0)):
            for transport in ("http", "grpc"):
                agent = Agent(wd, sidecar_config(jwks.port, cache), f"{label[0]}-{transport}",
                              grpc=transport == "grpc")
                cleanup.append(agent)
                ep = Endpoint(unix=str(agent.sock)) if transport == "http" else Endpoint(port=agent.grpc_port)
                p, a = free_port(), free_port()
                envoy(meshward_bootstrap(p, a, ep, transport), a, f"{label[0]}-meshward-{transport}")
                results.append(measure(f"{label} ({transport})", p, token, args.seconds, agent.proc.pid))
        # RSS with 10,000 distinct cached tokens (ES256 to mint them quickly), through the HTTP path.
        ekey = SigningKey("ES256", kid="bench-ec")
        jwks2 = JwksServer(ekey.jwk)
        cfg2 = sidecar_config(jwks2.port, 10_000)
        cfg2["policies"][0]["jwt"][0]["algorithms"] = ["ES256"]
        many = Agent(wd, cfg2, "many", grpc=False)  # the default deployment: HTTP/1.1 only
        cleanup.append(many)
        tokens = [jwt.encode({"iss": ISSUER, "aud": "orders", "sub": f"user-{i}", "iat": now, "exp": now + 3600},
                             ekey.private, algorithm="ES256", headers={"kid": ekey.kid}) for i in range(10_000)]
        script = wd / "tokens.lua"
        (wd / "tokens.txt").write_text("\n".join(tokens) + "\n")
        script.write_text(_LUA.replace("TOKENS", str(wd / "tokens.txt")))
        p, a = free_port(), free_port()
        envoy(meshward_bootstrap(p, a, Endpoint(unix=str(many.sock)), "http"), a, "rss")
        wrk(p, None, 10, script)
        rss_10k = proc_rss_mb(many.proc.pid)
        cached = _metric(many.admin, "meshward_token_cache_entries")
    finally:
        for c in reversed(cleanup):
            with contextlib.suppress(Exception):  # best-effort teardown of benchmark processes
                c.stop() if hasattr(c, "stop") else (c.terminate(), c.wait(10))

    base = next(r for r in results if r.name.startswith("b")).rps
    print(f"{'scenario':40} {'rps':>9} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>10} {'rss MB':>7} {'vs b':>6} "
          f"{'non2xx':>7}")
    for r in results:
        cpu = f"{r.cpu_us:10.1f}" if r.cpu_us is not None else f"{'-':>10}"
        rss = f"{r.rss_mb:7.1f}" if r.rss_mb is not None else f"{'-':>7}"
        print(f"{r.name:40} {r.rps:9.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {cpu} {rss} {r.rps / base:6.2f} "
              f"{r.non_2xx:7d}")
    print(f"agent RSS with {cached:.0f} cached tokens: {rss_10k:.1f} MB")
    d_http = next(r for r in results if r.name.startswith("d") and "http" in r.name)
    d_grpc = next(r for r in results if r.name.startswith("d") and "grpc" in r.name)
    print(f"authz_rps_ratio_vs_native_jwt={d_http.rps / base:.3f}")
    print(f"authz_grpc_rps_ratio_vs_native_jwt={d_grpc.rps / base:.3f}")
    return 0


_LUA = """
local tokens = {}
for line in io.lines("TOKENS") do tokens[#tokens + 1] = line end
local i = 0
request = function()
  i = i % #tokens + 1
  return wrk.format("GET", "/orders/1", {["Authorization"] = "Bearer " .. tokens[i]})
end
"""


def _tcp_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _metric(admin: int, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
