"""`meshward-sidecar`: the entry point of the per-pod agent.

The agent (Envoy ext_authz server, SDS, JWKS cache) arrives with later issues;
for now the entry point exists so that packaging and injection can refer to it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from meshward._version import __version__

USAGE = "usage: meshward-sidecar [--version]  (runs the Meshward per-pod agent)"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and report the version and usage."""
    parser = argparse.ArgumentParser(prog="meshward-sidecar", usage=USAGE.removeprefix("usage: "))
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    args = parser.parse_args(argv)
    print(f"meshward-sidecar {__version__}")
    if not args.version:
        print(USAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
