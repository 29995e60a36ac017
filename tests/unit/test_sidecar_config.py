"""The sidecar config contract: valid documents load, invalid ones name the field and the fix."""

from __future__ import annotations

from typing import Any

import pytest

from meshward.sidecar.config.schema import ConfigError, parse_config
from meshward.sidecar.domain.snapshot import compile_snapshot
from meshward.sidecar.engines.agent import ConfigRejected, load_snapshot
from tests.support.sidecar import config, issuer, policy


def test_minimal_config_defaults() -> None:
    cfg = parse_config(config(policy(jwt=[issuer()])))
    (p,) = cfg.policies
    assert p.mode == "Enforce"
    assert p.require_jwt is True
    (i,) = p.issuers
    assert i.algorithms == frozenset({"RS256", "ES256"})
    assert i.sources[0].header == "authorization" and i.sources[0].prefix == "Bearer "
    assert i.clock_skew_s == 30
    assert cfg.identity_headers == {"x-meshward-sub": "sub", "x-meshward-iss": "iss"}
    assert cfg.max_token_bytes == 8192


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("wrong-api-version", {**config(), "apiVersion": "v1"}, "apiVersion: 'v1' is not supported"),
    ("wrong-kind", {**config(), "kind": "Policy"}, "kind: 'Policy' must be SidecarConfig"),
    ("missing-workload", {k: v for k, v in config().items() if k != "workload"}, "workload: is required"),
    ("unknown-top-level-field", {**config(), "polices": []}, "polices: unknown field"),
    ("policy-not-a-mapping", config("x"), "policies[0]: must be a mapping"),  # type: ignore[arg-type]
    ("policy-mode", config(policy(mode="Permissive")), "policies[0].mode: 'Permissive' must be Enforce or Audit"),
    ("issuer-http", config(policy(jwt=[issuer("http://idp.example.com")])),
     "policies[0].jwt[0].issuer: 'http://idp.example.com' must be an https URL"),
    ("jwks-uri-http", config(policy(jwt=[issuer(jwksUri="http://evil/jwks")])), "jwt[0].jwksUri"),
    ("alg-hs256", config(policy(jwt=[issuer(algorithms=["HS256"])])),
     "policies[0].jwt[0].algorithms[0]: 'HS256' is not allowed"),
    ("alg-none", config(policy(jwt=[issuer(algorithms=["none"])])), "'none' is not allowed"),
    ("no-audiences", config(policy(jwt=[issuer(audiences=[])])), "audiences: must list at least one audience"),
    ("skew-too-large", config(policy(jwt=[issuer(clockSkewSeconds=600)])), "clockSkewSeconds: must be between 0"),
    ("duplicate-issuer", config(policy(jwt=[issuer(), issuer()])), "jwt[1].issuer: 'https://idp.example.com' is listed twice"),
    ("conflicting-issuer-across-policies", config(policy("a", jwt=[issuer()]), policy("b", jwt=[issuer(audiences=["x"])])),
     "policies[1].jwt[0]: issuer 'https://idp.example.com' is configured differently in policies[0].jwt[0]"),
    ("require-jwt-without-issuer", config(policy(requireJwt=True)), "requireJwt: true needs at least one issuer"),
    ("rule-bad-name", config(policy(rules=[{"name": "Read Orders"}])), "rules[0].name: 'Read Orders' must be lowercase"),
    ("rule-bad-action", config(policy(rules=[{"name": "r", "action": "Permit"}])), "rules[0].action: 'Permit'"),
    ("rule-duplicate-name", config(policy(rules=[{"name": "r"}, {"name": "r"}])), "rules[1].name: 'r' is used twice"),
    ("principal-not-spiffe", config(policy(rules=[{"name": "r", "from": {"principals": ["frontend"]}}])),
     "rules[0].from.principals[0]: 'frontend': use a SPIFFE ID"),
    ("method-lowercase", config(policy(rules=[{"name": "r", "to": {"methods": ["get"]}}])),
     "rules[0].to.methods[0]: 'get' is not an uppercase HTTP method"),
    ("path-relative", config(policy(rules=[{"name": "r", "to": {"paths": ["orders"]}}])),
     "rules[0].to.paths[0]: 'orders' must start with '/'"),
    ("port-out-of-range", config(policy(rules=[{"name": "r", "to": {"ports": [0]}}])), "to.ports[0]: 0 must be a port"),
    ("identity-header-not-owned", config(identityHeaders={"x-user": "sub"}), "identityHeaders.x-user: header names must"),
    ("token-limit-too-small", config(limits={"maxTokenBytes": 10}), "limits.maxTokenBytes: must be between 512"),
    ("unknown-rule-field", config(policy(rules=[{"name": "r", "form": {}}])), "rules[0].form: unknown field"),
    ("wrong-type", config({"name": "p", "rules": "all"}), "policies[0].rules: must be a list, got str"),
]


@pytest.mark.parametrize(("doc", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_config_names_the_field(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert message in str(e.value)


def test_cel_that_does_not_compile_is_rejected_with_its_path() -> None:
    with pytest.raises(ConfigError, match=r"policies\[0\]\.rules\[0\]\.when\[0\]: CEL does not compile"):
        compile_snapshot(parse_config(config(policy(rules=[{"name": "r", "when": ["claims.x =="]}]))))


def test_cel_with_unknown_variables_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"when\[0\]: CEL refers to user; use request, claims, scopes, source"):
        compile_snapshot(parse_config(config(policy(rules=[{"name": "r", "when": ["user.admin"]}]))))


def test_yaml_errors_are_rejections() -> None:
    with pytest.raises(ConfigRejected, match="not valid YAML"):
        load_snapshot("policies: [\n")
