"""Fixtures of the e2e tier (real pods on the session's kind cluster): the operator installed by its chart."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshward.operator.domain.inject import PROXY, SOCKET_DIR
from meshward.sidecar.domain.envoy import ENVOY_ADMIN_SOCKET
from tests.kube import Cluster, KindSession, service_identity, wait_until

CHART = Path(__file__).resolve().parents[2] / "charts" / "meshward"
# The namespace the agent's defaults expect the operator in (meshward-signer.meshward-system.svc).
OPERATOR_NAMESPACE = "meshward-system"


@dataclass(frozen=True)
class Release:
    """The operator as `helm install` made it."""

    cluster: Cluster
    name: str
    namespace: str
    image: str

    def pods(self, terminating: bool = False) -> list[dict[str, Any]]:
        """The operator's pods (with `terminating`, also those being deleted)."""
        items: list[dict[str, Any]] = self.cluster.get_json(
            "-n", self.namespace, "pods", "-l", f"app.kubernetes.io/instance={self.name}")["items"]
        return [p for p in items if terminating or not p["metadata"].get("deletionTimestamp")]

    def ready_replicas(self) -> int:
        """Operator pods that are Ready and not terminating."""
        return sum(1 for p in self.pods()
                   if all(c.get("ready") for c in p.get("status", {}).get("containerStatuses") or [{}]))

    def leader(self) -> str:
        """The pod holding the Lease (its identity is `<pod name>-<pid>`), once it is labelled as the leader."""
        holder = self.cluster.kubectl("-n", self.namespace, "get", "lease", "meshward-operator", "-o",
                                      "jsonpath={.spec.holderIdentity}", check=False).stdout
        labelled = [p["metadata"]["name"] for p in self.pods()
                    if p["metadata"].get("labels", {}).get("meshward.io/leader") == "true"]
        return labelled[0] if len(labelled) == 1 and holder.startswith(labelled[0] + "-") else ""


# Envoy's admin interface is a Unix socket (mode 0600) in the mesh's socket directory: read it from Envoy's own
# container (the socket path and the request path as argv); a status >= 400 fails the exec.
_ADMIN_GET = ("import http.client, socket, sys; c = http.client.HTTPConnection('localhost', timeout=10); "
              "c.sock = socket.socket(socket.AF_UNIX); c.sock.settimeout(10); c.sock.connect(sys.argv[1]); "
              "c.request('GET', sys.argv[2]); r = c.getresponse(); print(r.read().decode()); sys.exit(r.status >= 400)")


@dataclass(frozen=True)
class Mesh:
    """The release, the namespace and the images of this module."""

    release: Release
    ns: str
    echo: str

    @property
    def cluster(self) -> Cluster:
        return self.release.cluster

    def pod(self, app: str) -> str:
        """The name of the (one, Running, not terminating) pod of deployment `app`."""
        def find() -> str:
            pods = self.cluster.get_json("-n", self.ns, "pods", "-l", f"app={app}")["items"]
            live = [p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")
                    and p.get("status", {}).get("phase") == "Running"]
            return live[0] if len(live) == 1 else ""
        name: str = wait_until(f"one running {app} pod", find, timeout=120)
        return name

    def curl(self, app: str, url: str, *args: str, container: str = "app") -> tuple[int, str]:
        """(HTTP status or 0 for a failed connection, body) of curl run in `app`'s pod."""
        proc = self.cluster.kubectl("-n", self.ns, "exec", self.pod(app), "-c", container, "--", "curl", "-sS",
                                    "--max-time", "5", "-w", "\n%{http_code}", *args, url, check=False)
        body, _, code = proc.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def decisions(self, app: str) -> list[dict[str, Any]]:
        """The audit lines of `app`'s agent."""
        out = self.cluster.kubectl("-n", self.ns, "logs", self.pod(app), "-c", "meshward-agent").stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith('{"ts"')]


def deployment(ns: str, name: str, image: str, *, inject: bool, probe: bool = True,
               annotations: dict[str, str] | None = None, env: dict[str, str] | None = None,
               security: dict[str, Any] | None = None) -> dict[str, Any]:
    """A one-replica Deployment of the echo app (ServiceAccount `name`); `security` is the app's securityContext."""
    labels = {"app": name, **({"meshward.io/inject": "enabled"} if inject else {})}
    container: dict[str, Any] = {"name": "app", "image": image, "imagePullPolicy": "Never",
                                 "ports": [{"name": "http", "containerPort": 8080}],
                                 **({"env": [{"name": k, "value": v} for k, v in env.items()]} if env else {}),
                                 **({"securityContext": security} if security else {})}
    if probe:
        container["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 2}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
                "metadata": {"labels": labels, **({"annotations": annotations} if annotations else {})},
                "spec": {"serviceAccountName": name, "containers": [container]}}}}


