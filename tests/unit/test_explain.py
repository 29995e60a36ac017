"""`meshward explain` agrees with the agent: same decision as the real pipeline for every request in a table."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from meshward.sidecar.config.schema import parse_config
from meshward.sidecar.domain.explain import explain, render
from meshward.sidecar.domain.jwt import VerifiedToken
from meshward.sidecar.domain.snapshot import compile_snapshot
from tests.support.idp import SigningKey
from tests.support.sidecar import ISSUER, Clock, config, issuer, pipeline, policy, request

KEY = SigningKey("RS256", kid="k1")
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
BATCH = "spiffe://cluster.local/ns/batch/sa/jobs"
CFG = config(
    policy("orders-api", jwt=[issuer()], rules=[
        {"name": "no-admin", "action": "Deny", "to": {"paths": ["/admin/*"]}},
        {"name": "frontend-reads", "from": {"principals": [FRONTEND]}, "to": {"methods": ["GET"], "paths": ["/orders/*"]}},
        {"name": "scoped-writes", "from": {"requestPrincipals": [f"{ISSUER}/*"]}, "to": {"methods": ["POST"]},
         "when": ["'orders:write' in claims.scope.split(' ')"]},
        {"name": "batch-ns", "from": {"namespaces": ["batch"]}, "to": {"paths": ["/export"]}},
    ]),
    policy("shadow", mode="Audit", rules=[{"name": "only-get", "to": {"methods": ["GET"]}}]),
    revocations={"jti": ["stolen"]},
)


def tok(**claims: Any) -> str:
    now = int(Clock()())  # the pipeline's fixed clock
    body = {"iss": ISSUER, "aud": "orders", "sub": "alice", "iat": now, "exp": now + 300, **claims}
    return jwt.encode(body, KEY.private, algorithm="RS256", headers={"kid": "k1"})


def verified(raw: str) -> VerifiedToken:
    c = jwt.decode(raw, options={"verify_signature": False})
    return VerifiedToken(issuer=c["iss"], claims=c, expires_at=c["exp"], subject=c["sub"])


CASES = [
    ("/orders/1", "GET", FRONTEND, tok()),
    ("/orders/1", "GET", BATCH, tok()),
    ("/admin/users", "GET", FRONTEND, tok()),
    ("/orders", "POST", None, tok(scope="orders:write")),
    ("/orders", "POST", None, tok(scope="orders:read")),
    ("/export", "GET", BATCH, tok()),
    ("/export", "DELETE", BATCH, tok()),
    ("/orders/1", "GET", FRONTEND, None),
    ("/orders/1", "GET", FRONTEND, tok(jti="stolen")),
]


@pytest.mark.parametrize(("path", "method", "peer", "token"), CASES)
def test_explain_decides_like_the_pipeline(path: str, method: str, peer: str | None, token: str | None) -> None:
    real, _, _ = pipeline(CFG, {ISSUER: [KEY.jwk]})
    d = real.decide_now(request(path, method, token=token, peer=peer), "http")
    e = explain(compile_snapshot(parse_config(CFG)), request(path, method, peer=peer),
                verified(token) if token else None)
    assert e.status == d.wire.http, render(e)  # type: ignore[union-attr]
    assert (e.policy, e.rule) == (d.policy, d.rule) or e.status == 401  # type: ignore[union-attr]


def test_the_trace_says_why_each_rule_did_not_match() -> None:
    e = explain(compile_snapshot(parse_config(CFG)), request("/orders/1", "GET", peer=BATCH), verified(tok()))
    text = render(e)
    assert e.status == 403
    assert f"from.principals: {BATCH!r} does not match [{FRONTEND!r}]" in text
    assert "to.paths: '/orders/1' does not match ['/admin/*']" in text
    assert "[Allow, Audit]" in text  # the shadow policy's rule is shown as Audit
