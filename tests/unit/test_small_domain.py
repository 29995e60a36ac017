"""Small pure pieces the rest relies on, tested where mutation testing (cosmic-ray) showed the suite did not
notice a change: Go durations, request paths and peers, status messages and conditions.

What it still reports as surviving is equivalent by construction: annotations (`X | None` mutated), `is`
for `==` on small ints and interned strings, `frozen`/`slots` flags, tuning constants (lease timings), and
comparisons whose operands cannot take the values that would tell them apart (enforcing <= connected)."""

from __future__ import annotations

import datetime as dt

import pytest

from meshward.operator.domain.conditions import condition, iso
from meshward.operator.domain.duration import parse_duration
from meshward.operator.domain.policy_status import (
    MAX_LAGGING,
    PolicyView,
    exact_principals,
    policy_status,
    revocation_status,
)
from meshward.sidecar.domain.request import CheckInput, split_path

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(("text", "seconds"), [
    ("250ms", 0.25), ("1h30m", 5400), ("1.5s", 1.5), ("2m0.5s", 120.5), ("0s", 0), ("1h0m0s", 3600)])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1d", "h", "1 h", "-1s", "1h-"])
def test_not_go_durations(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is tested where it is shown
        parse_duration(text)


@pytest.mark.parametrize(("raw", "path"), [
    ("/orders/1", "/orders/1"), ("/orders/1?x=1", "/orders/1"), ("/orders/1#frag", "/orders/1"),
    ("/a?b#c", "/a"), ("/a#b?c", "/a"), ("", "/"), ("?x=1", "/"), ("#x", "/")])
def test_split_path_drops_query_and_fragment(raw: str, path: str) -> None:
    assert split_path(raw) == path


@pytest.mark.parametrize(("peer", "namespace"), [
    ("spiffe://cluster.local/ns/shop/sa/orders", "shop"),
    ("spiffe://cluster.local/ns/shop/sa", None),             # too short to be a workload ID
    ("spiffe://cluster.local/xx/shop/sa/orders", None),      # not .../ns/<ns>/...
    ("spiffe://cluster.local/nt/shop/sa/orders", None),
    ("spiffe://cluster.local/ab/shop/sa/orders", None),      # sorts before "ns": equality, not order
    ("spiffe://cluster.local/ns/shop/xx/orders", None),      # not .../sa/<sa>
    ("spiffe://cluster.local/ns/shop/sa/orders/x", None),    # longer than a workload ID
    (None, None), ("", None),
])
def test_the_peers_namespace_comes_from_a_workload_spiffe_id_only(peer: str | None, namespace: str | None) -> None:
    assert CheckInput("GET", "/", peer=peer).peer_namespace == namespace


def test_revocation_status_is_ready_only_when_every_connected_workload_enforces() -> None:
    lagging = [f"shop/p-{i}: not yet acknowledged" for i in range(8)]
    st = revocation_status(2, 3, 1, ["a", "b", *lagging], ["a", "b"], lagging, [], NOW)
    cond = st["conditions"][0]
    assert (cond["status"], cond["reason"], st["workloads"]) == ("False", "WorkloadsLagging", "2/10")
    assert cond["message"] == "2 of 10 workloads enforce it; " + "; ".join(lagging[:5])
    st = revocation_status(2, 3, 1, ["a", "b"], ["a", "b"], [], [], NOW)
    cond = st["conditions"][0]
    assert (cond["status"], cond["reason"]) == ("True", "Enforced")
    assert cond["message"] == "all 2 connected workloads deny its 3 active entries"
    assert (st["activeEntries"], st["expiredEntries"], st["observedGeneration"]) == (3, 1, 2)


def test_policy_status_lists_at_most_max_lagging_and_names_five() -> None:
    lagging = [f"shop/p-{i:03d}: enforces generation 1" for i in range(MAX_LAGGING + 10)]
    st = policy_status(PolicyView(2, 2, None, [x.split(":")[0] for x in lagging], [], lagging), [], NOW)
    assert len(st["laggingWorkloads"]) == MAX_LAGGING == 50
    message = st["conditions"][0]["message"]
    assert message.endswith("; ".join(lagging[:5]))
    assert lagging[5] not in message


def test_no_workload_selected_yet_is_ready_and_says_so() -> None:
    st = policy_status(PolicyView(1, 1, None, [], [], []), [], NOW)
    assert st["conditions"][0]["message"] == "no connected workload is selected yet"
    st = policy_status(PolicyView(1, 1, None, ["a"], ["a"], []), [], NOW)
    assert st["conditions"][0]["message"] == "all 1 selected workloads enforce generation 1"


@pytest.mark.parametrize(("view", "reason"), [
    (PolicyView(1, 1, None, [], [], [], oversized="too large"), "ConfigTooLarge"),
    (PolicyView(1, 1, None, [], [], [], conflict="issuer conflict"), "IssuerConflict"),
    (PolicyView(1, 1, None, [], [], [], unknown_principals=("spiffe://td/ns/a/sa/b",)), "UnknownPrincipal"),
    (PolicyView(1, 1, None, [], [], []), "AsExpected"),
    (PolicyView(2, 1, "bad CEL", [], [], [], oversized="too large", conflict="c"), "InvalidSpec"),
    (PolicyView(1, 1, None, [], [], [], oversized="too large", conflict="c"), "ConfigTooLarge"),
])
def test_degraded_says_the_most_important_problem(view: PolicyView, reason: str) -> None:
    degraded = policy_status(view, [], NOW)["conditions"][1]
    assert degraded["reason"] == reason
    assert degraded["status"] == ("False" if reason == "AsExpected" else "True")


def test_exact_principals_skip_wildcards_and_other_trust_domains_but_keep_looking() -> None:
    spec = {"rules": [
        {"name": "a", "from": {"principals": ["spiffe://cluster.local/ns/shop/*", "spiffe://other/ns/a/sa/b",
                                              "spiffe://cluster.local/ns/shop/sa/frontend"]}},
        {"name": "b", "from": {"principals": ["spiffe://cluster.local/ns/pay/sa/api",
                                              "spiffe://cluster.local/ns/pay/xx/api",
                                              "spiffe://cluster.local/ns/pay/sa/api/extra",
                                              "spiffe://cluster.local/ns/pay/aa/api",
                                              "spiffe://cluster.local/ns/pay",
                                              "spiffe://cluster.local/ns/pay/sa/front*"]}}]}
    assert exact_principals(spec, "cluster.local") == [
        ("spiffe://cluster.local/ns/shop/sa/frontend", "shop", "frontend"),
        ("spiffe://cluster.local/ns/pay/sa/api", "pay", "api")]


def test_unknown_principals_are_named_five_at_most() -> None:
    unknown = tuple(f"spiffe://td/ns/a/sa/s{n}" for n in range(6))
    message = policy_status(PolicyView(1, 1, None, [], [], [], unknown_principals=unknown), [], NOW)[
        "conditions"][1]["message"]
    assert all(p in message for p in unknown[:5]) and unknown[5] not in message


def test_a_condition_keeps_its_own_transition_time_only() -> None:
    """Only the condition of the same type, with the same status, keeps its time: other types (even ones that
    sort first) and a flip (True to False) do not."""
    then, now = "2026-01-01T00:00:00Z", NOW
    old = [{"type": "Degraded", "status": "True", "lastTransitionTime": then},
           {"type": "Ready", "status": "True", "lastTransitionTime": "2026-02-01T00:00:00Z"}]
    assert condition("Ready", True, "r", "m", 1, now, old)["lastTransitionTime"] == "2026-02-01T00:00:00Z"
    assert condition("Ready", False, "r", "m", 1, now, old)["lastTransitionTime"] == iso(now)
    assert condition("Degraded", False, "r", "m", 1, now, old)["lastTransitionTime"] == iso(now)
    assert condition("Degraded", True, "r", "m", 1, now, old)["lastTransitionTime"] == then
    assert condition("Other", True, "r", "m", 1, now, old)["lastTransitionTime"] == iso(now)
