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
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from meshward._version import __version__
from meshward.sidecar.clients.fetch import HttpFetcher
from meshward.sidecar.domain.probes import PROBES_ENV, AppProbe, parse_probes
from meshward.sidecar.engines.agent import GIL_SWITCH_INTERVAL_S, Agent, ConfigRejected, load_snapshot
from meshward.sidecar.engines.context import ContextKeys
from meshward.sidecar.engines.destinations import MeshDestinations
from meshward.sidecar.engines.observe import DEFAULT_AUDIT_FLUSH_S, JsonLineAudit, Metrics
from meshward.sidecar.entrypoints.proxy import add_http_flags, add_ipv6_flag, http_settings, ipv6_enabled
from meshward.sidecar.servers.admin import Admin
from meshward.sidecar.servers.authz_http import HttpAuthz
from meshward.sidecar.servers.http1 import Handler, serve_tcp, serve_unix

# gRPC, the Envoy protos and their engines are imported at run time only when used: they cost ~15 MB of RSS.
if TYPE_CHECKING:
    import grpc

    from meshward.sidecar.domain.snapshot import Snapshot
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
    p.add_argument("--pod-ip", default=os.environ.get("POD_IP", ""),
                   help="this pod's IP (default $POD_IP): the app's probes go there")
    p.add_argument("--pod-ips", default=os.environ.get("POD_IPS", ""),
                   help="this pod's IPs, comma-separated (default $POD_IPS, else --pod-ip): outbound calls to them "
                        "stay in the pod")
    p.add_argument("--app-probes", default=os.environ.get(PROBES_ENV, ""),
                   help=f"the app's original probes, JSON path -> probe (default ${PROBES_ENV}, set by the injector)")
    p.add_argument("--reload-interval", type=float, default=1.0, help="seconds between config file checks")
    p.add_argument("--audit-flush-interval", type=_seconds, default=DEFAULT_AUDIT_FLUSH_S,
                   help=f"seconds audit lines may wait to be written together (default {DEFAULT_AUDIT_FLUSH_S}; "
                        "0: once per event-loop iteration); shutdown writes them all")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    add_http_flags(p)  # of the outbound listener this agent serves its Envoy (LDS)
    add_ipv6_flag(p)  # of that listener too
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
    return PolicySubscription(client, agent, args.pod_name, registry,
                              destinations=MeshDestinations(args.pod_ips or args.pod_ip))



def _load(path: Path | None) -> Snapshot | None:
    """The config at `path` (or the deny-all one awaiting the operator) compiled; None after saying why not."""
    try:
        return load_snapshot(path.read_text() if path else json.dumps(AWAITING_OPERATOR))
    except OSError as e:
        print(f"meshward-sidecar: cannot read --config {path}: {e.strerror}", file=sys.stderr)
    except ConfigRejected as e:
        print(f"meshward-sidecar: invalid config {path}: {e}", file=sys.stderr)
    return None


@dataclass
class _Running:
    """The agent's engines once started, and what readiness means for them."""

    agent: Agent
    registry: CollectorRegistry
    fetcher: HttpFetcher
    audit: JsonLineAudit
    identity: IdentityManager | None = None
    subscription: PolicySubscription | None = None
    probes: dict[str, AppProbe] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def ready(self) -> bool:
        """Keys loaded, a certificate held (with an identity), the first config and destinations (when subscribed)."""
        subscribed = self.subscription is None or (self.subscription.synced and (
            self.subscription.destinations is None or self.subscription.destinations.received))
        return self.agent.ready and (self.identity is None or self.identity.current is not None) and subscribed

    def readiness(self) -> str:
        """The /readyz body."""
        doc = json.loads(self.agent.readiness())
        if self.identity is not None:
            doc["certificate"] = self.identity.current is not None
        if self.subscription is not None:
            doc["policy"] = {"synced": self.subscription.synced, "connected": self.subscription.connected}
            if self.subscription.destinations is not None:
                doc["destinations"] = self.subscription.destinations.received
        return json.dumps(doc)


