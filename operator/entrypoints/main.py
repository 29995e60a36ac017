"""`meshward-operator`: the entry point of the Kopf operator.

Reconcilers, the CA and the webhooks arrive with later issues; for now the
entry point exists so that packaging, the image and the chart can refer to it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from meshward._version import __version__

USAGE = "usage: meshward-operator [--version]  (runs the Meshward Kopf operator)"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and report the version and usage."""
    parser = argparse.ArgumentParser(prog="meshward-operator", usage=USAGE.removeprefix("usage: "))
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    args = parser.parse_args(argv)
    print(f"meshward-operator {__version__}")
    if not args.version:
        print(USAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
