"""A small test-side handle on a Kubernetes cluster: kubectl and helm with its kubeconfig."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CRD_NAMES = ("crd/authpolicies.meshward.io", "crd/serviceidentities.meshward.io", "crd/revocations.meshward.io")


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    kubectl_bin: str
    helm_bin: str
    flavour: str  # local | external | kind

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), *args],
                              input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def helm(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.helm_bin, "--kubeconfig", str(self.kubeconfig), *args],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def apply(self, *docs: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def install_crds(self) -> None:
        """Apply Meshward's CRDs and wait until they are served."""
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", *CRD_NAMES)

    def trust_bundle(self, namespace: str, timeout: float = 30) -> str:
        """Wait for the operator's trust-bundle ConfigMap in `namespace` and return its `ca.crt`."""
        return str(wait_until(f"the trust bundle in {namespace}", lambda: self.kubectl(
            "-n", namespace, "get", "configmap", "meshward-trust-bundle", "-o", r"jsonpath={.data.ca\.crt}",
            check=False).stdout, timeout=timeout))

    def new_namespace(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.kubectl("create", "namespace", name)
        return name


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60, interval: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def tool_paths(build: bool = True) -> dict[str, str]:
    """The control-plane programs from hack/ (`build`: compile them first; cached, idempotent)."""
    tool = ROOT / "hack" / "build-control-plane"
    if build:
        for what in ("etcd", "kube", "helm"):
            # Progress goes to stderr, which pytest shows when the build fails.
            subprocess.run([str(tool), what], check=True, stdout=sys.stderr)
    out = subprocess.run([str(tool), "paths"], check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


@contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """A local control plane with Meshward's CRDs for one benchmark run, removed afterwards."""
    from meshward.localcluster import Binaries, down, up

    paths = tool_paths(build=False)
    directory = Path(tempfile.mkdtemp(prefix="meshward-bench-cluster-"))
    state = up(directory, Binaries.from_paths(paths))
    try:
        cluster = Cluster(Path(state.kubeconfig), paths["kubectl"], paths["helm"], "local")
        cluster.install_crds()
        yield cluster
    finally:
        down(directory)


def opted_in_pod(namespace: str, name: str, service_account: str, **labels: str) -> dict[str, Any]:
    """A Pod that has opted into the mesh (it stays Pending: the local control plane has no kubelet)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"meshward.io/inject": "enabled", **labels}},
            "spec": {"serviceAccountName": service_account,
                     "containers": [{"name": "app", "image": "registry.invalid/app:1"}]}}


def service_identity(namespace: str, service_account: str, ttl: str | None = None) -> dict[str, Any]:
    """A ServiceIdentity named after the ServiceAccount it admits."""
    spec: dict[str, Any] = {"serviceAccountName": service_account}
    if ttl:
        spec["certificate"] = {"ttl": ttl}
    return {"apiVersion": "meshward.io/v1alpha1", "kind": "ServiceIdentity",
            "metadata": {"name": service_account, "namespace": namespace}, "spec": spec}
