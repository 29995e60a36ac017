"""Kind clusters for the e2e tier and `make dev`, through Docker or, where no Docker engine runs, podman.

Why this module: a kind node is a privileged container, and on a machine without Docker it runs
through podman, which needs settings of its own (this VM cannot grant the rlimits podman asks for)
and leaves traces on the host (sysctls kubelet and systemd set, a CNI bridge, iptables chains, a
`/lib/modules` directory kind insists on mounting). This module keeps all of that in one place:

- `container_env` is the environment every podman, buildah and kind call of the project runs with:
  a private containers.conf and storage under the cache directory, so the user's own podman
  configuration and images are left alone;
- `HostState` records what the host looked like before the first Meshward kind cluster, and
  `restore` puts it back after the last one is gone, also after a run that was killed (the record
  is a file, found and applied by the next `up` or `down`);
- `up`/`down` create and delete a cluster with kind, and `load` copies local images into it.

Dev and test tooling only: never imported by the operator or the sidecar. `python -m
meshward.kindcluster --help` lists the commands hack/ uses.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Settings podman needs on this machine kind. RLIMIT_NOFILE/NPROC above the VM's hard limits make
# runc fail with "error setting rlimit type 7: operation not permitted" (no CAP_SYS_RESOURCE).
CONTAINERS_CONF = """\
# Written by meshward.kindcluster: podman and buildah settings for Meshward's kind tier only
# (CONTAINERS_CONF points here; the host's own containers.conf is not read while it does).
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
# A kind node is one container for all its pods: podman's default of 2048 processes ran out at ~30 pods
# ("fork rejected by pids controller" on kubectl exec). 16384 holds a few hundred of our pods.
pids_limit = 16384

[network]
network_config_dir = "{networks}"
"""
STORAGE_CONF = """\
# Written by meshward.kindcluster: images and containers of Meshward's kind tier, kept apart from
# the host's own (CONTAINERS_STORAGE_CONF points here).
[storage]
driver = "overlay"
graphroot = "{graphroot}"
runroot = "{runroot}"
"""
# The kind network every kind cluster shares (kind creates it, and `kind delete` leaves it).
KIND_NETWORK = "kind"
# Nodes and pods may talk to each other and to this machine, never beyond it: our tests send traffic to
# the clusters they make and to loopback only, and a pod's packet for a Service IP that kube-proxy has not
# programmed yet, or CoreDNS forwarding a name it does not own, would otherwise leave the machine through
# the host's default route. One chain, first in FORWARD; restore removes it with the kind network.
EGRESS_CHAIN = "MESHWARD-KIND-EGRESS"
# Host sysctls that change by themselves: never compared, never restored.
VOLATILE_SYSCTLS = (
    "fs.dentry-state", "fs.file-nr", "fs.inode-nr", "fs.inode-state", "fs.aio-nr", "fs.quota.",
    "fs.binfmt_misc.", "kernel.random.", "kernel.ns_last_pid", "kernel.pty.nr", "kernel.perf_event_max_sample_rate",
    "kernel.tainted", "kernel.sched_domain.", "kernel.hostname", "kernel.domainname", "kernel.keys.",
    "net.netfilter.nf_conntrack_count", "net.ipv4.tcp_mem", "net.ipv4.udp_mem", "vm.stat_refresh",
    "vm.drop_caches", "vm.compact_memory", "kernel.printk_ratelimit", "net.ipv4.route.flush",
    "net.ipv6.route.flush", "fs.protected_", "dev.", "user.", "abi.", "debug.", "sunrpc.",
)
# Network interfaces podman/CNI make for kind nodes, which restore may remove (never any other).
OUR_LINK_PREFIXES = ("cni-podman", "veth", "podman")
# Where CNI keeps its IP allocations per network.
CNI_STATE = Path("/var/lib/cni/networks")
# Directories a kind node's run creates on the host (kind mounts /lib/modules; CNI keeps state and
# network namespaces): removed again when they did not exist before and hold nothing but empty folders.
WATCHED_DIRS = ("/lib/modules", "/var/lib/cni", "/run/netns")
# Podman 4 keeps a container's "running" state when every process is killed without a reboot (this
# machine's /run is not a tmpfs, so podman sees no reboot), and once the container's network namespace
# file is gone, every `podman ps` (so `kind get clusters`) fails on it: a run killed with its cluster
# would fail every later one. The container and the path, as podman names them in that error.
STALE_NETNS = re.compile(r"joining network namespace of container ([0-9a-f]{64}): retrieving network "
                         r"namespace at (/run/netns/netns-[0-9a-f-]{36}): failed to Statfs")
# Stale containers settled in one call at most (each failure names one): a bound, not a loop forever.
MAX_STALE = 32
# Built-in chains exist whenever their table does (iptables-nft creates tables on first use): only a
# policy other than ACCEPT is state worth recording.
BUILTIN_CHAINS = ("INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING")


class KindError(Exception):
    """A kind, podman or host-state step failed; the message says which and how to fix it."""


def cache_dir() -> Path:
    """Meshward's cache: $MESHWARD_CACHE, else ~/.cache/meshward."""
    return Path(os.environ.get("MESHWARD_CACHE") or Path.home() / ".cache" / "meshward")


