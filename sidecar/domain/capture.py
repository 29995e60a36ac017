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


def iptables_rules(c: Capture) -> str:
    """The `iptables-restore` input (nat table) that captures the pod's TCP traffic over IPv4."""
    return _nat_rules(c, 4)


def ip6tables_rules(c: Capture) -> str:
    """The `ip6tables-restore` input (nat table) that captures the pod's TCP traffic over IPv6, link-local included.

    Envoy's inbound listener takes redirected connections on `[::]`, its outbound one on `::1` (where the kernel
    redirects a connection the pod itself opens).
    """
    return _nat_rules(c, 6)


def ip6tables_reset_rules(c: Capture) -> str:
    """The `ip6tables-restore` input (filter table) of the fallback where the kernel has no IPv6 nat table.

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
    return "\n".join(lines)
