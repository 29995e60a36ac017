"""Every HTTP an app speaks, through two real Envoys on the pod builders' own config (issue 19).

The client's Envoy runs the outbound listener `outbound_resources` builds and the server's
the inbound listener of `build_pod_bootstrap`, with what only a pod has swapped for
loopback (`on_loopback`): no capture (fixed ports, no original destination), certificates
from files instead of the agent's SDS. Everything HTTP (the connection managers, routes,
timeouts, upgrades, ext_authz to a real agent) is the builders' own. Measured before this
config, in a cluster: WebSocket 403 at the handshake, SSE and long polls cut at 15 s
(Envoy's default route timeout), a slow client's download cut the same way, HTTP/1.0 426.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import http.client
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from meshward.sidecar.domain.envoy import (
    INBOUND_APP,
    Destination,
    HttpSettings,
    PodProxy,
    build_pod_bootstrap,
    outbound_resources,
)
from tests.support.pki import CertFiles, TestCA
from tests.support.procs import Agent, free_port, run_envoy

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
BACKEND = "spiffe://cluster.local/ns/shop/sa/backend"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC11B65"
# The client Envoy's outbound listeners, one per workload setting under test.
SETTINGS = {"default": HttpSettings(), "http10": HttpSettings(accept_http10=True),
            "timeout": HttpSettings(route_timeout_s=2)}


def backend_policy() -> dict[str, Any]:
    return {"apiVersion": "sidecar.meshward.io/v1alpha1", "kind": "SidecarConfig", "workload": "shop/backend",
            "policies": [{"name": "backend", "rules": [
                {"name": "no-private", "action": "Deny", "to": {"paths": ["/private/*"]}},
                {"name": "frontend-reads", "from": {"principals": [FRONTEND]}, "to": {"methods": ["GET"]}}]}]}


# ------------------------------------------------------------------------------------------------ the app


def _ws_frame(payload: bytes, mask: bytes | None) -> bytes:
    """One unfragmented text frame (RFC 6455 §5.2), masked when the client sends it."""
    assert len(payload) < 126
    if mask is None:
        return bytes([0x81, len(payload)]) + payload
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _read_exact(read: Any, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = read(n - len(out))
        if not chunk:
            raise EOFError("connection closed mid-frame")
        out += chunk
    return out


def _ws_read(read: Any) -> tuple[int, bytes]:
    """One frame's opcode and payload (short frames only)."""
    head = _read_exact(read, 2)
    length, masked = head[1] & 0x7F, head[1] & 0x80
    mask = _read_exact(read, 4) if masked else b""
    payload = _read_exact(read, length)
    if masked:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head[0] & 0x0F, payload


class App:
    """The app behind the server's Envoy: WebSocket echo, SSE, a large body, and an echo of what it was sent."""

    def __init__(self) -> None:
        self.paths: list[str] = []  # every request the app received
        paths = self.paths

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                paths.append(self.path)
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path.endswith("/ws"):
                    self._websocket()
                elif url.path == "/sse":
                    self._sse(int(query["events"]), float(query.get("every", "1")))
                elif url.path == "/bytes":
                    self._bytes(int(query["n"]))
                else:
                    body = repr(sorted((k.lower(), v) for k, v in self.headers.items())).encode()
                    self.send_response(200)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def _websocket(self) -> None:
                key = self.headers.get("sec-websocket-key", "")
                if self.headers.get("upgrade", "").lower() != "websocket" or not key:
                    body = b"not a WebSocket handshake"  # and the connection stays open for the next request
                    self.send_response(400)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
                self.send_response(101)
                self.send_header("upgrade", "websocket")
                self.send_header("connection", "Upgrade")
                self.send_header("sec-websocket-accept", accept)
                self.end_headers()
                self.wfile.write(_ws_frame(b"hello from the app", None))
                self.wfile.flush()
                try:
                    while True:
                        opcode, payload = _ws_read(self.rfile.read)
                        if opcode == 8:
                            break
                        self.wfile.write(_ws_frame(b"echo: " + payload, None))
                        self.wfile.flush()
                except (EOFError, OSError):
                    pass
                self.close_connection = True

            def _sse(self, events: int, every: float) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                try:
                    for n in range(events):
                        data = f"data: {n}\n\n".encode()
                        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                        self.wfile.flush()
                        time.sleep(every)  # the app's own pace: one event a second
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    self.close_connection = True

            def _bytes(self, n: int) -> None:
                self.send_response(200)
                self.send_header("content-length", str(n))
                self.end_headers()
                chunk = b"x" * 65536
                try:
                    for start in range(0, n, len(chunk)):
                        self.wfile.write(chunk[: n - start])
                except OSError:
                    self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -------------------------------------------------------------------------------- the pod config on loopback