def provider(run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> str:
    """`docker` where a Docker engine answers, else `podman` ($MESHWARD_KIND_PROVIDER overrides)."""
    chosen = os.environ.get("MESHWARD_KIND_PROVIDER", "")
    if chosen in ("docker", "podman"):
        return chosen
    if chosen:
        raise KindError(f"MESHWARD_KIND_PROVIDER={chosen!r}: use docker or podman (or leave it unset)")
    if shutil.which("docker") and run(["docker", "info"], capture_output=True, text=True).returncode == 0:
        return "docker"
    if shutil.which("podman"):
        return "podman"
    raise KindError("neither a Docker engine nor podman is available: run hack/install-host-deps (as root) "
                    "to install podman, buildah and mmdebstrap")


def container_env(cache: Path, chosen: str) -> dict[str, str]:
    """The environment podman, buildah and kind run with (nothing for Docker); writes the config files once."""
    if chosen == "docker":
        return {}
    root = cache / "containers"
    networks = root / "networks"
    networks.mkdir(parents=True, exist_ok=True)
    conf = root / "containers.conf"
    storage = root / "storage.conf"
    want_conf = CONTAINERS_CONF.format(networks=networks)
    # Each store needs its own run directory (several caches may live side by side, e.g. in CI).
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    want_storage = STORAGE_CONF.format(graphroot=root / "storage", runroot=Path("/run/meshward-containers") / tag)
    for path, text in ((conf, want_conf), (storage, want_storage)):
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return {"CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage),
            "KIND_EXPERIMENTAL_PROVIDER": "podman"}


# --- the host's state -------------------------------------------------------------------------


@dataclass(frozen=True)
class HostState:
    """What a kind node may change on the host: sysctls, links, iptables, a few paths."""

    sysctls: dict[str, str] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)
    # "iptables"/"ip6tables" -> table -> sorted chain declarations and rules
    iptables: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)  # WATCHED_DIRS that did not exist
    cni_networks: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """The record written next to a running cluster."""
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HostState:
        """Read a record written by `to_json`."""
        return cls(**json.loads(text))


def _sysctl_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).parts)


def _per_interface(parts: tuple[str, ...]) -> bool:
    """Per-interface network settings come and go with their interfaces: not host state."""
    return len(parts) >= 4 and parts[0] == "net" and parts[1] in ("ipv4", "ipv6") and \
        parts[2] in ("conf", "neigh") and parts[3] not in ("all", "default")


