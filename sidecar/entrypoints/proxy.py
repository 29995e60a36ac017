"""`meshward-proxy`: Envoy in an injected pod, started on the bootstrap the pod needs.

The bootstrap is built by the same pure function the tests check (domain/envoy.py,
build_pod_bootstrap), for this pod ($POD_NAMESPACE/$POD_NAME), written to the shared
socket directory (the root filesystem is read-only) and Envoy replaces this process, so
kubelet signals Envoy itself. Whether its listeners take IPv6 too is decided here, at
start, from the pod's own network namespace (`ipv6_enabled`): binding `[::]` fails where
IPv6 is off, and Envoy then refuses the whole listener.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from meshward._version import __version__
from meshward.sidecar.domain.capture import CaptureError, parse_ports
from meshward.sidecar.domain.envoy import (
    DEFAULT_STREAM_IDLE_TIMEOUT_S,
    HttpSettings,
    PodProxy,
    build_pod_bootstrap,
    parse_duration,
)


def _tcp_ports(text: str) -> tuple[int, ...]:
    try:
        return parse_ports(text, "--tcp-ports")
    except CaptureError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _route_timeout(text: str) -> float:
    try:
        return parse_duration(text, zero_is_none=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _stream_idle_timeout(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_http_flags(p: argparse.ArgumentParser) -> None:
    """Add the workload's HTTP settings (meshward.io/route-timeout, stream-idle-timeout, accept-http10) to `p`.

    Both meshward-proxy (the inbound listener) and meshward-sidecar (the outbound one it serves over LDS) take them.
    """
    p.add_argument("--route-timeout", type=_route_timeout, default=0.0, metavar="DURATION",
                   help="end of request to end of response, e.g. 30s (default 0: none, the app's timeouts rule)")
    p.add_argument("--stream-idle-timeout", type=_stream_idle_timeout, default=DEFAULT_STREAM_IDLE_TIMEOUT_S,
                   metavar="DURATION", help="reset a stream with no bytes either way for this long (default 5m)")
    p.add_argument("--accept-http10", action="store_true", help="serve HTTP/1.0 requests (default: 426)")


def add_ipv6_flag(p: argparse.ArgumentParser) -> None:
    """Add `--ipv6 auto|on|off` to `p`: whether Envoy's listeners take IPv6 too (meshward-proxy and the agent)."""
    p.add_argument("--ipv6", choices=["auto", "on", "off"], default="auto",
                   help="Envoy's listeners on IPv6 too: auto (default) where this network namespace has IPv6")


def ipv6_enabled(choice: str) -> bool:
    """Whether the listeners take IPv6: as `choice` says, or (auto) whether this pod can bind its IPv6 loopback.

    `::1` is where capture sends the app's connections over IPv6 (domain/capture.py); it is there whenever the
    pod's IPv6 is on, and binding it is what fails where it is off (no IPv6 in the kernel, or disabled in the pod).
    """
    if choice != "auto":
        return choice == "on"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def http_settings(args: argparse.Namespace) -> HttpSettings:
    """The HttpSettings the flags of add_http_flags say."""
    return HttpSettings(args.route_timeout, args.stream_idle_timeout, args.accept_http10)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshward-proxy", description="Envoy for an injected pod.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--inbound-plaintext", choices=["refuse", "allow"], default="refuse",
                   help="refuse (default) or allow plaintext callers next to mTLS ones (while migrating)")
    p.add_argument("--socket-dir", default="/var/run/meshward", help="the agent's sockets (shared emptyDir)")
    p.add_argument("--transport", choices=["http", "grpc"], default="http", help="ext_authz transport (default http)")
    p.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads (default 2)")
    p.add_argument("--log-level", default="warn", help="Envoy's log level (default warn)")
    p.add_argument("--envoy", default="envoy", help="the Envoy binary (default: envoy on $PATH)")
    p.add_argument("--print", action="store_true", help="print the bootstrap instead of starting Envoy")
    p.add_argument("--tcp-ports", type=_tcp_ports, default=(), metavar="PORTS",
                   help="ports the workload declares TCP (comma-separated): meshed callers may tunnel connections "
                        "to them over mTLS (meshward.io/tcp-ports)")
    add_http_flags(p)
    add_ipv6_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Write the bootstrap and exec Envoy on it."""
    args = _parser().parse_args(argv)
    if args.version:
        print(f"meshward-proxy {__version__}")
        return 0
    node = f"{os.environ.get('POD_NAMESPACE', 'default')}/{os.environ.get('POD_NAME', 'unknown')}"
    bootstrap = build_pod_bootstrap(PodProxy(node, args.socket_dir, args.inbound_plaintext == "allow",
                                             args.transport, http=http_settings(args),
                                             ipv6=ipv6_enabled(args.ipv6), tcp_ports=args.tcp_ports))
    text = json.dumps(bootstrap, indent=1)
    if args.print:
        print(text)
        return 0
    envoy = shutil.which(args.envoy)
    if envoy is None:
        print(f"meshward-proxy: no Envoy binary {args.envoy!r} on $PATH", file=sys.stderr)
        return 2
    path = Path(args.socket_dir) / "envoy.json"
    path.write_text(text)
    # Envoy replaces this process (no shell: every argument is ours).
    argv = [envoy, "-c", str(path), "--concurrency", str(args.concurrency), "--log-level", args.log_level,
            "--disable-hot-restart", "--drain-time-s", "5", "--service-node", node, "--service-cluster", node]
    os.execv(envoy, argv)  # noqa: S606
