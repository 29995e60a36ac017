"""TCP connections are decided with Istio's L4 semantics (sidecar/domain/policy.py, HTTP_ONLY), by the pipeline
and by `meshward explain` alike.

A connection carries a peer and a port, no HTTP request and no end user: an Allow rule with any HTTP-only condition
(requestPrincipals, methods, paths, hosts, a `when` reading more than `source.principal` and `source.namespace`)
never matches one; a Deny rule ignores those conditions there and denies on its connection-level ones (fail
closed); `requireJwt` is HTTP's (a connection has no token to require). The Envoy side (the tunnel that asks for
these decisions) is tested with real Envoys in tests/integration/test_tcp_tunnel.py; these are the agent's rules.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshward.sidecar.config.schema import parse_config
from meshward.sidecar.domain.decision import Decision
from meshward.sidecar.domain.explain import render
from meshward.sidecar.domain.policy import when_reads_connection_only
from meshward.sidecar.domain.request import L4_METHOD, CheckInput
from meshward.sidecar.domain.request import connection as tcp_connection
from meshward.sidecar.domain.snapshot import compile_snapshot
from meshward.sidecar.engines.explain import explain
from meshward.sidecar.servers.authz_http import input_from_http
from meshward.sidecar.servers.http1 import Request
from tests.support.idp import SigningKey
from tests.support.sidecar import ISSUER, Clock, config, issuer, pipeline, policy

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
BATCH = "spiffe://cluster.local/ns/batch/sa/jobs"
DB_PORT = 5432
KEY = SigningKey("ES256", kid="k1")


def connection(peer: str | None, port: int = DB_PORT) -> CheckInput:
    """A TCP connection from `peer` to `port`, as the HTTP transport reads Envoy's TCP check."""
    return tcp_connection("10.244.0.7:5432", peer, port)


def decide(cfg: dict[str, Any], inp: CheckInput) -> Decision:
    real, _, _ = pipeline(cfg, {ISSUER: [KEY.jwk]} if any(p.get("jwt") for p in cfg["policies"]) else None,
                          clock=Clock())
    d = real.decide_now(inp, "http")
    assert isinstance(d, Decision)
    e = explain(compile_snapshot(parse_config(cfg)), inp, clock=Clock())
    assert (e.status, e.outcome, e.policy, e.rule, e.reason) == (
        d.wire.http, d.outcome.value, d.policy, d.rule, d.reason), render(e)
    return d


def test_an_allow_rule_on_connection_fields_admits_its_peers_only() -> None:
    cfg = config(policy("db", rules=[{"name": "frontend", "from": {"principals": [FRONTEND]},
                                      "to": {"ports": [DB_PORT]}}]))
    assert decide(cfg, connection(FRONTEND)).wire.http == 200
    assert decide(cfg, connection(BATCH)).wire.http == 403
    assert decide(cfg, connection(FRONTEND, port=6379)).wire.http == 403
    assert decide(cfg, connection(None)).wire.http == 403


@pytest.mark.parametrize("to", [{"methods": ["GET"]}, {"paths": ["/*"]}, {"hosts": ["*"]}])
def test_http_fields_in_an_allow_rule_never_admit_a_connection(to: dict[str, Any]) -> None:
    """HTTP-only fields on a TCP port (Istio: an ALLOW with them does not allow TCP): `methods: [GET]` must not
    read as "any connection from this peer"; the trace says why."""
    cfg = config(policy("db", rules=[{"name": "reads", "from": {"principals": [FRONTEND]}, "to": to}]))
    d = decide(cfg, connection(FRONTEND))
    assert d.wire.http == 403
    e = explain(compile_snapshot(parse_config(cfg)), connection(FRONTEND), clock=Clock())
    assert "a TCP connection: an Allow rule with HTTP-only conditions" in render(e)


def test_an_allow_rule_with_request_principals_or_a_request_when_never_admits_a_connection() -> None:
    cfg = config(policy("db", jwt=[issuer()], rules=[
        {"name": "users", "from": {"principals": [FRONTEND], "requestPrincipals": [f"{ISSUER}/*"]}},
        {"name": "cel", "from": {"principals": [FRONTEND]}, "when": ["request.method == 'GET'"]},
        {"name": "act", "from": {"principals": [FRONTEND]}, "when": ["size(source.act) == 0"]}]))
    assert decide(cfg, connection(FRONTEND)).wire.http == 403


