"""The host after kind: what a privileged node changed is put back, also after a run that was killed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from meshward.kindcluster import Kind, capture, differences
from tests.kube import kind_paths

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
LEFTOVER = "MESHWARD-TEST-LEFTOVER"


def test_a_killed_runs_changes_to_the_host_are_put_back_by_the_next_run(tmp_path: Path) -> None:
    """A run records the host, a node changes it (a sysctl, an iptables chain and the jump to it), and the run
    dies before its cleanup. The next run finds the record with no cluster left and puts the host back.

    The runs use a cache of their own (its own podman store, so they see no cluster of the session's)."""
    binary = kind_paths()["kind"]
    before = capture()
    killed = Kind.here(binary, cache=tmp_path)
    killed.guard_host()
    assert killed.record.exists()
    panic = Path("/proc/sys/kernel/panic")
    old_panic = panic.read_text().strip()
    try:
        panic.write_text("10\n")  # what the node's kubelet does
        subprocess.run(["iptables", "-w", "-N", LEFTOVER], check=True)
        subprocess.run(["iptables", "-w", "-I", "FORWARD", "-j", LEFTOVER], check=True)
        assert differences(before, capture())
        # ... killed here. The next run:
        Kind.here(binary, cache=tmp_path).settle()
        assert differences(before, capture()) == []
        assert panic.read_text().strip() == old_panic
        assert not killed.record.exists()
    finally:
        panic.write_text(old_panic + "\n")
        subprocess.run(["iptables", "-w", "-D", "FORWARD", "-j", LEFTOVER], capture_output=True)
        subprocess.run(["iptables", "-w", "-X", LEFTOVER], capture_output=True)
        # podman mounts its store's overlay directory onto itself; this store is the test's own.
        subprocess.run(["umount", str(tmp_path / "containers" / "storage" / "overlay")], capture_output=True)