def _start_engines(args: argparse.Namespace, snapshot: Snapshot) -> _Running:
    """The agent, its key refreshes, config reloads, certificate renewal and policy subscription, as tasks."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    fetcher = HttpFetcher()
    audit = JsonLineAudit(sys.stdout, args.audit_flush_interval, metrics.audit_dropped.inc)
    awaiting = "no policy from the operator yet" if args.policy_server != "off" and args.config is None else None
    identity = _identity(args, registry) if args.identity_signer != "off" else None
    context = ContextKeys(lambda: identity.current) if identity is not None else None
    r = _Running(Agent(snapshot, fetcher, metrics, audit, awaiting=awaiting, context_keys=context), registry,
                 fetcher, audit)
    r.tasks.append(asyncio.create_task(r.agent.keys.run(), name="jwks"))
    if args.config is not None:
        r.tasks.append(asyncio.create_task(r.agent.watch(args.config, args.reload_interval), name="reload"))
    if identity is not None:
        r.identity = identity
        r.tasks.append(asyncio.create_task(identity.run(), name="identity"))
    if args.policy_server != "off":
        r.subscription = _subscription(args, r.agent, r.identity, registry)
        r.tasks.append(asyncio.create_task(r.subscription.run(), name="policy"))
    return r


async def _start_servers(args: argparse.Namespace, r: _Running) -> tuple[list[asyncio.Server], list[grpc.aio.Server]]:
    """The ext_authz transports asked for, SDS (with an identity) and the admin endpoints."""
    servers: list[asyncio.Server] = []
    grpc_servers: list[grpc.aio.Server] = []
    if args.http_listen != "off":
        servers.append(await _listen(HttpAuthz(lambda: r.agent.pipeline), args.http_listen))
    if args.grpc_listen != "off":
        # Imported only when used: gRPC and the Envoy protos cost ~15 MB of RSS.
        from meshward.sidecar.servers.authz_grpc import GrpcAuthz, serve_grpc

        grpc_servers.append(await serve_grpc(GrpcAuthz(lambda: r.agent.pipeline).Check, args.grpc_listen))
    if r.identity is not None:
        from meshward.sidecar.servers.sds import SecretDiscovery, serve_sds

        also = None
        if r.subscription is not None and r.subscription.destinations is not None:
            from meshward.sidecar.engines.egress import EgressLog
            from meshward.sidecar.servers import als, xds

            outbound = xds.OutboundDiscovery(r.subscription.destinations, http_settings(args),
                                             ipv6=ipv6_enabled(args.ipv6))
            logs = als.AccessLogs(EgressLog(r.registry, r.audit, lambda: r.agent.pipeline.snapshot.config.workload))

            def also(server: grpc.aio.Server) -> None:
                xds.register(outbound, server)
                als.register(logs, server)
        grpc_servers.append(await serve_sds(SecretDiscovery(r.identity, args.trust_domain), args.sds_listen, also))
    prober = None
    if r.probes:
        from meshward.sidecar.clients.probe import probe

        def prober(p: AppProbe) -> Awaitable[tuple[bool, str]]:
            return probe(p, args.pod_ip or "127.0.0.1")
    servers.append(await _listen(Admin(r.ready, r.readiness, r.registry, r.probes, prober), args.admin_listen))
    return servers, grpc_servers


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run(args: argparse.Namespace) -> int:
    """Start every engine and server and run until SIGTERM/SIGINT."""
    snapshot = _load(args.config)
    if snapshot is None:
        return 2
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # new configs compile in a thread beside the loop
    try:
        probes = parse_probes(args.app_probes)
    except ValueError as e:
        print(f"meshward-sidecar: --app-probes (${PROBES_ENV}): {e}", file=sys.stderr)
        return 2
    r = _start_engines(args, snapshot)
    r.probes = probes
    servers: list[asyncio.Server] = []
    grpc_servers: list[grpc.aio.Server] = []
    try:
        servers, grpc_servers = await _start_servers(args, r)
        # Start-up objects (modules, protos, compiled policies) never die: keep them out of GC scans.
        gc.collect()
        gc.freeze()
        log.info("meshward-sidecar %s serving: http=%s grpc=%s admin=%s identity=%s", __version__,
                 args.http_listen, args.grpc_listen, args.admin_listen, args.identity_signer)
        await _until_signalled()
    finally:
        for t in r.tasks:
            t.cancel()
        for s in servers:
            s.close()
        for g in grpc_servers:
            await g.stop(grace=1)
        with contextlib.suppress(Exception):
            await r.fetcher.close()
        r.audit.flush()  # every decision made so far reaches the log
    return 0


def check(path: Path | None) -> int:
    """`--check`: load the config exactly as the agent would and summarize it; 2 with the reason if it is invalid."""
    if path is None:
        print("meshward-sidecar: --check needs --config FILE", file=sys.stderr)
        return 2
    snapshot = _load(path)
    if snapshot is None:
        return 2
    cfg = snapshot.config
    rules = sum(len(p.rules) for p in cfg.policies)
    print(f"{path}: valid SidecarConfig for {cfg.workload}: {len(cfg.policies)} policies, {rules} rules, "
          f"{len(snapshot.issuers)} JWT issuers" + (f", generation {cfg.generation}" if cfg.generation else ""))
    return 0


# prctl(2) option: a process that is not dumpable has /proc/<pid>/mem, /environ and /root owned by root and open to
# ptrace only with CAP_SYS_PTRACE, even for processes of its own UID (the workload key lives in this process).
PR_SET_DUMPABLE = 4


def not_dumpable() -> bool:
    """Make this process non-dumpable (Linux); whether it now is."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent; without --config, print the version and usage."""
    args = _parser().parse_args(argv)
    if not not_dumpable() and sys.platform.startswith("linux"):
        print("meshward-sidecar: cannot make the agent non-dumpable (prctl PR_SET_DUMPABLE failed); refusing to hold "
              "a workload key", file=sys.stderr)
        return 1
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
