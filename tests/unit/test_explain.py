"""`meshward explain` decides as the agent does: its decision is the real pipeline's, for every case and for
generated policies and requests (Audit mode and JWT cases included).

The pipeline side verifies real signatures with real keys; explain checks everything but the signature.
"""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshward.sidecar.config.schema import parse_config
from meshward.sidecar.domain.decision import Decision
from meshward.sidecar.domain.explain import Explanation, render
from meshward.sidecar.domain.snapshot import compile_snapshot
from meshward.sidecar.engines.explain import explain
from tests.support.idp import SigningKey
from tests.support.sidecar import ISSUER, Clock, config, issuer, pipeline, policy, request

KEY = SigningKey("RS256", kid="k1")
OTHER = "https://other-idp.example.com"
OTHER_KEY = SigningKey("RS256", kid="o1")
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
BATCH = "spiffe://cluster.local/ns/batch/sa/jobs"
NOW = Clock().now
CFG = config(
    policy("orders-api", jwt=[issuer()], rules=[
        {"name": "no-admin", "action": "Deny", "to": {"paths": ["/admin/*"]}},
        {"name": "frontend-reads", "from": {"principals": [FRONTEND]}, "to": {"methods": ["GET"], "paths": ["/orders/*"]}},
        {"name": "scoped-writes", "from": {"requestPrincipals": [f"{ISSUER}/*"]}, "to": {"methods": ["POST"]},
         "when": ["'orders:write' in scopes"]},
        {"name": "batch-ns", "from": {"namespaces": ["batch"]}, "to": {"paths": ["/export"]}},
    ]),
    policy("shadow", mode="Audit", rules=[{"name": "only-get", "to": {"methods": ["GET"]}}]),
    revocations={"jti": ["stolen"]},
)


def tok(key: SigningKey = KEY, iss: str = ISSUER, **claims: Any) -> str:
    body = {"iss": iss, "aud": "orders", "sub": "alice", "iat": int(NOW), "exp": int(NOW) + 300, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key.private, algorithm="RS256",
                      headers={"kid": key.kid})


def both(cfg: dict[str, Any], path: str, method: str, peer: str | None, token: str | None) -> tuple[Decision,
                                                                                                    Explanation]:
    real, _, _ = pipeline(cfg, {ISSUER: [KEY.jwk]} if any(p.get("jwt") for p in cfg["policies"]) else None,
                          clock=Clock())
    d = real.decide_now(request(path, method, token=token, peer=peer), "http")
    assert isinstance(d, Decision)
    e = explain(compile_snapshot(parse_config(cfg)), request(path, method, peer=peer), token=token, clock=Clock())
    return d, e


def assert_same(d: Decision, e: Explanation) -> None:
    assert (e.status, e.outcome, e.policy, e.rule, e.reason, e.would_deny) == (
        d.wire.http, d.outcome.value, d.policy, d.rule, d.reason, d.would_deny), render(e)


CASES = [
    ("/orders/1", "GET", FRONTEND, tok()),
    ("/orders/1", "GET", BATCH, tok()),
    ("/admin/users", "GET", FRONTEND, tok()),
    ("/orders", "POST", None, tok(scope="orders:write")),
    ("/orders", "POST", None, tok(scp=["orders:read"])),
    ("/export", "GET", BATCH, tok()),
    ("/export", "DELETE", BATCH, tok()),
    ("/orders/1", "GET", FRONTEND, None),
    ("/orders/1", "GET", FRONTEND, tok(jti="stolen")),
    ("/orders/1", "GET", FRONTEND, tok(exp=int(NOW) - 3600, iat=int(NOW) - 7200)),
    ("/orders/1", "GET", FRONTEND, tok(OTHER_KEY, OTHER)),
    ("/orders/1", "GET", FRONTEND, tok(aud="billing")),
]


@pytest.mark.parametrize(("path", "method", "peer", "token"), CASES)
def test_explain_decides_like_the_pipeline(path: str, method: str, peer: str | None, token: str | None) -> None:
    assert_same(*both(CFG, path, method, peer, token))


def test_an_audit_policy_with_an_untrusted_issuer_allows_in_both() -> None:
    """Explain once re-implemented the identity phase: 200 in the pipeline, 401 in explain."""
    cfg = config(policy("trial", mode="Audit", jwt=[issuer()], rules=[{"name": "all"}]))
    d, e = both(cfg, "/orders/1", "GET", None, tok(OTHER_KEY, OTHER))
    assert d.wire.http == 200 and d.would_deny
    assert_same(d, e)


