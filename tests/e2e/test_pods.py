"""Real pods on the session's kind cluster: the images run, Services and cluster DNS work."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import pod, wait_ready
from tests.kube import KindSession, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_echo_pod_is_reachable_through_a_service_by_dns_name(kind_session: KindSession) -> None:
    cluster = kind_session.cluster
    ns = cluster.new_namespace("echo")
    try:
        cluster.apply(
            pod(ns, "echo", kind_session.images["echo"], ["python3", "/app/echo.py"]),
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": ns},
             "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080}]}},
            pod(ns, "client", kind_session.images["echo"], ["sleep", "infinity"]))
        wait_ready(cluster, ns, "pod/echo", "pod/client")
        for url in (f"http://echo.{ns}.svc.cluster.local/hello?x=1", "http://echo/short-name"):
            def answer(url: str = url) -> dict[str, object] | None:
                proc = cluster.kubectl("-n", ns, "exec", "client", "--", "curl", "-sS", "--max-time", "5", url,
                                       check=False)
                try:
                    return json.loads(proc.stdout) if proc.returncode == 0 else None
                except ValueError:
                    return None  # kubectl exec lost curl's output (seen once on a loaded machine): ask again
            doc = wait_until(f"{url} from the client pod", answer, timeout=60)
            assert doc["pod"] == "echo"
            assert doc["path"] == "/" + url.split("/", 3)[3]
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_the_image_runs_every_program_as_non_root(kind_session: KindSession) -> None:
    cluster = kind_session.cluster
    ns = cluster.new_namespace("img")
    try:
        cluster.apply(pod(ns, "versions", kind_session.images["meshward"],
                          ["sh", "-c", "id -u; meshward-operator --version; meshward-sidecar --version; envoy --version; "
                                       "iptables --version"],
                          restartPolicy="Never", securityContext={"runAsNonRoot": True}))
        wait_until("the versions pod to finish", lambda: cluster.get_json("-n", ns, "pod", "versions")
                   .get("status", {}).get("phase") in ("Succeeded", "Failed"), timeout=120)
        phase = cluster.get_json("-n", ns, "pod", "versions")["status"]["phase"]
        out = cluster.kubectl("-n", ns, "logs", "versions").stdout
        assert phase == "Succeeded", out
        lines = out.splitlines()
        assert lines[0] == "65532"
        assert lines[1].startswith("meshward-operator ")
        assert lines[2].startswith("meshward-sidecar ")
        assert "version: " in out and "/RELEASE/" in out  # envoy --version
        assert lines[-1].startswith("iptables v")
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