def _file_tls(node: Any, cert: CertFiles, ca: Path) -> Any:
    """`node` with every SDS secret of a TLS context replaced by `cert` and the trust bundle `ca` from files."""
    if isinstance(node, list):
        return [_file_tls(x, cert, ca) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _file_tls(v, cert, ca) for k, v in node.items()}
    if "tls_certificate_sds_secret_configs" in out:
        del out["tls_certificate_sds_secret_configs"]
        out["tls_certificates"] = [{"certificate_chain": {"filename": str(cert.cert)},
                                    "private_key": {"filename": str(cert.key)}}]
    if "validation_context_sds_secret_config" in out:
        del out["validation_context_sds_secret_config"]
        out["validation_context"] = {"trusted_ca": {"filename": str(ca)}}
    if "combined_validation_context" in out:
        combined = out.pop("combined_validation_context")
        out["validation_context"] = {**combined["default_validation_context"], "trusted_ca": {"filename": str(ca)}}
    return out


def _static(name: str, port: int, like: dict[str, Any]) -> dict[str, Any]:
    """Cluster `like` sending to 127.0.0.1:`port` instead of the original destination (no capture here)."""
    out = {k: v for k, v in like.items() if k not in ("type", "lb_policy")}
    return {**out, "name": name, "type": "STATIC", "load_assignment": {"cluster_name": name, "endpoints": [
        {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                         "port_value": port}}}}]}]}}


def on_loopback(boot: dict[str, Any], listeners: list[dict[str, Any]], clusters: list[dict[str, Any]],
                cert: CertFiles, ca: Path) -> dict[str, Any]:
    """A pod bootstrap with `listeners` and `clusters` made static, TLS from files, and no xDS (nothing serves it)."""
    out = copy.deepcopy(boot)
    out.pop("dynamic_resources")
    out["static_resources"] = _file_tls({
        "listeners": [{**lis, "listener_filters": [f for f in lis.get("listener_filters", [])
                                                   if "original_dst" not in f["name"]]} for lis in listeners],
        "clusters": [c for c in out["static_resources"]["clusters"] if c["name"] != "meshward_sds"] + clusters,
    }, cert, ca)
    return out


