"""Egress control: which addresses outside the mesh a meshed pod's app may reach (issue 20).

Open (the default, as before): every connection to an address the mesh does not cover passes
through. Locked (`meshed-only`, Istio's REGISTRY_ONLY for our mesh): a meshed pod's app
reaches meshed destinations, its own pod, and only the allowed networks and ports outside
the mesh; any other connection is closed by its Envoy before a byte leaves the pod, and
written to the agent's audit log (sidecar/engines/egress.py). Who locks: the platform, for the
whole mesh (Helm values) and per namespace (the Namespace's annotations, which only those
who may edit Namespaces can write); where both lock, a connection must be allowed by both
(`combine`): a namespace can narrow the mesh's list, never widen it.

An allowed entry is a network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`; a bare address
is its /32 or /128) with an optional port (`10.0.0.0/8:5432`, `[2001:db8::]/32:5432`): every
port of the network without one. Written comma-separated. Parsed here once, for the operator
(the annotation and the flags, so a wrong value is reported where it was written) and for the
agent (what it receives).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

OPEN = "open"
MESHED_ONLY = "meshed-only"
MODES = (OPEN, MESHED_ONLY)
# Allowed entries one lock may hold: each is a filter chain or two in every Envoy of the namespace
# (an entry with a port, a copy of the meshed chains for that port), so the list stays a list of
# networks, not of hosts.
MAX_ALLOW = 64
# The cluster DNS answers over TCP when an answer is too large for UDP (UDP is never captured): the
# cluster DNS Service's addresses on its TCP ports are always allowed. Taken from the Service by the
# operator (engines/mesh_directory.py), never from the pod's resolv.conf, which its spec
# (`dnsConfig.nameservers`) chooses.
DNS_PORT = 53


@dataclass(frozen=True)
class Allowed:
    """A network outside the mesh a locked pod may reach, on `port` or on every port (None)."""

    network: str  # canonical CIDR (ipaddress's form)
    port: int | None = None

    def __str__(self) -> str:
        if self.port is None:
            return self.network
        net = f"[{self.network.split('/')[0]}]/{self.network.split('/')[1]}" if ":" in self.network else self.network
        return f"{net}:{self.port}"

    @classmethod
    def host(cls, address: str, port: int | None = None) -> Allowed:
        """One address (its /32 or /128), on `port` or every port; ValueError if it is not an IP address."""
        return cls(str(ipaddress.ip_network(address)), port)

    @property
    def net(self) -> Network:
        """The network as an ipaddress object."""
        return ipaddress.ip_network(self.network)

    def key(self) -> tuple[int, int, int, int]:
        """The sort order: family, address, prefix length, then the port (every port, None, first)."""
        net = self.net
        return net.version, int(net.network_address), net.prefixlen, -1 if self.port is None else self.port


def ordered(entries: Iterable[Allowed]) -> tuple[Allowed, ...]:
    """`entries` without duplicates, in one order (equal lists, equal wire forms)."""
    return tuple(sorted(set(entries), key=Allowed.key))


@dataclass(frozen=True)
class Egress:
    """What leaves the mesh from a pod: everything (not `locked`), or only `allow`."""

    locked: bool = False
    allow: tuple[Allowed, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """The form the operator sends and the agent parses (`from_wire`)."""
        return {"mode": MESHED_ONLY if self.locked else OPEN, "allow": [str(a) for a in self.allow]}


def parse_entry(text: str) -> Allowed:
    """One allowed entry (`CIDR`, `CIDR:port`, `[v6 CIDR]:port`); ValueError saying what is wrong."""
    raw = text.strip()
    port: int | None = None
    net_text = raw
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0:
            raise ValueError(f"{raw!r}: an IPv6 network with a port is written [2001:db8::]/32:5432")
        rest = raw[close + 1:]
        net_text = raw[1:close]
        if rest.startswith("/"):
            prefix, _, port_text = rest[1:].partition(":")
            net_text += f"/{prefix}"
            rest = f":{port_text}" if port_text else ""
        if rest:
            port = _port(raw, rest.removeprefix(":"))
    elif raw.count(":") == 1:  # IPv4 with a port (an IPv6 address has two or more)
        net_text, _, port_text = raw.partition(":")
        port = _port(raw, port_text)
    try:
        network = ipaddress.ip_network(net_text, strict=True)
    except ValueError as e:
        raise ValueError(f"{raw!r}: not a network in CIDR notation ({e}); e.g. 10.0.0.0/8 or 10.0.0.0/8:5432") from e
    if network.prefixlen == 0:
        raise ValueError(f"{raw!r}: allows every address, which is no lock; use mode open instead")
    return Allowed(str(network), port)


def _port(raw: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{raw!r}: the port must be a number from 1 to 65535")
    return int(text)


def parse_allow(text: str) -> tuple[Allowed, ...]:
    """A comma-separated list of entries, sorted and without duplicates; ValueError naming the first bad one."""
    entries = ordered(parse_entry(t) for t in text.split(",") if t.strip())
    if len(entries) > MAX_ALLOW:
        raise ValueError(f"{len(entries)} entries, at most {MAX_ALLOW}: allow networks, not single hosts")
    return entries


def parse_mode(text: str) -> bool:
    """Whether a mode locks; ValueError naming the modes."""
    if text.strip() not in MODES:
        raise ValueError(f"{text!r} is not a mode: use {' or '.join(MODES)}")
    return text.strip() == MESHED_ONLY


def from_wire(doc: Any) -> Egress:
    """The egress an agent receives (absent: open, as from an operator that predates it); ValueError if malformed."""
    if doc is None:
        return Egress()
    if not isinstance(doc, Mapping) or not isinstance(doc.get("allow", []), list):
        raise ValueError("egress: want {mode, allow: [...]}")  # noqa: TRY004 (one error type for a bad message)
    allow = doc.get("allow", [])
    if not all(isinstance(a, str) for a in allow):
        raise ValueError("egress.allow: want strings")
    return Egress(parse_mode(str(doc.get("mode", OPEN))), parse_allow(",".join(allow)))


def _intersect(a: Allowed, b: Allowed) -> Allowed | None:
    """What both entries allow, if anything (networks nest or are disjoint)."""
    if a.port is not None and b.port is not None and a.port != b.port:
        return None
    na, nb = a.net, b.net
    if na.version != nb.version:
        return None
    inner = na if na.subnet_of(nb) else nb if nb.subnet_of(na) else None  # type: ignore[arg-type]
    if inner is None:
        return None
    return Allowed(str(inner), a.port if a.port is not None else b.port)


def combine(mesh: Egress, namespace: Egress) -> Egress:
    """The egress in force where both apply: locked if either locks; allowed only what every lock allows."""
    if not mesh.locked:
        return namespace
    if not namespace.locked:
        return mesh
    both = {x for a in mesh.allow for b in namespace.allow if (x := _intersect(a, b)) is not None}
    return Egress(True, ordered(both))
