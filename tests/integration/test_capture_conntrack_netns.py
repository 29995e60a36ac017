"""The app and the proxy reusing each other's ports: capture holds, on this machine's kernel, in network namespaces.

In a pod, the app and Envoy open connections from the same address to the same destinations (Envoy's upstream
goes to the original destination), so the kernel hands a port freed by one to the other. Conntrack may still hold
the last entry of that 4-tuple; a SYN that meets an entry it does not reopen (one closed by a reset from the far
side) is let through on it, NAT binding included, and nat rules are read for new entries only. So, before the
proxy's connections had their own conntrack zone (domain/capture.py): the app's next connection after a reset
upstream connection of Envoy's went out uncaptured, in plaintext (on kind: the meshed server's inbound listener
reset it, one request in ~3,000 of an abandoning client's pod, docs/app-teams.md), and Envoy's next connection after
it reset an app's went into its own outbound listener.

What is real: two network namespaces joined by a veth pair (a client "pod" with the capture rules of
`iptables_rules` loaded as `meshward-init` loads them, and a server "pod"), the kernel's conntrack and NAT, sockets
of the app's user and of PROXY_UID. What is not: Envoy (a listening socket on 127.0.0.1:15001 stands for its
outbound listener) and the server (a listening socket on its address). Each case pins the first connection's
source port and reuses it, as the kernel's port allocator does under load. Every case runs over IPv4 and over IPv6
(the same rules from `ip6tables_rules`; Envoy marks an IPv6 socket with IPV6_TCLASS, an IPv4 one with IP_TOS).

Needs root, marked `netns` like tests/integration/test_ipv6_capture_netns.py: it fails where it cannot run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from meshward.sidecar.domain.capture import (
    OUTBOUND_LISTENER_DSCP,
    OUTBOUND_PORT,
    PROXY_DSCP,
    PROXY_UID,
    Capture,
    ip6tables_rules,
    iptables_rules,
)
from tests.support.netns import missing, require, run

SERVER_PORT = 80
APP_UID = 65532  # the echo app's user in the e2e pods

pytestmark = pytest.mark.netns


def _can_run() -> str:
    return missing("ip", "iptables-restore", "ip6tables-restore", "iptables-save", "ip6tables-save", "nsenter")


@pytest.fixture(autouse=True, scope="module")
def _runs_here() -> None:
    """Fail (never skip) where network namespaces and iptables are out of reach."""
    require(_can_run())


# What each script below starts with: the family's socket, loopback and marking option (IP_TOS or IPV6_TCLASS).
_FAMILY = r"""
import socket
def family_of(version):
    if version == "6":
        return socket.AF_INET6, "::1", socket.IPPROTO_IPV6, socket.IPV6_TCLASS
    return socket.AF_INET, "127.0.0.1", socket.IPPROTO_IP, socket.IP_TOS
"""


# One case, in one process (root) that moves between the two namespaces (setns) and opens each socket as its user
# (the nat rules read the socket's user), the proxy's marked with its DSCP as Envoy marks them: a first connection from SOURCE_PORT by FIRST_UID, ended as ENDING says,
# then a second one from the same port by SECOND_UID. Prints where the second connection's SYN arrived: "outbound"
# (the stand-in for Envoy's outbound listener), "server", or "nowhere".
_CASE = _FAMILY + r"""
import ctypes, json, os, select, socket, struct, sys, time
client_ns, server_ns, client_ip, server_ip, server_port, outbound_port = sys.argv[1:7]
first_uid, ending, second_uid, source_port = int(sys.argv[7]), sys.argv[8], int(sys.argv[9]), int(sys.argv[10])
proxy_uid, proxy_tos = int(sys.argv[11]), int(sys.argv[12])
family, loopback, mark_level, mark_name = family_of(sys.argv[14])
libc = ctypes.CDLL("libc.so.6", use_errno=True)
def enter(ns):
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    assert libc.setns(fd, 0x40000000) == 0, ctypes.get_errno()
    os.close(fd)
def listener(ip, port):
    s = socket.socket(family); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((ip, port)); s.listen(8)
    return s
def accepted(s, timeout):
    return s.accept()[0] if select.select([s], [], [], timeout)[0] else None
