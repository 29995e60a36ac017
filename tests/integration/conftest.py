"""Fixtures shared by the integration tests: the CRDs installed once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kube import Cluster


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Cluster:
    """The cluster with Meshward's CRDs applied and Established."""
    cluster.install_crds()
    return cluster


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace for one test (deleted without waiting afterwards)."""
    ns = cluster.new_namespace()
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
