"""ServiceIdentity status as a pure function: reasons a user can act on, transition times that mean something."""

from __future__ import annotations

import datetime as dt

import pytest

from meshward.operator.domain.conditions import status_changed
from meshward.operator.domain.identity_status import Observation, identity_status

NOW = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
ME = "spiffe://cluster.local/ns/shop/sa/orders"


@pytest.mark.parametrize(("obs", "ready", "reason", "hint"), [
    (Observation(ME, 1, True, True), "True", "Issuing", ME),
    (Observation(ME, 1, False, True), "False", "ServiceAccountMissing", "kubectl -n shop create serviceaccount orders"),
    (Observation(ME, 1, True, False), "False", "CaUnavailable", "operator's log"),
])
def test_conditions(obs: Observation, ready: str, reason: str, hint: str) -> None:
    st = identity_status(obs, "shop", "orders", [], NOW)
    cond = {c["type"]: c for c in st["conditions"]}
    assert cond["Ready"]["status"] == ready
    assert cond["Ready"]["reason"] == reason
    assert hint in cond["Ready"]["message"]
    assert cond["Degraded"]["status"] == ("False" if ready == "True" else "True")
    assert cond["Degraded"]["reason"] == ("AsExpected" if ready == "True" else reason)
    assert (cond["Degraded"]["message"] == "nothing to report") == (ready == "True")
    assert st["spiffeID"] == ME and st["observedGeneration"] == 1


def test_transition_time_is_kept_while_the_status_holds_and_moves_when_it_changes() -> None:
    first = identity_status(Observation(ME, 1, False, True), "shop", "orders", [], NOW)
    later = NOW + dt.timedelta(minutes=5)
    same = identity_status(Observation(ME, 1, False, True), "shop", "orders", first["conditions"], later)
    assert same["conditions"] == first["conditions"]
    assert not status_changed(first, same)
    fixed = identity_status(Observation(ME, 1, True, True), "shop", "orders", first["conditions"], later)
    assert fixed["conditions"][0]["lastTransitionTime"] == "2026-01-01T12:05:00Z"
    assert status_changed(first, fixed)


def test_issuance_counts_are_reported() -> None:
    st = identity_status(Observation(ME, 2, True, True, 7, NOW), "shop", "orders", [], NOW)
    assert st["issuedCertificates"] == 7
    assert st["lastIssuedAt"] == "2026-01-01T12:00:00Z"
