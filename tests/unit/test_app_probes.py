"""The app's probes behind the agent (sidecar/clients/probe.py, servers/admin.py), on real sockets: kubelet's
semantics (HTTP 200-399, a TCP connect, gRPC SERVING), the original path and headers, and the timeout."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable

import grpc
import pytest

from meshward.sidecar.clients.probe import probe
from meshward.sidecar.domain.probes import AppProbe, grpc_health_request, grpc_serving, parse_probes


async def _http_app(status: int, seen: list[bytes]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()
    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


@pytest.mark.parametrize(("status", "ok"), [(200, True), (302, True), (399, True), (404, False), (503, False)])
def test_http_probes_succeed_like_kubelets(status: int, ok: bool) -> None:
    async def scenario() -> tuple[bool, list[bytes]]:
        seen: list[bytes] = []
        app = await _http_app(status, seen)
        try:
            got, _ = await probe(AppProbe("httpGet", _port(app), "/ready?x=1", headers=(("X-Probe", "1"),)),
                                 "127.0.0.1")
        finally:
            app.close()
        return got, seen
    got, seen = asyncio.run(scenario())
    assert got is ok
    assert seen[0].startswith(b"GET /ready?x=1 HTTP/1.1\r\n") and b"X-Probe: 1\r\n" in seen[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_probes_connect_and_a_closed_port_fails() -> None:
    async def scenario() -> tuple[bool, bool]:
        app = await _http_app(200, [])
        try:
            up, _ = await probe(AppProbe("tcpSocket", _port(app)), "127.0.0.1")
        finally:
            app.close()
        down, _ = await probe(AppProbe("tcpSocket", _closed_port()), "127.0.0.1")
        return up, down
    assert asyncio.run(scenario()) == (True, False)


def test_a_silent_app_fails_at_the_probes_timeout() -> None:
    async def scenario() -> tuple[bool, str]:
        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(5)
        app = await asyncio.start_server(hang, "127.0.0.1", 0)
        try:
            return await probe(AppProbe("httpGet", _port(app), timeout_s=0.2), "127.0.0.1")
        finally:
            app.close()
    ok, detail = asyncio.run(scenario())
    assert not ok and "0.2 s" in detail


@pytest.mark.parametrize(("answer", "ok"), [(b"\x08\x01", True), (b"\x08\x02", False)])
def test_grpc_probes_ask_the_health_service(answer: bytes, ok: bool) -> None:
    async def scenario() -> tuple[bool, bytes]:
        asked: list[bytes] = []

        async def check(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            asked.append(request)
            return answer
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
            "Check": grpc.unary_unary_rpc_method_handler(check)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            got, _ = await probe(AppProbe("grpc", port, service="orders.v1"), "127.0.0.1")
        finally:
            await server.stop(None)
        return got, asked[0]
    got, asked = asyncio.run(scenario())
    assert got is ok and asked == grpc_health_request("orders.v1")
    assert grpc_serving(b"\x08\x01") and not grpc_serving(b"")


def test_the_injectors_probes_parse_and_garbage_does_not() -> None:
    probes = parse_probes(json.dumps({"/app-health/app/readyz": {"httpGet": {"path": "/r", "port": 8080,
                                                                              "scheme": "https"},
                                                                  "timeoutSeconds": 3}}))
    assert probes["/app-health/app/readyz"] == AppProbe("httpGet", 8080, "/r", "HTTPS", timeout_s=3.0)
    assert parse_probes("") == {}
    for bad in ("[]", '{"/x": {}}', '{"/app-health/a/b": {"exec": {}}}'):
        with pytest.raises(ValueError, match="probe"):
            parse_probes(bad)


def test_the_admin_port_answers_a_probe_with_the_apps_result() -> None:
    from prometheus_client import CollectorRegistry

    from meshward.sidecar.servers.admin import Admin
    from meshward.sidecar.servers.http1 import Request

    calls: list[AppProbe] = []

    def prober(result: bool) -> Callable[[AppProbe], Awaitable[tuple[bool, str]]]:
        async def run(p: AppProbe) -> tuple[bool, str]:
            calls.append(p)
            return result, "HTTP 200" if result else "HTTP 500"
        return run

    p = AppProbe("httpGet", 8080)
    for result, code in ((True, 200), (False, 503)):
        admin = Admin(lambda: True, lambda: "{}", CollectorRegistry(), {"/app-health/app/readyz": p}, prober(result))
        response = admin(Request("GET", "/app-health/app/readyz", {}))
        assert asyncio.iscoroutine(response), "a probe is answered asynchronously"
        assert asyncio.run(response).status == code
    assert calls == [p, p]
    unknown = Admin(lambda: True, lambda: "{}", CollectorRegistry(), {}, None)(Request("GET", "/app-health/x/y", {}))
    assert unknown.status == 404  # type: ignore[union-attr]