def test_a_when_reading_only_the_peer_decides_a_connection_as_istio_does() -> None:
    """`when` on `source.principal` / `source.namespace` is something a connection can answer (Istio evaluates such
    conditions on TCP): an Allow rule with it admits the connections it holds for, a Deny rule denies only those
    (before, any `when` was HTTP-only: the Allow never matched, the Deny denied every connection). One expression
    reading the request, or the end user's `source.act`, keeps the rule HTTP-only."""
    cfg = config(policy("db", rules=[
        {"name": "no-batch", "action": "Deny", "when": ["source.namespace == 'batch'"]},
        {"name": "shop", "when": ["source.namespace == 'shop'", "source.principal.endsWith('/frontend')"]}]))
    assert (decide(cfg, connection(FRONTEND)).wire.http, decide(cfg, connection(FRONTEND)).rule) == (200, "shop")
    assert (decide(cfg, connection(BATCH)).wire.http, decide(cfg, connection(BATCH)).rule) == (403, "no-batch")
    assert when_reads_connection_only(["source.namespace == 'shop'"])
    assert not when_reads_connection_only(["source.namespace == 'shop'", "request.path == '/'"])
    assert not when_reads_connection_only(["size(source.act) == 0"]) and not when_reads_connection_only([])
    e = explain(compile_snapshot(parse_config(config(policy("db", rules=[
        {"name": "reads", "to": {"methods": ["GET"]}, "when": ["source.namespace == 'shop'"]}])))),
        connection(FRONTEND), clock=Clock())
    assert "HTTP-only conditions (to.methods) never matches" in render(e), render(e)
    # A name that merely contains `act`, in a string or a comment, is still the peer's.
    assert when_reads_connection_only(["source.namespace == 'factory' // act", "source.principal != \"act\""])


@pytest.mark.parametrize("expr", ["size(source['a' + 'ct']) > 0", "size(source['\\x61ct']) > 0",
                                  "size([source][0]['a' + 'ct']) > 0", "size(dyn(source)['act']) > 0",
                                  "r'\\' + string(source['act']) != ''", "source.exists(source, source == 'act')"])
def test_the_end_users_act_chain_read_around_the_check_never_decides_a_connection(expr: str) -> None:
    """`source.act` is the end user's, not the connection's: read by a computed key, through a list or `dyn`, behind
    a raw string's backslash or by a macro variable named `source`, the expression is HTTP-only, so a Deny with it
    denies every connection (fail closed) and an Allow with it admits none. Before, `source['a' + 'ct']` passed a
    text check for `act`, saw an empty chain on the connection, and the Deny let every connection through."""
    assert not when_reads_connection_only([expr])
    deny = config(policy("db", rules=[{"name": "no-chains", "action": "Deny", "when": [expr]},
                                      {"name": "anyone", "from": {"principals": ["*"]}}]))
    assert (decide(deny, connection(FRONTEND)).wire.http, decide(deny, connection(FRONTEND)).rule) == (
        403, "no-chains")
    allow = config(policy("db", rules=[{"name": "chains", "when": [expr.replace("> 0", "== 0")]}]))
    assert decide(allow, connection(FRONTEND)).wire.http == 403


def test_a_when_that_is_no_condition_fails_closed_on_a_connection() -> None:
    """`source.namespace` alone is a string, not a condition: a Deny with it is not decided, so it denies (it did
    not match before: a non-boolean counted as false); an Allow with it admits nothing."""
    deny = config(policy("db", rules=[{"name": "odd", "action": "Deny", "when": ["source.namespace"]},
                                      {"name": "anyone", "from": {"principals": ["*"]}}]))
    assert decide(deny, connection(FRONTEND)).wire.http == 403
    allow = config(policy("db", rules=[{"name": "odd", "when": ["source.namespace"]}]))
    assert decide(allow, connection(FRONTEND)).wire.http == 403


@pytest.mark.parametrize("to", [{"methods": ["DELETE"]}, {"paths": ["/admin/*"]}])
def test_a_deny_rule_with_http_fields_denies_the_whole_connection(to: dict[str, Any]) -> None:
    """Fail closed (Istio's DENY semantics): a Deny on `DELETE` from batch cannot be checked on a connection, so
    batch's connections are denied, while frontend's are not."""
    cfg = config(policy("db", rules=[
        {"name": "no-batch-writes", "action": "Deny", "from": {"principals": [BATCH]}, "to": to},
        {"name": "anyone", "from": {"principals": ["*"]}}]))
    d = decide(cfg, connection(BATCH))
    assert (d.wire.http, d.rule) == (403, "no-batch-writes")
    assert decide(cfg, connection(FRONTEND)).wire.http == 200


def test_require_jwt_does_not_apply_to_a_connection_the_rules_decide() -> None:
    """A connection carries no token: `requireJwt` (an HTTP request's) neither denies it as 401 nor admits it."""
    cfg = config(policy("db", jwt=[issuer()], requireJwt=True, rules=[
        {"name": "frontend", "from": {"principals": [FRONTEND]}}]))
    assert decide(cfg, connection(FRONTEND)).wire.http == 200
    assert decide(cfg, connection(BATCH)).wire.http == 403


