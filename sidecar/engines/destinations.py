"""The meshed destinations the agent's Envoy routes to with mTLS, as the operator last sent them.

The subscription puts each map here; the xDS server (servers/xds.py) turns the current
one into Envoy's outbound listener and clusters and pushes them on every change. Until
the first map arrives, nothing is meshed: every outbound connection passes through in
plaintext, which meshed peers refuse (the pod is not ready yet anyway).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from meshward.sidecar.domain.context import WIRE_HEADER
from meshward.sidecar.domain.egress import Egress, from_wire
from meshward.sidecar.domain.envoy import Destination, parse_destinations

log = logging.getLogger("meshward.sidecar.destinations")


class MeshDestinations:
    """The current destination map and egress, the app's context header, and a version that moves with each change."""

    def __init__(self, own_ip: str = "") -> None:
        self.own_ip = own_ip  # this pod's addresses, comma-separated (status.podIPs)
        self.current: dict[str, Destination] = {}
        self.egress = Egress()
        self.context_header = WIRE_HEADER
        self.version = 0
        self.received = False
        self._changed = asyncio.Event()

    def _bump(self) -> None:
        self.version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def use_context_header(self, name: str) -> None:
        """The header the app forwards its context token in (the workload's config, spec.context.header)."""
        if name != self.context_header:
            self.context_header = name
            self._bump()

    def update(self, message: Any) -> str | None:
        """Take a map (`{version, peers, egress}`) from the operator; the error if it is malformed (the last stays)."""
        try:
            if not isinstance(message, dict):
                raise ValueError("want {version, peers, egress}")  # noqa: TRY004
            parsed = parse_destinations(message.get("peers"))
            egress = from_wire(message.get("egress"))
        except ValueError as e:
            log.warning("ignoring a malformed destination map: %s", e)
            return str(e)
        self.received = True
        if parsed != self.current or egress != self.egress or self.version == 0:
            if egress != self.egress:
                log.info("egress: %s", "locked, allowed: " + (", ".join(map(str, egress.allow)) or "nothing")
                         if egress.locked else "open")
            self.current, self.egress = parsed, egress
            self._bump()
        return None

    async def newer_than(self, version: int) -> int:
        """Wait until the map's version passes `version`; return the new version."""
        while self.version <= version:
            changed = self._changed
            await changed.wait()
        return self.version