@dataclass
class Mesh:
    app: App
    agent: Agent
    outbound: dict[str, int]  # the client Envoy's outbound listeners' ports, by setting


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    wd = tmp_path_factory.mktemp("routes")
    server_dir, client_dir = wd / "server", wd / "client"
    server_dir.mkdir()
    client_dir.mkdir()
    ca = TestCA(wd / "pki")
    frontend, backend = ca.issue("frontend", uris=(FRONTEND,)), ca.issue("backend", uris=(BACKEND,))
    app = App()
    agent = Agent(wd, backend_policy(), http=f"unix:{server_dir / 'authz.sock'}").start()
    # The client's outbound exchange asks its own agent only for requests carrying a context token: none here.
    os.symlink(server_dir / "authz.sock", client_dir / "authz.sock")

    inbound_port = free_port()
    server = build_pod_bootstrap(PodProxy("shop/backend-1", socket_dir=str(server_dir)))
    inbound = next(lis for lis in server["static_resources"]["listeners"] if lis["name"] == "inbound")
    inbound["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": inbound_port}}
    server_clusters = [_static(INBOUND_APP, app.port, c) if c["name"] == INBOUND_APP else c
                       for c in server["static_resources"]["clusters"]]
    server["static_resources"]["clusters"] = [c for c in server_clusters if c["name"] != INBOUND_APP]
    server_boot = on_loopback(server, [inbound], [c for c in server_clusters if c["name"] == INBOUND_APP],
                              backend, ca.ca_file)

    client = build_pod_bootstrap(PodProxy("shop/frontend-1", socket_dir=str(client_dir)))
    ports = {name: free_port() for name in SETTINGS}
    listeners: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    for name, settings in SETTINGS.items():
        # The server's inbound answers at 127.0.0.1, the one meshed address of this map.
        lis, clusters = outbound_resources({"127.0.0.1": Destination((BACKEND,))}, http=settings)
        listeners.append({**lis[0], "name": f"outbound-{name}",
                          "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports[name]}}})
    client_boot = on_loopback(client, listeners, [_static(c["name"], inbound_port, c) for c in clusters],
                              frontend, ca.ca_file)
    try:
        with run_envoy(server_boot, wd, str(server_dir / "envoy-admin.sock"), name="envoy-server"), \
                run_envoy(client_boot, wd, str(client_dir / "envoy-admin.sock"), name="envoy-client"):
            yield Mesh(app, agent, ports)
    finally:
        agent.stop()
        app.close()


# ------------------------------------------------------------------------------------------------- clients


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _head(s: socket.socket) -> tuple[str, bytes]:
    """The response's status line and head, and whatever of the body came with them."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.decode(errors="replace"), rest


def _handshake(port: int, path: str) -> tuple[socket.socket, str, bytes]:
    s = _connect(port)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(f"GET {path} HTTP/1.1\r\nhost: backend\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
              f"sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n\r\n".encode())
    head, rest = _head(s)
    if head.startswith("HTTP/1.1 101"):
        want = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        assert f"sec-websocket-accept: {want}".lower() in head.lower(), head
    return s, head, rest


class _Reader:
    """Frames from a socket, starting with the bytes that arrived with the handshake's response."""

    def __init__(self, s: socket.socket, rest: bytes) -> None:
        self.s, self.buffer = s, rest

    def read(self, n: int) -> bytes:
        if not self.buffer:
            self.buffer = self.s.recv(65536)
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out


def _exchange(s: socket.socket, reader: _Reader, text: str) -> str:
    s.sendall(_ws_frame(text.encode(), os.urandom(4)))
    opcode, payload = _ws_read(reader.read)
    assert opcode == 1
    return payload.decode()


def _sse(port: int, path: str) -> tuple[list[str], float]:
    """The events of an SSE response as they arrive, and how long the stream was held."""
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    events: list[str] = []
    try:
        conn.request("GET", path, headers={"host": "backend", "accept": "text/event-stream"})
        r = conn.getresponse()
        assert r.status == 200
        while line := r.readline():
            if line.startswith(b"data: "):
                events.append(line[6:].strip().decode())
    except (http.client.IncompleteRead, ConnectionError):
        pass  # cut: the events so far say where
    finally:
        conn.close()
    return events, time.monotonic() - start


def _slow_read(port: int, size: int, rate: float) -> int:
    """Body bytes of GET /bytes?n=`size` read at `rate` bytes a second through a small receive buffer."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # the client, not the kernel, sets the pace
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    try:
        s.sendall(f"GET /bytes?n={size} HTTP/1.1\r\nhost: backend\r\n\r\n".encode())
        head, rest = _head(s)
        assert head.startswith("HTTP/1.1 200"), head
        got, start = len(rest), time.monotonic()
        while got < size:
            ahead = got / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)  # the slow client's pace, not a wait for a condition
            try:
                chunk = s.recv(16 * 1024)
            except ConnectionError:
                break
            if not chunk:
                break
            got += len(chunk)
        return got
    finally:
        s.close()


# --------------------------------------------------------------------------------------------------- tests


def test_a_websocket_goes_through_both_sidecars_both_ways(mesh: Mesh) -> None:
    s, head, rest = _handshake(mesh.outbound["default"], "/chat/ws")
    try:
        assert head.startswith("HTTP/1.1 101"), head
        reader = _Reader(s, rest)
        opcode, greeting = _ws_read(reader.read)
        assert (opcode, greeting) == (1, b"hello from the app")  # server to client, unprompted
        for n in range(3):
            assert _exchange(s, reader, f"message {n}") == f"echo: message {n}"  # client to server and back
    finally:
        s.close()


def test_a_websocket_handshake_the_policy_denies_never_upgrades(mesh: Mesh) -> None:
    """Authorization bypass through an upgrade: the handshake is a GET that ext_authz decides like any other; a
    denied one gets the 403 and no tunnel, so nothing sent after it reaches the app as frames."""
    s, head, _ = _handshake(mesh.outbound["default"], "/private/ws")
    try:
        assert head.startswith("HTTP/1.1 403"), head
        assert "upgrade: websocket" not in head.lower()
    finally:
        s.close()


def test_websocket_smuggling_an_upgrade_the_app_refuses_leaves_no_tunnel(mesh: Mesh) -> None:
    """WebSocket smuggling (0ang3el, 2019): a proxy that takes an upgrade request for an upgrade even when the app
    answers it with no 101 leaves a raw tunnel, and the next request on it reaches the app unchecked. The app refuses
    this handshake (no Sec-WebSocket-Key: 400, the connection kept open); the request smuggled after it never reaches
    the app (Envoy closes the connection, or authorizes the request and denies it)."""
    s = _connect(mesh.outbound["default"])
    smuggled = f"/private/secrets-{os.urandom(4).hex()}"
    try:
        s.sendall(b"GET /chat/ws HTTP/1.1\r\nhost: backend\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                  b"sec-websocket-version: 13\r\n\r\n")
        head, body = _head(s)
        assert head.startswith("HTTP/1.1 400"), head  # the app refused the upgrade: no 101
        length = int(next(line.split(":")[1] for line in head.lower().splitlines() if line.startswith("content-length")))
        while len(body) < length:
            body += s.recv(4096)
        s.sendall(f"GET {smuggled} HTTP/1.1\r\nhost: backend\r\n\r\n".encode())
        data = b""
        while b"HTTP/1.1 403" not in data and b"HTTP/1.1 200" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert b"HTTP/1.1 200" not in data, data
        assert b"HTTP/1.1 403" in data or not data, data  # denied, or the connection closed: no tunnel either way
    except ConnectionError:
        pass  # Envoy closing the connection after the refused upgrade leaves no tunnel either
    finally:
        s.close()
    assert "/chat/ws" in mesh.app.paths and smuggled not in mesh.app.paths


def test_h2c_upgrade_is_stripped_and_the_request_served_as_http1(mesh: Mesh) -> None:
    """h2c smuggling (Bishop Fox, 2020): a proxy forwarding `Upgrade: h2c` lets the app switch the connection to
    HTTP/2, past the proxy's checks. Envoy drops the h2c upgrade headers (as under Istio): the app sees HTTP/1.1."""
    conn = http.client.HTTPConnection("127.0.0.1", mesh.outbound["default"], timeout=10)
    try:
        conn.request("GET", "/headers", headers={"host": "backend", "upgrade": "h2c", "connection": "Upgrade, HTTP2-Settings",
                                                 "http2-settings": "AAMAAABkAARAAAAAAAIAAAAA"})
        r = conn.getresponse()
        seen = r.read().decode()
        assert r.status == 200 and r.version == 11
        assert "'upgrade'" not in seen and "'http2-settings'" not in seen and "h2c" not in seen
    finally:
        conn.close()


def test_long_lived_responses_outlive_envoys_default_15s_route_timeout(mesh: Mesh) -> None:
    """Before, both cut at 15 s (`upstream request timeout`, the client Envoy's upstream_rq_timeout): an SSE stream
    and a slow client's download, held 20 s here side by side. The slow client reads 48 MiB at 2.4 MiB/s: under a
    15 s route timeout it would get the 36 MiB read by then plus what the buffers on the way held, never all."""
    size, rate = 48 * 1024 * 1024, 2.4 * 1024 * 1024
    results: dict[str, Any] = {}

    def download() -> None:
        results["bytes"] = _slow_read(mesh.outbound["default"], size, rate)

    reader = threading.Thread(target=download)
    reader.start()
    events, held = _sse(mesh.outbound["default"], "/sse?events=20")
    reader.join(60)
    whole = {"sse": events == [str(n) for n in range(20)] and held >= 19, "download": results.get("bytes") == size}
    assert whole == {"sse": True, "download": True}, (events, held, results)


def test_a_workloads_route_timeout_cuts_a_response_but_never_a_websocket(mesh: Mesh) -> None:
    """meshward.io/route-timeout (2 s here) bounds a response from the end of the request; a WebSocket session is
    not a response and outlives it, bounded only by the stream idle timeout."""
    events, held = _sse(mesh.outbound["timeout"], "/sse?events=8&every=0.5")
    assert len(events) < 8 and held < 4, (events, held)
    s, head, rest = _handshake(mesh.outbound["timeout"], "/chat/ws")
    try:
        assert head.startswith("HTTP/1.1 101"), head
        reader = _Reader(s, rest)
        assert _ws_read(reader.read) == (1, b"hello from the app")
        deadline = time.monotonic() + 4
        n = 0
        while time.monotonic() < deadline:
            assert _exchange(s, reader, f"tick {n}") == f"echo: tick {n}"
            n += 1
            time.sleep(0.5)  # a chatty client's pace across the 2 s route timeout
    finally:
        s.close()


@pytest.mark.parametrize(("listener", "status"), [("default", 426), ("http10", 200)])
def test_http10_is_refused_unless_the_workload_accepts_it(mesh: Mesh, listener: str, status: int) -> None:
    s = _connect(mesh.outbound[listener])
    try:
        s.sendall(b"GET /headers HTTP/1.0\r\nhost: backend\r\n\r\n")
        head, _ = _head(s)
        assert head.split(" ")[1] == str(status), head
    finally:
        s.close()
