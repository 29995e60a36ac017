"""The `meshward` user CLI: one place for the commands platform teams run by hand.

Later issues add `explain`, CA rotation and local setup; until then it reports
its version and usage so that packaging and entry points are testable.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from meshward._stub import version_and_usage

USAGE = "usage: meshward [--version] <command>  (commands arrive with later releases)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    return version_and_usage("meshward", USAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