def opened_by(uid):
    os.seteuid(uid)
    try:
        s = socket.socket(family)
    finally:
        os.seteuid(0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if uid == proxy_uid:
        s.setsockopt(mark_level, mark_name, proxy_tos)  # as Envoy marks its upstream sockets
    s.bind((client_ip, source_port))
    return s
enter(server_ns); server = listener(server_ip, int(server_port))
enter(client_ns); outbound = listener(loopback, int(outbound_port))
outbound.setsockopt(mark_level, mark_name, int(sys.argv[13]))  # as Envoy marks its outbound listener
first = opened_by(first_uid)
first.connect((server_ip, int(server_port)))
peer = accepted(outbound, 2) or accepted(server, 2)
first.sendall(b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n")
peer.recv(100)
peer.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2000\r\n\r\n" + b"x" * 2000)
if ending == "reset by its peer":
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); peer.close()
    try:
        while first.recv(65536): pass
    except OSError: pass
    first.close()
else:  # "closed by its peer": the peer's FIN first, as Envoy closes a `connection: close` exchange
    peer.close()
    while first.recv(65536): pass
    first.close()
time.sleep(0.1)
second = opened_by(second_uid)
second.setblocking(False)
try:
    second.connect((server_ip, int(server_port)))
except BlockingIOError:
    pass
print(json.dumps("outbound" if accepted(outbound, 2) else "server" if accepted(server, 0.2) else "nowhere"))
"""


@dataclass(frozen=True)
class Pods:
    client_ns: str
    server_ns: str
    version: int  # the IP family the case's connections use
    client_ip: str
    server_ip: str

    def second_connection_lands(self, first_uid: int, ending: str, second_uid: int, source_port: int) -> str:
        """Where a connection from `source_port` by `second_uid` arrives after `first_uid`'s ended as `ending`."""
        out = run(sys.executable, "-c", _CASE, self.client_ns, self.server_ns, self.client_ip, self.server_ip,
                   str(SERVER_PORT), str(OUTBOUND_PORT), str(first_uid), ending, str(second_uid), str(source_port),
                   str(PROXY_UID), str(PROXY_DSCP << 2), str(OUTBOUND_LISTENER_DSCP << 2), str(self.version))
        where: str = json.loads(out)
        return where


# The two pods' addresses on their veth pair (nothing else routes there), per IP family.
ADDRESSES = {4: ("10.77.0.1", "10.77.0.2", 24), 6: ("fd77::1", "fd77::2", 64)}


@pytest.fixture(scope="module", params=[4, 6], ids=["IPv4", "IPv6"])
def pods(request: pytest.FixtureRequest) -> Iterator[Pods]:
    version: int = request.param
    client_ip, server_ip, prefix = ADDRESSES[version]
    tag = f"mwct{version}-{os.getpid()}"
    client_ns, server_ns = f"{tag}-c", f"{tag}-s"
    try:
        for ns in (client_ns, server_ns):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", "ctc0", "netns", client_ns, "type", "veth", "peer", "name", "cts0", "netns",
             server_ns)
        for ns, dev, ip in ((client_ns, "ctc0", client_ip), (server_ns, "cts0", server_ip)):
            run("ip", "-n", ns, "addr", "add", f"{ip}/{prefix}", "dev", dev, *(["nodad"] if version == 6 else []))
            run("ip", "-n", ns, "link", "set", dev, "up")
        # The client pod's capture, as meshward-init loads it (both families, as in a dual-stack pod).
        for restore, rules in (("iptables-restore", iptables_rules), ("ip6tables-restore", ip6tables_rules)):
            run("nsenter", f"--net=/run/netns/{client_ns}", "--", restore, "--noflush", stdin=rules(Capture()))
        yield Pods(client_ns, server_ns, version, client_ip, server_ip)
    finally:
        for ns in (client_ns, server_ns):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)


def test_port_reuse_after_a_peer_reset_envoys_upstream_the_app_still_goes_through_capture(pods: Pods) -> None:
    """Capture bypass by port reuse: the far side resets one of Envoy's upstream connections (an RST, no FIN), the
    kernel hands its port to the app, and the app's SYN to the same destination met Envoy's old conntrack entry,
    which has no NAT: the app reached the server directly, in plaintext. It must land at Envoy's outbound listener."""
    assert pods.second_connection_lands(PROXY_UID, "reset by its peer", APP_UID, 41001) == "outbound"


def test_port_reuse_after_envoy_reset_an_app_connection_envoy_does_not_connect_to_itself(pods: Pods) -> None:
    """The other way round: Envoy resets an app connection (an RST from its outbound listener, no FIN), and Envoy's
    next upstream connection from that port met the app's old entry and was redirected into Envoy's own outbound
    listener. It must reach the server."""
    assert pods.second_connection_lands(APP_UID, "reset by its peer", PROXY_UID, 41003) == "server"


@pytest.mark.parametrize(("first", "second", "where"), [(PROXY_UID, APP_UID, "outbound"),
                                                         (APP_UID, PROXY_UID, "server")])
def test_port_reuse_after_an_orderly_close_goes_where_it_always_went(pods: Pods, first: int, second: int,
                                                                      where: str) -> None:
    """After a FIN, conntrack reopens the entry for the new SYN (the case that always worked, kept working)."""
    port = 41005 if first == PROXY_UID else 41007
    assert pods.second_connection_lands(first, "closed by its peer", second, port) == where


