"""Keeps the admission webhooks' caBundle equal to the mesh trust bundle.

The chart creates the webhook configurations without a caBundle (Helm must not own a
value that changes with every CA rotation); the operator sets it at start-up and after
every CA check. During a rotation the bundle holds the old and the new root from the
staging step on, one maximum leaf lifetime before the operator's serving certificate
switches to the new root: the API server trusts both certificates before it ever sees
the new one, so no admission fails across a rotation.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable

from meshward.operator.clients.kube import KubeClient, KubeError

log = logging.getLogger("meshward.operator.webhooks")


class WebhookBundle:
    """Sets the caBundle of the named webhook configurations (`mutating:NAME`, `validating:NAME`)."""

    def __init__(self, kube: KubeClient, configurations: list[tuple[str, str]], bundle: Callable[[], str]) -> None:
        self._kube = kube
        self._configurations = configurations
        self._bundle = bundle
        self._missing: set[str] = set()

    async def sync(self) -> int:
        """Patch every webhook whose caBundle differs from the trust bundle; how many configurations changed."""
        want = base64.b64encode(self._bundle().encode()).decode()
        if not self._bundle():
            return 0
        changed = 0
        for kind, name in self._configurations:
            try:
                current = await asyncio.to_thread(self._kube.webhook_ca_bundles, kind, name)
                if current is None:
                    if name not in self._missing:
                        log.warning("%s webhook configuration %s does not exist: no caBundle to keep (installed "
                                    "without the chart?)", kind, name)
                        self._missing.add(name)
                    continue
                self._missing.discard(name)
                if current and any(b != want for b in current):
                    await asyncio.to_thread(self._kube.set_webhook_ca_bundle, kind, name, len(current), want)
                    log.info("caBundle of %s webhook configuration %s set to the trust bundle", kind, name)
                    changed += 1
            except KubeError as e:
                log.warning("cannot keep the caBundle of %s webhook configuration %s: %s", kind, name, e)
        return changed


def parse_configurations(text: str) -> list[tuple[str, str]]:
    """`mutating:NAME,validating:NAME` as pairs; ValueError naming a malformed entry."""
    out = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        kind, _, name = item.partition(":")
        if kind not in ("mutating", "validating") or not name:
            raise ValueError(f"{item!r}: write mutating:NAME or validating:NAME")
        out.append((kind, name))
    return out
