"""Session fixtures: a Kubernetes API server for every integration test, a cluster that runs pods for e2e.

By default the local control plane (etcd + kube-apiserver + kube-controller-manager
built by hack/build-control-plane) is started once per session for the integration
tests and torn down at the end, with its logs kept when a test failed. The e2e tier
(marker `e2e`: real pods) gets one kind cluster per session through pytest-kind, with
the node image and Meshward's images built by hack/build-kind (podman where no Docker
engine runs); it is created at the first e2e test, deleted at the end, its logs
exported when a test failed, and the host checked to be as it was before.
`--kubeconfig PATH` uses an existing cluster for both, and `--kind` the kind cluster
for both.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube import Cluster, KindSession, kind_session_for, tool_paths

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SEEN = pytest.StashKey[str]()
E2E_SEEN = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("meshward")
    # pytest-kind registers --kubeconfig too (ValueError here): both take a kubeconfig path, which this conftest reads.
    with contextlib.suppress(ValueError):
        group.addoption("--kubeconfig", default=None,
                        help="run integration and e2e tests against this existing cluster instead")
    group.addoption("--kind", action="store_true", default=False,
                    help="run the integration tests on the session's kind cluster too (pytest-kind; Docker, "
                         "or podman with the node image hack/build-kind makes)")
    group.addoption("--update-golden", action="store_true", default=False,
                    help="rewrite tests/golden/ files from the builders instead of comparing")


def _failed(session: pytest.Session) -> bool:
    return bool(session.testsfailed)


def _describe(config: pytest.Config, c: Cluster) -> Cluster:
    """Remember which API server the integration tests used, for the terminal summary."""
    config.stash[CLUSTER_SEEN] = c.describe()
    return c


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the e2e tier last: its kind cluster is made at the first e2e test, after the fast tier's results."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    seen = config.stash.get(CLUSTER_SEEN, None)
    if seen:
        terminalreporter.write_line(f"integration tests ran against: {seen}")
    e2e = config.stash.get(E2E_SEEN, None)
    if e2e:
        terminalreporter.write_line(f"e2e tests ran on: {e2e}")


@pytest.fixture(autouse=True)
def _collectable_heap() -> Iterator[None]:
    """An agent freezes the heap after each config it compiles (`gc.freeze`): thawed after each test, so what one
    test leaves behind stays collectable for the next."""
    yield
    if gc.get_freeze_count():
        gc.unfreeze()


@pytest.fixture(scope="session")
def kind_session(request: pytest.FixtureRequest) -> Iterator[KindSession]:
    """A cluster whose pods run, with Meshward's images in it: one kind cluster per session (or --kubeconfig's)."""
    kubeconfig_opt = request.config.getoption("--kubeconfig")
    if kubeconfig_opt and request.config.getoption("--kind"):
        pytest.fail("--kubeconfig and --kind are exclusive: pick one cluster")
    with kind_session_for(Path(kubeconfig_opt).resolve() if kubeconfig_opt else None,
                          failed=lambda: _failed(request.session)) as session:
        request.config.stash[E2E_SEEN] = session.describe()
        yield session


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
        yield _describe(request.config, request.getfixturevalue("kind_session").cluster)
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