def read_sysctls(root: Path = Path("/proc/sys")) -> dict[str, str]:
    """Every writable, non-volatile sysctl under `root` (global settings only)."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        if _per_interface(rel):
            dirnames[:] = []
            continue
        for name in filenames:
            path = Path(dirpath) / name
            key = _sysctl_name(path, root)
            if key.startswith(VOLATILE_SYSCTLS) or _per_interface(path.relative_to(root).parts):
                continue
            try:
                if not path.stat().st_mode & 0o200:
                    continue
                found[key] = " ".join(path.read_text().split())
            except OSError:
                continue  # write-only or refused to read
    return found


def parse_iptables_save(text: str) -> dict[str, list[str]]:
    """`iptables-save` output as table -> sorted chain names (`:NAME`) and rules (`-A …`), counters dropped."""
    tables: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:], [])
        elif current is not None and line.startswith(":"):
            name, policy = [*line[1:].split(), "-"][:2]
            if name not in BUILTIN_CHAINS:
                current.append(":" + name)
            elif policy != "ACCEPT":
                current.append(f":{name} {policy}")
        elif current is not None and line.startswith("-A "):
            current.append(line)
    return {t: sorted(lines) for t, lines in tables.items()}


def capture(run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> HostState:
    """The host's state now."""
    tables: dict[str, dict[str, list[str]]] = {}
    for family in ("iptables", "ip6tables"):
        if shutil.which(f"{family}-save"):
            proc = run([f"{family}-save"], capture_output=True, text=True)
            if proc.returncode == 0:
                tables[family] = parse_iptables_save(proc.stdout)
    links = sorted(os.listdir("/sys/class/net")) if Path("/sys/class/net").is_dir() else []
    cni = sorted(os.listdir(CNI_STATE)) if CNI_STATE.is_dir() else []
    return HostState(read_sysctls(), links, tables, [d for d in WATCHED_DIRS if not Path(d).exists()], cni)


def differences(before: HostState, after: HostState) -> list[str]:
    """What differs, one line each (empty: the host is as it was)."""
    out = [f"sysctl {k}: {before.sysctls[k]!r} -> {after.sysctls.get(k)!r}"
           for k in sorted(before.sysctls) if after.sysctls.get(k, before.sysctls[k]) != before.sysctls[k]]
    out += [f"link {name} added" for name in sorted(set(after.links) - set(before.links))]
    for family, tables in after.iptables.items():
        for table, lines in tables.items():
            old = set(before.iptables.get(family, {}).get(table, []))
            out += [f"{family} -t {table}: {line} added" for line in lines if line not in old]
    out += [f"{d} created" for d in before.absent if d not in after.absent]
    out += [f"{d} removed" for d in after.absent if d not in before.absent]
    out += [f"{CNI_STATE / n} added" for n in sorted(set(after.cni_networks) - set(before.cni_networks))]
    return out


def restore(before: HostState, *, full: bool, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
            sysctl_root: Path = Path("/proc/sys")) -> list[str]:
    """Put back what changed since `before`; `full` also removes podman's links, chains and CNI state.

    Returns what could not be put back (empty when all is as before).
    """
    now = capture(run)
    for key, value in before.sysctls.items():
        if now.sysctls.get(key, value) != value:
            with contextlib.suppress(OSError):
                (sysctl_root / key.replace(".", "/")).write_text(value + "\n")
    if full:
        for family, tables in now.iptables.items():
            for table, lines in tables.items():
                old = set(before.iptables.get(family, {}).get(table, []))
                new_rules = [ln for ln in lines if ln.startswith("-A ") and ln not in old]
                new_chains = [ln[1:] for ln in lines if ln.startswith(":") and ln not in old and " " not in ln]
                # A built-in chain's policy is recorded only when it is not ACCEPT (`:FORWARD DROP`).
                was = {ln[1:].split()[0]: ln.split()[1] for ln in old if ln.startswith(":") and " " in ln}
                for ln in lines:
                    if ln.startswith(":") and " " in ln and ln not in old:
                        chain = ln[1:].split()[0]
                        run([family, "-w", "-t", table, "-P", chain, was.get(chain, "ACCEPT")],
                            capture_output=True, text=True)
                for rule in new_rules:
                    run([family, "-w", "-t", table, "-D", *shlex.split(rule)[1:]], capture_output=True, text=True)
                for chain in new_chains:
                    run([family, "-w", "-t", table, "-F", chain], capture_output=True, text=True)
                for chain in new_chains:
                    run([family, "-w", "-t", table, "-X", chain], capture_output=True, text=True)
        for name in sorted(set(now.links) - set(before.links)):
            if name.startswith(OUR_LINK_PREFIXES):
                run(["ip", "link", "delete", name], capture_output=True, text=True)
        for name in sorted(set(now.cni_networks) - set(before.cni_networks)):
            shutil.rmtree(CNI_STATE / name, ignore_errors=True)
    for d in before.absent:
        _remove_empty_tree(Path(d))
    after = capture(run)
    if not full:
        after = HostState(after.sysctls, before.links, before.iptables, after.absent, before.cni_networks)
    return differences(before, after)


