"""For the tests that build pods' network namespaces by hand (marker `netns`): root and a few tools, else fail.

They load the capture rules into real network namespaces, which needs root; where that is out of reach they fail
naming what is missing, never skip (README: deselect them with `-m "not netns"`).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def missing(*tools: str) -> str:
    """Why network-namespace tests cannot run here ('' if they can): not root, or one of `tools` not installed."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    return next((f"needs {tool}" for tool in tools if shutil.which(tool) is None), "")


def require(why: str) -> None:
    """Fail the test naming `why` (from `missing`), unless it is empty."""
    if why:
        pytest.fail(f"this test {why}; run it as root, or deselect it with -m 'not netns'")


def run(*argv: str, stdin: str | None = None) -> str:
    """`argv`'s output; the test fails with its stderr if it exits non-zero."""
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"
    return proc.stdout
