"""Traffic capture in an injected pod: the iptables rules, as one pure builder, and the ports they know.

Why iptables in the pod's own network namespace (set up once by an init container, the
only step with NET_ADMIN): every TCP connection into the pod is redirected to Envoy's
inbound listener, and every TCP connection the app opens to its Envoy's outbound
listener, so the app can neither receive unauthenticated requests nor reach a meshed
peer in plaintext, whatever address it dials (a Service, a pod IP, a port). Envoy and
the agent run as PROXY_UID, whose own connections are never redirected (no loop); so is
loopback. Exempting by user only, never by group: a group is something an app container
can ask for (`runAsGroup`, `setgid`), the proxy's user it cannot (the injector refuses it).

IPv6 is captured like IPv4 (`ip6tables_rules`, the nat table): every pod has a
link-local IPv6 address even in an IPv4-only cluster, and uncaptured it was a side door
straight to the app. Inbound TCP over IPv6 is redirected to Envoy's inbound listener
(which listens on `[::]` too, so mTLS and policy decide exactly as over IPv4), outbound to
Envoy's outbound listener (the kernel redirects a locally made connection to `::1`, where
the outbound listener has its second socket). Only `::1` and the proxy's user are exempt,
and each family honours its own `exclude-outbound-cidrs`. On a dual-stack cluster meshed
peers are known by their IPv6 pod and Service addresses too (the destination map), so
pod-to-pod calls over IPv6 are mTLS. On an IPv4-only cluster the only IPv6 addresses are
link-local: inbound, a connection to one meets Envoy's inbound listener like any other
(mTLS required; a plaintext caller is refused); outbound, no link-local address is in the
destination map, so Envoy passes the connection through to its original destination, and
Envoy cannot dial a link-local address (no zone in an original-destination address): it
fails closed either way.

The proxy's own connections are tracked apart: Envoy marks the sockets of its upstream connections
with a DSCP of its own (PROXY_DSCP, set with IP_TOS, over IPv6 with IPV6_TCLASS: domain/envoy.py), and
the raw table puts every TCP packet carrying it in conntrack zone PROXY_CONNTRACK_ZONE for the original direction; the
mangle table clears the DSCP before the packet leaves. Why: the app and Envoy open connections
from the same pod address to the same destinations (Envoy's upstream goes to the original
destination), so they share one space of 4-tuples, and the kernel hands a port to one as soon as
no *socket* of the other holds it. Conntrack may still hold an entry for the other's last
connection of that 4-tuple: one it believes open (Envoy aborting an upstream connection right
after writing to it sends an RST conntrack does not take, RFC 5961's challenge ACK), or one closed
by a reset from the far side. A SYN meeting such an entry is let through *on it*, with its NAT
binding: nat rules are only read for a new entry. Measured on kind (docs/app-teams.md): the app's
connection then skipped capture and went out in plaintext, and the meshed peer's inbound listener
reset it; in network namespaces (tests/integration/test_capture_conntrack_netns.py) also the other
way round, Envoy's connection redirected into its own outbound listener. In separate zones neither
can meet the other's entries. Why a DSCP and not the proxy's user: a socket keeps its DSCP after
Envoy closes it (an orphaned socket still sending what Envoy wrote last, then its TIME_WAIT) and
loses its owner, so by user those packets fell in the app's zone, missed their entry and were
redirected: the end of an upload through passthrough was lost (measured). An app may set the same
DSCP on its own sockets: its connections are then tracked in the proxy's zone, still captured (the
nat rules decide by user). A reset the kernel sends for no process's socket (the answer to a
segment of a connection already gone) carries the DSCP of that segment, not of any socket: such
resets go to the proxy's zone too: Envoy's need it (left in the app's zone, one that met the app's
old entry of the same 4-tuple was redirected to Envoy's own listener, the peer's socket lived on,
and Envoy's next connection from that port met it and timed out: 39 `503`s in ~29,000 requests on
kind). But for the resets of the app's kernel answering Envoy's outbound listener (the rest of a
response arriving after the app closed): in the proxy's zone they found no entry and went to the
address the app dialled instead of to Envoy's listener, whose socket then waited for its
retransmissions to time out (on kind, the client pod's retransmission timeouts went from none to
about two per second under an abandoning client; the lost reset reproduced in network namespaces). So
the outbound listener's sockets carry a DSCP of their own (OUTBOUND_LISTENER_DSCP, on loopback only),
which the kernel copies into its reset, and a reset carrying it stays in the app's zone (verified in
network namespaces; not yet measured on kind). IPv6 the same way, with the same rules in ip6tables: an IPv6
socket takes IPV6_TCLASS (IP_TOS on it marks only IPv4-mapped packets), so Envoy sets each family's own option
(both families verified in network namespaces).

Where the kernel has no IPv6 nat table (no `ip6table_nat`), the init container falls back
to `ip6tables_reset_rules` (filter table): TCP over IPv6 into the pod and out of its app
is reset but for loopback, the probe ports and the excluded ports and CIDRs. Dropped,
never passed through. Only TCP is captured or reset: UDP and SCTP are not, in either
family (docs/app-teams.md).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

# The user Envoy and the agent run as in an injected pod; its connections are never captured. An app
# container must not run as it (the injector refuses such pods): its traffic would bypass the mesh.
PROXY_UID = 1337
# Envoy's inbound listener (every TCP connection into the pod lands here, mTLS from meshed peers).
INBOUND_PORT = 15006
# Envoy's outbound listener (on 127.0.0.1 and ::1, where the kernel redirects every TCP connection the app opens).
OUTBOUND_PORT = 15001
# The agent's admin port: readiness, metrics and the app's rewritten probes (kubelet reaches it in plaintext).
AGENT_ADMIN_PORT = 15020
# Envoy's readiness, proxied from its admin (kubelet probes it).
PROXY_HEALTH_PORT = 15021
# Never captured inbound: kubelet's probes must reach these without mTLS.
ALWAYS_EXCLUDED_INBOUND = (AGENT_ADMIN_PORT, PROXY_HEALTH_PORT)

# The conntrack zone of the proxy's own TCP connections (their original direction; replies are looked up in the
# default zone, so they find them): apart from the app's, whose connections share their 4-tuples (module docstring).
PROXY_CONNTRACK_ZONE = 1337
# The DSCP Envoy sets on its upstream sockets (IP_TOS, domain/envoy.py), by which the raw table knows the proxy's
# packets whatever their socket's state: from RFC 2474's pool 2 (xxxx11, for experimental or local use), and
# cleared (mangle POSTROUTING) before a packet leaves the pod.
PROXY_DSCP = 0x1B
# The DSCP of the sockets of Envoy's outbound listener (the app's side of its captured connections, on loopback
# only): the kernel's resets answering them copy it, and stay in the app's zone. Pool 2 as well.
OUTBOUND_LISTENER_DSCP = 0x17

_CHAIN_IN = "MESHWARD_INBOUND"
_CHAIN_OUT = "MESHWARD_OUTPUT"


class CaptureError(ValueError):
    """An exclusion list that cannot be turned into rules; the message names the setting."""


@dataclass(frozen=True)
class Capture:
    """What the init container sets up."""

    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    proxy_uid: int = PROXY_UID
    inbound_port: int = INBOUND_PORT
    outbound_port: int = OUTBOUND_PORT
    proxy_conntrack_zone: int = PROXY_CONNTRACK_ZONE
    proxy_dscp: int = PROXY_DSCP
    outbound_listener_dscp: int = OUTBOUND_LISTENER_DSCP


def parse_ports(text: str, setting: str) -> tuple[int, ...]:
    """A comma-separated port list (`8081,9090`); raise CaptureError naming `setting`."""
    out: list[int] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise CaptureError(f"{setting}: {item!r} is not a port number 1..65535 (write e.g. \"8081,9090\")")
        out.append(int(item))
    return tuple(sorted(set(out)))


def parse_cidrs(text: str, setting: str) -> tuple[str, ...]:
    """A comma-separated CIDR list of either family (`10.0.0.0/8,fd00:10::/64`); raise CaptureError naming `setting`.

    Each family's rules take its own (`cidrs_of`).
    """
    out: list[str] = []
    for item in (c.strip() for c in text.split(",")):
        if not item:
            continue
        try:
            # A zone (`fe80::%eth0/64`) parses but is no CIDR ip6tables takes.
            net = ipaddress.ip_network(item, strict=False) if "%" not in item else None
        except ValueError:
            net = None
        if net is None:
            raise CaptureError(f"{setting}: {item!r} is not a CIDR (write e.g. \"10.0.0.0/8\" or \"fd00::/8\")")
        out.append(str(net))
    return tuple(sorted(set(out)))


def cidrs_of(cidrs: Iterable[str], version: int) -> list[str]:
    """The CIDRs of IP `version` (4 or 6) among `cidrs`, in their order."""
    return [c for c in cidrs if ipaddress.ip_network(c, strict=False).version == version]


def _ports(ports: Iterable[int]) -> list[str]:
    return [str(p) for p in sorted(set(ports))]


# Each family's loopback: connections to it are the pod talking to itself, never captured.
_LOOPBACK = {4: "127.0.0.0/8", 6: "::1/128"}


def _nat_rules(c: Capture, version: int) -> str:
    """The nat table of IP `version` that redirects the pod's TCP, in and out, to Envoy."""
    lines = ["*nat", f":{_CHAIN_IN} - [0:0]", f":{_CHAIN_OUT} - [0:0]",
             f"-A PREROUTING -p tcp -j {_CHAIN_IN}", f"-A OUTPUT -p tcp -j {_CHAIN_OUT}"]
    for port in _ports((*ALWAYS_EXCLUDED_INBOUND, *c.exclude_inbound_ports)):
        lines.append(f"-A {_CHAIN_IN} -p tcp --dport {port} -j RETURN")
    lines.append(f"-A {_CHAIN_IN} -p tcp -j REDIRECT --to-ports {c.inbound_port}")
    lines += [
        f"-A {_CHAIN_OUT} -m owner --uid-owner {c.proxy_uid} -j RETURN",
        f"-A {_CHAIN_OUT} -d {_LOOPBACK[version]} -j RETURN",
    ]
    for cidr in cidrs_of(c.exclude_outbound_cidrs, version):
        lines.append(f"-A {_CHAIN_OUT} -d {cidr} -j RETURN")
    for port in _ports(c.exclude_outbound_ports):
        lines.append(f"-A {_CHAIN_OUT} -p tcp --dport {port} -j RETURN")
    lines += [f"-A {_CHAIN_OUT} -p tcp -j REDIRECT --to-ports {c.outbound_port}", "COMMIT", ""]
    return "\n".join(lines)


