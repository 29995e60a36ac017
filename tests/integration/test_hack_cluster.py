"""`hack/cluster up|status|down`: a second cluster beside the session's, in its own state directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.kube import Cluster, wait_until

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


def test_make_dev_local_starts_a_cluster_with_the_operator_and_down_stops_both(cluster: Cluster, tmp_path: Path) -> None:
    """`hack/dev-local` (what `make dev-local` runs after installing): CRDs, examples, and a running operator."""
    from tests.support.procs import free_port

    state = tmp_path / "dev"
    env = {**os.environ, "MESHWARD_CLUSTER_DIR": str(state), "MESHWARD_SIGNER_PORT": str(free_port()),
           "MESHWARD_METRICS_PORT": str(free_port())}
    try:
        dev = subprocess.run([str(ROOT / "hack" / "dev-local")], env=env, capture_output=True, text=True, timeout=300)
        assert dev.returncode == 0, dev.stderr
        assert "meshward ca rotate" in dev.stdout
        second = Cluster(state / "kubeconfig", cluster.kubectl_bin, cluster.helm_bin, "local")
        ids = second.get_json("-n", "shop", "serviceidentities")["items"]
        assert {i["status"]["spiffeID"] for i in ids} == {"spiffe://cluster.local/ns/shop/sa/orders",
                                                           "spiffe://cluster.local/ns/shop/sa/frontend"}
        pid = int((state / "operator.pid").read_text())
        os.kill(pid, 0)  # running
    finally:
        down = hack_cluster("down", state)
    assert down.returncode == 0, down.stderr
    wait_until("the operator to stop", lambda: not _alive(pid), timeout=20)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
