"""ServiceIdentity status as a pure function of what the operator observed.

Why pure: `kubectl get serviceidentities` is how a user learns whether a workload can
get its certificate, so the conditions, their reasons and their transition times are
decided here, table-tested, and merely patched by the handler.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from meshward.operator.domain.conditions import DEGRADED, READY, condition, iso


@dataclass(frozen=True)
class Observation:
    """What the operator saw for one ServiceIdentity."""

    spiffe_id: str
    generation: int
    service_account_exists: bool
    ca_loaded: bool
    issued: int = 0
    last_issued_at: dt.datetime | None = None


def identity_status(obs: Observation, namespace: str, service_account: str, old_conditions: list[dict[str, Any]],
                    now: dt.datetime) -> dict[str, Any]:
    """Return the ServiceIdentity `.status` for an observation (transition times kept while unchanged)."""
    if not obs.ca_loaded:
        ready, reason = False, "CaUnavailable"
        message = "the mesh CA is not loaded yet; see the operator's log"
    elif not obs.service_account_exists:
        ready, reason = False, "ServiceAccountMissing"
        message = (f"ServiceAccount {namespace}/{service_account} does not exist: create it "
                   f"(kubectl -n {namespace} create serviceaccount {service_account})")
    else:
        ready, reason = True, "Issuing"
        message = f"pods running as {service_account} get certificates for {obs.spiffe_id}"
    status: dict[str, Any] = {
        "observedGeneration": obs.generation,
        "spiffeID": obs.spiffe_id,
        "issuedCertificates": obs.issued,
        "conditions": [
            condition(READY, ready, reason, message, obs.generation, now, old_conditions),
            condition(DEGRADED, not ready, reason if not ready else "AsExpected",
                       message if not ready else "nothing to report", obs.generation, now, old_conditions),
        ],
    }
    if obs.last_issued_at is not None:
        status["lastIssuedAt"] = iso(obs.last_issued_at)
    return status
