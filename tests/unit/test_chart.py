"""The Helm chart as rendered by `helm template`: what it makes, what its values schema refuses (no cluster)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube import tool_paths

CHART = Path(__file__).resolve().parents[2] / "charts" / "meshward"


@pytest.fixture(scope="module")
def helm() -> str:
    return tool_paths(only=("helm",))["helm"]


def render(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, "template", "mw", str(CHART), "-n", "meshward-system", *args],
                          capture_output=True, text=True)


def docs(helm: str, *args: str) -> list[dict[str, Any]]:
    proc = render(helm, *args)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_chart_renders_the_operator_its_services_budget_and_rbac(helm: str) -> None:
    kinds = sorted(d["kind"] for d in docs(helm, "--include-crds"))
    assert kinds == sorted(["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                            "CustomResourceDefinition", "CustomResourceDefinition", "Deployment",
                            "MutatingWebhookConfiguration", "PodDisruptionBudget", "Role", "RoleBinding", "Service",
                            "Service", "Service", "ServiceAccount", "ValidatingAdmissionPolicy",
                            "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
                            "ValidatingAdmissionPolicyBinding", "ValidatingAdmissionPolicyBinding",
                            "ValidatingWebhookConfiguration"])


def test_chart_refuses_a_cluster_older_than_1_30(helm: str) -> None:
    proc = render(helm, "--kube-version", "1.29.0")
    assert proc.returncode != 0
    assert "requires kubeVersion: >=1.30.0-0" in proc.stderr


@pytest.mark.parametrize(("value", "message"), [
    ("operator.replica=2", "additional properties 'replica' not allowed"),
    ("operator.replicas=two", "at '/operator/replicas': got string, want integer"),
    ("operator.replicas=0", "at '/operator/replicas': minimum"),
    ("image.pullPolicy=Sometimes", "at '/image/pullPolicy'"),
    ("operator.trustDomain=Not_A_Domain", "at '/operator/trustDomain'"),
    ("podDisruptionBudget.enabled=yes", "at '/podDisruptionBudget/enabled': got string, want boolean"),
    ("imge.tag=1", "additional properties 'imge' not allowed"),
    ("injection.timeoutSeconds=10", "at '/injection/timeoutSeconds': maximum"),
    ("operator.topologySpreadConstraints[0].maxSkew=1", "missing properties 'topologyKey', 'whenUnsatisfiable'"),
    ("operator.topologySpreadConstraints[0].maxskew=1", "additional properties 'maxskew' not allowed"),
    ("operator.affinity=close", "at '/operator/affinity': got string, want object"),
])
def test_values_schema_refuses_mistyped_and_wrong_typed_values(helm: str, value: str, message: str) -> None:
    proc = render(helm, "--set", value)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_services_reach_the_leader_alone_while_every_replica_is_ready(helm: str) -> None:
    rendered = docs(helm)
    services = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Service"}
    assert set(services) == {"meshward-signer", "meshward-policy", "meshward-webhook"}
    for svc in services.values():
        assert svc["spec"]["selector"]["meshward.io/leader"] == "true"
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    role = next(d for d in rendered if d["kind"] == "Role")
    assert {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]} in role["rules"]


def _pod_spec(helm: str, *args: str) -> dict[str, Any]:
    spec: dict[str, Any] = next(d for d in docs(helm, *args) if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    return spec


SELECTOR = {"app.kubernetes.io/name": "meshward", "app.kubernetes.io/instance": "mw",
            "app.kubernetes.io/component": "operator"}


def test_replicas_prefer_different_nodes_unless_the_values_say_otherwise(helm: str) -> None:
    """By default a preferred anti-affinity (one node: both replicas still schedule); topology spread constraints
    are added when given, their labelSelector the operator's pods unless one is given; an affinity replaces the
    chart's."""
    default = _pod_spec(helm)
    assert default["affinity"] == {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                            "labelSelector": {"matchLabels": SELECTOR}}}]}}
    assert "topologySpreadConstraints" not in default
    zone = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
    own = {"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
           "labelSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, "minDomains": 2}
    spread = _pod_spec(helm, "--set-json", f"operator.topologySpreadConstraints={json.dumps([zone, own])}")
    assert spread["topologySpreadConstraints"] == [{**zone, "labelSelector": {"matchLabels": SELECTOR}}, own]
    assert spread["affinity"] == default["affinity"], "the anti-affinity stays beside the constraints"
    node = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "node-role.kubernetes.io/infra", "operator": "Exists"}]}]}}}
    assert _pod_spec(helm, "--set-json", f"operator.affinity={json.dumps(node)}")["affinity"] == node


