"""`meshward-sidecar`: the per-pod agent, Envoy's external authorization server.

It reads its policy from a config file (the contract the operator compiles
AuthPolicies into, docs/sidecar-config.md), reloads it when it changes, fetches
JWKS in the background, and serves ext_authz over HTTP/1.1 (default, fastest)
and/or gRPC, plus /healthz, /readyz and /metrics on an admin port. Audit lines go
to stdout, logs to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import random
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from meshward._version import __version__
from meshward.sidecar.clients.fetch import HttpFetcher
from meshward.sidecar.engines.agent import Agent, ConfigRejected, load_snapshot
from meshward.sidecar.engines.observe import DEFAULT_AUDIT_FLUSH_S, JsonLineAudit, Metrics
from meshward.sidecar.servers.admin import Admin
from meshward.sidecar.servers.authz_http import HttpAuthz
from meshward.sidecar.servers.http1 import Handler, serve_tcp, serve_unix

if TYPE_CHECKING:
    # Imported at run time only when used: gRPC and the Envoy protos cost ~15 MB of RSS.
    from meshward.sidecar.engines.certificate import IdentityManager
    from meshward.sidecar.engines.subscription import PolicySubscription

USAGE = ("usage: meshward-sidecar {--config FILE | --policy-server ADDR} [--http-listen ADDR] [--grpc-listen ADDR] "
         "[--admin-listen ADDR]  (ADDR: host:port or unix:/path)")
log = logging.getLogger("meshward.sidecar")
# In force until the operator's first config arrives: a policy with no allow rule denies everything.
AWAITING_OPERATOR = {"apiVersion": "sidecar.meshward.io/v1alpha1", "kind": "SidecarConfig",
                     "workload": "awaiting-operator", "generation": "awaiting-operator",
                     "policies": [{"name": "meshward/awaiting-first-config", "rules": []}]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshward-sidecar", usage=USAGE.removeprefix("usage: "),
                                description="Meshward's per-pod agent: Envoy ext_authz server.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--config", type=Path, help="SidecarConfig file (YAML or JSON), reloaded on change")
    p.add_argument("--check", action="store_true",
                   help="validate and compile --config (CEL included), say what it holds, and exit (2 if invalid)")
    p.add_argument("--http-listen", default="127.0.0.1:9191",
                   help="HTTP/1.1 ext_authz address (default 127.0.0.1:9191; 'off' to disable)")
    p.add_argument("--grpc-listen", default="off", help="gRPC ext_authz address (default off)")
    p.add_argument("--admin-listen", default="127.0.0.1:9192", help="health/ready/metrics address")
    p.add_argument("--identity-signer", default="off",
                   help="the operator's signing service, host:port (default off: no workload certificate)")
    p.add_argument("--identity-signer-name", default="meshward-signer.meshward-system.svc",
                   help="the DNS name on the signing service's certificate")
    p.add_argument("--identity-token", type=Path, default=Path("/var/run/secrets/meshward/token"),
                   help="projected ServiceAccount token (audience meshward), reread for every request")
    p.add_argument("--trust-bundle", type=Path, default=Path("/var/run/meshward/bundle/ca.crt"),
                   help="mounted meshward-trust-bundle ConfigMap, to verify the signing service")
    p.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default cluster.local)")
    p.add_argument("--sds-listen", default="unix:/var/run/meshward/sds.sock", type=_unix_only,
                   help="Envoy SDS address, unix:/path only: the workload's private key travels on it, so the "
                        "socket is created mode 0600, for this user alone (used with --identity-signer)")
    p.add_argument("--policy-server", default="off",
                   help="the operator's policy service host:port: subscribe to this workload's config over mTLS "
                        "(needs --identity-signer; replaces --config)")
    p.add_argument("--pod-name", default=os.environ.get("POD_NAME", ""),
                   help="this pod's name, sent when subscribing (default $POD_NAME)")
    p.add_argument("--reload-interval", type=float, default=1.0, help="seconds between config file checks")
    p.add_argument("--audit-flush-interval", type=_seconds, default=DEFAULT_AUDIT_FLUSH_S,
                   help=f"seconds audit lines may wait to be written together (default {DEFAULT_AUDIT_FLUSH_S}; "
                        "0: once per event-loop iteration); shutdown writes them all")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return p


def _unix_only(text: str) -> str:
    """An argparse type: `unix:/path` (SDS serves the private key, so never on a TCP port)."""
    if not text.startswith("unix:/"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: SDS serves the workload's private key and listens only on a Unix socket "
            "(unix:/path, mode 0600); a TCP port would hand the key to anyone who can connect")
    return text


def _seconds(text: str) -> float:
    """An argparse type: a non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds >= 0")
    return value


async def _listen(handler: Handler, addr: str) -> asyncio.Server:
    if addr.startswith("unix:"):
        return await serve_unix(handler, addr.removeprefix("unix:"))
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"meshward-sidecar: {addr!r} is not host:port or unix:/path")
    return await serve_tcp(handler, host.strip("[]"), int(port))


def _identity(args: argparse.Namespace, registry: CollectorRegistry) -> IdentityManager:
    """The certificate manager, talking to the signing service with the mounted bundle plus the latest one."""
    from meshward.sidecar.clients.signer import SignerClient
    from meshward.sidecar.engines.certificate import IdentityManager

    holder: list[IdentityManager] = []

    def roots() -> bytes:
        mounted = b""
        with contextlib.suppress(OSError):
            mounted = args.trust_bundle.read_bytes()
        latest = holder[0].current.bundle_pem if holder and holder[0].current else b""
        return mounted + latest

    signer = SignerClient(args.identity_signer, args.identity_signer_name, roots)
    manager = IdentityManager(signer, args.identity_token.read_text, args.trust_domain,
                              lambda: dt.datetime.now(dt.UTC), random.random, registry)
    holder.append(manager)
    return manager


