"""`meshward-init`: the injected pod's init container that installs traffic capture.

Runs once, as root with NET_ADMIN and NET_RAW (the only privileged step of the mesh),
in the pod's network namespace: it loads the rules of domain/capture.py with
`iptables-restore` (nftables back end first, the legacy one if the kernel has no
nf_tables), prints them for `kubectl logs`, and fails the pod loudly if they cannot be
installed: a pod must never run opted in but uncaptured.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence

from meshward._version import __version__
from meshward.sidecar.domain.capture import Capture, CaptureError, iptables_rules, parse_cidrs, parse_ports

# Tried in order: Debian's default (nftables) and the legacy back end.
RESTORE_COMMANDS = ("iptables-restore", "iptables-legacy-restore")


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
    rules = iptables_rules(capture)
    print(rules, end="")
    if args.dry_run:
        return 0
    errors = []
    for command in RESTORE_COMMANDS:
        path = shutil.which(command)
        if path is None:
            errors.append(f"{command}: not installed")
            continue
        proc = subprocess.run([path, "--noflush"], input=rules, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            print(f"meshward-init: capture installed with {command}")
            return 0
        errors.append(f"{command}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    print("meshward-init: cannot install traffic capture: " + "; ".join(errors), file=sys.stderr)
    return 1
