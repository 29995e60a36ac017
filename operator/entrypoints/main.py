"""`meshward-operator`: the entry point of the Kopf operator.

Reconcilers, the CA and the webhooks arrive with later issues; for now the
entry point exists so that packaging, the image and the chart can refer to it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from meshward._stub import version_and_usage

USAGE = "usage: meshward-operator [--version]  (runs the Meshward Kopf operator)"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and report the version and usage."""
    return version_and_usage("meshward-operator", USAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
