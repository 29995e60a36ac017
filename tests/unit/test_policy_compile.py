"""AuthPolicy compilation: selectors, merging, conflicts, revocations, validation messages, status."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from meshward.operator.domain.compile import (
    PolicyInvalid,
    PolicyObject,
    RevocationEntry,
    Workload,
    compile_workload,
    selects,
    validate,
)
from meshward.operator.domain.policy_status import PolicyView, policy_status
from meshward.sidecar.config.schema import parse_config
from meshward.sidecar.domain.snapshot import compile_snapshot

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
IDP = "https://idp.example.com"
ORDERS = Workload("shop", "orders-1", "orders", {"app": "orders", "tier": "api"})


def pol(name: str = "p", created: str = "2026-01-01T00:00:00Z", generation: int = 1, **spec: Any) -> PolicyObject:
    spec.setdefault("selector", {"matchLabels": {"app": "orders"}})
    spec.setdefault("rules", [{"name": "r", "to": {"paths": ["/orders/*"]}}])
    return PolicyObject("shop", name, generation, created, spec)


@pytest.mark.parametrize(("selector", "expected"), [
    ({"matchLabels": {"app": "orders"}}, True),
    ({"matchLabels": {"app": "billing"}}, False),
    ({"matchLabels": {"app": "orders", "tier": "db"}}, False),
    ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["api", "web"]}]}, True),
    ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["api"]}]}, False),
    ({"matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]}, True),
    ({"matchExpressions": [{"key": "canary", "operator": "Exists"}]}, False),
    ({}, False),  # an empty selector selects nothing, never everything
])
def test_selector_semantics(selector: dict[str, Any], expected: bool) -> None:
    assert selects({"selector": selector}, ORDERS.labels) is expected


def test_namespace_wide_selects_every_workload_of_its_namespace_only() -> None:
    p = PolicyObject("shop", "all", 1, "", {"namespaceWide": True, "rules": []})
    assert compile_workload(ORDERS, [p], [], NOW).policies == {"shop/all": 1}
    other = Workload("billing", "b-1", "b", {"app": "orders"})
    assert compile_workload(other, [p], [], NOW).policies == {}


def test_compiled_documents_are_accepted_by_the_agent_and_versioned_by_content() -> None:
    p = pol(jwt=[{"issuer": IDP, "audiences": ["orders"], "clockSkew": "1m30s", "maxTokenLifetime": "1h"}])
    c = compile_workload(ORDERS, [p], [], NOW)
    cfg = parse_config(c.document)
    compile_snapshot(cfg)
    assert cfg.policies[0].issuers[0].clock_skew_s == 90
    assert cfg.policies[0].issuers[0].max_lifetime_s == 3600
    assert compile_workload(ORDERS, [p], [], NOW).version == c.version
    assert compile_workload(ORDERS, [pol(jwt=[{"issuer": IDP, "audiences": ["x"]}])], [], NOW).version != c.version


def test_an_issuer_defined_twice_differently_keeps_the_oldest_definition_and_reports_the_conflict() -> None:
    old = pol("old", "2026-01-01T00:00:00Z", jwt=[{"issuer": IDP, "audiences": ["orders"]}])
    new = pol("new", "2026-02-01T00:00:00Z", jwt=[{"issuer": IDP, "audiences": ["anything"]}])
    c = compile_workload(ORDERS, [new, old], [], NOW)
    assert "shop/new" in c.conflicts and "shop/old" in c.conflicts["shop/new"]
    cfg = parse_config(c.document)  # one definition per issuer: the agent accepts it
    assert [i.audiences for p in cfg.policies for i in p.issuers] == [("orders",), ("orders",)]
    # The conflicting policy still requires a token: a conflict never opens access.
    assert [p.require_jwt for p in cfg.policies] == [True, True]


def test_revocations_apply_until_they_expire_and_travel_hashed() -> None:
    from meshward.sidecar.config.schema import hashed_revocation

    live = RevocationEntry("jti", "t-1", NOW + dt.timedelta(seconds=1))
    gone = RevocationEntry("sub", f"{IDP}/mallory", NOW - dt.timedelta(seconds=1), IDP)
    doc = compile_workload(ORDERS, [], [live, gone], NOW).document
    assert doc["revocations"] == {"jti": [hashed_revocation("t-1")], "sub": [], "sid": []}
    assert "t-1" not in str(doc)


def test_a_subject_revoked_for_one_issuer_reaches_only_workloads_that_trust_it() -> None:
    from meshward.operator.domain.compile import revocation_entries
    from meshward.sidecar.config.schema import hashed_revocation

    entries = revocation_entries({"spec": {"entries": [
        {"sub": "mallory", "issuer": IDP + "/", "expiresAt": "2027-01-01T00:00:00Z"},
        {"sub": "eve", "expiresAt": "2027-01-01T00:00:00Z"}]}})
    trusting = compile_workload(ORDERS, [pol(jwt=[{"issuer": IDP, "audiences": ["orders"]}])], entries, NOW)
    other = compile_workload(ORDERS, [pol()], entries, NOW)
    assert trusting.document["revocations"]["sub"] == sorted([hashed_revocation(f"{IDP}/mallory"),
                                                              hashed_revocation("eve")])
    assert other.document["revocations"]["sub"] == [hashed_revocation("eve")]


@pytest.mark.parametrize(("spec", "field"), [
    ({"rules": [{"name": "r", "when": ["claims.scope.("]}]}, "spec.rules[0].when[0]"),
    ({"rules": [{"name": "r", "to": {"paths": ["orders/*"]}}]}, "spec.rules[0].to.paths[0]"),
    ({"selector": {"matchLabels": {}}}, "spec.selector"),
    ({"selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}, "spec.selector.matchExpressions[0].values"),
    ({"jwt": [{"issuer": IDP, "audiences": ["o"], "algorithms": ["HS256"]}]}, "spec.jwt[0].algorithms[0]"),
    ({"jwt": [{"issuer": IDP, "audiences": ["o"], "jwksUri": "http://idp.example.com/jwks"}]}, "spec.jwt[0].jwksUri"),
])
def test_invalid_policies_name_the_authpolicy_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyInvalid) as err:
        validate(pol(**spec))
    assert err.value.field == field, str(err.value)


def body(p: PolicyObject) -> dict[str, Any]:
    return {"metadata": {"namespace": p.namespace, "name": p.name, "generation": p.generation,
                         "creationTimestamp": p.created}, "spec": dict(p.spec)}


@pytest.mark.parametrize(("view", "ready", "reason", "workloads"), [
    (PolicyView(1, 1, None, ["a", "b"], ["a", "b"], []), "True", "Enforced", "2/2"),
    (PolicyView(1, 1, None, [], [], []), "True", "Enforced", "0/0"),
    (PolicyView(2, 1, None, ["a", "b"], ["a"], ["b: enforces generation 1"]), "False", "WorkloadsLagging", "1/2"),
    (PolicyView(3, 2, "spec.rules[0].when[0]: CEL does not compile", ["a"], ["a"], []), "False", "InvalidSpec",
     "1/1"),
])
def test_policy_status(view: PolicyView, ready: str, reason: str, workloads: str) -> None:
    st = policy_status(view, [], NOW)
    cond = st["conditions"][0]
    assert (cond["status"], cond["reason"], st["workloads"]) == (ready, reason, workloads)
    if reason == "InvalidSpec":
        assert "generation 2 stays in force" in cond["message"] and "spec.rules[0].when[0]" in cond["message"]
    if reason == "WorkloadsLagging":
        assert "b: enforces generation 1" in cond["message"]


def test_each_identity_gets_only_the_claims_its_policies_reference() -> None:
    from meshward.operator.domain.compile import destination_claims

    orders = pol("orders", context={"claims": ["tenant"]},
                 rules=[{"name": "r", "when": ["claims.scope == 'x' && claims['org-id'] != ''"]}])
    billing = PolicyObject("shop", "billing", 1, "", {"selector": {"matchLabels": {"app": "billing"}},
                                                      "rules": [{"name": "r"}]})
    pods = [ORDERS, Workload("shop", "billing-1", "billing", {"app": "billing"})]
    dests = destination_claims(pods, [orders, billing], "cluster.local")
    # billing needs nothing but `sub`, which every context token carries: it is not listed.
    assert dests == {"spiffe://cluster.local/ns/shop/sa/orders": ["org-id", "scope", "sub", "tenant"]}
    doc = compile_workload(ORDERS, [orders, billing], [], NOW, dests).document
    cfg = parse_config(doc)  # the agent accepts the context section
    assert cfg.context.claims == ("org-id", "scope", "sub", "tenant")
    assert "spiffe://cluster.local/ns/shop/sa/billing" not in cfg.context.destinations


def test_other_namespaces_claim_names_are_bounded_per_namespace_and_in_total() -> None:
    """Issue 19: every config carries each other namespace's claim-name union (by namespace audience); a namespace
    over its share is left out, then the largest while the whole is over its bound, each with why."""
    from meshward.operator.domain.compile import namespace_claims

    unions = {"billing": ["sub", "tenant"], "hr": ["salary_band", "sub"], "web": ["sub"],
              "evil": ["sub", *(f"c{n:04d}" for n in range(1000))], "big": ["sub", *(f"b{n:03d}" for n in range(300))]}
    carried, cut = namespace_claims(unions, "cluster.local", max_total_bytes=1024)
    assert carried == {"spiffe://cluster.local/ns/billing/sa/*": ["sub", "tenant"],
                       "spiffe://cluster.local/ns/hr/sa/*": ["salary_band", "sub"]}
    assert set(cut) == {"evil", "big"} and "more than the 4096" in cut["evil"] and "largest left" in cut["big"]
    # Its own namespace's entry never lands in a workload's config: exact identities serve there.
    doc = compile_workload(Workload("billing", "p-1", "payments", {}), [], [], NOW, {}, carried).document
    assert doc["context"]["destinations"] == {"spiffe://cluster.local/ns/hr/sa/*": ["salary_band", "sub"]}


@pytest.mark.parametrize(("context", "field"), [
    ({"header": "Authorization"}, "context.header"),
    ({"ttlSeconds": 600}, "context.ttlSeconds"),
    ({"destinations": {"orders": ["sub"]}}, "context.destinations.orders"),
])
def test_the_agent_refuses_a_bad_context_section(context: dict[str, Any], field: str) -> None:
    from meshward.sidecar.config.schema import ConfigError

    doc = {"apiVersion": "sidecar.meshward.io/v1alpha1", "kind": "SidecarConfig", "workload": "w",
           "context": context}
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert err.value.path == field


def test_principals_without_a_service_identity_are_reported() -> None:
    from meshward.operator.domain.policy_status import exact_principals

    spec = {"rules": [{"name": "r", "from": {"principals": [
        "spiffe://cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/ns/shop/*", "spiffe://other.td/ns/a/sa/b"]}}]}
    assert exact_principals(spec, "cluster.local") == [("spiffe://cluster.local/ns/shop/sa/frontend", "shop", "frontend")]
    st = policy_status(PolicyView(1, 1, None, [], [], [], None, ("spiffe://cluster.local/ns/shop/sa/frontnd",)), [],
                       NOW)
    degraded = st["conditions"][1]
    assert (degraded["status"], degraded["reason"]) == ("True", "UnknownPrincipal")
    assert "spiffe://cluster.local/ns/shop/sa/frontnd" in degraded["message"]
    assert st["conditions"][0]["status"] == "True"  # still enforced: the rule just never matches
