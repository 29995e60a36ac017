"""The shared entry point of commands that so far only report their version and usage."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from meshward._version import __version__


def version_and_usage(prog: str, usage: str, argv: Sequence[str] | None) -> int:
    """Parse `--version`, print `<prog> <version>` and, without --version, the usage line."""
    parser = argparse.ArgumentParser(prog=prog, usage=usage.removeprefix("usage: "))
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    args = parser.parse_args(argv)
    print(f"{prog} {__version__}")
    if not args.version:
        print(usage)
    return 0
