"""Leader election's rule: take a free or abandoned lease, renew our own, never take a live one."""

from __future__ import annotations

import datetime as dt

from meshward.operator.domain.lease import LEASE_DURATION_S, LeaseView, claim, released

T = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_nobody_holds_it() -> None:
    got = claim(None, "a", T)
    assert got is not None and got.holder == "a" and got.renewed == T


def test_the_holder_renews() -> None:
    got = claim(LeaseView("a", T, resource_version="7"), "a", T + dt.timedelta(seconds=2))
    assert got is not None and got.renewed == T + dt.timedelta(seconds=2) and got.resource_version == "7"


def test_a_live_leader_is_never_replaced() -> None:
    assert claim(LeaseView("a", T), "b", T + dt.timedelta(seconds=LEASE_DURATION_S - 0.001)) is None
    # Whichever way the names sort: the holder is compared for equality.
    assert claim(LeaseView("b", T), "a", T + dt.timedelta(seconds=1)) is None


def test_an_abandoned_lease_is_taken_over_and_counted() -> None:
    got = claim(LeaseView("a", T, transitions=3), "b", T + dt.timedelta(seconds=LEASE_DURATION_S))
    assert got is not None and got.holder == "b" and got.transitions == 4


def test_a_released_lease_is_taken_at_once() -> None:
    got = claim(released(LeaseView("a", T)), "b", T + dt.timedelta(milliseconds=1))
    assert got is not None and got.holder == "b"


def test_a_lease_abandoned_long_ago_is_taken_too() -> None:
    """Not only at the exact moment the duration runs out (a mutant of `>=` into `==` survived this suite)."""
    got = claim(LeaseView("a", T, transitions=3), "b", T + dt.timedelta(seconds=LEASE_DURATION_S + 30))
    assert got is not None and got.holder == "b" and got.transitions == 4


def test_a_new_lease_starts_with_no_transitions() -> None:
    got = claim(None, "a", T)
    assert got is not None and got.transitions == 0 and got.duration_s == LEASE_DURATION_S
