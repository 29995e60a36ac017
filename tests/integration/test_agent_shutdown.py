"""A real agent process stopped with SIGTERM (as the kubelet does) loses no audit line it batched."""

from __future__ import annotations

from pathlib import Path

from tests.support.procs import Agent


def test_sigterm_writes_every_batched_audit_line(tmp_path: Path) -> None:
    config = {"apiVersion": "sidecar.meshward.io/v1alpha1", "kind": "SidecarConfig", "workload": "shop/orders",
              "policies": [{"name": "orders-api", "rules": [{"name": "reads", "to": {"methods": ["GET"]}}]}]}
    agent = Agent(tmp_path, config, extra_args=("--audit-flush-interval", "3600")).start()
    try:
        assert agent.check("/orders/1") == 200
        assert agent.check("/orders/2", method="DELETE") == 403
        assert agent.audit_lines() == []  # batched: an hour would pass before the timer writes them
    finally:
        agent.stop()
    assert agent.proc is not None and agent.proc.returncode == 0
    assert [(x["path"], x["outcome"]) for x in agent.audit_lines()] == [("/orders/1", "allow"),
                                                                       ("/orders/2", "forbidden")]
