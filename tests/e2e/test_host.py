"""The host after kind: what a privileged node changed is put back, also after a run that was killed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from meshward.kindcluster import Kind, KindError, capture, container_env, differences
from tests.kube import kind_paths
from tests.support.procs import wait_for

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


def test_a_node_left_dead_by_a_killed_run_is_removed_and_a_running_one_is_left_alone(tmp_path: Path) -> None:
    """Every process of a run killed (conmon and the node's init, as an environment restart does, with no reboot
    podman could notice) and its network namespace's file gone: podman 4 still calls the container running, and
    every `podman ps` — so `kind get clusters`, so every later run — failed on it. The next run removes that
    container; a container whose namespace file is gone but whose process lives is refused by name, not removed.

    Two tiny containers (the node image's static pause) in a podman store of the test's own."""
    paths = kind_paths()
    kind = Kind(paths["kind"], "podman", container_env(tmp_path, "podman"), tmp_path)
    kind.guard_host()  # as a run does: the host is recorded, and put back once no cluster is left
    root = tmp_path / "rootfs"
    root.mkdir()
    shutil.copy(paths["pause"], root / "pause")
    subprocess.run(["tar", "-C", str(root), "-cf", str(tmp_path / "pause.tar"), "pause"], check=True)
    image = "localhost/meshward-test/pause:1"
    kind.run("podman", "import", "--change", 'ENTRYPOINT ["/pause"]', str(tmp_path / "pause.tar"), image)
    try:
        for name in ("dead", "alive"):
            kind.run("podman", "run", "-d", "--name", name, "--label", f"io.x-k8s.kind.cluster={name}", image)

        def state(name: str) -> tuple[int, int, str]:
            out = kind.run("podman", "inspect", name, "--format",
                           "{{.State.Pid}} {{.State.ConmonPid}} {{.NetworkSettings.SandboxKey}}").stdout.split()
            return int(out[0]), int(out[1]), out[2]
        dead_pid, dead_conmon, dead_netns = state("dead")
        alive_pid, alive_conmon, alive_netns = state("alive")
        for pid in (dead_conmon, dead_pid):
            os.kill(pid, signal.SIGKILL)
        wait_for("the killed container's process to go", lambda: not Path("/proc", str(dead_pid)).exists(), 10)
        for netns in (dead_netns, alive_netns):
            subprocess.run(["ip", "netns", "delete", Path(netns).name], check=True)
        failed = kind.run("get", "clusters", check=False)
        assert failed.returncode and "failed to Statfs" in failed.stderr  # the trap, as podman 4.3 sets it

        with pytest.raises(KindError, match=r"runs \(pid \d+\) but its network namespace .* is gone"):
            kind.clusters()
        assert Path("/proc", str(alive_pid)).exists()
        names = kind.run("podman", "ps", "-a", "--format", "{{.Names}}", check=False).stdout.split()
        assert "dead" not in names  # removed on the way to the live one

        for pid in (alive_conmon, alive_pid):  # now it is dead too: the next run removes it and puts the host back
            os.kill(pid, signal.SIGKILL)
        wait_for("the second container's process to go", lambda: not Path("/proc", str(alive_pid)).exists(), 10)
        Kind(paths["kind"], "podman", container_env(tmp_path, "podman"), tmp_path).settle()
        assert kind.run("podman", "ps", "-aq").stdout.split() == []
        assert not kind.record.exists()
        assert not any(Path("/run/netns", Path(n).name).exists() for n in (dead_netns, alive_netns))
    finally:
        kind.run("podman", "rm", "--force", "--volumes", "--all", check=False)
        kind.run("podman", "rmi", "--force", image, check=False)
        kind.restore_host()
        subprocess.run(["umount", str(tmp_path / "containers" / "storage" / "overlay")], capture_output=True)