def _raw_rules(c: Capture, version: int) -> str:
    """The raw and mangle tables: the proxy's TCP (by its DSCP) in a conntrack zone of its own, the DSCP cleared."""
    dscp = f"-p tcp -m dscp --dscp {c.proxy_dscp:#04x}"
    listener = f"-p tcp -m dscp --dscp {c.outbound_listener_dscp:#04x}"
    zone = f"-j CT --zone-orig {c.proxy_conntrack_zone}"
    return "\n".join(["*raw", f"-A OUTPUT {dscp} {zone}",
                      # The app's side, and the kernel's resets answering Envoy's outbound listener: the app's zone.
                      f"-A OUTPUT {listener} -j ACCEPT",
                      # Any other reset the kernel sends for no process's socket (the answer to a segment of a
                      # connection already gone) copies the segment's DSCP, not a socket's: the proxy's zone.
                      f"-A OUTPUT -p tcp --tcp-flags RST RST -m owner ! --uid-owner 0-4294967294 {zone}", "COMMIT",
                      "*mangle", f"-A POSTROUTING {dscp} -j DSCP --set-dscp 0",
                      # ... and the listener's own DSCP on what leaves the pod (the app's resets; Envoy's listener
                      # itself speaks from loopback only).
                      f"-A POSTROUTING ! -s {_LOOPBACK[version]} {listener} -j DSCP --set-dscp 0", "COMMIT", ""])


