"""Leader election over a coordination.k8s.io Lease, as a pure decision.

Why: two operator replicas must never both write status, rotate the CA or push
configs, and a dead leader must be replaced quickly (target: within 15 s). The rules,
table-tested: take a lease nobody holds or whose holder stopped renewing for its
duration; renew our own; otherwise wait. A graceful stop releases the lease so the
standby takes over at once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

# A leader that has not renewed for this long is presumed dead.
LEASE_DURATION_S = 10
# The leader renews (and a standby retries) this often: several renewals fit in one duration.
RENEW_EVERY_S = 2.0


@dataclass(frozen=True)
class LeaseView:
    """The fields of a Lease that election reads and writes."""

    holder: str
    renewed: dt.datetime
    duration_s: int = LEASE_DURATION_S
    transitions: int = 0
    resource_version: str = ""


def claim(current: LeaseView | None, me: str, now: dt.datetime, duration_s: int = LEASE_DURATION_S) -> LeaseView | None:
    """The lease to write to lead (or keep leading) at `now`, or None when someone else leads."""
    if current is None:
        return LeaseView(me, now, duration_s)
    if current.holder == me:
        return replace(current, renewed=now, duration_s=duration_s)
    if not current.holder or now >= current.renewed + dt.timedelta(seconds=current.duration_s):
        return replace(current, holder=me, renewed=now, duration_s=duration_s, transitions=current.transitions + 1)
    return None


def released(current: LeaseView) -> LeaseView:
    """The lease as a leader leaves it on a graceful stop: held by nobody."""
    return replace(current, holder="")
