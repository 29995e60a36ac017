"""The agent's admin port (15020 in an injected pod) against another tenant's pod: kubelet's answers, no details.

In an injected pod the port listens on the pod's address, uncaptured, so any pod of any namespace reaches it;
/readyz used to hand it the workload's issuer URLs, their last errors and the config generation. Details now go
only to callers from the pod itself (a Unix socket, loopback). The split is tested on the Admin router with the
flag the server sets, and the flag on real sockets (tests may only use loopback, which is local by definition).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from meshward.sidecar.domain.probes import AppProbe
from meshward.sidecar.engines.observe import Metrics
from meshward.sidecar.servers.admin import Admin
from meshward.sidecar.servers.http1 import Request, Response, is_local_peer, serve_tcp, serve_unix

ISSUER = "https://login.tenant-a.example.com"
READINESS = json.dumps({"ready": False, "generation": "sha256:5f1e", "issuers": {
    ISSUER: {"loaded": False, "keys": 0, "last_error": "HTTP 503 from https://login.tenant-a.example.com/jwks"}}})


def _admin(ready: bool, probe_ok: bool = True) -> Admin:
    async def prober(_p: AppProbe) -> tuple[bool, str]:
        return probe_ok, "ConnectionRefusedError: connect to 10.244.0.7:8080" if not probe_ok else "HTTP 200"
    return Admin(lambda: ready, lambda: READINESS, CollectorRegistry(), {"/app-health/app/readyz":
                                                                          AppProbe("httpGet", 8080)}, prober)


def _answer(admin: Admin, path: str, local: bool) -> Response:
    got = admin(Request("GET", path, {}, local))
    return asyncio.run(got) if asyncio.iscoroutine(got) else got  # type: ignore[return-value]


@pytest.mark.parametrize("ready", [True, False])
def test_readyz_from_another_namespaces_pod_tells_only_ready_or_not(ready: bool) -> None:
    """`curl http://<pod-ip>:15020/readyz` from any pod: the status kubelet needs, no issuer, error or
    generation."""
    resp = _answer(_admin(ready), "/readyz", local=False)
    assert resp.status == (200 if ready else 503)
    assert resp.body in (b"ok\n", b"not ready\n")
    assert b"tenant-a" not in resp.body and b"generation" not in resp.body


def test_an_app_probe_from_another_pod_tells_only_its_verdict() -> None:
    """/app-health/<container>/<kind> from any pod: the app's probe result as a status, not what failed."""
    resp = _answer(_admin(True, probe_ok=False), "/app-health/app/readyz", local=False)
    assert resp.status == 503 and resp.body == b"not ready\n"
    assert _answer(_admin(True), "/app-health/app/readyz", local=False).body == b"ok\n"


def test_the_pod_itself_still_reads_the_details() -> None:
    """`kubectl exec` into the agent's container (loopback): the readiness JSON and the probe's detail."""
    resp = _answer(_admin(False), "/readyz", local=True)
    assert resp.status == 503 and json.loads(resp.body)["issuers"][ISSUER]["loaded"] is False
    assert b"ConnectionRefusedError" in _answer(_admin(True, probe_ok=False), "/app-health/app/readyz", True).body


def test_metrics_name_no_issuer() -> None:
    """/metrics answers the same pods (Prometheus scrapes the pod's address): JWKS fetches are counted by result,
    never by issuer URL."""
    metrics = Metrics(CollectorRegistry())
    metrics.jwks_fetched(ISSUER, False)
    metrics.jwks_fetched(ISSUER, True)
    text = generate_latest(metrics.registry).decode()
    assert "tenant-a" not in text
    assert 'meshward_jwks_fetches_total{result="failure"} 1.0' in text


@pytest.mark.parametrize(("peer", "local"), [
    (("127.0.0.1", 40000), True), (("127.0.0.53", 1), True), (("::1", 1, 0, 0), True),
    (("::ffff:127.0.0.1", 1, 0, 0), True), ("", True), (None, True),
    (("10.244.0.7", 40000), False), (("::ffff:10.244.0.7", 1, 0, 0), False), (("fe80::1%eth0", 1, 0, 2), False),
    (("192.168.1.1", 1), False), (("not-an-address", 1), False),
])
def test_only_loopback_and_unix_peers_are_the_pod_itself(peer: object, local: bool) -> None:
    assert is_local_peer(peer) is local


def test_the_server_marks_loopback_and_unix_connections_local() -> None:
    """The flag comes from the real socket's peer address, never from anything the client sends."""
    seen: list[bool] = []

    def handler(req: Request) -> Response:
        seen.append(req.local)
        return Response(200)

    async def scenario(sock_dir: str) -> None:
        tcp = await serve_tcp(handler, "127.0.0.1", 0)
        unix = await serve_unix(handler, str(Path(sock_dir) / "admin.sock"))
        port = tcp.sockets[0].getsockname()[1]
        for reader, writer in (await asyncio.open_connection("127.0.0.1", port),
                               await asyncio.open_unix_connection(str(Path(sock_dir) / "admin.sock"))):
            writer.write(b"GET /readyz HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 10.0.0.1\r\n\r\n")
            await writer.drain()
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
            writer.close()
        tcp.close()
        unix.close()

    with tempfile.TemporaryDirectory(prefix="mw-") as tmp:
        asyncio.run(scenario(tmp))
    assert seen == [True, True]
