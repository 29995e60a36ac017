"""Deleting Meshward objects never waits for the operator: no finalizers, status still reported.

Kopf puts a finalizer on every object with a timer; an operator that is down (or
uninstalled) then blocks `kubectl delete` and whole namespace deletions. Meshward writes
status from its own loop instead, so these tests stop the operator and delete.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kube import Cluster, service_identity, wait_until
from tests.support.procs import Operator

pytestmark = pytest.mark.integration
API = "meshward.io/v1alpha1"
# The marker Kopf put on objects with timers (operators before this change): removed on start-up.
KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"


@pytest.fixture
def operator(crds: Cluster, tmp_path: Path) -> Iterator[Operator]:
    ns = crds.new_namespace("mw")
    op = Operator(tmp_path, crds.kubeconfig, ns, "--status-interval", "1")
    try:
        yield op
    finally:
        op.stop()
        crds.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _objects(ns: str, name: str) -> list[dict[str, Any]]:
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [
        {"apiVersion": API, "kind": "AuthPolicy", "metadata": {"name": name, "namespace": ns},
         "spec": {"selector": {"matchLabels": {"app": "orders"}}, "rules": [{"name": "reads", "to": {
             "methods": ["GET"]}}]}},
        {"apiVersion": API, "kind": "Revocation", "metadata": {"name": name},
         "spec": {"entries": [{"sub": "mallory", "expiresAt": expires}]}},
        service_identity(ns, name),
    ]


def _get(c: Cluster, ns: str, kind: str, name: str) -> dict[str, Any]:
    got: dict[str, Any] = c.get_json(kind, name) if kind == "revocation" else c.get_json("-n", ns, kind, name)
    return got


def _ready(c: Cluster, ns: str, kind: str, name: str) -> bool:
    conds = _get(c, ns, kind, name).get("status", {}).get("conditions", [])
    return any(x["type"] == "Ready" for x in conds)


KINDS = ("authpolicy", "revocation", "serviceidentity")


def test_objects_are_deleted_while_the_operator_is_down(crds: Cluster, operator: Operator, namespace: str) -> None:
    name = f"gone-{namespace}"
    crds.apply(*_objects(namespace, name))
    operator.start()
    for kind in KINDS:  # the operator has handled (and reported) every object
        wait_until(f"{kind} status", lambda k=kind: _ready(crds, namespace, k, name))  # type: ignore[misc]
        assert _get(crds, namespace, kind, name)["metadata"].get("finalizers") in (None, [])
    operator.stop()
    crds.kubectl("-n", namespace, "delete", "authpolicy,serviceidentity", name, "--timeout=20s")
    crds.kubectl("delete", "revocation", name, "--timeout=20s")
    left = crds.kubectl("-n", namespace, "get", "authpolicy,serviceidentity", "-o", "name").stdout
    assert name not in left and name not in crds.kubectl("get", "revocation", "-o", "name").stdout


def test_a_finalizer_left_by_an_older_operator_is_removed(crds: Cluster, operator: Operator,
                                                          namespace: str) -> None:
    name = f"old-{namespace}"
    objects = _objects(namespace, name)
    for o in objects:
        o["metadata"]["finalizers"] = [KOPF_FINALIZER]
    crds.apply(*objects)
    operator.start()
    for kind in KINDS:
        wait_until(f"{kind} without Kopf's finalizer", lambda k=kind: KOPF_FINALIZER not in (  # type: ignore[misc]
            _get(crds, namespace, k, name)["metadata"].get("finalizers") or []))
    operator.stop()
    crds.kubectl("-n", namespace, "delete", "authpolicy,serviceidentity", name, "--timeout=20s")
    crds.kubectl("delete", "revocation", name, "--timeout=20s")
