"""What counting egress costs: connections out of the mesh with and without their access log to the agent.

Every connection an injected pod's app opens to an address outside the mesh passes its Envoy's outbound
listener, and since issue 20 each is logged over gRPC to the pod's agent (its per-destination counters, the
audit line of a refusal). Measured here on loopback with the builder's own outbound listener (egress open),
interleaved: the same listener with its access logs (to a real agent access log service, in a process of its
own) and without them (the baseline), in one Envoy, passing through to an Envoy echo server. Each round opens
`--connections` new connections (each sends 8 binary bytes, reads the echo, closes) from `--workers` client processes.

Printed per variant: connections per second (bounded by the Python clients on this machine; the CPU figures
are what to read) and CPU per connection of the listener's Envoy and of the agent. Last lines:
`egress_log_connect_rate_ratio=<x>` (with logs / without), `egress_log_envoy_cpu_us_per_connection_added=<x>`
and `egress_log_agent_cpu_us_per_connection=<x>`.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from tests.support.procs import envoy_binary, free_port, wait_for  # noqa: E402

from meshward.sidecar.domain.envoy import PASSTHROUGH, XDS, outbound_resources  # noqa: E402

# The agent's access log service alone, in a process whose CPU is measured (audit lines to /dev/null).
AGENT = """
import asyncio, sys
import grpc
from prometheus_client import CollectorRegistry
from meshward.sidecar.engines.egress import EgressLog
from meshward.sidecar.engines.observe import JsonLineAudit
from meshward.sidecar.servers.als import AccessLogs, register

async def main() -> None:
    server = grpc.aio.server()
    register(AccessLogs(EgressLog(CollectorRegistry(), JsonLineAudit(open('/dev/null', 'w')), lambda: 'bench')),
             server)
    server.add_insecure_port('unix:' + sys.argv[1])
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _strip_logs(doc: Any) -> Any:
    """`doc` without any access_log (the baseline listener)."""
    if isinstance(doc, dict):
        return {k: _strip_logs(v) for k, v in doc.items() if k != "access_log"}
    if isinstance(doc, list):
        return [_strip_logs(v) for v in doc]
    return doc


def _listener(base: dict[str, Any], name: str, port: int) -> dict[str, Any]:
    lis = copy.deepcopy(base)
    lis.pop("additional_addresses", None)
    lis.pop("socket_options", None)
    return {**lis, "name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}


def _static(name: str, address: dict[str, Any], http2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]}}
    if http2:
        cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return cluster


def _envoy(boot: dict[str, Any], wd: Path, name: str, admin: int) -> subprocess.Popen[bytes]:
    path = wd / f"{name}.yaml"
    path.write_text(yaml.safe_dump(boot, sort_keys=False))
    proc = subprocess.Popen([envoy_binary(), "-c", str(path), "--concurrency", "1", "--use-dynamic-base-id",
                             "--log-level", "error"], stdout=(wd / f"{name}.log").open("wb"), stderr=subprocess.STDOUT)
    import urllib.request

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
            return bool(r.status == 200)
    wait_for(f"{name} ready", ready, timeout=30, proc=proc)
    return proc


# What each client says first: binary, as a database client's startup message is, so the listener's HTTP inspector
# tells at once that it is not HTTP (a short text such as `hi` waits out its 1 s sniffing window instead).
HELLO = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"


def _client(port: int, count: int) -> int:
    """Open `count` connections to `port` one after the other (say HELLO, read the echo, close); the failures."""
    failed = 0
    for _ in range(count):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(HELLO)
                if c.recv(16) != HELLO:
                    failed += 1
        except OSError:
            failed += 1
    return failed


def _round(port: int, connections: int, workers: int, pids: list[int]) -> tuple[float, list[float], int]:
    """(connections per second, CPU seconds of each of `pids`, failures) of one round."""
    before = [cpu_seconds(p) for p in pids]
    start = time.monotonic()
    with multiprocessing.Pool(workers) as pool:
        failed = sum(pool.starmap(_client, [(port, connections // workers)] * workers))
    elapsed = time.monotonic() - start
    used = [cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]
    return (connections // workers * workers) / elapsed, used, failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=6000, help="new connections per round and variant")
    ap.add_argument("--workers", type=int, default=4, help="client processes")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="egress-bench-") as tmp:
        wd = Path(tmp)
        sock = wd / "agent.sock"
        agent = subprocess.Popen([sys.executable, "-c", AGENT, str(sock)], cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        procs: list[subprocess.Popen[Any]] = [agent]
        try:
            wait_for("the agent's access log service", sock.exists, timeout=30, proc=agent)
            echo_port, echo_admin = free_port(), free_port()
            procs.append(_envoy({
                "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": echo_admin}}},
                "static_resources": {"listeners": [{"name": "echo", "address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": echo_port}}, "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.echo", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.echo.v3.Echo"}}]}]}]}},
                wd, "echo", echo_admin))
            (outbound,), _ = outbound_resources({}, "")
            logged, bare, admin = free_port(), free_port(), free_port()
            procs.append(_envoy({
                "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
                "static_resources": {
                    "listeners": [_listener(outbound, "logged", logged),
                                  _listener(_strip_logs(outbound), "bare", bare)],
                    "clusters": [_static(PASSTHROUGH, {"socket_address": {"address": "127.0.0.1",
                                                                          "port_value": echo_port}}),
                                 _static(XDS, {"pipe": {"path": str(sock)}}, http2=True)]}},
                wd, "outbound", admin))
            envoy_pid = procs[-1].pid
            _client(logged, 200)  # warm-up: the access log stream is open
            _client(bare, 200)
            results: dict[str, list[tuple[float, list[float], int]]] = {"logged": [], "bare": []}
            for _ in range(args.rounds):
                for name, port in (("bare", bare), ("logged", logged)):
                    results[name].append(_round(port, args.connections, args.workers, [envoy_pid, agent.pid]))
                    time.sleep(1.5)  # Envoy flushes its access log batch every second: counted in this round
        finally:
            for p in reversed(procs):
                p.terminate()
                p.wait(10)
    per: dict[str, tuple[float, float, float]] = {}
    for name, runs in results.items():
        n = args.connections // args.workers * args.workers
        rate = sorted(r[0] for r in runs)[len(runs) // 2]
        envoy_us = sorted(r[1][0] for r in runs)[len(runs) // 2] / n * 1e6
        agent_us = sorted(r[1][1] for r in runs)[len(runs) // 2] / n * 1e6
        failed = sum(r[2] for r in runs)
        per[name] = (rate, envoy_us, agent_us)
        print(f"{name:7s} {rate:8.0f} connections/s  Envoy {envoy_us:6.1f} µs/connection  "
              f"agent {agent_us:6.1f} µs/connection  failed {failed}")
    print(f"egress_log_connect_rate_ratio={per['logged'][0] / per['bare'][0]:.2f}")
    print(f"egress_log_envoy_cpu_us_per_connection_added={per['logged'][1] - per['bare'][1]:.1f}")
    print(f"egress_log_agent_cpu_us_per_connection={per['logged'][2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
