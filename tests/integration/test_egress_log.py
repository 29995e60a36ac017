"""Egress control through a real Envoy on the builder's own outbound listener, logging to the agent's real access
log service (issue 20): allowed connections pass and are counted, refused ones never reach a server and are
audited.

What only a pod has is swapped for loopback: without capture, a connection's original destination is the listener's
own address, so the listener is run twice (two ports, one allowed) and the passthrough cluster points at an echo
server instead of at the original destination (which would be Envoy itself). Real pods: tests/e2e/test_compat.py,
`test_a_namespace_locked_to_meshed_only_egress_reaches_meshed_and_allowed_destinations_only`.
"""

from __future__ import annotations

import asyncio
import copy
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from meshward.sidecar.domain.egress import Egress, parse_allow
from meshward.sidecar.domain.envoy import PASSTHROUGH, XDS, outbound_resources
from meshward.sidecar.engines.egress import EgressLog
from meshward.sidecar.servers.als import AccessLogs, register
from tests.integration.test_http_routes import _static
from tests.kube import Cluster
from tests.support.procs import free_port, run_envoy, wait_for
from tests.unit.test_egress import _Audit

pytestmark = pytest.mark.integration


def _echo() -> int:
    """A TCP server that answers `echo:` + what it got, on a free port."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            conn, _ = srv.accept()
            with conn:
                if data := conn.recv(1024):
                    conn.sendall(b"echo:" + data)
    threading.Thread(target=serve, daemon=True).start()
    port: int = srv.getsockname()[1]
    return port


@pytest.fixture
def agent_logs(tmp_path: Path) -> Iterator[tuple[Path, CollectorRegistry, _Audit]]:
    """The agent's access log service on a Unix socket, served from a loop of its own."""
    sock, registry, audit = tmp_path / "sds.sock", CollectorRegistry(), _Audit()
    logs = AccessLogs(EgressLog(registry, audit, lambda: "shop/orders"))
    loop = asyncio.new_event_loop()
    started = threading.Event()
    server: list[grpc.aio.Server] = []

    async def serve() -> None:
        s = grpc.aio.server()
        register(logs, s)
        s.add_insecure_port(f"unix:{sock}")
        await s.start()
        server.append(s)
        started.set()
        await s.wait_for_termination()
    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    started.wait(10)
    yield sock, registry, audit
    asyncio.run_coroutine_threadsafe(server[0].stop(0), loop)
    thread.join(10)  # the server's end ends wait_for_termination, and the loop with it
    assert not thread.is_alive()


def _talk(port: int) -> bytes:
    """What a client connecting to `port` and saying `hi` gets back (b"" if the connection is closed on it)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"hi")
            return c.recv(100)
    except ConnectionResetError:
        return b""


def test_a_locked_listener_passes_the_allowed_port_and_refuses_and_audits_the_other(
        agent_logs: tuple[Path, CollectorRegistry, _Audit], tmp_path: Path) -> None:
    sock, registry, audit = agent_logs
    allowed, other, echo = free_port(), free_port(), _echo()
    (listener,), clusters = outbound_resources({}, "", egress=Egress(True, parse_allow(f"127.0.0.1/32:{allowed}")))
    listeners: list[dict[str, Any]] = []
    for port in (allowed, other):
        lis = copy.deepcopy(listener)
        lis.pop("additional_addresses", None)
        lis.pop("socket_options", None)
        listeners.append({**lis, "name": f"outbound-{port}",
                          "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}})
    xds = {"name": XDS, "type": "STATIC", "connect_timeout": "1s",
           "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
               "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
               "explicit_http_config": {"http2_protocol_options": {}}}},
           "load_assignment": {"cluster_name": XDS, "endpoints": [{"lb_endpoints": [
               {"endpoint": {"address": {"pipe": {"path": str(sock)}}}}]}]}}
    passthrough = _static(PASSTHROUGH, echo, {"connect_timeout": "1s"})
    admin = free_port()
    boot = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": listeners, "clusters": [*clusters, xds, passthrough]}}
    with run_envoy(boot, tmp_path, admin):
        wait_for("the allowed port passing through", lambda: _talk(allowed) == b"echo:hi")
        assert _talk(other) == b""

        def total(port: int, outcome: str) -> float:
            return registry.get_sample_value("meshward_egress_total", {
                "destination": f"127.0.0.1:{port}", "protocol": "tcp", "outcome": outcome}) or 0.0
        wait_for("both connections logged to the agent", lambda: total(allowed, "allowed") >= 1 and
                 total(other, "refused") >= 1)
    assert total(other, "allowed") == total(allowed, "refused") == 0
    refused = [r for r in audit.records if r.destination == f"127.0.0.1:{other}"]
    assert refused and all((r.outcome, r.transport, r.method, r.port, r.workload) ==
                           ("forbidden", "egress", "TCP", other, "shop/orders") for r in refused)
    assert not [r for r in audit.records if r.port == allowed]


def test_the_operator_reads_namespaces_and_the_dns_service_as_plain_json(cluster: Cluster) -> None:
    """What the operator primes its egress from, on a real API server: every Namespace, a Service by name (None when
    it does not exist, as `kube-system/kube-dns` on the local control plane), and a namespace's Services."""
    from meshward.operator.clients.kube import KubeClient

    kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig))
    assert {"default", "kube-system"} <= {n["metadata"]["name"] for n in kube.list_namespaces()}
    service = kube.read_service("default", "kubernetes")
    assert service is not None and service["spec"]["clusterIP"]
    assert kube.read_service("default", "no-such-service") is None
    assert "kubernetes" in {s["metadata"]["name"] for s in kube.list_services("default")}