def test_claims_are_explained_as_a_genuine_token_with_them() -> None:
    snap = compile_snapshot(parse_config(CFG))
    e = explain(snap, request("/orders", "POST"), claims={"iss": ISSUER, "sub": "alice", "scope": "orders:write"},
                clock=Clock())
    assert (e.status, e.rule) == (200, "scoped-writes")
    assert any("no aud" in n for n in e.notes) and any("no exp" in n for n in e.notes)
    e = explain(snap, request("/orders", "POST"), claims={"iss": ISSUER, "sub": "alice", "jti": "stolen"},
                clock=Clock())
    assert (e.status, e.reason) == (401, "token revoked")


def test_the_trace_says_why_each_rule_did_not_match() -> None:
    e = explain(compile_snapshot(parse_config(CFG)), request("/orders/1", "GET", peer=BATCH), token=tok(),
                clock=Clock())
    text = render(e)
    assert e.status == 403
    assert f"from.principals: {BATCH!r} does not match [{FRONTEND!r}]" in text
    assert "to.paths: '/orders/1' does not match ['/admin/*']" in text
    assert "[Allow, Audit]" in text  # the shadow policy's rule is shown as Audit


# --- property: generated policies and requests ---------------------------------------------------

WHENS = ["'orders:write' in scopes", "claims.sub == 'alice'", "claims.tenant == 'acme'", "request.method == 'GET'"]
rule_st = st.fixed_dictionaries({
    "action": st.sampled_from(["Allow", "Deny"]),
}, optional={
    "mode": st.sampled_from(["Enforce", "Audit"]),
    "from": st.fixed_dictionaries({}, optional={"principals": st.sampled_from([[FRONTEND], [BATCH], ["*"]]),
                                                "namespaces": st.sampled_from([["shop"], ["batch"]]),
                                                "requestPrincipals": st.sampled_from([[f"{ISSUER}/alice"],
                                                                                      [f"{ISSUER}/*"]])}),
    "to": st.fixed_dictionaries({}, optional={"paths": st.sampled_from([["/orders/*"], ["/admin/*"], ["/export"]]),
                                              "methods": st.sampled_from([["GET"], ["POST", "DELETE"]])}),
    "when": st.lists(st.sampled_from(WHENS), min_size=1, max_size=2, unique=True),
})
policy_st = st.fixed_dictionaries({
    "mode": st.sampled_from(["Enforce", "Audit"]),
    "jwt": st.booleans(),
    "rules": st.lists(rule_st, max_size=3),
})
token_st = st.one_of(st.none(), st.fixed_dictionaries({
    "iss": st.sampled_from([ISSUER, ISSUER, OTHER]),
    "sub": st.sampled_from(["alice", "bob"]),
    "scope": st.sampled_from([None, "orders:write", "orders:read openid"]),
    "tenant": st.sampled_from([None, "acme"]),
    "jti": st.sampled_from([None, "stolen", "fine"]),
    "expired": st.booleans(),
}))


def _config(policies: list[dict[str, Any]], revoke: bool) -> dict[str, Any]:
    out = []
    for n, p in enumerate(policies):
        rules = [{"name": f"r{k}", **r} for k, r in enumerate(p["rules"])]
        needs_jwt = p["jwt"] or any("requestPrincipals" in r.get("from", {}) for r in rules)
        out.append(policy(f"p{n}", mode=p["mode"], jwt=[issuer()] if needs_jwt else None, rules=rules))
    return config(*out, **({"revocations": {"jti": ["stolen"]}} if revoke else {}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies=st.lists(policy_st, min_size=0, max_size=3), revoke=st.booleans(),
       path=st.sampled_from(["/orders/1", "/admin/x", "/export", "/ORDERS/1"]),
       method=st.sampled_from(["GET", "POST", "DELETE"]), peer=st.sampled_from([None, FRONTEND, BATCH]),
       token=token_st)
def test_explain_decides_like_the_pipeline_for_generated_policies_and_requests(
        policies: list[dict[str, Any]], revoke: bool, path: str, method: str, peer: str | None,
        token: dict[str, Any] | None) -> None:
    raw = None
    if token is not None:
        key = KEY if token["iss"] == ISSUER else OTHER_KEY
        times = {"iat": int(NOW) - 7200, "exp": int(NOW) - 3600} if token["expired"] else {}
        raw = tok(key, token["iss"], sub=token["sub"], scope=token["scope"], tenant=token["tenant"],
                  jti=token["jti"], **times)
    assert_same(*both(_config(policies, revoke), path, method, peer, raw))
