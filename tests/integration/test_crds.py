"""The CRDs against a real API server: apply, examples, rejections with precise messages, kubectl UX."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube import Cluster, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
API = "meshward.io/v1alpha1"


def policy(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "AuthPolicy", "metadata": {"name": "p", "namespace": "default"},
            "spec": spec}


def identity(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "ServiceIdentity", "metadata": {"name": "i", "namespace": "default"},
            "spec": spec}


SEL = {"selector": {"matchLabels": {"app": "orders"}}}
JWT = {"issuer": "https://idp.example.com", "audiences": ["orders"]}


def with_jwt(**fields: Any) -> dict[str, Any]:
    return policy({**SEL, "jwt": [{**JWT, **fields}]})


def with_rule(**fields: Any) -> dict[str, Any]:
    return policy({**SEL, "rules": [{"name": "r", **fields}]})


# (case id, object, text the API server's rejection must contain)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("policy-without-selector", policy({}), "spec.selector must select workloads"),
    ("policy-with-empty-selector", policy({"selector": {"matchLabels": {}}}),
     "spec.selector must select workloads"),
    ("namespace-wide-with-selector", policy({**SEL, "namespaceWide": True}),
     "spec.selector must be omitted when spec.namespaceWide is true"),
    ("unknown-mode", policy({**SEL, "mode": "Permissive"}), 'Unsupported value: "Permissive"'),
    ("issuer-plain-http", policy({**SEL, "jwt": [{**JWT, "issuer": "http://idp.example.com"}]}),
     "spec.jwt[].issuer must be an https URL"),
    ("jwks-inline-and-fetched", with_jwt(jwksUri="https://idp.example.com/jwks", jwks='{"keys": []}'),
     "set jwks (keys inline) or jwksUri (keys fetched), not both"),
    ("jwks-uri-plain-http", with_jwt(jwksUri="http://idp.example.com/jwks"),
     "spec.jwt[].jwksUri must be an https URL"),
    ("jwks-uri-http-lookalike-loopback", with_jwt(jwksUri="http://127.0.0.1.evil.example/jwks"),
     "spec.jwt[].jwksUri must be an https URL"),
    ("jwt-without-audiences", policy({**SEL, "jwt": [{"issuer": "https://idp.example.com"}]}),
     "spec.jwt[0].audiences: Required value"),
    ("jwt-empty-audiences", with_jwt(audiences=[]), "should have at least 1 items"),
    ("jwt-alg-hs256", with_jwt(algorithms=["HS256"]), 'Unsupported value: "HS256"'),
    ("jwt-alg-none", with_jwt(algorithms=["none"]), 'Unsupported value: "none"'),
    ("clock-skew-too-large", with_jwt(clockSkew="10m"), "spec.jwt[].clockSkew must be between 0s and 5m"),
    ("clock-skew-not-a-duration", with_jwt(clockSkew="30 seconds"), "clockSkew in body should match"),
    ("max-lifetime-too-long", with_jwt(maxTokenLifetime="169h"),
     "spec.jwt[].maxTokenLifetime must be between 1m and 168h"),
    ("issuer-with-userinfo", with_jwt(issuer="https://localhost@idp.example.com"),
     "spec.jwt[].issuer must be an https URL such as https://idp.example.com, without user@"),
    ("jwks-uri-userinfo-host-confusion", with_jwt(jwksUri="http://localhost@192.0.2.2:18446/jwks.json"),
     "spec.jwt[].jwksUri must be an https URL without user@"),
    ("duplicate-issuers", policy({**SEL, "jwt": [JWT, JWT]}), "Duplicate value"),
    ("require-jwt-without-issuer", policy({**SEL, "requireJwt": True}),
     "spec.requireJwt: true needs at least one issuer in spec.jwt"),
    ("principal-not-spiffe", with_rule(**{"from": {"principals": ["frontend"]}}),
     "spec.rules[].from.principals: use a SPIFFE ID"),
    ("principal-wildcard-in-middle", with_rule(**{"from": {"principals": ["spiffe://td/ns/*/sa/x"]}}),
     "spec.rules[].from.principals: use a SPIFFE ID"),
    ("path-without-slash", with_rule(to={"paths": ["orders/*"]}),
     "spec.rules[].to.paths: a path must start with '/'"),
    ("method-lowercase", with_rule(to={"methods": ["get"]}), 'Unsupported value: "get"'),
    ("port-out-of-range", with_rule(to={"ports": [70000]}), "should be less than or equal to 65535"),
    ("rule-action-unknown", with_rule(action="Permit"), 'Unsupported value: "Permit"'),
    ("rule-without-name", policy({**SEL, "rules": [{"action": "Allow"}]}), "name: Required value"),
    ("duplicate-rule-names", policy({**SEL, "rules": [{"name": "r"}, {"name": "r"}]}), "Duplicate value"),
    ("context-ttl-over-a-minute", policy({**SEL, "context": {"ttl": "5m"}}),
     "spec.context.ttl must be between 1s and 60s"),
    ("context-reserved-claim", policy({**SEL, "context": {"claims": ["sub", "exp"]}}),
     'spec.context.claims: "exp" is set by Meshward itself'),
    ("context-header-not-x", policy({**SEL, "context": {"header": "authorization"}}),
     "spec.context.header in body should match"),
    ("policy-unknown-field", policy({**SEL, "rulez": []}), 'unknown field "spec.rulez"'),
    ("identity-without-service-account", identity({}), "spec.serviceAccountName: Required value"),
    ("identity-bad-service-account-name", identity({"serviceAccountName": "Orders_1"}),
     "spec.serviceAccountName in body should match"),
    ("certificate-ttl-too-short", identity({"serviceAccountName": "orders", "certificate": {"ttl": "1m"}}),
     "spec.certificate.ttl must be between 5m and 24h"),
    ("certificate-ttl-too-long", identity({"serviceAccountName": "orders", "certificate": {"ttl": "48h"}}),
     "spec.certificate.ttl must be between 5m and 24h"),
]


def server_dry_run(cluster: Cluster, obj: dict[str, Any]) -> Any:
    return cluster.kubectl("create", "--dry-run=server", "-f", "-", stdin=json.dumps(obj), check=False)


@pytest.mark.parametrize(("obj", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_object_is_rejected_with_its_message(crds: Cluster, obj: dict[str, Any], message: str) -> None:
    proc = server_dry_run(crds, obj)
    assert proc.returncode != 0, f"accepted: {obj}"
    assert message in proc.stderr


@pytest.mark.parametrize("obj", [
    policy(SEL), policy({"namespaceWide": True}), with_jwt(jwksUri="https://idp.example.com/jwks"),
    with_jwt(issuer="http://127.0.0.1:8443", jwksUri="http://localhost:8443/jwks"),
    with_rule(**{"from": {"principals": ["*", "spiffe://cluster.local/ns/shop/*", "*/sa/frontend"]}}),
    with_rule(to={"paths": ["/orders/*", "/v*/items/**", "*"], "methods": ["GET"], "ports": [8080]}),
    policy({**SEL, "jwt": [JWT], "requireJwt": True}),
    identity({"serviceAccountName": "orders", "certificate": {"ttl": "24h"}}),
], ids=["selector", "namespace-wide", "jwks-https", "loopback-http", "principal-wildcards", "path-globs",
        "require-jwt", "ttl-24h"])
def test_valid_neighbours_of_the_invalid_cases_are_accepted(crds: Cluster, obj: dict[str, Any]) -> None:
    """Each rejection above is caused by its field, not by a base object the server refuses anyway."""
    proc = server_dry_run(crds, obj)
    assert proc.returncode == 0, proc.stderr


def test_defaults_are_applied(crds: Cluster, namespace: str) -> None:
    p = copy.deepcopy(with_jwt())
    p["metadata"]["namespace"] = namespace
    i = identity({"serviceAccountName": "orders"})
    i["metadata"]["namespace"] = namespace
    crds.apply(p, i)
    spec = crds.get_json("-n", namespace, "authpolicy", "p")["spec"]
    assert spec["mode"] == "Enforce"
    assert spec["namespaceWide"] is False
    assert spec["jwt"][0]["algorithms"] == ["RS256", "ES256"]
    assert spec["jwt"][0]["clockSkew"] == "30s"
    assert spec["jwt"][0]["forwardOriginalToken"] is False
    assert crds.get_json("-n", namespace, "serviceidentity", "i")["spec"]["certificate"] == {"ttl": "1h"}


def test_service_account_name_is_immutable(crds: Cluster, namespace: str) -> None:
    i = identity({"serviceAccountName": "orders"})
    i["metadata"]["namespace"] = namespace
    crds.apply(i)
    proc = crds.kubectl("-n", namespace, "patch", "serviceidentity", "i", "--type=merge",
                        "-p", '{"spec":{"serviceAccountName":"payments"}}', check=False)
    assert proc.returncode != 0
    assert "spec.serviceAccountName is immutable" in proc.stderr
    crds.kubectl("-n", namespace, "patch", "serviceidentity", "i", "--type=merge",
                 "-p", '{"spec":{"certificate":{"ttl":"2h"}}}')


def test_every_example_is_accepted(crds: Cluster) -> None:
    files = sorted((ROOT / "docs" / "examples").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        crds.kubectl("apply", "-f", str(f))
    names = crds.kubectl("get", "authpolicies,serviceidentities", "-n", "shop", "-o", "name").stdout.split()
    names += crds.kubectl("get", "revocations", "-o", "name").stdout.split()
    expected = {f"{d['kind'].lower()}.meshward.io/{d['metadata']['name']}"
                for f in files for d in yaml.safe_load_all(f.read_text())
                if d and d["apiVersion"] == API}
    assert expected <= set(names)
    crds.kubectl("delete", "namespace", "shop", "--wait=false")
    crds.kubectl("delete", "revocation", "inc-4711")


def test_kubectl_explain_teaches_the_api(crds: Cluster) -> None:
    out = crds.kubectl("explain", "authpolicy.spec.rules").stdout
    assert "Deny rules are checked first and win" in out
    assert "principals" in crds.kubectl("explain", "authpolicy.spec.rules.from").stdout
    ttl = crds.kubectl("explain", "serviceidentity.spec.certificate.ttl").stdout
    assert "renews at half" in ttl


def test_kubectl_get_shows_the_printer_columns(crds: Cluster, namespace: str) -> None:
    p = policy(SEL)
    p["metadata"]["namespace"] = namespace
    i = identity({"serviceAccountName": "orders"})
    i["metadata"]["namespace"] = namespace
    crds.apply(p, i)
    crds.kubectl("-n", namespace, "patch", "authpolicy", "p", "--subresource=status", "--type=merge", "-p",
                 json.dumps({"status": {"workloads": "2/3", "conditions": [{
                     "type": "Ready", "status": "False", "reason": "WorkloadsLagging",
                     "message": "1 workload behind", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}))
    crds.kubectl("-n", namespace, "patch", "serviceidentity", "i", "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": {"spiffeID": f"spiffe://cluster.local/ns/{namespace}/sa/orders"}}))
    lines = wait_until("the AuthPolicy row", lambda: crds.kubectl("-n", namespace, "get", "ap").stdout
                       .splitlines())
    assert lines[0].split() == ["NAME", "MODE", "READY", "WORKLOADS", "AGE"]
    assert lines[1].split()[:4] == ["p", "Enforce", "False", "2/3"]
    si = crds.kubectl("-n", namespace, "get", "si").stdout.splitlines()
    assert si[0].split() == ["NAME", "SPIFFE", "ID", "READY", "AGE"]
    assert si[1].split()[:2] == ["i", f"spiffe://cluster.local/ns/{namespace}/sa/orders"]
    wide = crds.kubectl("-n", namespace, "get", "serviceidentities", "-o", "wide").stdout.splitlines()
    assert "SERVICE ACCOUNT" in wide[0]


def test_status_is_a_subresource(crds: Cluster, namespace: str) -> None:
    """A spec update cannot write status, so users cannot fake Ready through the main resource."""
    p = policy(SEL)
    p["metadata"]["namespace"] = namespace
    p["status"] = {"workloads": "9/9"}
    crds.apply(p)
    assert "workloads" not in crds.get_json("-n", namespace, "authpolicy", "p").get("status", {})


@pytest.mark.parametrize(("entry", "message"), [
    ({"jti": "a", "sub": "b", "expiresAt": "2030-01-01T00:00:00Z"}, "set exactly one of jti, sub or sid"),
    ({"expiresAt": "2030-01-01T00:00:00Z"}, "set exactly one of jti, sub or sid"),
    ({"jti": "a"}, "expiresAt: Required value"),
    ({"jti": "a", "issuer": "https://idp", "expiresAt": "2030-01-01T00:00:00Z"},
     "issuer applies only to sub entries"),
])
def test_invalid_revocations_are_rejected_with_the_fix(crds: Cluster, entry: dict[str, Any], message: str) -> None:
    doc = {"apiVersion": API, "kind": "Revocation", "metadata": {"name": "bad"}, "spec": {"entries": [entry]}}
    proc = crds.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
