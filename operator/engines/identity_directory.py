"""What the operator knows about ServiceIdentities between API calls: an index and issuance counts.

The index is fed by the operator's watch, so a CSR costs no list call when its
ServiceIdentity is known; a miss falls back to one list call (the watch may not have
caught up yet), so a new ServiceIdentity is never refused for being too fresh. The
counts feed `.status.issuedCertificates` / `lastIssuedAt` and the Warning Events that
tell a user why a workload is refused.
"""

from __future__ import annotations

import datetime as dt
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Refusals kept per ServiceAccount until the status handler posts them as Events.
MAX_PENDING_REFUSALS = 10


class IdentityDirectory:
    """ServiceIdentities by namespace and ServiceAccount name."""

    def __init__(self) -> None:
        self._by_sa: dict[tuple[str, str], dict[str, Any]] = {}

    def upsert(self, body: Mapping[str, Any]) -> None:
        """Record an added or changed ServiceIdentity (one being deleted is removed)."""
        meta = body.get("metadata", {})
        key = (meta.get("namespace", ""), body.get("spec", {}).get("serviceAccountName", ""))
        if meta.get("deletionTimestamp"):
            self._by_sa.pop(key, None)
        else:
            self._by_sa[key] = {"metadata": dict(meta), "spec": dict(body.get("spec", {}))}

    def remove(self, body: Mapping[str, Any]) -> None:
        """Forget a deleted ServiceIdentity."""
        key = (body.get("metadata", {}).get("namespace", ""), body.get("spec", {}).get("serviceAccountName", ""))
        self._by_sa.pop(key, None)

    def find(self, namespace: str, service_account: str) -> dict[str, Any] | None:
        """The ServiceIdentity admitting `namespace/service_account`, if the watch has seen one."""
        return self._by_sa.get((namespace, service_account))


@dataclass
class _Counts:
    issued: int = 0
    last_issued_at: dt.datetime | None = None
    refusals: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_REFUSALS))


class IssuanceStats:
    """Issuance counts and pending refusals per ServiceAccount."""

    def __init__(self) -> None:
        self._by_sa: dict[tuple[str, str], _Counts] = {}

    def issued(self, namespace: str, service_account: str, at: dt.datetime) -> None:
        """Count one issued certificate."""
        c = self._by_sa.setdefault((namespace, service_account), _Counts())
        c.issued += 1
        c.last_issued_at = at

    def refused(self, namespace: str, service_account: str, reason: str, message: str) -> None:
        """Remember a refusal for the next Event."""
        self._by_sa.setdefault((namespace, service_account), _Counts()).refusals.append((reason, message))

    def counts(self, namespace: str, service_account: str) -> tuple[int, dt.datetime | None]:
        """Certificates issued since the operator started, and when the last one was."""
        c = self._by_sa.get((namespace, service_account))
        return (c.issued, c.last_issued_at) if c else (0, None)

    def take_refusals(self, namespace: str, service_account: str) -> list[tuple[str, str]]:
        """Return and forget the refusals not yet reported."""
        c = self._by_sa.get((namespace, service_account))
        if c is None:
            return []
        out = list(c.refusals)
        c.refusals.clear()
        return out
