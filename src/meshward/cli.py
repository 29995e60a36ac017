"""The `meshward` user CLI: one place for the commands platform teams run by hand.

Later issues add `explain`, CA rotation and local setup; until then it reports
its version and usage so that packaging and entry points are testable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from meshward._version import __version__

USAGE = "usage: meshward [--version] <command>  (commands arrive with later releases)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    parser = argparse.ArgumentParser(prog="meshward", usage=USAGE.removeprefix("usage: "))
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    args = parser.parse_args(argv)
    print(f"meshward {__version__}")
    if not args.version:
        print(USAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
