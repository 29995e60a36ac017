"""The Helm chart as rendered by `helm template`: what it makes, what its values schema refuses (no cluster)."""

from __future__ import annotations

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
                            "PodDisruptionBudget", "Role", "RoleBinding", "Service", "Service", "ServiceAccount"])


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
])
def test_values_schema_refuses_mistyped_and_wrong_typed_values(helm: str, value: str, message: str) -> None:
    proc = render(helm, "--set", value)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_services_reach_the_leader_alone_while_every_replica_is_ready(helm: str) -> None:
    rendered = docs(helm)
    services = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Service"}
    assert set(services) == {"meshward-signer", "meshward-policy"}
    for svc in services.values():
        assert svc["spec"]["selector"]["meshward.io/leader"] == "true"
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    role = next(d for d in rendered if d["kind"] == "Role")
    assert {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]} in role["rules"]


def test_the_disruption_budget_comes_with_two_or_more_replicas(helm: str) -> None:
    assert any(d["kind"] == "PodDisruptionBudget" for d in docs(helm, "--set", "operator.replicas=2"))
    assert not any(d["kind"] == "PodDisruptionBudget" for d in docs(helm, "--set", "operator.replicas=1"))
    assert not any(d["kind"] == "PodDisruptionBudget" for d in docs(helm, "--set", "podDisruptionBudget.enabled=false"))
