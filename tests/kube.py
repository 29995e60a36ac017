"""A small test-side handle on a Kubernetes cluster: kubectl and helm with its kubeconfig, and the e2e kind cluster."""

from __future__ import annotations

import json
import os
import shutil
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

    def describe(self) -> str:
        """Which API server this is, for the session summary."""
        version = json.loads(self.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
        server = self.kubectl("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}").stdout
        return f"{self.flavour} kube-apiserver {version} at {server}"

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

    def pod_token(self, namespace: str, service_account: str, pod: str, duration: str = "1h") -> str:
        """A token like the one kubelet projects into `pod`: audience meshward, bound to the pod (by name and UID)."""
        uid = self.kubectl("-n", namespace, "get", "pod", pod, "-o", "jsonpath={.metadata.uid}").stdout.strip()
        return self.kubectl("-n", namespace, "create", "token", service_account, "--audience", "meshward",
                            "--duration", duration, "--bound-object-kind", "Pod", "--bound-object-name", pod,
                            "--bound-object-uid", uid).stdout.strip()

    def bound_token(self, namespace: str, service_account: str, duration: str = "1h") -> str:
        """A pod-bound token of `service_account` (the signer refuses others), from a plain pod made for it (not
        opted in; it stays Pending on the local control plane) and kept for the namespace's life."""
        pod = f"{service_account}-token-holder"
        if not self.kubectl("-n", namespace, "get", "pod", pod, "--ignore-not-found", "-o", "name").stdout.strip():
            self.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": namespace},
                        "spec": {"serviceAccountName": service_account,
                                 "containers": [{"name": "app", "image": "registry.invalid/app:1"}]}})
        return self.pod_token(namespace, service_account, pod, duration)

    def webhooks_to_loopback(self, release_fullname: str, port: int) -> None:
        """Point the chart's webhook configurations at https://127.0.0.1:`port` (an operator run on this machine).

        The local control plane has no Service network: its API server can reach a webhook only by URL. The
        operator keeps the caBundle; its serving certificate names 127.0.0.1.
        """
        for kind, name in (("mutatingwebhookconfiguration", f"{release_fullname}-inject"),
                           ("validatingwebhookconfiguration", f"{release_fullname}-validate")):
            hooks = self.get_json(kind, name)["webhooks"]
            patch = [{"op": "replace", "path": f"/webhooks/{n}/clientConfig",
                      "value": {"url": f"https://127.0.0.1:{port}{h['clientConfig']['service']['path']}",
                                **({"caBundle": h["clientConfig"]["caBundle"]}
                                   if h["clientConfig"].get("caBundle") else {})}}
                     for n, h in enumerate(hooks)]
            self.kubectl("patch", kind, name, "--type=json", "-p", json.dumps(patch))

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


def tool_paths(build: bool = True, only: tuple[str, ...] = ("etcd", "kube", "helm")) -> dict[str, str]:
    """The control-plane programs from hack/ (`build`: compile `only` these first; cached, idempotent)."""
    tool = ROOT / "hack" / "build-control-plane"
    if build:
        for what in only:
            # Progress goes to stderr, which pytest shows when the build fails.
            subprocess.run([str(tool), what], check=True, stdout=sys.stderr)
    out = subprocess.run([str(tool), "paths"], check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def kind_paths(build: bool = True) -> dict[str, str]:
    """kind, the node image and Meshward's images from hack/build-kind (`build`: build them first; cached)."""
    tool = ROOT / "hack" / "build-kind"
    if build:
        subprocess.run([str(tool), "all"], check=True, stdout=sys.stderr)
    out = subprocess.run([str(tool), "paths"], check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


@dataclass(frozen=True)
class KindSession:
    """The e2e tier's cluster: pods run there, and Meshward's images are in it."""

    cluster: Cluster
    name: str
    images: dict[str, str]
    node_image: str = ""
    provider: str = ""

    def describe(self) -> str:
        """What the e2e tests ran on, for the session summary."""
        if not self.provider:
            return f"the cluster of {self.cluster.kubeconfig}: {self.cluster.describe()}"
        return (f"kind cluster {self.name} ({self.provider}, node image {self.node_image or 'kind default'}): "
                f"{self.cluster.describe()}")


@contextmanager
def kind_session_for(kubeconfig: Path | None, failed: Callable[[], bool]) -> Iterator[KindSession]:
    """A kind cluster through pytest-kind for the block (or the cluster at `kubeconfig`, images already in it).

    The host's state is recorded before the cluster exists and checked after it is gone; logs are exported
    (`kind export logs`) when `failed()` says a test failed.
    """
    paths = tool_paths()
    if kubeconfig is not None:
        built = kind_paths(build=False)
        images = {"meshward": built["meshward-image"], "echo": built["echo-image"], "compat": built["compat-image"]}
        yield KindSession(Cluster(kubeconfig, paths["kubectl"], paths["helm"], "external"), "external", images)
        return
    try:
        from pytest_kind import KindCluster
    except ImportError as e:
        raise AssertionError(f"the e2e tier needs pytest-kind: pip install -e '.[dev]' ({e})") from e
    from meshward.kindcluster import Kind, capture, differences, dual_stack_config, ipv6_enabled

    built = kind_paths()
    kind = Kind.here(built["kind"])
    name = f"meshward-e2e-{uuid.uuid4().hex[:6]}"
    work = Path(tempfile.mkdtemp(prefix="meshward-kind-"))
    saved_env = {k: os.environ.get(k) for k in kind.env}
    os.environ.update(kind.env)  # pytest-kind runs kind with the inherited environment
    kind.settle()
    before = capture()
    kind.guard_host()
    config = work / "kind.yaml"
    if not ipv6_enabled():
        raise AssertionError("the e2e tier runs a dual-stack kind cluster (IPv6 capture is tested on it), and this "
                             "machine's kernel has IPv6 disabled: set net.ipv6.conf.all.disable_ipv6=0")
    config.write_text(dual_stack_config(work))
    handle = KindCluster(name, work / "kubeconfig", image=built["node-image"] or None,
                         kind_path=Path(built["kind"]), kubectl_path=Path(paths["kubectl"]))
    try:
        kind.guard_egress(dual_stack=True)
        handle.create(config)
        cluster = Cluster(work / "kubeconfig", paths["kubectl"], paths["helm"], "kind")
        cluster.kubectl("wait", "--for=condition=Ready", "node", "--all", "--timeout=120s", timeout=150)
        cluster.kubectl("-n", "kube-system", "rollout", "status", "deployment/coredns", "--timeout=120s", timeout=150)
        images = {"meshward": built["meshward-image"], "echo": built["echo-image"], "compat": built["compat-image"]}
        kind.load(name, list(images.values()))
        yield KindSession(cluster, name, images, built["node-image"], kind.provider)
    finally:
        if failed():
            logs = work / "logs"
            kind.export_logs(name, logs)
            print(f"\n[kind] cluster logs exported to {logs}", file=sys.stderr)
        try:
            handle.delete()
        finally:
            problems = kind.restore_host()
            shutil.rmtree(handle.path, ignore_errors=True)  # pytest-kind's .pytest-kind/<name>
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        left = differences(before, capture())
        if kind.provider == "docker":
            left = [d for d in left if d.startswith(("sysctl", "/"))]
        if problems or left:
            raise AssertionError("the host is not as it was before the kind cluster: " + "; ".join(problems + left))


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
