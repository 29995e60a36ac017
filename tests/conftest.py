"""Session fixtures: a Kubernetes API server for every integration test.

By default the local control plane (etcd + kube-apiserver + kube-controller-manager
built by hack/build-control-plane) is started once per session and torn down at the
end, with its logs kept when a test failed.  `--kubeconfig PATH` uses an existing
cluster instead, and `--kind` a kind cluster through pytest-kind (needs Docker).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube import Cluster, tool_paths

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SEEN = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("meshward")
    group.addoption("--kubeconfig", default=None,
                    help="run integration tests against this existing cluster instead of the local one")
    group.addoption("--kind", action="store_true", default=False,
                    help="run integration tests on a kind cluster (pytest-kind; needs a Docker engine)")
    group.addoption("--update-golden", action="store_true", default=False,
                    help="rewrite tests/golden/ files from the builders instead of comparing")


def _failed(session: pytest.Session) -> bool:
    return bool(session.testsfailed)


def _describe(config: pytest.Config, c: Cluster) -> Cluster:
    """Remember which API server the integration tests used, for the terminal summary."""
    version = json.loads(c.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    server = c.kubectl("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}").stdout
    config.stash[CLUSTER_SEEN] = f"{c.flavour} kube-apiserver {version} at {server}"
    return c


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    seen = config.stash.get(CLUSTER_SEEN, None)
    if seen:
        terminalreporter.write_line(f"integration tests ran against: {seen}")


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A Kubernetes API server with an admin kubeconfig, shared by the whole session."""
    kubeconfig_opt = request.config.getoption("--kubeconfig")
    use_kind = request.config.getoption("--kind")
    if kubeconfig_opt and use_kind:
        pytest.fail("--kubeconfig and --kind are exclusive: pick one cluster")
    paths = tool_paths()
    if kubeconfig_opt:
        yield _describe(request.config,
                        Cluster(Path(kubeconfig_opt).resolve(), paths["kubectl"], paths["helm"], "external"))
        return
    if use_kind:
        try:
            from pytest_kind import KindCluster
        except ImportError as e:
            pytest.fail(f"--kind needs pytest-kind: pip install -e '.[kind]' ({e})")
        if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
            pytest.fail("--kind needs a running Docker engine; use the default local control plane instead")
        kind = KindCluster("meshward-test")
        kind.create()
        try:
            yield _describe(request.config,
                            Cluster(Path(kind.kubeconfig_path), paths["kubectl"], paths["helm"], "kind"))
        finally:
            kind.delete()
        return

    from meshward.localcluster import Binaries, down, up

    directory = Path(tempfile.mkdtemp(prefix="meshward-cluster-"))
    state = up(directory, Binaries.from_paths(paths), progress=lambda m: print(f"[cluster] {m}", file=sys.stderr))
    try:
        yield _describe(request.config, Cluster(Path(state.kubeconfig), paths["kubectl"], paths["helm"], "local"))
    finally:
        keep = _failed(request.session) or bool(os.environ.get("MESHWARD_KEEP_CLUSTER_LOGS"))
        down(directory, keep_logs=keep)
        if keep:
            print(f"\n[cluster] control-plane logs kept in {directory / 'logs'}", file=sys.stderr)
