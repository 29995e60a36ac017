"""Status conditions (metav1.Condition) shared by every Meshward kind's status, as pure functions.

Why one place: Ready and Degraded mean the same on ServiceIdentities, AuthPolicies and
Revocations, and their transition times must be kept the same way, or `kubectl wait`
and dashboards would see flapping that never happened.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

READY = "Ready"
DEGRADED = "Degraded"


def iso(t: dt.datetime) -> str:
    """A timestamp as Kubernetes writes them (RFC 3339, UTC, seconds)."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(ctype: str, status: bool, reason: str, message: str, generation: int, now: dt.datetime,
              old: list[dict[str, Any]]) -> dict[str, Any]:
    """A metav1.Condition whose lastTransitionTime is kept from `old` while its status holds."""
    text = "True" if status else "False"
    previous = next((c for c in old if c.get("type") == ctype), None)
    since = previous["lastTransitionTime"] if previous and previous.get("status") == text else iso(now)
    return {"type": ctype, "status": text, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": since}


def status_changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether patching `new` over `old` would change anything a user sees."""
    return any(old.get(k) != v for k, v in new.items())
