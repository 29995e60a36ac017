"""`meshward-init`: the injected pod's init container that installs traffic capture.

Runs once, as root with NET_ADMIN and NET_RAW (the only privileged step of the mesh),
in the pod's network namespace: it loads the rules of domain/capture.py with
`iptables-restore` and, for IPv6, `ip6tables-restore` (nftables back end first, the
legacy one if the kernel has no nf_tables), prints them for `kubectl logs`, and fails
the pod loudly if they cannot be installed: a pod must never run opted in but
uncaptured.

IPv6, in order:
1. the nat rules (`ip6tables_rules`): TCP over IPv6 captured like IPv4;
2. where no back end takes them (a kernel without an IPv6 nat table, `ip6table_nat`),
   the reset rules (`ip6tables_reset_rules`): TCP over IPv6 into the pod and out of its
   app is reset, and the log says "IPv6 reset, not captured" and why;
3. where neither is installed, the pod fails if it has IPv6 (a way around the mesh), and
   starts if it has none at all (a kernel without it, or IPv6 disabled in the pod:
   nothing to close then).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from meshward._version import __version__
from meshward.sidecar.domain.capture import (
    Capture,
    CaptureError,
    ip6tables_reset_rules,
    ip6tables_rules,
    iptables_rules,
    parse_cidrs,
    parse_ports,
)

# Tried in order: Debian's default (nftables) and the legacy back end.
RESTORE_COMMANDS = ("iptables-restore", "iptables-legacy-restore")
RESTORE6_COMMANDS = ("ip6tables-restore", "ip6tables-legacy-restore")
# 1 when IPv6 is off in this network namespace; absent when the kernel has no IPv6.
IPV6_DISABLED = Path("/proc/sys/net/ipv6/conf/all/disable_ipv6")
# The namespace's IPv6 addresses, one per line, the interface last. Read too: `all` can say 1 while an interface's
# own setting (an unsafe sysctl a pod may be allowed) says 0 and it has an address, uncaptured if we believed `all`.
IF_INET6 = Path("/proc/net/if_inet6")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshward-init", description="Install an injected pod's traffic capture.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--exclude-inbound-ports", default="", help="ports reached without the mesh, e.g. 9090,8081")
    p.add_argument("--exclude-outbound-ports", default="", help="destination ports left alone, e.g. 5432")
    p.add_argument("--exclude-outbound-cidrs", default="", help="destinations left alone, e.g. 10.1.0.0/16")
    p.add_argument("--dry-run", action="store_true", help="print the rules and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Install the rules; 1 (and why) if no back end takes them."""
    args = _parser().parse_args(argv)
    if args.version:
        print(f"meshward-init {__version__}")
        return 0
    try:
        capture = Capture(parse_ports(args.exclude_inbound_ports, "--exclude-inbound-ports"),
                          parse_ports(args.exclude_outbound_ports, "--exclude-outbound-ports"),
                          parse_cidrs(args.exclude_outbound_cidrs, "--exclude-outbound-cidrs"))
    except CaptureError as e:
        print(f"meshward-init: {e}", file=sys.stderr)
        return 2
    rules, rules6, reset6 = iptables_rules(capture), ip6tables_rules(capture), ip6tables_reset_rules(capture)
    print(rules, end="")
    print(rules6, end="")
    if args.dry_run:
        print("# where the kernel has no IPv6 nat table, instead:")
        print(reset6, end="")
        return 0
    error = _restore(RESTORE_COMMANDS, rules)
    if error:
        print(f"meshward-init: cannot install traffic capture: {error}", file=sys.stderr)
        return 1
    error = _restore(RESTORE6_COMMANDS, rules6)
    if not error:
        return 0
    print(f"meshward-init: cannot capture IPv6 ({error}); resetting TCP over IPv6 instead:")
    print(reset6, end="")
    reset_error = _restore(RESTORE6_COMMANDS, reset6)
    if not reset_error:
        print("meshward-init: IPv6 reset, not captured: TCP over IPv6 into this pod and out of its app is refused")
        return 0
    if _has_ipv6():
        print("meshward-init: cannot capture or close IPv6 (the pod has IPv6, so it would be a way around the mesh): "
              f"{error}; {reset_error}", file=sys.stderr)
        return 1
    print("meshward-init: no IPv6 in this pod; IPv6 rules not needed")
    return 0


def _has_ipv6() -> bool:
    """Whether this network namespace has IPv6: turned on for all, or an address on any interface but loopback."""
    try:
        if IPV6_DISABLED.read_text().strip() == "0":
            return True
    except OSError:
        pass
    try:
        return any(line.split()[-1] != "lo" for line in IF_INET6.read_text().splitlines() if line.split())
    except OSError:
        return False


def _restore(commands: Sequence[str], rules: str) -> str:
    """Load `rules` with the first of `commands` that takes them; '' on success, else why none did."""
    errors = []
    for command in commands:
        path = shutil.which(command)
        if path is None:
            errors.append(f"{command}: not installed")
            continue
        proc = subprocess.run([path, "--noflush"], input=rules, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            print(f"meshward-init: rules installed with {command}")
            return ""
        errors.append(f"{command}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return "; ".join(errors)
