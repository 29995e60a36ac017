"""`hack/cluster up|status|down`: a second cluster beside the session's, in its own state directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.kube import Cluster

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def hack_cluster(cmd: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHWARD_CLUSTER_DIR": str(state)}
    return subprocess.run([str(ROOT / "hack" / "cluster"), cmd], env=env, capture_output=True, text=True,
                          timeout=180)


def test_second_cluster_runs_beside_the_first_and_down_removes_it(cluster: Cluster, tmp_path: Path) -> None:
    state = tmp_path / "second"
    up = hack_cluster("up", state)
    assert up.returncode == 0, up.stderr
    try:
        assert up.stdout.strip() == f"export KUBECONFIG={state / 'kubeconfig'}"
        status = hack_cluster("status", state).stdout
        assert "kube-apiserver: ready" in status
        assert "etcd: running" in status
        assert "kube-controller-manager: running" in status
        second = Cluster(state / "kubeconfig", cluster.kubectl_bin, cluster.helm_bin, "local")
        second.kubectl("create", "namespace", "only-in-the-second")
        assert second.kubectl("get", "namespace", "only-in-the-second", check=False).returncode == 0
        assert cluster.kubectl("get", "namespace", "only-in-the-second", check=False).returncode != 0
        again = hack_cluster("up", state)
        assert again.returncode == 1
        assert "run `hack/cluster down` first" in again.stderr
    finally:
        down = hack_cluster("down", state)
    assert down.returncode == 0, down.stderr
    assert not state.exists()
    missing = hack_cluster("status", state)
    assert missing.returncode == 1
    assert "no cluster state" in missing.stderr