def _mounted(path: Path, mounts: Path = Path("/proc/self/mounts")) -> bool:
    """Whether something is mounted at `path`, a directory bind-mounted onto itself included.

    os.path.ismount cannot see such a mount (same device and inode as before), which CNI makes of /run/netns.
    """
    try:
        return any(line.split()[1] == str(path) for line in mounts.read_text().splitlines() if line.strip())
    except OSError:
        return False


def _remove_empty_tree(top: Path, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> None:
    """Remove `top` if it holds nothing but empty folders (never a file someone put there).

    CNI bind-mounts /run/netns onto itself to share network namespaces: that mount goes too.
    """
    if not top.is_dir() or any(p.is_file() or p.is_symlink() for p in top.rglob("*")):
        return
    while _mounted(top):
        if run(["umount", str(top)], capture_output=True, text=True).returncode:
            return
    for d in sorted((p for p in top.rglob("*")), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()


# --- clusters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One way to run kind: its binary, the provider and the environment its calls need."""

    binary: str
    provider: str
    env: Mapping[str, str]
    cache: Path

    @classmethod
    def here(cls, binary: str, cache: Path | None = None) -> Kind:
        """Kind on this machine, through Docker or podman as available."""
        cache = cache or cache_dir()
        chosen = provider()
        return cls(binary, chosen, container_env(cache, chosen), cache)

    @property
    def record(self) -> Path:
        """The host state before the first Meshward kind cluster (present while one may exist)."""
        return self.cache / "kind" / "host-before.json"

    def run(self, *args: str, check: bool = True, timeout: float = 600,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run kind (or, with a first argument of `podman`/`docker`, the provider) in this environment."""
        argv = list(args) if args[0] in ("podman", "docker", "iptables", "ip6tables", "ip") else [self.binary, *args]
        proc = subprocess.run(argv, env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout, input=stdin)
        if check and proc.returncode:
            raise KindError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc

    def clusters(self) -> list[str]:
        """The kind clusters that exist now (of any name), after removing nodes a killed run left dead."""
        for _ in range(MAX_STALE):
            proc = self.run("get", "clusters", check=False)
            if not proc.returncode:
                return [c for c in proc.stdout.split() if c]
            if not self.remove_dead_node(proc.stderr):
                break
        raise KindError(f"{self.binary} get clusters failed ({proc.returncode}):\n{proc.stderr[-3000:]}")

    def remove_dead_node(self, error: str) -> bool:
        """Remove the container a podman error names as having lost its network namespace, if its process is dead."""
        found = STALE_NETNS.search(error) if self.provider == "podman" else None
        if not found:
            return False
        container, path = found.groups()
        placeholder = Path(path).name
        # Podman must join the namespace to read the container's state, also to remove it: give it an empty one.
        self.run("ip", "netns", "add", placeholder)
        try:
            pid = self.run("podman", "inspect", container, "--format", "{{.State.Pid}}").stdout.strip()
            if pid.isdigit() and int(pid) > 0 and Path("/proc", pid).exists():
                raise KindError(f"podman container {container[:12]} runs (pid {pid}) but its network namespace "
                                f"{path} is gone: remove it yourself (`podman rm -f {container[:12]}` in the "
                                "environment `python -m meshward.kindcluster env` prints)")
            print(f"[kind] removing container {container[:12]}, left dead by a killed run", file=sys.stderr)
            self.run("podman", "rm", "--force", "--volumes", container)
        finally:
            self.run("ip", "netns", "delete", placeholder, check=False)
        return True

    def settle(self) -> None:
        """Put the host back after an earlier run that was killed before it could (its record, no cluster left)."""
        if self.record.exists() and not self.clusters():
            problems = self.restore_host()
            if problems:
                print("[kind] could not put back after an earlier run: " + "; ".join(problems), file=sys.stderr)

    def guard_host(self) -> HostState:
        """Before creating a cluster: settle an earlier run, then record the host (before the first cluster only)."""
        self.settle()
        if not self.record.exists():
            self.record.parent.mkdir(parents=True, exist_ok=True)
            self.record.write_text(capture().to_json())
        if not Path("/lib/modules").exists():
            Path("/lib/modules").mkdir()  # kind always mounts it; restore removes it again
        return HostState.from_json(self.record.read_text())

    def restore_host(self) -> list[str]:
        """Once no kind cluster is left: remove the kind network and put the host back as recorded."""
        if not self.record.exists():
            return []
        if self.clusters():
            return []  # another cluster still runs: the last one out restores
        if self.provider == "podman":
            self.run("podman", "network", "rm", KIND_NETWORK, check=False)
        else:
            self.run("docker", "network", "rm", KIND_NETWORK, check=False)
        before = HostState.from_json(self.record.read_text())
        problems = restore(before, full=self.provider == "podman")
        self.record.unlink()
        return problems

    def guard_egress(self, dual_stack: bool = False) -> None:
        """Create the kind network (with IPv6 for dual stack) and drop all it would route off this machine (podman)."""
        if self.provider != "podman":
            return  # Docker's network is Docker's to police (DOCKER-USER): not changed behind its back
        if not self.run("podman", "network", "exists", KIND_NETWORK, check=False).returncode:
            has_ipv6 = self.run("podman", "network", "inspect", KIND_NETWORK, "--format",
                                "{{.IPv6Enabled}}").stdout.strip() == "true"
            if dual_stack and not has_ipv6:
                if self.clusters():
                    raise KindError(f"a dual-stack cluster needs IPv6 on the podman network {KIND_NETWORK}, which "
                                    "an IPv4-only kind cluster still uses: delete it (`make down`) and try again")
                self.run("podman", "network", "rm", KIND_NETWORK)
        if self.run("podman", "network", "exists", KIND_NETWORK, check=False).returncode:
            # `--ipv6` without subnets: podman picks a free IPv4 and a free IPv6 (ULA) subnet, as kind does.
            self.run("podman", "network", "create", "-d=bridge", *(["--ipv6"] if dual_stack else []), KIND_NETWORK)
        bridge = self.run("podman", "network", "inspect", KIND_NETWORK, "--format",
                          "{{.NetworkInterface}}").stdout.strip()
        if not bridge:
            raise KindError(f"podman network {KIND_NETWORK} has no bridge interface: `podman network rm "
                            f"{KIND_NETWORK}` and try again")
        for family in ("iptables", "ip6tables"):
            if not shutil.which(family):
                continue
            self.run(family, "-w", "-N", EGRESS_CHAIN, check=False)
            self.run(family, "-w", "-F", EGRESS_CHAIN)
            self.run(family, "-w", "-A", EGRESS_CHAIN, "-i", bridge, "!", "-o", bridge, "-j", "DROP")
            if self.run(family, "-w", "-C", "FORWARD", "-j", EGRESS_CHAIN, check=False).returncode:
                self.run(family, "-w", "-I", "FORWARD", "1", "-j", EGRESS_CHAIN)

    def create(self, name: str, kubeconfig: Path, image: str | None, config: str = "",
               dual_stack: bool = False) -> None:
        """`kind create cluster` (after guarding the host and its egress)."""
        self.guard_host()
        self.guard_egress(dual_stack)
        args = ["create", "cluster", "--name", name, "--kubeconfig", str(kubeconfig), "--wait", "120s"]
        if image:
            args += ["--image", image]
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(config or DEFAULT_CONFIG)
            f.flush()
            self.run(*args, "--config", f.name, timeout=600)

    def delete(self, name: str) -> list[str]:
        """`kind delete cluster`, then put the host back if it was the last one."""
        self.run("delete", "cluster", "--name", name, check=False, timeout=300)
        return self.restore_host()

    def load(self, name: str, images: Sequence[str]) -> None:
        """Copy local images into the cluster's node(s)."""
        for image in images:
            if self.provider == "docker":
                self.run("load", "docker-image", "--name", name, image)
                continue
            with tempfile.TemporaryDirectory(prefix="meshward-image-") as d:
                archive = Path(d) / "image.tar"
                self.run("podman", "save", "--format", "docker-archive", "-o", str(archive), image)
                self.run("load", "image-archive", "--name", name, str(archive))

    def export_logs(self, name: str, directory: Path) -> None:
        """`kind export logs` into `directory`."""
        self.run("export", "logs", str(directory), "--name", name, check=False, timeout=300)


# One control-plane node that also runs pods (kind's default), its API server on loopback only.
DEFAULT_CONFIG = """\
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  apiServerAddress: 127.0.0.1
nodes:
  - role: control-plane
"""


# The node image's bridge CNI configuration (hack/images/node/10-bridge.conflist) with an IPv6 range beside the
# IPv4 one, for a dual-stack cluster (kind's `ipFamily: dual`: pods in 10.244.0.0/16 and fd00:10:244::/56, Services
# in 10.96.0.0/16 and fd00:10:96::/112; this one node takes the first /24 and /64). Mounted over the image's file,
# so one node image serves both kinds of cluster.
DUAL_STACK_CNI = """\
{
  "cniVersion": "0.4.0",
  "name": "meshward-kind",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.0.0/24"}], [{"subnet": "fd00:10:244::/64"}]],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"""


def ipv6_enabled(proc: Path = Path("/proc/sys/net/ipv6/conf/all/disable_ipv6")) -> bool:
    """Whether this machine's kernel has IPv6 on (a dual-stack kind cluster needs it)."""
    try:
        return proc.read_text().strip() == "0"
    except OSError:
        return False


def dual_stack_config(directory: Path) -> str:
    """A kind config for one dual-stack node; writes the CNI configuration it mounts into `directory`."""
    conflist = directory / "10-bridge-dual.conflist"
    conflist.write_text(DUAL_STACK_CNI)
    return f"""\
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  apiServerAddress: 127.0.0.1
  ipFamily: dual
nodes:
  - role: control-plane
    extraMounts:
      - hostPath: {conflist.resolve()}
        containerPath: /etc/cni/net.d/10-bridge.conflist
        readOnly: true
"""


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m meshward.kindcluster env|up|down|restore|load` for hack/."""
    p = argparse.ArgumentParser(prog="python -m meshward.kindcluster", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["env", "provider", "up", "down", "restore", "load", "status"])
    p.add_argument("--kind", default="kind", help="the kind binary")
    p.add_argument("--name", default="meshward", help="cluster name")
    p.add_argument("--kubeconfig", type=Path, help="where kind writes the kubeconfig (up)")
    p.add_argument("--image", default=None, help="node image (up)")
    p.add_argument("images", nargs="*", help="images to load (load)")
    args = p.parse_intermixed_args(argv)
    try:
        if args.command in ("env", "provider"):
            chosen = provider()
            if args.command == "provider":
                print(chosen)
                return 0
            for k, v in container_env(cache_dir(), chosen).items():
                print(f"export {k}={shlex.quote(v)}")
            return 0
        kind = Kind.here(args.kind)
        if args.command == "up":
            if args.name in kind.clusters():
                print(f"[kind] cluster {args.name} already exists", file=sys.stderr)
                return 0
            kubeconfig = args.kubeconfig or kind.cache / "kind" / args.name / "kubeconfig"
            kubeconfig.parent.mkdir(parents=True, exist_ok=True)
            kind.create(args.name, kubeconfig, args.image)
            print(f"export KUBECONFIG={kubeconfig}")
        elif args.command == "down":
            problems = kind.delete(args.name)
            if problems:
                print("[kind] not put back: " + "; ".join(problems), file=sys.stderr)
                return 1
        elif args.command == "restore":
            problems = kind.restore_host()
            if problems:
                print("[kind] not put back: " + "; ".join(problems), file=sys.stderr)
                return 1
        elif args.command == "load":
            kind.load(args.name, args.images)
        elif args.command == "status":
            clusters = kind.clusters()
            print(f"provider: {kind.provider}\nclusters: {' '.join(clusters) or '-'}\n"
                  f"host record: {kind.record if kind.record.exists() else '-'}")
    except KindError as e:
        print(f"[kind] {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
