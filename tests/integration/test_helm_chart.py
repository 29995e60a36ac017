"""The Helm chart installs on a real API server and refuses clusters too old for its CRDs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.kube import Cluster

pytestmark = pytest.mark.integration

CHART = Path(__file__).resolve().parents[2] / "charts" / "meshward"


def test_chart_renders_the_operator_and_its_rbac(cluster: Cluster) -> None:
    out = subprocess.run([cluster.helm_bin, "template", "mw", str(CHART), "-n", "meshward-system",
                          "--include-crds"], capture_output=True, text=True, check=True).stdout
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out) if d)
    assert kinds == sorted(["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                            "CustomResourceDefinition", "CustomResourceDefinition", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"])


def test_chart_refuses_a_cluster_older_than_1_30(cluster: Cluster) -> None:
    proc = subprocess.run([cluster.helm_bin, "template", "mw", str(CHART), "--kube-version", "1.29.0"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "requires kubeVersion: >=1.30.0-0" in proc.stderr


def test_helm_install_creates_the_operator_deployment(cluster: Cluster, namespace: str) -> None:
    release = f"mw-{namespace}"
    try:
        cluster.helm("install", release, str(CHART), "-n", namespace)
        dep = cluster.get_json("-n", namespace, "deployment", f"{release}-operator")
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["meshward-operator"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert dep["spec"]["template"]["spec"]["serviceAccountName"] == f"{release}-operator"
        cluster.get_json("crd", "authpolicies.meshward.io")
        can = cluster.kubectl("auth", "can-i", "create", "tokenreviews.authentication.k8s.io",
                              f"--as=system:serviceaccount:{namespace}:{release}-operator").stdout.strip()
        assert can == "yes"
    finally:
        cluster.helm("uninstall", release, "-n", namespace, check=False)
