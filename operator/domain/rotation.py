"""Mesh CA rotation as a pure state machine: trust first, sign later, forget last.

A rotation never breaks a handshake because each step waits for the previous one to
reach every workload:
1. *staged*: a new root joins the trust bundle; leaves are still signed by the old key.
   Every workload gets the new bundle with its next certificate (renewal at half life).
2. *retiring*: once every live leaf was issued after staging (one maximum leaf lifetime
   later), every workload trusts the new root, so the new key starts signing. The old
   root stays in the bundle for peers still presenting old leaves.
3. *steady*: one maximum leaf lifetime after that, every leaf the old key signed has
   expired, and the old root leaves the bundle.
A rotation starts when requested (annotation / `meshward ca rotate`) or automatically
when the active root nears its end. The clock and root generation come in as arguments.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshward.operator.domain.ca import CertificateAuthority

Phase = Literal["steady", "staged", "retiring"]
# A root with less than this left starts rotating by itself (roots live a year).
AUTO_ROTATE_BEFORE = dt.timedelta(days=60)
# With less than this left, the operator warns (a rotation should have finished long before).
WARN_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class CaState:
    """The mesh CA's key material and rotation phase."""

    active: CertificateAuthority
    next: CertificateAuthority | None = None
    previous: x509.Certificate | None = None
    since: dt.datetime | None = None

    @property
    def phase(self) -> Phase:
        """Which step of a rotation the CA is in."""
        if self.next is not None:
            return "staged"
        if self.previous is not None:
            return "retiring"
        return "steady"

    def bundle(self) -> list[x509.Certificate]:
        """Every root a workload must trust now, newest first."""
        roots = [self.next.cert] if self.next else []
        roots.append(self.active.cert)
        if self.previous is not None:
            roots.append(self.previous)
        return roots

    def bundle_pem(self) -> str:
        """The trust bundle as concatenated PEM."""
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in self.bundle())


@dataclass(frozen=True)
class Step:
    """A state change and the sentence the operator logs and posts as an Event."""

    state: CaState
    reason: str
    message: str


def advance(state: CaState, now: dt.datetime, *, requested: bool, leaf_lifetime: dt.timedelta,
            new_root: Callable[[], CertificateAuthority]) -> Step | None:
    """Return the next rotation step due at `now`, or None when nothing is due."""
    phase = state.phase
    since = state.since or now
    if phase == "steady":
        remaining = state.active.cert.not_valid_after_utc - now
        if requested or remaining < AUTO_ROTATE_BEFORE:
            why = "requested" if requested else f"the active root expires in {remaining.days} days"
            return Step(replace(state, next=new_root(), since=now), "CaRotationStaged",
                        f"CA rotation started ({why}): a new root joined the trust bundle; the old key signs "
                        f"until {now + leaf_lifetime:%Y-%m-%dT%H:%M:%SZ}")
    elif phase == "staged" and state.next is not None and now >= since + leaf_lifetime:
        return Step(CaState(active=state.next, previous=state.active.cert, since=now), "CaRotationActivated",
                    f"the new root now signs; the old root stays trusted until "
                    f"{now + leaf_lifetime:%Y-%m-%dT%H:%M:%SZ}")
    elif phase == "retiring" and now >= since + leaf_lifetime:
        return Step(CaState(active=state.active, since=now), "CaRotationCompleted",
                    "every leaf of the old root has expired; the old root left the trust bundle")
    return None