def service(ns: str, name: str) -> dict[str, Any]:
    """A Service on port 80 in front of deployment `name`'s port 8080."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}}


def dual_stack_service(ns: str, name: str) -> dict[str, Any]:
    """A Service on port 80 in front of `name`'s 8080 with a ClusterIP of each family (the cluster is dual-stack)."""
    svc = service(ns, name)
    svc["spec"].update(ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv4", "IPv6"])
    return svc


def envoy_admin(cluster: Cluster, ns: str, pod: str, path: str, check: bool = True) -> str:
    """The body of GET `path` (query URL-encoded) from the admin interface of an injected pod's Envoy."""
    return cluster.kubectl("-n", ns, "exec", pod, "-c", PROXY, "--", "python3", "-c", _ADMIN_GET,
                           f"{SOCKET_DIR}/{ENVOY_ADMIN_SOCKET}", path, check=check).stdout


def image_values(image: str) -> list[str]:
    """`helm --set` arguments for a locally built image (never pulled: it is not in any registry)."""
    repository, _, tag = image.rpartition(":")
    return ["--set", f"image.repository={repository}", "--set-string", f"image.tag={tag}", "--set", "image.pullPolicy=Never"]


def pod(namespace: str, name: str, image: str, command: list[str], **spec: Any) -> dict[str, Any]:
    """A one-container Pod manifest."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
            "spec": {"containers": [{"name": name, "image": image, "imagePullPolicy": "Never", "command": command}],
                     **spec}}


def wait_ready(cluster: Cluster, namespace: str, *what: str, timeout: int = 120) -> None:
    """`kubectl wait` for Ready, with the pods' state in the failure message."""
    proc = cluster.kubectl("-n", namespace, "wait", "--for=condition=Ready", *what, f"--timeout={timeout}s",
                           check=False, timeout=timeout + 30)
    if proc.returncode:
        state = cluster.kubectl("-n", namespace, "get", "pods", "-o", "wide", check=False).stdout
        events = cluster.kubectl("-n", namespace, "get", "events", "--sort-by=.lastTimestamp", check=False).stdout
        raise AssertionError(f"{' '.join(what)} not Ready in {timeout} s:\n{proc.stderr}\n{state}\n{events[-3000:]}")


@contextmanager
def installed(kind_session: KindSession, *values: str) -> Iterator[Release]:
    """The operator installed by the Helm chart with the locally built image (two replicas, one leading), then
    uninstalled; `values` are more `helm --set` arguments."""
    cluster = kind_session.cluster
    rel = Release(cluster, "meshward", OPERATOR_NAMESPACE, kind_session.images["meshward"])
    cluster.helm("install", rel.name, str(CHART), "-n", rel.namespace, "--create-namespace", "--wait",
                 "--timeout", "180s", *image_values(rel.image), *values, timeout=240)
    try:
        wait_until("a labelled leader", rel.leader, timeout=60)
        # Then its Services route to it once kube-proxy has the endpoints: until then the validating webhook's
        # callers are refused (seen on a loaded machine). A server-side dry run goes through the webhook.
        probe = yaml.safe_dump(service_identity("default", "webhook-probe"))
        wait_until("the validating webhook admitting", lambda: cluster.kubectl(
            "apply", "--dry-run=server", "-f", "-", stdin=probe, check=False).returncode == 0, timeout=60)
        yield rel
    finally:
        cluster.helm("uninstall", rel.name, "-n", rel.namespace, "--wait", check=False, timeout=180)
        # helm waits for the Deployment, not for its pods: the next release must not meet this one's.
        wait_until("the operator's pods gone", lambda: not rel.pods(terminating=True), timeout=120)


@pytest.fixture(scope="module")
def release(kind_session: KindSession) -> Iterator[Release]:
    """The operator installed by the Helm chart with the locally built image, two replicas, one leading."""
    with installed(kind_session) as rel:
        yield rel
