"""gRPC and h2c through two real Envoys on the pod builders' own config (issue 19), as test_http_routes.py does.

A grpcio greeter (all four RPC kinds, bytes messages: no generated code) and an h2c-only app (the `h2` library)
sit behind the server's Envoy; the client's Envoy runs the outbound listener `outbound_resources` builds for a
meshed address; mTLS between them, ext_authz to a real agent with a JWT policy naming gRPC methods as paths.
Before this config both Envoys spoke HTTP/1.1 upstream: every RPC failed `UNAVAILABLE ... protocol error`, and
the h2c app received HTTP/1.1 (an h2c-only server answered 502).
"""

from __future__ import annotations

import copy
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest

from meshward.sidecar.domain.envoy import (
    INBOUND_APP,
    Destination,
    PodProxy,
    build_pod_bootstrap,
    outbound_resources,
)
from tests.integration.test_http_routes import _static, on_loopback
from tests.support.idp import IdP
from tests.support.pki import TestCA
from tests.support.procs import Agent, free_port, run_envoy, unix_get, wait_for

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
GREETER = "spiffe://cluster.local/ns/shop/sa/greeter"
SERVICE = "greet.Greeter"
ALLOWED = ("SayHello", "ListHellos", "CollectHellos", "Chat", "Slow")
MB4 = 4 * 1024 * 1024
# grpcio's default receive limit is 4 MiB: a 4 MiB message plus its framing needs more, as it would unmeshed.
OPTIONS = [("grpc.max_receive_message_length", 16 * 1024 * 1024),
           ("grpc.max_send_message_length", 16 * 1024 * 1024), ("grpc.enable_http_proxy", 0)]


def greeter_policy(idp: IdP) -> dict[str, Any]:
    """The server's policy: a JWT required (from gRPC metadata), the frontend may call five methods, not Forbidden."""
    return {"apiVersion": "sidecar.meshward.io/v1alpha1", "kind": "SidecarConfig", "workload": "shop/greeter",
            "policies": [{
                "name": "greeter",
                "jwt": [{"issuer": idp.issuer, "audiences": ["orders"], "jwksUri": idp.jwks_uri,
                         "caFile": idp.ca_file}],
                "rules": [{"name": "frontend-greets", "from": {"principals": [FRONTEND]},
                           "to": {"paths": [f"/{SERVICE}/{m}" for m in ALLOWED] + ["/h2c/*"]}}]}]}


# ------------------------------------------------------------------------------------------------ the apps


@dataclass
class Greeter:
    """A grpcio server of greet.Greeter; `seen` records what each call's server side saw."""

    port: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)
    server: Any = None

    def start(self) -> Greeter:
        seen = self.seen

        def say_hello(request: bytes, context: grpc.ServicerContext) -> bytes:
            seen.append({"method": "SayHello", "metadata": dict(context.invocation_metadata()),
                         "size": len(request)})
            if request.startswith(b"big:"):
                return b"x" * int(request[4:4 + 16].split(b":")[0])  # big:<n>:<padding> -> n bytes back
            return b"Hello, " + request

        def list_hellos(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            n = int(request)
            for i in range(n):
                if not context.is_active():
                    seen.append({"method": "ListHellos", "cancelled_at": i})
                    return
                yield f"hello {i}".encode()
                if n > 10:
                    time.sleep(0.05)  # a long stream, for the cancellation test

        def collect_hellos(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            return b",".join(requests)

        def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            for r in requests:
                yield b"echo " + r if len(r) < 100 else r[::-1]

        def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
            record = {"method": "Slow", "time_remaining": context.time_remaining(), "cancelled": False}
            seen.append(record)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and context.is_active():
                time.sleep(0.01)  # the server's own work, until the call ends
            record["cancelled"] = not context.is_active()
            return b"too late"

        def forbidden(request: bytes, context: grpc.ServicerContext) -> bytes:
            seen.append({"method": "Forbidden"})
            return b"should never run"

        handlers = {"SayHello": grpc.unary_unary_rpc_method_handler(say_hello),
                    "ListHellos": grpc.unary_stream_rpc_method_handler(list_hellos),
                    "CollectHellos": grpc.stream_unary_rpc_method_handler(collect_hellos),
                    "Chat": grpc.stream_stream_rpc_method_handler(chat),
                    "Slow": grpc.unary_unary_rpc_method_handler(slow),
                    "Forbidden": grpc.unary_unary_rpc_method_handler(forbidden)}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=OPTIONS)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(0)


class H2cApp:
    """An h2c-only server (prior knowledge; anything else is closed): answers every request with its protocol."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []  # (protocol, path) of each request received
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2c.initiate_connection()
        try:
            conn.sendall(h2c.data_to_send())
            while data := conn.recv(65536):
                for event in h2c.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        headers = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes)
                                   else v for k, v in event.headers}
                        self.requests.append(("HTTP/2", headers[":path"]))
                        body = f"HTTP/2 {headers[':path']}".encode()
                        h2c.send_headers(event.stream_id, [(":status", "200"), ("content-length", str(len(body)))])
                        h2c.send_data(event.stream_id, body, end_stream=True)
                conn.sendall(h2c.data_to_send())
        except (h2.exceptions.ProtocolError, OSError):
            pass  # not HTTP/2 (an HTTP/1.1 request): closed, as an h2c-only server does
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def h2c_get(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """One GET over cleartext HTTP/2 with prior knowledge (RFC 9113 §3.3): its status and body."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "greeter"),
                          *headers.items()], end_stream=True)
    s.sendall(conn.data_to_send())
    status, body = 0, b""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return status, body
            s.sendall(conn.data_to_send())
    finally:
        s.close()
    return status, body


