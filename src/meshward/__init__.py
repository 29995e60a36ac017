"""Meshward: zero-trust east-west security for Kubernetes.

The distribution holds three programs that share one version: the operator
(`meshward.operator`), the per-pod agent (`meshward.sidecar`) and the user CLI
(`meshward.cli`).  `operator/` and `sidecar/` live at the repository's top level
and are linked in here, so the stdlib `operator` module is never shadowed.
"""

from meshward._version import __version__

__all__ = ["__version__"]