def _subscription(args: argparse.Namespace, agent: Agent, identity: IdentityManager | None,
                  registry: CollectorRegistry) -> PolicySubscription:
    """The operator subscription, authenticated by the workload certificate."""
    from meshward.sidecar.clients.policy import PolicyClient
    from meshward.sidecar.engines.subscription import PolicySubscription

    if identity is None:
        raise SystemExit("meshward-sidecar: --policy-server needs --identity-signer (the subscription is mTLS)")
    if not args.pod_name:
        raise SystemExit("meshward-sidecar: --policy-server needs --pod-name (or $POD_NAME)")

    def credentials() -> tuple[bytes, bytes, bytes] | None:
        cert = identity.current
        return (cert.bundle_pem, cert.key_pem, cert.chain_pem) if cert else None

    client = PolicyClient(args.policy_server, args.identity_signer_name, credentials, args.identity_token.read_text)
    return PolicySubscription(client, agent, args.pod_name, registry)


async def run(args: argparse.Namespace) -> int:
    """Start every server and run until SIGTERM/SIGINT."""
    config_path: Path | None = args.config
    try:
        snapshot = load_snapshot(config_path.read_text() if config_path else json.dumps(AWAITING_OPERATOR))
    except OSError as e:
        print(f"meshward-sidecar: cannot read --config {config_path}: {e.strerror}", file=sys.stderr)
        return 2
    except ConfigRejected as e:
        print(f"meshward-sidecar: invalid config {config_path}: {e}", file=sys.stderr)
        return 2
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    fetcher = HttpFetcher()
    audit = JsonLineAudit(sys.stdout, args.audit_flush_interval, metrics.audit_dropped.inc)
    agent = Agent(snapshot, fetcher, metrics, audit)
    servers: list[asyncio.Server] = []
    tasks = [asyncio.create_task(agent.keys.run(), name="jwks")]
    if config_path is not None:
        tasks.append(asyncio.create_task(agent.watch(config_path, args.reload_interval), name="reload"))
    grpc_servers = []
    identity = None
    if args.identity_signer != "off":
        identity = _identity(args, registry)
        tasks.append(asyncio.create_task(identity.run(), name="identity"))

    subscription = None
    if args.policy_server != "off":
        subscription = _subscription(args, agent, identity, registry)
        tasks.append(asyncio.create_task(subscription.run(), name="policy"))

    def ready() -> bool:
        return agent.ready and (identity is None or identity.current is not None) and \
            (subscription is None or subscription.synced)

    def readiness() -> str:
        doc = json.loads(agent.readiness())
        if identity is not None:
            doc["certificate"] = identity.current is not None
        if subscription is not None:
            doc["policy"] = {"synced": subscription.synced, "connected": subscription.connected}
        return json.dumps(doc)

    try:
        if args.http_listen != "off":
            servers.append(await _listen(HttpAuthz(lambda: agent.pipeline), args.http_listen))
        if args.grpc_listen != "off":
            # Imported only when used: gRPC and the Envoy protos cost ~15 MB of RSS.
            from meshward.sidecar.servers.authz_grpc import GrpcAuthz, serve_grpc

            grpc_servers.append(await serve_grpc(GrpcAuthz(lambda: agent.pipeline).Check, args.grpc_listen))
        if identity is not None:
            from meshward.sidecar.servers.sds import SecretDiscovery, serve_sds

            grpc_servers.append(await serve_sds(SecretDiscovery(identity, args.trust_domain), args.sds_listen))
        servers.append(await _listen(Admin(ready, readiness, registry), args.admin_listen))
        # Start-up objects (modules, protos, compiled policies) never die: keep them out of GC scans.
        gc.collect()
        gc.freeze()
        log.info("meshward-sidecar %s serving: http=%s grpc=%s admin=%s identity=%s", __version__,
                 args.http_listen, args.grpc_listen, args.admin_listen, args.identity_signer)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        for s in servers:
            s.close()
        for g in grpc_servers:
            await g.stop(grace=1)
        with contextlib.suppress(Exception):
            await fetcher.close()
        audit.flush()  # every decision made so far reaches the log
    return 0


def check(path: Path | None) -> int:
    """`--check`: load the config exactly as the agent would and summarize it; 2 with the reason if it is invalid."""
    if path is None:
        print("meshward-sidecar: --check needs --config FILE", file=sys.stderr)
        return 2
    try:
        snapshot = load_snapshot(path.read_text())
    except OSError as e:
        print(f"meshward-sidecar: cannot read --config {path}: {e.strerror}", file=sys.stderr)
        return 2
    except ConfigRejected as e:
        print(f"meshward-sidecar: invalid config {path}: {e}", file=sys.stderr)
        return 2
    cfg = snapshot.config
    rules = sum(len(p.rules) for p in cfg.policies)
    print(f"{path}: valid SidecarConfig for {cfg.workload}: {len(cfg.policies)} policies, {rules} rules, "
          f"{len(snapshot.issuers)} JWT issuers" + (f", generation {cfg.generation}" if cfg.generation else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent; without --config, print the version and usage."""
    args = _parser().parse_args(argv)
    if args.check:
        return check(args.config)
    if args.version or (args.config is None and args.policy_server == "off"):
        print(f"meshward-sidecar {__version__}")
        if not args.version:
            print(USAGE)
        return 0
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        return uvloop.run(run(args))
    except ImportError:
        return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