# -------------------------------------------------------------------------------- the two Envoys on loopback


def _renamed(node: Any, old: str, new: str) -> Any:
    """`node` with every string equal to `old` (a cluster's name, where it is named) replaced by `new`."""
    if isinstance(node, list):
        return [_renamed(x, old, new) for x in node]
    if isinstance(node, dict):
        return {k: _renamed(v, old, new) for k, v in node.items()}
    return new if node == old else node


@dataclass
class Mesh:
    greeter: Greeter
    h2c: H2cApp
    agent: Agent
    idp: IdP
    grpc_port: int  # the client Envoy's outbound listener toward the greeter
    h2c_port: int  # ... toward the h2c app
    server_admin: str
    client_admin: str

    def channel(self, direct: bool = False) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.greeter.port if direct else self.grpc_port}", options=OPTIONS)

    def token(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.idp.token()}")]

    def stat(self, admin: str, name: str) -> int:
        _, text = unix_get(admin, f"/stats?filter=^{name}$")
        return sum(int(v) for _, _, v in (line.partition(": ") for line in text.splitlines()) if v.isdigit())


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    wd = tmp_path_factory.mktemp("grpc")
    server_dir, client_dir = wd / "server", wd / "client"
    server_dir.mkdir()
    client_dir.mkdir()
    ca = TestCA(wd / "pki")
    frontend, greeter_cert = ca.issue("frontend", uris=(FRONTEND,)), ca.issue("greeter", uris=(GREETER,))
    idp = IdP(ca)
    greeter, h2c = Greeter().start(), H2cApp()
    agent = Agent(wd, greeter_policy(idp), http=f"unix:{server_dir / 'authz.sock'}").start()
    os.symlink(server_dir / "authz.sock", client_dir / "authz.sock")

    # The server's Envoy: its inbound listener twice, toward the greeter and toward the h2c app.
    server = build_pod_bootstrap(PodProxy("shop/greeter-1", socket_dir=str(server_dir)))
    inbound = next(lis for lis in server["static_resources"]["listeners"] if lis["name"] == "inbound")
    app_cluster = next(c for c in server["static_resources"]["clusters"] if c["name"] == INBOUND_APP)
    server["static_resources"]["clusters"].remove(app_cluster)
    ports = {"grpc": free_port(), "h2c": free_port()}
    apps = {"grpc": greeter.port, "h2c": h2c.port}
    listeners, clusters = [], []
    for name, port in ports.items():
        lis = _renamed(copy.deepcopy(inbound), INBOUND_APP, f"{INBOUND_APP}_{name}")
        listeners.append({**lis, "name": f"inbound-{name}",
                          "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}})
        clusters.append(_static(f"{INBOUND_APP}_{name}", apps[name], app_cluster))
    server_boot = on_loopback(server, listeners, clusters, greeter_cert, ca.ca_file)

    # The client's Envoy: the outbound listener for a meshed address, twice, toward each inbound listener.
    client = build_pod_bootstrap(PodProxy("shop/frontend-1", socket_dir=str(client_dir)))
    (out,), (mesh_cluster,) = outbound_resources({"127.0.0.1": Destination((GREETER,))})
    outbound = {name: free_port() for name in ports}
    listeners, clusters = [], []
    for name, port in ports.items():
        cname = f"{mesh_cluster['name']}-{name}"
        lis = _renamed(copy.deepcopy(out), mesh_cluster["name"], cname)
        listeners.append({**lis, "name": f"outbound-{name}",
                          "address": {"socket_address": {"address": "127.0.0.1", "port_value": outbound[name]}}})
        clusters.append(_static(cname, port, {**mesh_cluster, "alt_stat_name": f"outbound_{name}"}))
    client_boot = on_loopback(client, listeners, clusters, frontend, ca.ca_file)
    server_admin, client_admin = str(server_dir / "envoy-admin.sock"), str(client_dir / "envoy-admin.sock")
    try:
        with run_envoy(server_boot, wd, server_admin, name="envoy-server"), \
                run_envoy(client_boot, wd, client_admin, name="envoy-client"):
            yield Mesh(greeter, h2c, agent, idp, outbound["grpc"], outbound["h2c"], server_admin, client_admin)
    finally:
        agent.stop()
        greeter.stop()
        h2c.close()
        idp.close()


def _calls(channel: grpc.Channel, metadata: list[tuple[str, str]]) -> dict[str, Any]:
    """The four kinds of RPC on `channel`: what each returned."""
    def method(kind: Callable[..., Any], name: str) -> Any:
        return kind(f"/{SERVICE}/{name}")

    return {
        "unary": method(channel.unary_unary, "SayHello")(b"alice", metadata=metadata, timeout=10),
        "server_stream": list(method(channel.unary_stream, "ListHellos")(b"5", metadata=metadata, timeout=10)),
        "client_stream": method(channel.stream_unary, "CollectHellos")(
            iter([b"a", b"b", b"c"]), metadata=metadata, timeout=10),
        "bidi": list(method(channel.stream_stream, "Chat")(iter([b"1", b"2", b"3"]), metadata=metadata, timeout=10)),
    }


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    code: grpc.StatusCode = e.value.code()
    return code


# --------------------------------------------------------------------------------------------------- tests


def test_all_four_rpc_kinds_through_both_sidecars_equal_the_direct_call(mesh: Mesh) -> None:
    """Unary, server streaming, client streaming and bidi: the same results as calling the app directly, over
    HTTP/2 on every leg (the client Envoy's mTLS hop and the server Envoy's hop to the app), decided by the server's
    agent with the caller's SPIFFE ID."""
    h2_before = (mesh.stat(mesh.client_admin, "cluster.outbound_grpc.upstream_cx_http2_total"),
                 mesh.stat(mesh.server_admin, f"cluster.{INBOUND_APP}_grpc.upstream_cx_http2_total"))
    with mesh.channel(direct=True) as direct, mesh.channel() as meshed:
        want = _calls(direct, [])
        got = _calls(meshed, mesh.token())
    assert want == {"unary": b"Hello, alice", "server_stream": [f"hello {i}".encode() for i in range(5)],
                    "client_stream": b"a,b,c", "bidi": [b"echo 1", b"echo 2", b"echo 3"]}
    assert got == want
    # One HTTP/2 connection on each hop (a channel's four calls share it): nothing went over HTTP/1.1.
    assert (mesh.stat(mesh.client_admin, "cluster.outbound_grpc.upstream_cx_http2_total") > h2_before[0],
            mesh.stat(mesh.server_admin, f"cluster.{INBOUND_APP}_grpc.upstream_cx_http2_total") > h2_before[1]) \
        == (True, True)
    lines: list[dict[str, Any]] = []

    def audited() -> bool:
        lines[:] = [x for x in mesh.agent.audit_lines() if x.get("path") == f"/{SERVICE}/CollectHellos"]
        return bool(lines)

    wait_for("the CollectHellos decision's audit line", audited)
    assert lines[-1]["outcome"] == "allow" and FRONTEND in lines[-1].values(), lines[-1]


def test_a_method_the_policy_does_not_name_is_permission_denied_not_a_transport_error(mesh: Mesh) -> None:
    """A policy names gRPC methods as paths: `/greet.Greeter/Forbidden` is not among them, so the server's Envoy
    answers 403, which a gRPC caller receives as PERMISSION_DENIED (grpc-status 7), and the method never runs."""
    with mesh.channel() as ch:
        code = _code(lambda: ch.unary_unary(f"/{SERVICE}/Forbidden")(b"x", metadata=mesh.token(), timeout=10))
        assert ch.unary_unary(f"/{SERVICE}/SayHello")(b"bob", metadata=mesh.token(), timeout=10) == b"Hello, bob"
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert not [s for s in mesh.greeter.seen if s["method"] == "Forbidden"]


@pytest.mark.parametrize("metadata", [[], [("authorization", "Bearer not.a.jwt")]], ids=["missing", "invalid"])
def test_an_rpc_without_a_valid_end_user_token_is_unauthenticated(mesh: Mesh, metadata: list[tuple[str, str]]
                                                                   ) -> None:
    """The end user's token comes from gRPC metadata (`authorization: Bearer`), validated as for HTTP: none, or a
    forged one, is a 401, which the caller receives as UNAUTHENTICATED (grpc-status 16)."""
    with mesh.channel() as ch:
        assert _code(lambda: ch.unary_unary(f"/{SERVICE}/SayHello")(b"x", metadata=metadata, timeout=10)) \
            == grpc.StatusCode.UNAUTHENTICATED


def test_the_app_receives_the_user_and_never_the_raw_token(mesh: Mesh) -> None:
    """As for HTTP: the agent replaces the end user's JWT in the app's metadata with the user's identity."""
    before = len(mesh.greeter.seen)
    with mesh.channel() as ch:
        assert ch.unary_unary(f"/{SERVICE}/SayHello")(b"carol", metadata=mesh.token(), timeout=10) == b"Hello, carol"
    metadata = mesh.greeter.seen[before]["metadata"]
    assert "authorization" not in metadata and metadata.get("x-meshward-sub") == "alice", sorted(metadata)


def test_a_deadline_propagates_and_its_expiry_cancels_the_server_side(mesh: Mesh) -> None:
    """grpc-timeout reaches the app (its context knows the deadline), the caller gets DEADLINE_EXCEEDED, and the
    stream reset travels through both Envoys: the server's handler sees its call cancelled."""
    before = len(mesh.greeter.seen)
    with mesh.channel() as ch:
        assert _code(lambda: ch.unary_unary(f"/{SERVICE}/Slow")(b"", metadata=mesh.token(), timeout=1.5)) \
            == grpc.StatusCode.DEADLINE_EXCEEDED
    record = mesh.greeter.seen[before]
    wait_for("the server side cancelled", lambda: bool(record["cancelled"]), timeout=5)
    # The app's deadline comes from grpc-timeout (None without it); its clock and the encoding round a little.
    assert record["time_remaining"] is not None and 0 < record["time_remaining"] < 2


def test_a_cancelled_stream_is_cancelled_at_the_server(mesh: Mesh) -> None:
    """The client cancels a server stream after three messages (RST_STREAM CANCEL): the handler, which would send
    200, stops early."""
    with mesh.channel() as ch:
        call = ch.unary_stream(f"/{SERVICE}/ListHellos")(b"200", metadata=mesh.token(), timeout=30)
        got = [next(call) for _ in range(3)]
        call.cancel()
    assert got == [b"hello 0", b"hello 1", b"hello 2"]

    def stopped() -> bool:
        return any(s.get("method") == "ListHellos" and "cancelled_at" in s for s in mesh.greeter.seen)

    wait_for("the server's stream stopped", stopped, timeout=5)
    assert next(s["cancelled_at"] for s in mesh.greeter.seen if "cancelled_at" in s) < 200


def test_4mb_messages_both_ways(mesh: Mesh) -> None:
    """4 MiB requests and responses, unary and bidi: nothing on the way buffers a whole body (ext_authz is sent no
    body) or caps a message below what the app allows."""
    big = b"big:" + str(MB4).encode() + b":" + b"p" * (MB4 - 12)
    with mesh.channel() as ch:
        reply = ch.unary_unary(f"/{SERVICE}/SayHello")(big, metadata=mesh.token(), timeout=30)
        echoed = list(ch.stream_stream(f"/{SERVICE}/Chat")(iter([big, big]), metadata=mesh.token(), timeout=30))
    assert len(reply) == MB4 and set(reply) == {ord("x")}
    assert echoed == [big[::-1], big[::-1]]
    assert any(s.get("size") == len(big) for s in mesh.greeter.seen)


def test_h2c_with_prior_knowledge_reaches_the_app_as_http2(mesh: Mesh) -> None:
    """The app's Envoy detects the HTTP/2 preface on its outbound listener, and the server's Envoy hands the app
    HTTP/2: an h2c-only server (it closes anything else) answers. Before, it received HTTP/1.1 and the caller a
    502."""
    status, body = h2c_get(mesh.h2c_port, "/h2c/hello", {"authorization": f"Bearer {mesh.idp.token()}"})
    assert (status, body) == (200, b"HTTP/2 /h2c/hello")
    assert ("HTTP/2", "/h2c/hello") in mesh.h2c.requests


def test_an_http11_caller_stays_http11_to_the_app(mesh: Mesh) -> None:
    """No upgrade on the way: an HTTP/1.1 request reaches the app as HTTP/1.1, as it would without the mesh (so the
    h2c-only app refuses it, and the caller gets the 502 of an upstream that did not speak HTTP/1.1)."""
    import http.client

    before = mesh.stat(mesh.server_admin, f"cluster.{INBOUND_APP}_h2c.upstream_cx_http1_total")
    conn = http.client.HTTPConnection("127.0.0.1", mesh.h2c_port, timeout=10)
    try:
        conn.request("GET", "/h2c/hello", headers={"authorization": f"Bearer {mesh.idp.token()}"})
        r = conn.getresponse()
        r.read()
    finally:
        conn.close()
    assert r.status == 502
    assert mesh.stat(mesh.server_admin, f"cluster.{INBOUND_APP}_h2c.upstream_cx_http1_total") == before + 1