# The proxy (PROXY_UID, its DSCP) writes argv[5] bytes to the server, which does not read yet, and closes: the kernel
# sends the rest from the orphaned socket, which has no owner any more. Prints how many bytes the server received.
_ORPHAN = _FAMILY + r"""
import ctypes, os, socket, sys
client_ns, server_ns, client_ip, server_ip, size, proxy_uid, proxy_tos = sys.argv[1:8]
family, loopback, mark_level, mark_name = family_of(sys.argv[8])
libc = ctypes.CDLL("libc.so.6", use_errno=True)
def enter(ns):
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    assert libc.setns(fd, 0x40000000) == 0, ctypes.get_errno()
    os.close(fd)
enter(server_ns)
server = socket.socket(family); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536); server.bind((server_ip, 81)); server.listen(1)
enter(client_ns)
os.seteuid(int(proxy_uid))
try:
    proxy = socket.socket(family)
finally:
    os.seteuid(0)
proxy.setsockopt(mark_level, mark_name, int(proxy_tos))
proxy.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
proxy.connect((server_ip, 81))
peer, _ = server.accept()
proxy.setblocking(False)
sent = 0
while sent < int(size):
    try:
        sent += proxy.send(b"x" * min(65536, int(size) - sent))
    except BlockingIOError:
        break
proxy.close()
peer.settimeout(5)
got = 0
try:
    while chunk := peer.recv(1 << 20):
        got += len(chunk)
except TimeoutError:  # the rest never came
    pass
print(sent, got)
"""


def test_what_envoy_wrote_before_closing_reaches_the_server(pods: Pods) -> None:
    """A socket Envoy closed still sends what was written to it (the end of an upload through passthrough); it has
    no owner then. Tracked apart by their user, such packets missed their entry and were redirected into Envoy's
    own listener: the server got 114 KB of 3 MB. By the DSCP the socket keeps, every byte arrives."""
    out = run(sys.executable, "-c", _ORPHAN, pods.client_ns, pods.server_ns, pods.client_ip, pods.server_ip,
               str(3 << 20), str(PROXY_UID), str(PROXY_DSCP << 2), str(pods.version))
    sent, got = (int(x) for x in out.split())
    assert sent > 1 << 20 and got == sent, (sent, got)


# The app (APP_UID) opens a connection (redirected to the stand-in for Envoy's outbound listener, its socket marked as
# Envoy marks it), reads the first part of the response and closes (a FIN: nothing was left unread in the kernel);
# the rest of the response arrives at its closed socket and the kernel answers with a reset, from no process's socket.
# Prints whether that reset reached the listener's socket.
_APP_RESET = _FAMILY + r"""
import ctypes, os, socket, sys, time
client_ns, server_ip, outbound_port, app_uid, listener_tos = sys.argv[1:6]
family, loopback, mark_level, mark_name = family_of(sys.argv[6])
libc = ctypes.CDLL("libc.so.6", use_errno=True)
fd = os.open(f"/run/netns/{client_ns}", os.O_RDONLY)
assert libc.setns(fd, 0x40000000) == 0, ctypes.get_errno()
outbound = socket.socket(family); outbound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
outbound.setsockopt(mark_level, mark_name, int(listener_tos))
outbound.bind((loopback, int(outbound_port))); outbound.listen(1)
os.seteuid(int(app_uid))
try:
    app = socket.socket(family)
finally:
    os.seteuid(0)
app.connect((server_ip, 82))
envoy, _ = outbound.accept()
app.sendall(b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n"); envoy.recv(100)
envoy.sendall(b"x" * 500); time.sleep(0.05)
app.recv(500)
app.close()
time.sleep(0.05)
envoy.sendall(b"y" * 500)
time.sleep(0.3)
try:
    envoy.sendall(b"z"); time.sleep(0.2); envoy.sendall(b"z")
    print("no reset")
except OSError:
    print("reset")
"""


def test_the_apps_kernel_reset_reaches_envoys_outbound_listener(pods: Pods) -> None:
    """The kernel's resets are tracked by what they answer: the app's, answering the rest of a response that reached
    its closed socket, stays in the app's zone (by the DSCP of Envoy's outbound listener, which the kernel copies
    into it) and reaches Envoy's socket, which would otherwise retransmit until it times out."""
    out = run(sys.executable, "-c", _APP_RESET, pods.client_ns, pods.server_ip, str(OUTBOUND_PORT), str(APP_UID),
               str(OUTBOUND_LISTENER_DSCP << 2), str(pods.version))
    assert out.strip() == "reset"


def test_the_proxys_connections_are_tracked_in_their_own_zone(pods: Pods) -> None:
    """What `iptables-save` shows in a captured pod: TCP with the proxy's DSCP in conntrack zone 1337 (original
    direction), the DSCP cleared on the way out."""
    save = "iptables-save" if pods.version == 4 else "ip6tables-save"

    def saved(table: str) -> str:
        return run("nsenter", f"--net=/run/netns/{pods.client_ns}", "--", save, "-t", table)
    assert f"-A OUTPUT -p tcp -m dscp --dscp {PROXY_DSCP:#04x} -j CT --zone-orig 1337" in saved("raw")
    assert "-A OUTPUT -p tcp -m tcp --tcp-flags RST RST -m owner ! --uid-owner 0-4294967294 -j CT --zone-orig 1337" \
        in saved("raw")
    assert f"-A POSTROUTING -p tcp -m dscp --dscp {PROXY_DSCP:#04x} -j DSCP --set-dscp 0x00" in saved("mangle")