def iptables_rules(c: Capture) -> str:
    """The `iptables-restore` input (nat, raw and mangle tables) that captures the pod's TCP traffic over IPv4."""
    return _nat_rules(c, 4) + _raw_rules(c, 4)


def ip6tables_rules(c: Capture) -> str:
    """The `ip6tables-restore` input (nat, raw, mangle) that captures the pod's TCP over IPv6, link-local included.

    Envoy's inbound listener takes redirected connections on `[::]`, its outbound one on `::1` (where the kernel
    redirects a connection the pod itself opens).
    """
    return _nat_rules(c, 6) + _raw_rules(c, 6)


def ip6tables_reset_rules(c: Capture) -> str:
    """The `ip6tables-restore` input (filter, raw, mangle) of the fallback where the kernel has no IPv6 nat table.

    It resets TCP over IPv6 into the pod and out of its app, but for loopback, the probe ports and the exclusions.
    """
    lines = ["*filter", f":{_CHAIN_IN} - [0:0]", f":{_CHAIN_OUT} - [0:0]",
             f"-A INPUT -p tcp -j {_CHAIN_IN}", f"-A OUTPUT -p tcp -j {_CHAIN_OUT}",
             # Packets of connections a rule below let open (the replies on an excluded port, the proxy's own) pass;
             # a new connection never matches this.
             f"-A {_CHAIN_IN} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
             f"-A {_CHAIN_IN} -i lo -j RETURN"]
    for port in _ports((*ALWAYS_EXCLUDED_INBOUND, *c.exclude_inbound_ports)):
        lines.append(f"-A {_CHAIN_IN} -p tcp --dport {port} -j RETURN")
    lines += [f"-A {_CHAIN_IN} -p tcp -j REJECT --reject-with tcp-reset",
              f"-A {_CHAIN_OUT} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
              f"-A {_CHAIN_OUT} -o lo -j RETURN",
              f"-A {_CHAIN_OUT} -m owner --uid-owner {c.proxy_uid} -j RETURN"]
    for cidr in cidrs_of(c.exclude_outbound_cidrs, 6):
        lines.append(f"-A {_CHAIN_OUT} -d {cidr} -j RETURN")
    for port in _ports(c.exclude_outbound_ports):
        lines.append(f"-A {_CHAIN_OUT} -p tcp --dport {port} -j RETURN")
    lines += [f"-A {_CHAIN_OUT} -p tcp -j REJECT --reject-with tcp-reset", "COMMIT", ""]
    # The proxy's connections apart here too: an app SYN let through on an entry of the proxy's counted as
    # ESTABLISHED and passed the first rule of the app's chain (measured).
    return "\n".join(lines) + _raw_rules(c, 6)
