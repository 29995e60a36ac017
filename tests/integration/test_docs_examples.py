"""The Kubernetes objects the docs show are accepted by a real API server with Meshward's CRDs: schema, bounds
and CEL rules (`kubectl apply --dry-run=server`), so an example cannot drift from the API silently."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.kube import Cluster
from tests.support.docs import DOCUMENTS

pytestmark = pytest.mark.integration
KINDS = {"AuthPolicy", "ServiceIdentity", "Revocation", "Namespace", "ServiceAccount", "Deployment", "Service"}
OBJECTS = [(w, d) for w, d in DOCUMENTS if isinstance(d, dict) and d.get("kind") in KINDS
           and d.get("apiVersion") in ("v1", "apps/v1", "meshward.io/v1alpha1")]


def test_there_are_examples_of_every_kind() -> None:
    assert {d["kind"] for _, d in OBJECTS} >= {"AuthPolicy", "ServiceIdentity", "Revocation", "Deployment"}


@pytest.mark.parametrize(("where", "doc"), OBJECTS, ids=[f"{w}:{d['kind']}/{d['metadata']['name']}" for w, d in OBJECTS])
def test_the_api_server_accepts_the_example(crds: Cluster, where: str, doc: dict[str, Any]) -> None:
    namespace = doc["metadata"].get("namespace")
    if namespace and crds.kubectl("get", "namespace", str(namespace), check=False).returncode:
        crds.kubectl("create", "namespace", str(namespace))
    proc = crds.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    assert proc.returncode == 0, f"{where}: {proc.stderr}"
