"""The authorization phase and the response phase: matching tables and decision semantics."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshward.sidecar.domain.decision import WIRE, Decision, Outcome
from meshward.sidecar.domain.policy import compile_path, compile_paths, path_is_safe
from meshward.sidecar.domain.request import CheckInput
from meshward.sidecar.servers.authz_grpc import grpc_response
from meshward.sidecar.servers.authz_http import http_response
from meshward.sidecar.servers.http1 import Response, frame
from tests.support.idp import SigningKey
from tests.support.sidecar import ISSUER, Clock, config, issuer, pipeline, policy, request

KEY = SigningKey("RS256", kid="k1")
NOW = 1_800_000_000
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"


def token(**claims: Any) -> str:
    import jwt

    body = {"iss": ISSUER, "aud": "orders", "sub": "alice", "iat": NOW, "exp": NOW + 300, **claims}
    return jwt.encode(body, KEY.private, algorithm="RS256", headers={"kid": "k1"})


def decide(rules: list[dict[str, Any]], inp: CheckInput, *policies: dict[str, Any], **cfg: Any) -> Decision:
    pols = policies or (policy(jwt=[issuer()], requireJwt=False, rules=rules),)
    p, _, _ = pipeline(config(*pols, **cfg), jwks={ISSUER: [KEY.jwk]}, clock=Clock(NOW))
    d = p.decide_now(inp, "http")
    assert isinstance(d, Decision)
    return d


@pytest.mark.parametrize(("pattern", "path", "matches"), [
    ("/healthz", "/healthz", True),
    ("/healthz", "/healthz/", False),
    ("/orders/*", "/orders/", True),
    ("/orders/*", "/orders/1/items", True),
    ("/orders/*", "/orders", False),
    ("/orders/*", "/ordersX", False),
    ("*", "/anything", True),
    ("/v*/orders", "/v1/orders", True),
    ("/v*/orders", "/v1/x/orders", False),
    ("/api/**/items", "/api/a/b/items", True),
    ("/api/*/items", "/api/a/b/items", False),
    ("/a.b/*", "/aXb/c", False),
])
def test_path_patterns(pattern: str, path: str, matches: bool) -> None:
    assert compile_path(pattern)(path) is matches
    assert compile_paths([pattern])(path) is matches
    assert compile_paths(["/never", pattern, "/nope/*"])(path) is matches


@pytest.mark.parametrize(("path", "safe"), [
    ("/orders/1", True), ("/a/../admin", False), ("/a/./b", False), ("/..", False), ("/a%2e%2e/b", False),
    ("/a\\b", False), ("/v1.2/x", True), ("/.well-known/x", True),
])
def test_traversal_paths_are_refused(path: str, safe: bool) -> None:
    assert path_is_safe(path) is safe


# (case, rule, input, allowed?)
RULES: list[tuple[str, dict[str, Any], CheckInput, bool]] = [
    ("principal-exact", {"from": {"principals": [FRONTEND]}}, request(peer=FRONTEND), True),
    ("principal-exact-other", {"from": {"principals": [FRONTEND]}}, request(peer=FRONTEND + "x"), False),
    ("principal-none", {"from": {"principals": ["*"]}}, request(), False),
    ("principal-any", {"from": {"principals": ["*"]}}, request(peer=FRONTEND), True),
    ("principal-prefix", {"from": {"principals": ["spiffe://cluster.local/ns/shop/*"]}}, request(peer=FRONTEND), True),
    ("principal-prefix-other-ns", {"from": {"principals": ["spiffe://cluster.local/ns/shop/*"]}},
     request(peer="spiffe://cluster.local/ns/shopx/sa/a"), False),
    ("principal-suffix", {"from": {"principals": ["*/sa/frontend"]}}, request(peer=FRONTEND), True),
    ("namespace", {"from": {"namespaces": ["shop"]}}, request(peer=FRONTEND), True),
    ("namespace-other", {"from": {"namespaces": ["bank"]}}, request(peer=FRONTEND), False),
    ("request-principal", {"from": {"requestPrincipals": [f"{ISSUER}/alice"]}}, request(token=token()), True),
    ("request-principal-other", {"from": {"requestPrincipals": [f"{ISSUER}/bob"]}}, request(token=token()), False),
    ("request-principal-any-needs-token", {"from": {"requestPrincipals": ["*"]}}, request(), False),
    ("method", {"to": {"methods": ["GET"]}}, request(method="GET"), True),
    ("method-other", {"to": {"methods": ["GET"]}}, request(method="POST"), False),
    ("host-exact-with-port", {"to": {"hosts": ["orders.shop"]}}, request(), True),
    ("host-wildcard", {"to": {"hosts": ["*.shop"]}}, request(), True),
    ("host-other", {"to": {"hosts": ["pay.shop"]}}, request(), False),
    ("port", {"to": {"ports": [8080]}}, request(), True),
    ("port-other", {"to": {"ports": [9090]}}, request(), False),
    ("all-parts", {"from": {"principals": [FRONTEND]}, "to": {"methods": ["GET"], "paths": ["/orders/*"]}},
     request(peer=FRONTEND), True),
    ("one-part-fails", {"from": {"principals": [FRONTEND]}, "to": {"methods": ["POST"]}}, request(peer=FRONTEND),
     False),
    ("cel-claim", {"when": ["claims.tenant == 'acme'"]}, request(token=token(tenant="acme")), True),
    ("cel-claim-other", {"when": ["claims.tenant == 'acme'"]}, request(token=token(tenant="evil")), False),
    ("cel-split-scope", {"when": ["'orders:read' in claims.scope.split(' ')"]},
     request(token=token(scope="a orders:read")), True),
    ("cel-missing-claim-does-not-allow", {"when": ["claims.tenant == 'acme'"]}, request(token=token()), False),
    ("cel-request-and-source", {"when": ["request.method == 'GET' && source.namespace == 'shop'"]},
     request(peer=FRONTEND), True),
    ("empty-rule-matches-everything", {}, request(), True),
]


@pytest.mark.parametrize(("rule", "inp", "allowed"), [c[1:] for c in RULES], ids=[c[0] for c in RULES])
def test_allow_rule_matching(rule: dict[str, Any], inp: CheckInput, allowed: bool) -> None:
    d = decide([{"name": "r", **rule}], inp)
    assert (d.outcome is Outcome.ALLOW) is allowed
    if not allowed:
        assert d.outcome is Outcome.FORBIDDEN and d.reason.startswith("no rule allows this request")


def test_deny_wins_over_allow() -> None:
    d = decide([{"name": "allow-all"}, {"name": "no-admin", "action": "Deny", "to": {"paths": ["/admin/*"]}}],
               request("/admin/x"))
    assert (d.outcome, d.policy, d.rule) == (Outcome.FORBIDDEN, "orders-api", "no-admin")


def test_deny_rule_whose_condition_errors_denies() -> None:
    d = decide([{"name": "allow-all"}, {"name": "d", "action": "Deny", "when": ["claims.banned == true"]}],
               request(token=token()))
    assert d.outcome is Outcome.FORBIDDEN and d.rule == "d"


def test_a_when_that_is_no_boolean_is_undecided_a_deny_denies_and_an_allow_admits_nothing() -> None:
    """`claims.sub` alone is a string, not a condition: undecided, like an error (a non-boolean used to count as
    false, so a Deny written that way never denied)."""
    d = decide([{"name": "allow-all"}, {"name": "d", "action": "Deny", "when": ["claims.sub"]}], request(token=token()))
    assert d.outcome is Outcome.FORBIDDEN and d.rule == "d"
    assert decide([{"name": "a", "when": ["claims.sub"]}], request(token=token())).outcome is Outcome.FORBIDDEN


def test_no_policy_allows() -> None:
    p, _, _ = pipeline(config())
    d = p.decide_now(request(), "http")
    assert isinstance(d, Decision) and d.outcome is Outcome.ALLOW
    assert d.reason == "no policy selects this workload"


def test_an_enforce_policy_without_rules_allows_nothing() -> None:
    d = decide([], request())
    assert d.outcome is Outcome.FORBIDDEN and d.reason == "no rule allows this request"


def test_missing_token_is_401_when_required() -> None:
    d = decide([], request(), policy(jwt=[issuer()], rules=[{"name": "all"}]))
    assert d.outcome is Outcome.UNAUTHENTICATED
    assert ("www-authenticate", 'Bearer realm="meshward"') in d.deny_headers


def test_audit_policy_allows_but_reports_would_deny() -> None:
    p, audit, metrics = pipeline(config(policy(mode="Audit", rules=[{"name": "frontend-only",
                                                                     "from": {"principals": [FRONTEND]}}])))
    d = p.decide_now(request(peer="spiffe://cluster.local/ns/x/sa/y"), "http")
    assert isinstance(d, Decision)
    assert d.outcome is Outcome.ALLOW and d.would_deny
    assert d.reason == "audit: would be denied by orders-api/default deny"
    line = json.loads(audit.getvalue().splitlines()[-1])
    assert line["would_deny"] is True and line["outcome"] == "allow"
    # Counted under the policy that would have denied (the Audit-only policy), not "-".
    assert metrics.registry.get_sample_value("meshward_authz_would_deny_total", {"policy": "orders-api"}) == 1
    assert metrics.registry.get_sample_value("meshward_authz_would_deny_total", {"policy": "-"}) is None


def test_would_deny_is_counted_under_the_policy_that_would_deny_not_the_one_that_allowed() -> None:
    p, _, metrics = pipeline(config(policy("allow-all", rules=[{"name": "all"}]),
                                    policy("shadow", mode="Audit", rules=[{"name": "no-admin", "action": "Deny",
                                                                           "to": {"paths": ["/admin/*"]}}])))
    d = p.decide_now(request("/admin/x"), "http")
    assert isinstance(d, Decision) and d.outcome is Outcome.ALLOW and d.would_deny
    assert (d.policy, d.would_deny_policy) == ("allow-all", "shadow")
    assert metrics.registry.get_sample_value("meshward_authz_would_deny_total", {"policy": "shadow"}) == 1
    assert metrics.registry.get_sample_value("meshward_authz_would_deny_total", {"policy": "allow-all"}) is None


def test_a_missing_token_under_an_audit_jwt_policy_is_counted_under_that_policy() -> None:
    p, _, metrics = pipeline(config(policy("jwt-trial", mode="Audit", jwt=[issuer()], rules=[{"name": "all"}])))
    d = p.decide_now(request(), "http")
    assert isinstance(d, Decision) and d.outcome is Outcome.ALLOW and d.would_deny
    assert metrics.registry.get_sample_value("meshward_authz_would_deny_total", {"policy": "jwt-trial"}) == 1


def test_audit_rule_in_enforce_policy_neither_denies_nor_allows() -> None:
    rules: list[dict[str, Any]] = [{"name": "all"}, {"name": "trial-deny", "action": "Deny", "mode": "Audit", "to": {"paths": ["/orders/*"]}}]
    d = decide(rules, request("/orders/1"))
    assert d.outcome is Outcome.ALLOW and d.would_deny and "trial-deny" in d.reason
    d = decide([{"name": "trial-allow", "mode": "Audit"}], request("/orders/1"))
    assert d.outcome is Outcome.FORBIDDEN


def test_audit_policy_with_required_jwt_allows_without_token() -> None:
    d = decide([], request(), policy(mode="Audit", jwt=[issuer()], rules=[{"name": "all"}]))
    assert d.outcome is Outcome.ALLOW and d.would_deny and "missing token" in d.reason


def test_allow_sets_identity_headers_and_strips_token_and_spoofed_headers() -> None:
    d = decide([{"name": "all"}], request(token=token(tenant="acme")),
               identityHeaders={"x-meshward-sub": "sub", "x-meshward-tenant": "tenant", "x-meshward-roles": "roles"})
    assert ("x-meshward-sub", "alice") in d.headers_to_set and ("x-meshward-tenant", "acme") in d.headers_to_set
    assert "x-meshward-roles" in d.headers_to_remove  # no such claim: a client-sent copy must not survive
    assert "authorization" in d.headers_to_remove


def test_forward_original_token_keeps_authorization() -> None:
    d = decide([], request(token=token()), policy(jwt=[issuer(forwardOriginalToken=True)], rules=[{"name": "all"}]))
    assert "authorization" not in d.headers_to_remove


def test_identity_header_values_cannot_inject_headers() -> None:
    d = decide([{"name": "all"}], request(token=token(sub="alice\r\nx-admin: 1")))
    assert ("x-meshward-sub", "alice%0D%0Ax-admin: 1") in d.headers_to_set


def test_outcomes_map_to_one_table_of_wire_codes() -> None:
    assert {o: (w.http, w.grpc) for o, w in WIRE.items()} == {
        Outcome.ALLOW: (200, 0), Outcome.UNAUTHENTICATED: (401, 16), Outcome.FORBIDDEN: (403, 7),
        Outcome.UNAVAILABLE: (503, 14)}


@pytest.mark.parametrize("outcome", list(Outcome))
def test_both_transports_render_the_same_decision(outcome: Outcome) -> None:
    d = Decision(outcome, "id-1", "because", deny_headers=[("www-authenticate", "Bearer")],
                 headers_to_set=[("x-meshward-sub", "alice")], headers_to_remove=["authorization"])
    h = http_response(d)
    g = grpc_response(d)
    status, headers = _framed(h)
    assert status == h.status == WIRE[outcome].http
    assert g.status.code == WIRE[outcome].grpc
    assert ("x-meshward-decision-id", "id-1") in headers
    if outcome is Outcome.ALLOW:
        assert ("x-meshward-sub", "alice") in headers
        assert ("x-envoy-auth-headers-to-remove", "authorization") in headers
        assert list(g.ok_response.headers_to_remove) == ["authorization"]
        assert {x.header.key: x.header.value for x in g.ok_response.headers}["x-meshward-sub"] == "alice"
    else:
        assert g.denied_response.status.code == h.status
        assert json.loads(h.body) == json.loads(g.denied_response.body) == {
            "error": outcome.value, "reason": "because", "decision_id": "id-1"}


def _framed(resp: Response) -> tuple[int, list[tuple[str, str]]]:
    """The status and headers Envoy reads from the framed response."""
    head_text = frame(resp, keep_alive=True).split(b"\r\n\r\n", 1)[0].decode("latin-1")
    status_line, *lines = head_text.split("\r\n")
    return int(status_line.split()[1]), [(k, v) for k, v in (x.split(": ", 1) for x in lines)]


def test_an_allow_served_from_the_wire_cache_differs_only_in_its_decision_id() -> None:
    cache: dict[str, bytes] = {}

    def allow(decision_id: str) -> Decision:
        return Decision(Outcome.ALLOW, decision_id, "ok", headers_to_set=[("x-meshward-sub", "alice")],
                        headers_to_remove=["authorization", "x-meshward-tenant"], wire_cache=cache)

    first, second = http_response(allow("id-1")), http_response(allow("id-2"))
    assert set(cache) == {"http"}
    assert _framed(second) == _framed(http_response(Decision(
        Outcome.ALLOW, "id-2", "ok", headers_to_set=[("x-meshward-sub", "alice")],
        headers_to_remove=["authorization", "x-meshward-tenant"])))
    assert frame(first, True).replace(b"id-1", b"id-2") == frame(second, True)
    assert frame(second, keep_alive=False).endswith(b"connection: close\r\n\r\n")


def test_every_decision_writes_one_audit_line_without_secrets() -> None:
    tok = token()
    p, audit, _ = pipeline(config(policy(jwt=[issuer()], rules=[{"name": "all"}])), jwks={ISSUER: [KEY.jwk]},
                           clock=Clock(NOW))
    p.decide_now(request("/orders/1?card=4111", token=tok), "grpc")
    p.decide_now(request("/orders/1"), "http")
    lines = [json.loads(x) for x in audit.getvalue().splitlines()]
    assert len(lines) == 2
    assert set(lines[0]) >= {"decision_id", "workload", "policy", "rule", "outcome", "reason", "peer",
                             "subject_hash", "latency_us", "transport"}
    assert lines[0]["outcome"] == "allow" and lines[1]["outcome"] == "unauthenticated"
    assert lines[0]["subject_hash"] and "alice" not in audit.getvalue()
    assert tok not in audit.getvalue()


def test_rules_beyond_one_generated_function_keep_their_order_and_deny_first() -> None:
    """A large config's rules are split into generated functions of RULES_PER_FUNCTION (compiling one function of
    12,000 rules held the GIL ~0.5 s): the first matching rule still wins across them, a Deny in a later function
    still beats an Allow in an earlier one, and no match is still the default deny."""
    from meshward.sidecar.domain.policy import RULES_PER_FUNCTION

    n = RULES_PER_FUNCTION * 2 + 10
    rules = [{"name": f"r-{i}", "to": {"paths": [f"/p{i}/*", "/shared/*"]}} for i in range(n)]
    denies = RULES_PER_FUNCTION + 20  # the last ones land in the second function, with the first Allow rules
    rules += [{"name": f"deny-{i}", "action": "Deny", "to": {"paths": [f"/p{i}/secret"]}} for i in range(denies)]
    d = decide(rules, request(f"/p{n - 1}/x"))
    assert d.outcome is Outcome.ALLOW and d.rule == f"r-{n - 1}"
    d = decide(rules, request("/shared/x"))
    assert d.outcome is Outcome.ALLOW and d.rule == "r-0"
    d = decide(rules, request(f"/p{denies - 1}/secret"))
    assert d.outcome is Outcome.FORBIDDEN and d.rule == f"deny-{denies - 1}"
    d = decide(rules, request("/nowhere"))
    assert d.outcome is Outcome.FORBIDDEN and d.rule == ""
