"""Fixtures shared by the integration tests: the CRDs installed once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube import Cluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Cluster:
    """The cluster with Meshward's CRDs applied and Established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/authpolicies.meshward.io", "crd/serviceidentities.meshward.io",
                    "crd/revocations.meshward.io")
    return cluster


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace for one test (deleted without waiting afterwards)."""
    ns = cluster.new_namespace()
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