def test_only_envoys_attribute_makes_a_check_a_connection() -> None:
    """The HTTP transport reads a connection from Envoy's own attribute (x-meshward-authz-l4, which Envoy strips
    from clients); without it, a `TCP` method or an empty path is an ordinary HTTP request."""
    raw = {"x-meshward-authz-peer": FRONTEND, "x-meshward-authz-port": "5432", "x-meshward-authz-host": "db:5432",
           "authorization": "Bearer x"}
    tcp = input_from_http(Request("POST", "/meshward.tcp", {**raw, "x-meshward-authz-l4": "tcp"}))
    assert (tcp.l4, tcp.method, tcp.path, dict(tcp.headers), tcp.port, tcp.peer) == (
        True, L4_METHOD, "", {}, 5432, FRONTEND)
    http = input_from_http(Request("TCP", "/", dict(raw)))
    assert not http.l4


# Generated policies: every field a rule may set, both actions and modes.
rule_st = st.fixed_dictionaries({
    "action": st.sampled_from(["Allow", "Deny"]),
}, optional={
    "from": st.fixed_dictionaries({}, optional={"principals": st.sampled_from([[FRONTEND], [BATCH], ["*"]]),
                                                "namespaces": st.sampled_from([["shop"], ["batch"]])}),
    "to": st.fixed_dictionaries({}, optional={"ports": st.sampled_from([[DB_PORT], [6379]]),
                                              "methods": st.sampled_from([["GET"]]),
                                              "paths": st.sampled_from([["/admin/*"]])}),
    "when": st.sampled_from([["source.principal != ''"], ["request.method == 'GET'"],
                             ["source.namespace == 'batch'"]]),
})


def _l4_oracle(rules: list[dict[str, Any]], peer: str | None, port: int) -> bool:
    """Istio's documented L4 semantics, written from the rules as given (not from the compiled code)."""
    def l4_match(rule: dict[str, Any]) -> bool:
        f, t = rule.get("from", {}), rule.get("to", {})
        ns = peer.split("/")[4] if peer else None
        # `when` on the peer only: the connection answers it (source.principal/namespace are "" without a peer);
        # one reading the request is HTTP-only, which a Deny ignores on a connection (an Allow never gets here).
        when = {"source.principal != ''": peer is not None, "source.namespace == 'batch'": ns == "batch",
                "request.method == 'GET'": True}
        return ((not f.get("principals") or (peer is not None and ("*" in f["principals"] or
                                                                   peer in f["principals"])))
                and (not f.get("namespaces") or ns in f["namespaces"])
                and (not t.get("ports") or port in t["ports"])
                and all(when[w] for w in rule.get("when", [])))

    def http_only(rule: dict[str, Any]) -> bool:
        return bool(any(w.startswith("request.") for w in rule.get("when", []))
                    or {"methods", "paths"} & set(rule.get("to", {})))
    if any(r["action"] == "Deny" and l4_match(r) for r in rules):
        return False
    # An Enforce policy selects the workload, so what no rule allows is denied (no rules at all included).
    return any(r["action"] == "Allow" and not http_only(r) and l4_match(r) for r in rules)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=st.lists(rule_st, max_size=4), peer=st.sampled_from([None, FRONTEND, BATCH]),
       port=st.sampled_from([DB_PORT, 6379]))
def test_generated_policies_decide_connections_as_istio_documents_and_explain_agrees(
        rules: list[dict[str, Any]], peer: str | None, port: int) -> None:
    cfg = config(policy("db", rules=[{"name": f"r{n}", **r} for n, r in enumerate(rules)]))
    d = decide(cfg, connection(peer, port))
    assert (d.wire.http == 200) == _l4_oracle(rules, peer, port), (rules, peer, port, d.reason)


def test_meshward_explain_tcp_shows_a_connections_decision(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`meshward explain --tcp --port N --peer ID` decides a connection (exit 0 allowed, 3 denied) and refuses a
    user for it (a connection carries none), naming the flags."""
    import yaml

    from meshward.cli import main

    path = tmp_path / "db.yaml"
    path.write_text(yaml.safe_dump(config(policy("db", rules=[
        {"name": "reads", "from": {"principals": [FRONTEND]}, "to": {"methods": ["GET"]}},
        {"name": "frontend", "from": {"principals": [FRONTEND]}, "to": {"ports": [DB_PORT]}}]))))
    assert main(["explain", "--config", str(path), "--tcp", "--port", str(DB_PORT), "--peer", FRONTEND]) == 0
    out = capsys.readouterr().out
    assert "by db rule frontend" in out and "a TCP connection: an Allow rule with HTTP-only conditions" in out
    assert main(["explain", "--config", str(path), "--tcp", "--port", str(DB_PORT), "--peer", BATCH]) == 3
    capsys.readouterr()
    assert main(["explain", "--config", str(path), "--tcp", "--peer", FRONTEND]) == 1
    assert "--tcp explains a connection to --port" in capsys.readouterr().err
