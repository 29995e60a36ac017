"""`meshward-operator`: the Kopf operator that runs the mesh CA and reconciles Meshward's objects.

Builds every collaborator (Kubernetes client, CA keeper, issuance engine, policy hub,
status reports and writers), registers the handlers on a private Kopf registry (no
module-level state) and runs Kopf until SIGTERM, on the replica that holds the Lease.
Metrics are served on their own port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import grpc
import kopf
from aiohttp import web
from kopf._core.engines.peering import Identity  # not re-exported; the type of kopf.operator(identity=)
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from meshward._version import __version__
from meshward.operator.clients.kube import KubeClient, KubeError
from meshward.operator.domain.ca import MAX_TTL, MIN_TTL, parse_ttl, random_serial, spiffe_id
from meshward.operator.domain.egress import DNS_SERVICE, mesh_egress
from meshward.operator.domain.inject import InjectSettings, mesh_resources_problem
from meshward.operator.engines.ca_keeper import CaKeeper
from meshward.operator.engines.identity_directory import IdentityDirectory
from meshward.operator.engines.issuance import IssuanceEngine
from meshward.operator.engines.leader import LeaderElection, LeaderMarker
from meshward.operator.engines.mesh_directory import MeshDirectory
from meshward.operator.engines.metrics import register_metrics
from meshward.operator.engines.policy_hub import PolicyHub
from meshward.operator.engines.safety_net import SafetyNet
from meshward.operator.engines.status_reports import StatusReports
from meshward.operator.engines.status_writer import StatusWriter
from meshward.operator.engines.webhook_bundle import WebhookBundle, parse_configurations
from meshward.operator.handlers import lifecycle, service_identities
from meshward.operator.handlers import mesh as mesh_handlers
from meshward.operator.handlers import policies as policy_handlers
from meshward.operator.handlers.lifecycle import Runtime
from meshward.operator.servers.policy import serve_policy
from meshward.operator.servers.signing import serve_rotating
from meshward.operator.webhooks.admission import AdmissionWebhooks, serve_webhooks
from meshward.sidecar.domain.egress import MESHED_ONLY, OPEN

# The shortest leaf lifetime --max-leaf-ttl accepts (tests and demos only; see docs/identity.md).
MIN_DEMO_TTL = dt.timedelta(seconds=10)
log = logging.getLogger("meshward.operator")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshward-operator", description="Meshward's Kopf operator and mesh CA.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--namespace", default=os.environ.get("MESHWARD_NAMESPACE", "meshward-system"),
                   help="the operator's namespace, home of the CA Secret (default $MESHWARD_NAMESPACE "
                        "or meshward-system)")
    p.add_argument("--trust-domain", default=os.environ.get("MESHWARD_TRUST_DOMAIN", "cluster.local"),
                   help="SPIFFE trust domain (default $MESHWARD_TRUST_DOMAIN or cluster.local)")
    p.add_argument("--signer-listen", default="0.0.0.0:15012", help="signing service address (default 0.0.0.0:15012)")
    p.add_argument("--policy-listen", default="0.0.0.0:15013",
                   help="policy distribution address, mTLS with workload certificates (default 0.0.0.0:15013)")
    p.add_argument("--signer-dns", default="", help="comma-separated DNS names of the signing service's "
                                                    "certificate (default meshward-signer.<namespace>.svc and "
                                                    "meshward-policy.<namespace>.svc)")
    p.add_argument("--signer-ip", default="127.0.0.1", help="comma-separated IPs of the signing service's certificate")
    p.add_argument("--max-leaf-ttl", default="", help="cap every workload certificate's lifetime, below the 5m "
                                                      "minimum if need be (e.g. 30s; tests and demos only)")
    p.add_argument("--egress-mode", default=os.environ.get("MESHWARD_EGRESS_MODE", OPEN),
                   help=f"egress of every meshed pod: {OPEN} (default; $MESHWARD_EGRESS_MODE) or "
                   f"{MESHED_ONLY} (meshed destinations and --egress-allow only); a Namespace's "
                   "meshward.io/egress annotations narrow it (docs/policies.md, Egress)")
    p.add_argument("--egress-allow", default=os.environ.get("MESHWARD_EGRESS_ALLOW", ""),
                   help="with --egress-mode meshed-only ($MESHWARD_EGRESS_ALLOW): networks (CIDR) with an "
                   "optional port, comma-separated (10.0.0.0/8:5432,192.0.2.7), that every meshed pod may reach")
    p.add_argument("--egress-dns-service", default=os.environ.get("MESHWARD_EGRESS_DNS_SERVICE", DNS_SERVICE),
                   help=f"namespace/name of the cluster DNS Service, reachable over TCP from locked pods (default "
                        f"$MESHWARD_EGRESS_DNS_SERVICE or {DNS_SERVICE})")
    p.add_argument("--status-interval", type=float, default=10.0, help="seconds between status refreshes")
    p.add_argument("--ca-interval", type=float, default=30.0, help="seconds between CA rotation checks")
    p.add_argument("--metrics-listen", default="0.0.0.0:15014", help="Prometheus metrics address ('off' to disable)")
    p.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                   help="run as one of several replicas: only the holder of Lease meshward-operator works "
                        "(default on)")
    p.add_argument("--pod-name", default=os.environ.get("POD_NAME", ""),
                   help="this replica's Pod (default $POD_NAME): the leader labels it meshward.io/leader=true, "
                        "which the chart's Services select")
    p.add_argument("--webhook-listen", default="0.0.0.0:15443",
                   help="admission webhooks (inject, validate) address, HTTPS ('off' to disable)")
    p.add_argument("--webhook-configurations", default=os.environ.get("MESHWARD_WEBHOOKS", ""),
                   help="the webhook configurations whose caBundle the operator keeps, e.g. "
                        "mutating:meshward-inject,validating:meshward-validate (default $MESHWARD_WEBHOOKS)")
    p.add_argument("--inject-image", default=os.environ.get("MESHWARD_INJECT_IMAGE", ""),
                   help="the image of the injected agent, Envoy and init container (default $MESHWARD_INJECT_IMAGE; "
                        "without it opted-in pods are refused)")
    p.add_argument("--inject-pull-policy", default=os.environ.get("MESHWARD_INJECT_PULL_POLICY", "IfNotPresent"),
                   help="imagePullPolicy of the injected containers (default $MESHWARD_INJECT_PULL_POLICY or "
                        "IfNotPresent)")
    p.add_argument("--inject-resources", default=os.environ.get("MESHWARD_INJECT_RESOURCES", ""),
                   help='resources of the injected containers, JSON {"agent": {...}, "proxy": {...}, "init": {...}} '
                        "(default $MESHWARD_INJECT_RESOURCES)")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, then in-cluster)")
    p.add_argument("--log-level", default=os.environ.get("MESHWARD_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING or ERROR (default $MESHWARD_LOG_LEVEL or INFO)")
    return p


def build(args: argparse.Namespace) -> tuple[kopf.OperatorRegistry, Runtime, CollectorRegistry, KubeClient]:
    """Build the runtime and the Kopf registry from the command line; raise SystemExit on bad flags."""
    try:
        spiffe_id(args.trust_domain, "default", "default")
    except ValueError as e:
        raise SystemExit(f"meshward-operator: --trust-domain: {e}") from e
    cap = None
    if args.max_leaf_ttl:
        try:
            cap = parse_ttl(args.max_leaf_ttl, MIN_DEMO_TTL, MAX_TTL)
        except ValueError as e:
            raise SystemExit(f"meshward-operator: --max-leaf-ttl: {e}") from e
    dns = tuple(d for d in args.signer_dns.split(",") if d) or (
        f"meshward-signer.{args.namespace}.svc", f"meshward-policy.{args.namespace}.svc",
        f"meshward-webhook.{args.namespace}.svc")
    ips = tuple(i for i in args.signer_ip.split(",") if i)
    kube = KubeClient.from_kubeconfig(args.kubeconfig)

    def clock() -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    serial = random_serial(os.urandom)
    ca = CaKeeper(kube, args.namespace, args.trust_domain, clock, serial, cap or MAX_TTL, dns, ips)
    directory = IdentityDirectory()
    engine = IssuanceEngine(kube, ca.signer, ca.bundle_pem, args.trust_domain, clock, serial, time.monotonic,
                            min_ttl=min(MIN_TTL, cap) if cap else MIN_TTL, ttl_cap=cap, directory=directory)
    hub = PolicyHub(clock, args.trust_domain)

    async def post_on_pod(namespace: str, name: str, uid: str, reason: str, message: str) -> None:
        try:
            await asyncio.to_thread(kube.post_event, namespace, "Pod", name, "Warning", reason, message, uid=uid)
        except KubeError as e:
            log.warning("%s", e)

    async def post_on_namespace(namespace: str, reason: str, message: str) -> None:
        try:
            await asyncio.to_thread(kube.post_event, namespace, "Namespace", namespace, "Warning", reason, message)
        except KubeError as e:
            log.warning("%s", e)

    try:
        egress = mesh_egress(args.egress_mode, args.egress_allow)
    except ValueError as e:
        raise SystemExit(f"meshward-operator: {e}") from e
    mesh = MeshDirectory(args.trust_domain, post=post_on_pod, egress=egress, post_namespace=post_on_namespace,
                         dns_service=args.egress_dns_service)
    reports = StatusReports(kube, ca, engine.stats, hub, directory, args.trust_domain, clock, mesh)
    identities = StatusWriter("ServiceIdentity", "serviceidentities", kube, reports.identity, args.status_interval)
    policies = StatusWriter("AuthPolicy", "authpolicies", kube, reports.policy, args.status_interval)
    revocations = StatusWriter("Revocation", "revocations", kube, reports.revocation, args.status_interval)

    def credentials() -> tuple[bytes, bytes]:
        return ca.server_cert().cert_pem, ca.server_cert().key_pem

    def start_signer() -> Awaitable[grpc.aio.Server]:
        return serve_rotating(engine, args.signer_listen, credentials)

    def start_policy() -> Awaitable[grpc.aio.Server]:
        return serve_policy(hub, engine.reviewer, args.policy_listen,
                            lambda: (*credentials(), ca.bundle_pem().encode()), mesh)

    metrics = CollectorRegistry()
    rt = Runtime(kube, args.namespace, args.trust_domain, ca, hub, start_signer, start_policy,
                 [identities, policies, revocations], ca_interval_s=args.ca_interval, mesh=mesh)

    def prime_mesh() -> Awaitable[None]:
        async def namespaces() -> list[dict[str, Any]]:
            return await asyncio.to_thread(kube.list_namespaces)

        async def service(namespace: str, name: str) -> dict[str, Any] | None:
            return await asyncio.to_thread(kube.read_service, namespace, name)
        return mesh.prime(namespaces, service)
    rt.prime_mesh = prime_mesh
    if args.webhook_listen != "off":
        def services(namespace: str) -> Awaitable[list[dict[str, object]]]:
            return asyncio.to_thread(kube.list_services, namespace)
        webhooks = AdmissionWebhooks(_inject_settings(args), args.trust_domain, clock, metrics, services=services,
                                     egress_locked=lambda namespace: mesh.egress(namespace).locked)

        def start_webhooks() -> Awaitable[web.AppRunner]:
            return serve_webhooks(webhooks, args.webhook_listen, credentials)
        rt.start_webhooks = start_webhooks
    try:
        configurations = parse_configurations(args.webhook_configurations)
    except ValueError as e:
        raise SystemExit(f"meshward-operator: --webhook-configurations: {e}") from e
    if configurations:
        rt.webhook_bundle = WebhookBundle(kube, configurations, ca.bundle_pem)

    async def post_unprotected(namespace: str, name: str, uid: str, message: str) -> None:
        await post_on_pod(namespace, name, uid, "MeshMissing", message)

    safety = SafetyNet(args.namespace, post_unprotected)
    registry = kopf.OperatorRegistry()
    lifecycle.register(registry, rt)
    service_identities.register(registry, directory, identities)
    policy_handlers.register(registry, hub, engine.reviewer, policies, revocations)
    mesh_handlers.register(registry, mesh, safety)
    register_metrics(metrics, ca, engine, hub, safety, mesh)
    return registry, rt, metrics, kube


def _inject_settings(args: argparse.Namespace) -> InjectSettings:
    """What the injector puts into pods, from the command line; SystemExit naming a bad flag."""
    base = InjectSettings(image=args.inject_image, operator_namespace=args.namespace, trust_domain=args.trust_domain,
                          version=__version__, image_pull_policy=args.inject_pull_policy)
    if not args.inject_resources:
        return base
    try:
        resources = json.loads(args.inject_resources)
        if not isinstance(resources, dict) or not set(resources) <= {"agent", "proxy", "init"}:
            raise ValueError("want an object with keys agent, proxy, init")
        for role, given in resources.items():
            problem = mesh_resources_problem(given, role) if isinstance(given, dict) else f"{role}: want an object"
            if problem is not None:
                raise ValueError(f"{problem} (the chart's injection.resources)")
    except ValueError as e:
        raise SystemExit(f"meshward-operator: --inject-resources: {e}") from e
    return dataclasses.replace(base, agent_resources=resources.get("agent", base.agent_resources),
                               proxy_resources=resources.get("proxy", base.proxy_resources),
                               init_resources=resources.get("init", base.init_resources))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the operator until SIGTERM/SIGINT."""
    args = _parser().parse_args(argv)
    if args.version:
        print(f"meshward-operator {__version__}")
        return 0
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level.upper() != "DEBUG":
        # Kopf logs every handler run at INFO (every watch event of every object).
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.kubeconfig:
        # Kopf's own login reads $KUBECONFIG; the operator's client takes the path directly.
        os.environ["KUBECONFIG"] = args.kubeconfig
    registry, rt, metrics, kube = build(args)
    election = None
    marker = LeaderMarker(kube, args.namespace, args.pod_name)
    rt.on_serving = functools.partial(marker.mark, True)
    # Also Kopf's identity: without one Kopf asks getpass.getuser(), which fails for a UID with no passwd
    # entry (the image runs as 65532).
    identity = f"{socket.gethostname()}-{os.getpid()}"
    if args.leader_elect:
        election = LeaderElection(kube, args.namespace, identity, lambda: dt.datetime.now(dt.UTC), time.monotonic)
    leader = Gauge("meshward_operator_leader", "1 while this replica leads (holds Lease meshward-operator).",
                   registry=metrics)
    if args.metrics_listen != "off":
        host, _, port = args.metrics_listen.rpartition(":")
        start_http_server(int(port), host or "0.0.0.0", registry=metrics)  # noqa: S104 - scraped in-cluster
    log.info("meshward-operator %s starting (namespace %s)", __version__, args.namespace)
    return asyncio.run(_lead(registry, identity, election, marker, leader))


async def _lead(registry: kopf.OperatorRegistry, identity: str, election: LeaderElection | None,
                marker: LeaderMarker, leader: Gauge) -> int:
    """Wait for the lease (if electing), then run Kopf until SIGTERM or until the lease is lost."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await marker.mark(False)  # a restarted container of a former leader must not attract traffic
    if election is not None and not await election.acquire(stop):
        return 0
    leader.set(1)  # the Pod is labelled leader once its servers listen (lifecycle's start-up, rt.on_serving)
    lost = asyncio.Event()

    async def hold() -> None:
        if election is not None:
            await election.hold()
            lost.set()

    holder = asyncio.create_task(hold())
    try:
        # Kopf installs its own SIGTERM/SIGINT handlers and stops gracefully on them, or when `lost` is set.
        await kopf.operator(registry=registry, clusterwide=True, standalone=True, stop_flag=lost,
                            identity=Identity(identity))
    finally:
        holder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holder
        leader.set(0)
        await marker.mark(False)
        if election is not None:
            await election.release()
    return 1 if lost.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
