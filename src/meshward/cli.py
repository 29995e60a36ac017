"""The `meshward` user CLI: the commands platform teams run by hand.

`meshward ca status` shows the mesh CA's roots and rotation phase; `meshward ca rotate`
asks the operator to rotate it (the same annotation a GitOps repository can set).
Later issues add `explain`.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import sys
from collections.abc import Sequence

from meshward._version import __version__

USAGE = "usage: meshward [--version] ca {status,rotate} [--namespace NS] [--kubeconfig FILE]"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshward", usage=USAGE.removeprefix("usage: "),
                                description="Meshward's command line.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command")
    ca = sub.add_parser("ca", help="the mesh CA")
    ca.add_argument("action", choices=["status", "rotate"], help="status: roots and phase; rotate: start a rotation")
    ca.add_argument("--namespace", default="meshward-system", help="the operator's namespace (default meshward-system)")
    ca.add_argument("--kubeconfig", default=None, help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
    return p


def _ca(args: argparse.Namespace) -> int:
    # Imported here so `meshward --version` stays instant.
    from meshward.operator.clients.kube import KubeClient, KubeError
    from meshward.operator.engines.ca_store import ROTATE_ANNOTATION, SECRET_NAME, CaStoreError, decode

    try:
        kube = KubeClient.from_kubeconfig(args.kubeconfig)
        secret = kube.read_secret(args.namespace, SECRET_NAME)
        if secret is None:
            print(f"meshward: no Secret {args.namespace}/{SECRET_NAME}: is the operator installed in "
                  f"{args.namespace}? (--namespace)", file=sys.stderr)
            return 1
        stored = decode(secret, f"{args.namespace}/{SECRET_NAME}")
        if args.action == "rotate":
            if stored.state.phase != "steady":
                print(f"meshward: a rotation is already in phase {stored.state.phase}; nothing to do",
                      file=sys.stderr)
                return 1
            kube.annotate_secret(args.namespace, SECRET_NAME,
                                 {ROTATE_ANNOTATION: dt.datetime.now(dt.UTC).isoformat()})
            print("rotation requested: the operator stages a new root on its next check "
                  "(follow with: meshward ca status)")
            return 0
    except (KubeError, CaStoreError) as e:
        print(f"meshward: {e}", file=sys.stderr)
        return 1
    state = stored.state
    now = dt.datetime.now(dt.UTC)
    print(f"phase: {state.phase}" + (f" (since {state.since:%Y-%m-%dT%H:%M:%SZ})" if state.since else ""))
    for role, cert in (("next", state.next.cert if state.next else None), ("active", state.active.cert),
                       ("previous", state.previous)):
        if cert is not None:
            left = cert.not_valid_after_utc - now
            print(f"{role:9} serial {cert.serial_number:x}  expires {cert.not_valid_after_utc:%Y-%m-%d} "
                  f"({left.days} days left)  sha256 {base64.b16encode(cert.fingerprint(cert.signature_hash_algorithm)).decode()[:16]}")  # type: ignore[arg-type]  # noqa: E501
    if stored.rotation_requested:
        print("rotation requested; waiting for the operator")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    args = _parser().parse_args(argv)
    if args.version or args.command is None:
        print(f"meshward {__version__}")
        if not args.version:
            print(USAGE)
        return 0
    return _ca(args)


if __name__ == "__main__":
    sys.exit(main())