def test_the_disruption_budget_comes_with_two_or_more_replicas(helm: str) -> None:
    assert any(d["kind"] == "PodDisruptionBudget" for d in docs(helm, "--set", "operator.replicas=2"))
    assert not any(d["kind"] == "PodDisruptionBudget" for d in docs(helm, "--set", "operator.replicas=1"))
    assert not any(d["kind"] == "PodDisruptionBudget" for d in docs(helm, "--set", "podDisruptionBudget.enabled=false"))


def test_webhooks_see_only_opted_in_pods_and_fail_closed_for_them(helm: str) -> None:
    """Istio's injector blocked whole clusters when it was down (istio#30139, #43593): ours is asked about opted-in
    pods only, never those of its own or the system namespaces, fails closed for them, and answers fast."""
    rendered = docs(helm)
    mutating = next(d for d in rendered if d["kind"] == "MutatingWebhookConfiguration")
    never = {"meshward-system", "kube-system", "kube-public", "kube-node-lease"}
    by_name = {w["name"]: w for w in mutating["webhooks"]}
    assert set(by_name) == {"pods.inject.meshward.io", "namespaces.inject.meshward.io"}
    assert by_name["pods.inject.meshward.io"]["objectSelector"] == {"matchLabels": {"meshward.io/inject": "enabled"}}
    assert {"key": "meshward.io/inject", "operator": "In", "values": ["enabled"]} in \
        by_name["namespaces.inject.meshward.io"]["namespaceSelector"]["matchExpressions"]
    assert by_name["namespaces.inject.meshward.io"]["objectSelector"]["matchExpressions"] == [
        {"key": "meshward.io/inject", "operator": "NotIn", "values": ["enabled", "disabled"]}]
    for hook in mutating["webhooks"]:
        excluded = next(e for e in hook["namespaceSelector"]["matchExpressions"]
                        if e["key"] == "kubernetes.io/metadata.name")
        assert excluded["operator"] == "NotIn" and set(excluded["values"]) == never
        assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
        assert hook["timeoutSeconds"] <= 5 and hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                  "resources": ["pods"], "scope": "Namespaced"}]
        assert "caBundle" not in hook["clientConfig"], "the operator owns caBundle; Helm must not reset it"
    validating = next(d for d in rendered if d["kind"] == "ValidatingWebhookConfiguration")
    hooks = {w["name"]: w for w in validating["webhooks"]}
    assert set(hooks) == {"objects.validate.meshward.io", "pods.validate.meshward.io"}
    assert hooks["objects.validate.meshward.io"]["rules"][0]["resources"] == ["authpolicies", "serviceidentities",
                                                                              "revocations"]
    debug = hooks["pods.validate.meshward.io"]  # kubectl debug on opted-in pods gets the injector's refusals
    assert debug["rules"] == [{"operations": ["UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
                               "resources": ["pods/ephemeralcontainers"], "scope": "Namespaced"}]
    assert debug["objectSelector"] == {"matchLabels": {"meshward.io/inject": "enabled"}}
    assert debug["clientConfig"]["service"]["path"] == "/validate/ephemeral"
    for hook in hooks.values():
        assert hook["failurePolicy"] == "Fail" and hook["timeoutSeconds"] <= 5


def test_the_operator_is_told_which_webhooks_to_keep_and_what_to_inject(helm: str) -> None:
    def env(*args: str) -> dict[str, str]:
        deployment = next(d for d in docs(helm, *args) if d["kind"] == "Deployment")
        return {e["name"]: e.get("value", "") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}

    assert env()["MESHWARD_WEBHOOKS"] == "mutating:mw-operator-inject,validating:mw-operator-validate"
    assert env()["MESHWARD_INJECT_IMAGE"].startswith("ghcr.io/meshward/meshward:")
    assert env("--set", "injection.enabled=false")["MESHWARD_WEBHOOKS"] == "validating:mw-operator-validate"
    custom = env("--set", "image.repository=localhost/meshward", "--set", "image.tag=t1",
                 "--set", "injection.image.pullPolicy=Never")
    assert custom["MESHWARD_INJECT_IMAGE"] == "localhost/meshward:t1"
    assert custom["MESHWARD_INJECT_PULL_POLICY"] == "Never"
    kinds = {d["kind"] for d in docs(helm, "--set", "injection.enabled=false", "--set", "validation.enabled=false")}
    assert not kinds & {"MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}


def test_the_api_server_itself_refuses_pods_that_imitate_the_mesh_or_leave_it_by_label(helm: str) -> None:
    """Two ways around the injection webhook, which sees only pods that opt in at creation: a pod carrying the mesh's
    containers without the opt-in label (a hand-made imitation, `kubectl debug --copy-to`), later labelled to look
    meshed; and an injected pod unlabelled so the debug webhook no longer sees it. A ValidatingAdmissionPolicy (no
    operator needed) refuses both."""
    rendered = docs(helm)
    policy = next(d for d in rendered if d["kind"] == "ValidatingAdmissionPolicy" and
                  d["metadata"]["name"].endswith("-pods"))
    binding = next(d for d in rendered if d["kind"] == "ValidatingAdmissionPolicyBinding" and
                   d["metadata"]["name"].endswith("-pods"))
    assert binding["spec"]["policyName"] == policy["metadata"]["name"] and binding["spec"]["validationActions"] == [
        "Deny"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert policy["spec"]["matchConstraints"]["resourceRules"] == [
        {"operations": ["CREATE", "UPDATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}]
    rules = [v["expression"] for v in policy["spec"]["validations"]]
    assert rules == ["!variables.meshed || variables.label == 'enabled'"]  # on CREATE and on every UPDATE
    assert not any(d["metadata"]["name"].endswith("-pods") for d in docs(helm, "--set", "injection.enabled=false"))


def test_meshed_namespaces_keep_pod_security_baseline_but_for_the_capture_container(helm: str) -> None:
    """A meshed namespace must enforce Pod Security `privileged` (the capture container's NET_ADMIN/NET_RAW); the
    chart's ValidatingAdmissionPolicy enforces baseline there itself, with that one exception."""
    rendered = docs(helm)
    policy = next(d for d in rendered if d["kind"] == "ValidatingAdmissionPolicy" and
                  d["metadata"]["name"].endswith("-baseline"))
    assert policy["spec"]["failurePolicy"] == "Fail"
    selectors = [b["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] for b in rendered
                 if b["kind"] == "ValidatingAdmissionPolicyBinding" and b["spec"]["policyName"] ==
                 policy["metadata"]["name"]]
    opted_out = {"key": "meshward.io/pod-security", "operator": "NotIn", "values": ["privileged"]}
    assert selectors == [[{"key": "meshward.io/inject", "operator": "In", "values": ["enabled"]}, opted_out],
                         [{"key": "meshward.io/pod-security", "operator": "In", "values": ["baseline"]}, opted_out]]
    rules = " ".join(v["expression"] for v in policy["spec"]["validations"])
    for check in ("hostNetwork", "hostPID", "hostIPC", "hostPath", "privileged", "hostPort", "procMount",
                  "capabilities", "Unconfined", "sysctls"):
        assert check in rules, check
    assert "c.name == 'meshward-init' && (cap == 'NET_ADMIN' || cap == 'NET_RAW')" in rules
    assert not any(d["kind"] == "ValidatingAdmissionPolicy" and d["metadata"]["name"].endswith("-baseline")
                   for d in docs(helm, "--set", "podSecurity.enabled=false"))
