"""`meshward inject -f`: the webhook's injection, done to manifests before they reach the cluster."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from meshward._version import __version__
from meshward.operator.domain.admission import inject_response
from meshward.operator.domain.inject import InjectSettings
from tests.support.jsonpatch import apply_patch

IMAGE = "localhost/meshward:cli"
POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "orders-1", "namespace": "shop",
                                                       "labels": {"app": "orders", "meshward.io/inject": "enabled"}},
       "spec": {"containers": [{"name": "app", "image": "shop/orders:1", "ports": [{"containerPort": 8080}],
                                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}}]}}


def deployment(labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "orders"}}, "template": {
                "metadata": {"labels": {"app": "orders", **labels}},
                "spec": {"containers": [{"name": "app", "image": "shop/orders:1"}]}}}}


def run(docs: list[dict[str, Any]], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "meshward"), "inject", "-f", "-", "--image", IMAGE,
                           *args], input=yaml.safe_dump_all(docs), capture_output=True, text=True, timeout=60)


def test_the_cli_makes_the_pod_the_webhook_makes() -> None:
    proc = run([POD])
    assert proc.returncode == 0, proc.stderr
    [printed] = list(yaml.safe_load_all(proc.stdout))
    review = inject_response({"uid": "u", "kind": {"group": "", "kind": "Pod"}, "operation": "CREATE",
                              "namespace": "shop", "object": POD},
                             InjectSettings(image=IMAGE, version=__version__, image_pull_policy="IfNotPresent"),
                             namespace_opted_in=False)
    assert printed == apply_patch(POD, json.loads(base64.b64decode(review["patch"])))


def test_opted_in_templates_are_injected_and_everything_else_passes_unchanged() -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "orders"}, "spec": {"ports": []}}
    out = list(yaml.safe_load_all(run([deployment({"meshward.io/inject": "enabled"}), deployment({}), service])
                                  .stdout))
    inits = out[0]["spec"]["template"]["spec"]["initContainers"]
    assert [c["name"] for c in inits] == ["meshward-init", "meshward-agent", "meshward-proxy"]
    assert out[1] == deployment({}) and out[2] == service
    again = list(yaml.safe_load_all(run(out).stdout))
    assert again == out, "injecting an injected manifest changes nothing"


def test_a_service_of_the_same_manifests_declares_its_tcp_ports_as_in_the_cluster() -> None:
    """A Service in the manifests whose port declares TCP (appProtocol) declares it on the template it selects, as
    the webhook would from the cluster's Services; one of another namespace does not."""
    def service(namespace: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "orders-db", "namespace": namespace},
                "spec": {"selector": {"app": "orders"}, "ports": [{"name": "db", "port": 5432,
                                                                   "appProtocol": "postgresql"}]}}

    def proxy(docs: list[dict[str, Any]]) -> list[str]:
        proc = run(docs)
        assert proc.returncode == 0, proc.stderr
        inits = next(iter(yaml.safe_load_all(proc.stdout)))["spec"]["template"]["spec"]["initContainers"]
        command: list[str] = next(c["command"] for c in inits if c["name"] == "meshward-proxy")
        return command
    declared = proxy([deployment({"meshward.io/inject": "enabled"}), service("shop")])
    assert declared[declared.index("--tcp-ports") + 1] == "5432"
    assert "--tcp-ports" not in proxy([deployment({"meshward.io/inject": "enabled"}), service("billing")])


def test_a_labelled_namespace_is_said_with_a_flag() -> None:
    out = list(yaml.safe_load_all(run([deployment({})], "--namespace-opted-in").stdout))
    assert "initContainers" in out[0]["spec"]["template"]["spec"]


def test_what_cannot_be_protected_fails_naming_the_document_and_field() -> None:
    bad = deployment({"meshward.io/inject": "enabled"})
    bad["spec"]["template"]["spec"]["hostNetwork"] = True
    proc = run([POD, bad])
    assert proc.returncode == 2 and proc.stdout == ""
    assert "document 2: Deployment shop/orders: spec.template: spec.hostNetwork" in proc.stderr
