"""Sidecar injection as one pure function: an opted-in Pod in, the Pod with the mesh out.

Why pure: the admission webhook, `meshward inject -f` (GitOps pipelines that render
manifests first) and the golden-file tests must produce the very same pod, and a
webhook that can be called twice (reinvocation, retries) must change nothing the
second time. What the injected pod gets, and why:
- three init containers before the user's own: `meshward-init` installs the capture
  rules (sidecar/domain/capture.py; the only step with NET_ADMIN/NET_RAW), then the
  agent and Envoy as native sidecars (`restartPolicy: Always`): each must be started
  (its startup probe passing: a certificate, the first policy, Envoy ready) before the
  next container starts, so the user's init containers and app never run unprotected,
  and they stop after the app;
- the agent subscribes to its certificate and policy from the operator's Services with
  the pod's projected ServiceAccount token (audience `meshward`, 10 minutes) and the
  namespace's trust bundle; Envoy gets everything from the agent over Unix sockets;
- the app's HTTP, TCP and gRPC probes go to the agent's admin port, which is never
  captured, and the agent probes the app as kubelet would have (strict mTLS would
  refuse kubelet's plaintext otherwise); the originals travel in the agent's env;
- everything Meshward adds runs as PROXY_UID, non-root, read-only root filesystem, all
  capabilities dropped, but the init container.
What it refuses, with the reason: pods on the host network (capturing them would capture
the node), app containers running as PROXY_UID or with its GID (their traffic would
bypass capture, or reach the mesh's files), any container of the pod's own mounting a
mesh volume (the SDS socket hands out the workload's key), a shared process namespace
(the app would see the agent's and Envoy's processes), names that clash with Meshward's,
mesh annotations it cannot parse or over their bounds (ANNOTATION_BOUNDS; the sidecars'
CPU and memory within RESOURCE_BOUNDS, no request above its limit), probes on ports the
container does not declare. Ephemeral containers (`kubectl debug`) are
reviewed with the same rules (`check_ephemeral`). A pod that arrives with the mesh
already in it (`meshward inject`, a reinvocation, or a hand-made imitation) is injected
again from what it is without the mesh (`uninject`): what runs is always exactly what
this injector makes, with every refusal applied.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from meshward.operator.domain.quantity import QuantityError, parse_quantity
from meshward.sidecar.domain.capture import (
    AGENT_ADMIN_PORT,
    PROXY_HEALTH_PORT,
    PROXY_UID,
    CaptureError,
    parse_cidrs,
    parse_ports,
)
from meshward.sidecar.domain.envoy import parse_duration
from meshward.sidecar.domain.probes import PROBES_ENV

INJECT_LABEL = "meshward.io/inject"
ENABLED, DISABLED = "enabled", "disabled"
# Written on every injected pod: the injector's version (which sidecar a pod runs, for upgrades).
INJECTED_ANNOTATION = "meshward.io/injected"
# Per-workload settings, on the pod template (docs/app-teams.md).
EXCLUDE_INBOUND_PORTS = "meshward.io/exclude-inbound-ports"
# Ports the workload declares TCP (numbers or its container ports' names): meshed callers may tunnel connections to
# them over mTLS, decided by L4 rules (issue 20). Only declared ports: on any other, a tunnel is refused, so no
# meshed caller can hand an HTTP app bytes its HTTP rules never saw.
TCP_PORTS = "meshward.io/tcp-ports"
# A Service port declares TCP for the pods it selects (issue 20, as Istio reads a port's protocol): its `appProtocol`
# names one of these non-HTTP protocols, or its name is `tcp` or starts with `tcp-`. Its target port is then declared
# as if the pod's annotation named it; read at admission, from the Services of the pod's namespace at that moment.
# An explicit list, not "anything not HTTP": `https`, `tls` or a vendor's `example.com/x` keep today's behaviour.
TCP_APP_PROTOCOLS = frozenset({"tcp", "mysql", "mysqlx", "postgresql", "postgres", "redis", "mongo", "mongodb",
                               "kafka", "amqp", "mqtt", "nats", "zookeeper", "cassandra", "memcached", "smtp", "ldap"})
EXCLUDE_OUTBOUND_PORTS = "meshward.io/exclude-outbound-ports"
EXCLUDE_OUTBOUND_CIDRS = "meshward.io/exclude-outbound-cidrs"
INBOUND_PLAINTEXT = "meshward.io/inbound-plaintext"
PLAINTEXT_VALUES = ("refuse", "allow")
# How the workload's Envoy treats HTTP streams, inbound and outbound (sidecar/domain/envoy.py, HttpSettings): a route
# timeout (none by default: the app's own timeouts rule), a stream idle timeout (5 minutes by default), HTTP/1.0.
ROUTE_TIMEOUT = "meshward.io/route-timeout"
STREAM_IDLE_TIMEOUT = "meshward.io/stream-idle-timeout"
ACCEPT_HTTP10 = "meshward.io/accept-http10"
BOOLEAN_VALUES = ("true", "false")
# Bounds of each mesh annotation: (characters, comma-separated items). Generous for real workloads (Istio's users list
# a handful of ports), and what keeps one pod's settings from growing what every agent of the mesh receives: the
# excluded inbound ports go into the destination map (domain/destinations.py), the rest into the pod's own spec.
# A 256 KiB exclusion once pushed that map past gRPC's 4 MiB for every agent (issue 18). The map applies the
# same bounds to pods it reads, since annotations can be edited after admission.
# The sidecars' CPU and memory for one workload: each annotation replaces one field of the mesh's resources for that
# container (the chart's injection.resources, InjectSettings); the fields it does not name stay the mesh's.
AGENT_CPU, AGENT_CPU_LIMIT = "meshward.io/agent-cpu", "meshward.io/agent-cpu-limit"
AGENT_MEMORY, AGENT_MEMORY_LIMIT = "meshward.io/agent-memory", "meshward.io/agent-memory-limit"
PROXY_CPU, PROXY_CPU_LIMIT = "meshward.io/proxy-cpu", "meshward.io/proxy-cpu-limit"
PROXY_MEMORY, PROXY_MEMORY_LIMIT = "meshward.io/proxy-memory", "meshward.io/proxy-memory-limit"
# Each resource annotation's container, field (requests or limits) and resource.
RESOURCE_ANNOTATIONS: Mapping[str, tuple[str, str, str]] = {
    AGENT_CPU: ("agent", "requests", "cpu"), AGENT_CPU_LIMIT: ("agent", "limits", "cpu"),
    AGENT_MEMORY: ("agent", "requests", "memory"), AGENT_MEMORY_LIMIT: ("agent", "limits", "memory"),
    PROXY_CPU: ("proxy", "requests", "cpu"), PROXY_CPU_LIMIT: ("proxy", "limits", "cpu"),
    PROXY_MEMORY: ("proxy", "requests", "memory"), PROXY_MEMORY_LIMIT: ("proxy", "limits", "memory"),
}
# The least and most a sidecar's request or limit may be (Kubernetes quantities), with why. Measured
# (docs/performance.md, "Pod-to-pod hop"): ~69 MiB RSS per Envoy and ~68 MiB per agent with a small config, the agent
# 65.5 MiB with 10,000 cached tokens ("Authorization hot path"); Envoy 0.13-0.18 vCPU per 1,000 rps, the agent 0.05.
# - a memory limit under 96 Mi is less than ~40 % above that idle footprint: lower still, the sidecar is OOM-killed at
#   its start and the pod never serves; the headroom is for cached tokens and a config push (decoded beside the
#   config in force);
# - a CPU limit under 50m throttles Envoy at ~300 requests per second (and slows every start);
# - the request floors catch unit typos: "64" is 64 bytes and "64m" 0.064 of one (16 Mi is the mesh's own smallest
#   request, the init container's); a CPU request of 0 gives the sidecar no share under contention;
# - the ceilings catch the other typos ("64Gi" for "64Mi", "100" for "100m"): Envoy runs two workers and the agent one
#   event loop, neither can use 16 cores, and nothing measured comes near 8 Gi.
RESOURCE_BOUNDS: Mapping[tuple[str, str], tuple[str, str]] = {
    ("requests", "cpu"): ("1m", "16"),
    ("limits", "cpu"): ("50m", "16"),
    ("requests", "memory"): ("16Mi", "8Gi"),
    ("limits", "memory"): ("96Mi", "8Gi"),
}
ANNOTATION_BOUNDS: Mapping[str, tuple[int, int]] = {
    EXCLUDE_INBOUND_PORTS: (512, 64),
    TCP_PORTS: (512, 64),
    EXCLUDE_OUTBOUND_PORTS: (512, 64),
    EXCLUDE_OUTBOUND_CIDRS: (1536, 64),
    INBOUND_PLAINTEXT: (16, 1),
    ROUTE_TIMEOUT: (16, 1),
    STREAM_IDLE_TIMEOUT: (16, 1),
    ACCEPT_HTTP10: (16, 1),
    **{key: (16, 1) for key in RESOURCE_ANNOTATIONS},
}
_EXAMPLES = {EXCLUDE_INBOUND_PORTS: "9090,9100", TCP_PORTS: "5432,redis", EXCLUDE_OUTBOUND_PORTS: "5432",
             EXCLUDE_OUTBOUND_CIDRS: "10.0.0.0/8", INBOUND_PLAINTEXT: "refuse", ROUTE_TIMEOUT: "30s",
             STREAM_IDLE_TIMEOUT: "5m", ACCEPT_HTTP10: "true",
             **{key: {("requests", "cpu"): "200m", ("requests", "memory"): "128Mi",
                      ("limits", "cpu"): "1", ("limits", "memory"): "512Mi"}[kind, resource]
                for key, (_, kind, resource) in RESOURCE_ANNOTATIONS.items()}}
# Namespaces never injected, whatever their labels say: the operator's own (it would wait for itself) and
# the cluster's system pods.
NEVER_INJECTED = ("kube-system", "kube-public", "kube-node-lease")

INIT, AGENT, PROXY = "meshward-init", "meshward-agent", "meshward-proxy"
SOCKETS, BUNDLE, TOKEN = "meshward-sockets", "meshward-bundle", "meshward-token"
SOCKET_DIR = "/var/run/meshward"
# The audience of the pod's projected token that the signer and the policy service accept: only the agent's.
MESH_AUDIENCE = "meshward"
# The projected token's lifetime: the API server's minimum (kubelet refreshes it at 80%).
TOKEN_EXPIRATION_S = 600
_PROBE_KINDS = (("livenessProbe", "livez"), ("readinessProbe", "readyz"), ("startupProbe", "startupz"))
# A native sidecar's startup may wait this long (a certificate and the first policy): 1 s probes, 5 minutes.
STARTUP_FAILURE_THRESHOLD = 300


class InjectRefused(ValueError):
    """The pod cannot be injected safely; the message says why and what to change."""


@dataclass(frozen=True)
class InjectSettings:
    """What the injector puts into pods: the image and where the operator's Services are."""

    image: str
    operator_namespace: str = "meshward-system"
    trust_domain: str = "cluster.local"
    version: str = "dev"
    image_pull_policy: str = "IfNotPresent"
    log_level: str = "INFO"
    agent_resources: Mapping[str, Any] = field(default_factory=lambda: {
        "requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}})
    proxy_resources: Mapping[str, Any] = field(default_factory=lambda: {
        "requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}})
    init_resources: Mapping[str, Any] = field(default_factory=lambda: {
        "requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}})


def opted_in(pod: Mapping[str, Any], namespace: str, namespace_opted_in: bool, operator_namespace: str) -> bool:
    """Whether `pod` is to run the mesh: its label says so, or its namespace's does and the pod does not opt out."""
    if namespace in NEVER_INJECTED or namespace == operator_namespace:
        return False
    label = (pod.get("metadata", {}).get("labels") or {}).get(INJECT_LABEL)
    return label == ENABLED or (namespace_opted_in and label != DISABLED)


def is_injected(pod: Mapping[str, Any]) -> bool:
    """Whether `pod` carries the mesh's containers (as the injector makes them, once it passed the webhook)."""
    init = pod.get("spec", {}).get("initContainers") or []
    return any(isinstance(c, dict) and c.get("name") == AGENT for c in init)


def _mesh_flag(pod: Mapping[str, Any], container: str, flag: str) -> str:
    """The value of `flag` in the command of the mesh's init container `container` ('' if absent).

    The spec, not the annotation: a pod's annotations can be edited after admission (and by then change nothing
    the mesh's containers were given), its init containers cannot.
    """
    for c in pod.get("spec", {}).get("initContainers") or []:
        if isinstance(c, dict) and c.get("name") == container:
            command = [str(x) for x in c.get("command") or []]
            if flag in command[:-1]:
                return command[command.index(flag) + 1]
    return ""


def excluded_inbound_ports(pod: Mapping[str, Any]) -> str:
    """The inbound ports an injected pod leaves outside the mesh, as its capture container was given ('' if none)."""
    return _mesh_flag(pod, INIT, "--exclude-inbound-ports")


def declared_tcp_ports(pod: Mapping[str, Any]) -> str:
    """The ports an injected pod declares TCP, as given to its proxy container ('' if none)."""
    return _mesh_flag(pod, PROXY, "--tcp-ports")


def unprotected(pods: Sequence[Mapping[str, Any]], opted_in_namespaces: set[str], operator_namespace: str
                ) -> list[str]:
    """`namespace/name` of every running pod that opted in but carries no mesh (webhook bypassed, label too late)."""
    out = []
    for pod in pods:
        meta = pod.get("metadata", {})
        namespace = str(meta.get("namespace", ""))
        if meta.get("deletionTimestamp") or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            continue
        if opted_in(pod, namespace, namespace in opted_in_namespaces, operator_namespace) and not is_injected(pod):
            out.append(f"{namespace}/{meta.get('name', '')}")
    return sorted(out)


def _security(uid: int, *, add: tuple[str, ...] = ()) -> dict[str, Any]:
    ctx: dict[str, Any] = {"runAsUser": uid, "runAsGroup": uid, "runAsNonRoot": uid != 0,
                           "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                           "capabilities": {"drop": ["ALL"], **({"add": list(add)} if add else {})},
                           "seccompProfile": {"type": "RuntimeDefault"}}
    return ctx


def _env(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            # Both families' addresses on a dual-stack cluster, comma-separated: the agent's outbound calls to them
            # stay in the pod (sidecar/domain/envoy.py, outbound_resources).
            {"name": "POD_IPS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIPs"}}}, *extra]


def _http_probe(path: str, port: int, period_s: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period_s, "failureThreshold": failures}


def _annotation(pod: Mapping[str, Any], key: str) -> str:
    value = (pod.get("metadata", {}).get("annotations") or {}).get(key, "")
    return value if isinstance(value, str) else ""


def _port_number(container: Mapping[str, Any], port: Any, where: str) -> int:
    """A probe's port as a number: given, or looked up among the container's named ports."""
    if isinstance(port, int) and not isinstance(port, bool):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port and isinstance(p.get("containerPort"), int):
            return int(p["containerPort"])
    raise InjectRefused(f"{where}: port {port!r} is not a port of this container; name one of its ports or use "
                        "a number")


def declared_ports(pod: Mapping[str, Any]) -> dict[str, int]:
    """The pod's named TCP container ports (every container, native sidecars too), name -> number."""
    spec = pod.get("spec") or {}
    out: dict[str, int] = {}
    for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        for p in c.get("ports") or [] if isinstance(c, Mapping) else []:
            if isinstance(p, Mapping) and p.get("protocol", "TCP") == "TCP" and isinstance(p.get("name"), str) \
                    and isinstance(p.get("containerPort"), int):
                out.setdefault(p["name"], int(p["containerPort"]))
    return out


def resolve_port_names(text: str, pod: Mapping[str, Any], setting: str) -> str:
    """`text` (a comma-separated port list) with each port name replaced by the pod's container port of that name.

    As a Service's `targetPort` may name a port, so may an exclusion: `"grpc,9100"` leaves out the port a container
    declares as `grpc`. Raise InjectRefused naming `setting` for a name no container of the pod declares.
    """
    named = declared_ports(pod)
    out = []
    for item in (p.strip() for p in text.split(",")):
        if item and not item.isdigit():
            if item not in named:
                known = ", ".join(f"{n}={v}" for n, v in sorted(named.items())) or "none"
                raise InjectRefused(f"{setting}: {item!r} is neither a port number nor the name of a TCP port a "
                                    f"container of the pod declares (ports[].name; declared: {known}); name one "
                                    "of them or write the number")
            item = str(named[item])
        out.append(item)
    return ",".join(out)


# Service port names that declare TCP without an appProtocol: Istio's non-HTTP names (`<protocol>` or
# `<protocol>-<suffix>`: its port-naming convention, which charts follow: `tcp-redis`, `mysql`), and `mongodb`,
# as MongoDB's charts name it.
TCP_PORT_NAMES = ("tcp", "redis", "mysql", "mongo", "mongodb")
# ... but for the names Prometheus exporters' charts give their HTTP ports (prometheus-community's redis and mysql
# exporters: `redis-exporter`, `mysql-exporter`), which Istio would take for Redis and MySQL (a `tcp-` name is TCP).
HTTP_NAME_SUFFIXES = ("-exporter", "-metrics")


def declares_tcp(port: Mapping[str, Any]) -> bool:
    """Whether a Service port declares TCP: by its appProtocol (TCP_APP_PROTOCOLS), else by its name (TCP_PORT_NAMES).

    As Istio reads a port's protocol, `appProtocol` comes first: `tcp-web` with `appProtocol: http` is HTTP.
    """
    app_protocol = port.get("appProtocol")
    if app_protocol:
        return str(app_protocol).lower() in TCP_APP_PROTOCOLS
    name = str(port.get("name") or "").lower()
    if name == "tcp" or name.startswith("tcp-"):  # said outright
        return True
    return not name.endswith(HTTP_NAME_SUFFIXES) and any(name == n or name.startswith(f"{n}-") for n in TCP_PORT_NAMES)


def service_tcp_ports(services: Iterable[Mapping[str, Any]], pod: Mapping[str, Any]) -> dict[int, str]:
    """The pod's ports that Services selecting it declare TCP (declares_tcp), each with the Service port saying so.

    Every target port is resolved on the pod. A Service selects the pod when its selector is a non-empty subset of
    the pod's labels, as the EndpointSlice controller reads it (ExternalName Services select nothing). A named
    target port the pod does not declare is skipped: that Service sends this pod no traffic on it. Malformed
    Services declare nothing.
    """
    labels = (pod.get("metadata") or {}).get("labels") or {}
    named = declared_ports(pod)
    out: dict[int, str] = {}
    for svc in services:
        spec = svc.get("spec") if isinstance(svc, Mapping) else None
        if not isinstance(spec, Mapping) or spec.get("type") == "ExternalName":
            continue
        selector, ports = spec.get("selector"), spec.get("ports")
        if not isinstance(selector, Mapping) or not selector or not isinstance(ports, list) \
                or any(labels.get(k) != v for k, v in selector.items()):
            continue
        for port in ports:
            if not isinstance(port, Mapping) or port.get("protocol", "TCP") != "TCP" or not declares_tcp(port):
                continue
            target = port.get("targetPort", port.get("port"))
            number = named.get(target) if isinstance(target, str) and not target.isdigit() else target
            if number is not None and str(number).isdigit() and 0 < int(number) < 65536:
                out.setdefault(int(number), f"Service {(svc.get('metadata') or {}).get('name')} port "
                                            f"{port.get('name') or port.get('port')}")
    return dict(sorted(out.items()))


def _rewrite_probes(container: dict[str, Any], where: str, excluded: tuple[int, ...],
                    originals: dict[str, Any]) -> None:
    """Point the container's network probes at the agent, recording the originals in `originals`."""
    for key, kind in _PROBE_KINDS:
        probe = container.get(key)
        if not isinstance(probe, dict):
            continue
        here = f"{where}.{key}"
        handler: dict[str, Any]
        if isinstance(probe.get("httpGet"), dict) and not probe["httpGet"].get("host"):
            get = probe["httpGet"]
            port = _port_number(container, get.get("port"), f"{here}.httpGet")
            handler = {"httpGet": {"path": get.get("path") or "/", "port": port,
                                   "scheme": get.get("scheme") or "HTTP",
                                   **({"httpHeaders": get["httpHeaders"]} if get.get("httpHeaders") else {})}}
        elif isinstance(probe.get("tcpSocket"), dict) and not probe["tcpSocket"].get("host"):
            port = _port_number(container, probe["tcpSocket"].get("port"), f"{here}.tcpSocket")
            handler = {"tcpSocket": {"port": port}}
        elif isinstance(probe.get("grpc"), dict):
            port = _port_number(container, probe["grpc"].get("port"), f"{here}.grpc")
            handler = {"grpc": {"port": port, **({"service": probe["grpc"]["service"]}
                                                 if probe["grpc"].get("service") else {})}}
        else:
            continue  # exec probes, or probes of another host: never captured
        if port in excluded:
            continue
        path = f"/app-health/{container['name']}/{kind}"
        originals[path] = {**handler, "timeoutSeconds": int(probe.get("timeoutSeconds") or 1)}
        rest = {k: v for k, v in probe.items() if k not in ("httpGet", "tcpSocket", "grpc")}
        container[key] = {**rest, "httpGet": {"path": path, "port": AGENT_ADMIN_PORT, "scheme": "HTTP"}}


def may_become_the_proxy(pod: Mapping[str, Any]) -> list[str]:
    """Names of an injected pod's own containers that may run as root with CAP_SETUID, so could become PROXY_UID.

    Inherent to sidecars (Istio's too): root with its default capabilities can setuid(1337), whose traffic the capture
    exempts. Only the pod's own securityContext can rule it out: runAsNonRoot, a non-zero runAsUser, or SETUID dropped.
    """
    spec = pod.get("spec", {})
    pod_ctx = spec.get("securityContext")
    out = []
    for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        if not isinstance(c, dict) or str(c.get("name", "")).startswith("meshward-"):
            continue
        ctx = c.get("securityContext")
        uid = _field(ctx, "runAsUser")
        uid = uid if uid is not None else _field(pod_ctx, "runAsUser")
        non_root = _field(ctx, "runAsNonRoot")
        non_root = non_root if non_root is not None else _field(pod_ctx, "runAsNonRoot")
        dropped = {str(x).upper().removeprefix("CAP_") for x in (_field(_field(ctx, "capabilities"), "drop") or [])}
        if non_root is True or (uid is not None and uid != 0) or dropped & {"ALL", "SETUID"}:
            continue
        out.append(str(c.get("name", "")))
    return out


def _field(ctx: Any, key: str) -> Any:
    return ctx.get(key) if isinstance(ctx, dict) else None


def _check_container(c: Mapping[str, Any], where: str, pod_ctx: Any) -> None:
    """Raise InjectRefused for a container of the pod's own that could get around the mesh or into it."""
    if str(c.get("name", "")).startswith("meshward-"):
        raise InjectRefused(f"{where}.name: {c.get('name')!r}: names starting with meshward- are Meshward's; rename "
                            "the container")
    ctx = c.get("securityContext")
    uid = _field(ctx, "runAsUser")
    if (uid if uid is not None else _field(pod_ctx, "runAsUser")) == PROXY_UID:
        raise InjectRefused(f"{where} ({c.get('name')}): runs as UID {PROXY_UID}, the mesh proxy's, whose traffic is "
                            "never captured; run it as another user")
    gid = _field(ctx, "runAsGroup")
    if (gid if gid is not None else _field(pod_ctx, "runAsGroup")) == PROXY_UID:
        raise InjectRefused(f"{where} ({c.get('name')}).securityContext.runAsGroup: {PROXY_UID} is the mesh proxy's "
                            "group; run it with another group")
    for kind in ("volumeMounts", "volumeDevices"):
        for n, m in enumerate(c.get(kind) or []):
            if isinstance(m, dict) and str(m.get("name", "")).startswith("meshward-"):
                raise InjectRefused(f"{where}.{kind}[{n}].name: {m.get('name')!r} is a volume of the mesh (it holds "
                                    "the workload's key and the proxy's sockets); only Meshward's containers mount it: "
                                    "remove the mount")


def annotation_problem(key: str, value: str) -> str | None:
    """Why mesh annotation `key` with `value` is over its bounds (naming it and the fix), or None when it is not."""
    bounds = ANNOTATION_BOUNDS.get(key)
    if bounds is None:
        return None
    chars, items = bounds
    if len(value) > chars:
        return (f"metadata.annotations[{key}]: {len(value)} characters, more than the {chars} allowed; list at "
                f"most {items} values, e.g. \"{_EXAMPLES[key]}\"")
    count = sum(1 for item in value.split(",") if item.strip())
    if count > items == 1:
        return f"metadata.annotations[{key}]: {count} values; it takes one, e.g. \"{_EXAMPLES[key]}\""
    if count > items:
        return (f"metadata.annotations[{key}]: {count} values, more than the {items} allowed; list only what the "
                f"mesh must leave alone, e.g. \"{_EXAMPLES[key]}\"")
    return None


def check_annotation_bounds(pod: Mapping[str, Any]) -> None:
    """Raise InjectRefused for a mesh annotation over its bounds (ANNOTATION_BOUNDS), naming it and the fix."""
    for key in ANNOTATION_BOUNDS:
        problem = annotation_problem(key, _annotation(pod, key))
        if problem is not None:
            raise InjectRefused(problem)


def _check(pod: Mapping[str, Any]) -> None:
    """Raise InjectRefused for a pod the mesh cannot protect, naming the field and the fix."""
    spec = pod.get("spec", {})
    if spec.get("hostNetwork"):
        raise InjectRefused("spec.hostNetwork: a pod on the node's network cannot be captured without capturing "
                            f"the node; run it off the host network or label it {INJECT_LABEL}={DISABLED}")
    if spec.get("shareProcessNamespace"):
        raise InjectRefused("spec.shareProcessNamespace: the app would see the agent's and Envoy's processes (and "
                            "could signal them, or reach their files through /proc); remove it, or label the pod "
                            f"{INJECT_LABEL}={DISABLED}")
    pod_ctx = spec.get("securityContext")
    for key in ("fsGroup", "runAsGroup"):
        if _field(pod_ctx, key) == PROXY_UID:
            raise InjectRefused(f"spec.securityContext.{key}: {PROXY_UID} is the mesh proxy's group; use another")
    if PROXY_UID in (_field(pod_ctx, "supplementalGroups") or []):
        raise InjectRefused(f"spec.securityContext.supplementalGroups: {PROXY_UID} is the mesh proxy's group; remove "
                            "it")
    for group in ("initContainers", "containers", "ephemeralContainers"):
        for n, c in enumerate(spec.get(group) or []):
            _check_container(c, f"spec.{group}[{n}]", pod_ctx)
    for n, v in enumerate(spec.get("volumes") or []):
        if str(v.get("name", "")).startswith("meshward-"):
            raise InjectRefused(f"spec.volumes[{n}].name: {v.get('name')!r}: names starting with meshward- are "
                                "Meshward's; rename the volume")
        for k, source in enumerate(_field(_field(v, "projected"), "sources") or []):
            if _field(_field(source, "serviceAccountToken"), "audience") == MESH_AUDIENCE:
                raise InjectRefused(f"spec.volumes[{n}].projected.sources[{k}].serviceAccountToken.audience: "
                                    f"{MESH_AUDIENCE!r} is the mesh's own: with it a container asks the signer for "
                                    "the workload's certificate and key; use another audience")
    plaintext = _annotation(pod, INBOUND_PLAINTEXT) or "refuse"
    if plaintext not in PLAINTEXT_VALUES:
        raise InjectRefused(f"metadata.annotations[{INBOUND_PLAINTEXT}]: {plaintext!r} must be refuse (the "
                            "default) or allow (while migrating: plaintext callers reach the app with no peer)")
    _http_args(pod)


def _http_args(pod: Mapping[str, Any]) -> list[str]:
    """The HTTP settings of the workload's Envoy as flags of meshward-proxy and meshward-sidecar alike (none if unset).

    Raises InjectRefused naming the annotation that is malformed or out of its bounds.
    """
    args: list[str] = []
    for key, flag, zero_is_none in ((ROUTE_TIMEOUT, "--route-timeout", True),
                                    (STREAM_IDLE_TIMEOUT, "--stream-idle-timeout", False)):
        value = _annotation(pod, key).strip()
        if not value:
            continue
        try:
            parse_duration(value, zero_is_none=zero_is_none)
        except ValueError as e:
            raise InjectRefused(f"metadata.annotations[{key}]: {e}") from e
        args += [flag, value]
    http10 = _annotation(pod, ACCEPT_HTTP10).strip() or "false"
    if http10 not in BOOLEAN_VALUES:
        raise InjectRefused(f"metadata.annotations[{ACCEPT_HTTP10}]: {http10!r} must be true (HTTP/1.0 requests are "
                            "served) or false (the default: Envoy answers them 426)")
    return [*args, "--accept-http10"] if http10 == "true" else args


def mesh_resources_problem(resources: Mapping[str, Any], where: str) -> str | None:
    """Why the mesh's resources of one injected container (`where` names the setting) are unusable, or None."""
    amounts: dict[tuple[str, str], Fraction] = {}
    for kind in ("requests", "limits"):
        given = resources.get(kind) or {}
        if not isinstance(given, dict):
            return f"{where}.{kind}: want an object such as {{cpu: 50m, memory: 64Mi}}"
        for resource, value in given.items():
            try:
                amounts[kind, str(resource)] = parse_quantity(str(value))
            except QuantityError as e:
                return f"{where}.{kind}.{resource}: {e}"
    for resource in ("cpu", "memory"):
        request, limit = amounts.get(("requests", resource)), amounts.get(("limits", resource))
        if request is not None and limit is not None and request > limit:
            return f"{where}.requests.{resource}: above {where}.limits.{resource}; lower it or raise the limit"
    return None


def _sidecar_resources(pod: Mapping[str, Any], settings: InjectSettings) -> dict[str, dict[str, Any]]:
    """The agent's and Envoy's resources ("agent", "proxy"): the mesh's, with the pod's resource annotations in place.

    Raises InjectRefused naming the annotation that is malformed, out of RESOURCE_BOUNDS, or a request above its
    container's limit (or a limit below its request).
    """
    mesh = {"agent": settings.agent_resources, "proxy": settings.proxy_resources}
    out = {role: copy.deepcopy(dict(resources)) for role, resources in mesh.items()}
    given: set[tuple[str, str, str]] = set()
    for key, (role, kind, resource) in RESOURCE_ANNOTATIONS.items():
        value = _annotation(pod, key).strip()
        if not value:
            continue
        try:
            amount = parse_quantity(value)
        except QuantityError as e:
            raise InjectRefused(f"metadata.annotations[{key}]: {e}; write e.g. \"{_EXAMPLES[key]}\", or remove it "
                                "for the mesh's") from e
        least, most = RESOURCE_BOUNDS[kind, resource]
        if not parse_quantity(least) <= amount <= parse_quantity(most):
            raise InjectRefused(f"metadata.annotations[{key}]: {value} is outside {least} to {most}, the "
                                f"bounds of a sidecar's {resource} {kind[:-1]} (docs/app-teams.md); e.g. "
                                f"\"{_EXAMPLES[key]}\", or remove it for the mesh's")
        out[role][kind] = {**(out[role].get(kind) or {}), resource: value}
        given.add((role, kind, resource))
    keys = {v: k for k, v in RESOURCE_ANNOTATIONS.items()}
    for role, resource in sorted({(role, resource) for role, _, resource in given}):
        request, limit = ((out[role].get(kind) or {}).get(resource) for kind in ("requests", "limits"))
        if request is None or limit is None:
            continue
        try:
            over = parse_quantity(str(request)) > parse_quantity(str(limit))
        except QuantityError as e:
            raise InjectRefused(f"the mesh's resources of its {role} (the chart's injection.resources.{role}): {e}; "
                                "fix the operator's installation") from e
        if not over:
            continue
        request_key, limit_key = keys[role, "requests", resource], keys[role, "limits", resource]
        if (role, "requests", resource) not in given:
            raise InjectRefused(f"metadata.annotations[{limit_key}]: {limit} is below the {role}'s {resource} request "
                                f"{request} (the mesh's, the chart's injection.resources.{role}.requests.{resource}); "
                                f"set {request_key} too, at most as high, or allow more")
        if (role, "limits", resource) in given:
            raise InjectRefused(f"metadata.annotations[{request_key}]: {request} is above {limit_key}, {limit}; "
                                "a request cannot exceed its limit: lower one or raise the other")
        raise InjectRefused(f"metadata.annotations[{request_key}]: {request} is above the {role}'s {resource} limit "
                            f"{limit} (the mesh's, the chart's injection.resources.{role}.limits.{resource}); set "
                            f"{limit_key} too, at least as high, or ask for less")
    return out


# Capabilities with which a container can change the pod's network namespace (the capture rules) or leave it.
_POD_ESCAPING_CAPABILITIES = frozenset({"ALL", "NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_MODULE", "BPF"})


def check_ephemeral(pod: Mapping[str, Any]) -> None:
    """Raise InjectRefused for an ephemeral container (`kubectl debug`) that could get around an injected pod's mesh."""
    spec = pod.get("spec", {})
    for n, c in enumerate(spec.get("ephemeralContainers") or []):
        where = f"spec.ephemeralContainers[{n}]"
        _check_container(c, where, spec.get("securityContext"))
        ctx = c.get("securityContext")
        added = {str(x).upper().removeprefix("CAP_") for x in (_field(_field(ctx, "capabilities"), "add") or [])}
        if _field(ctx, "privileged") or added & _POD_ESCAPING_CAPABILITIES:
            raise InjectRefused(f"{where}.securityContext: privileged or {', '.join(sorted(added)) or 'capabilities'} "
                                "would let a debug container rewrite the pod's traffic capture (kubectl debug "
                                "--profile=netadmin or sysadmin); use --profile=general or restricted")
        target = str(c.get("targetContainerName") or "")
        if target.startswith("meshward-"):
            raise InjectRefused(f"{where}.targetContainerName: {target!r}: debugging the mesh's own containers would "
                                "share their processes (and the workload's key); target the app's container")


def uninject(pod: Mapping[str, Any]) -> dict[str, Any]:
    """`pod` without what the injector adds: its containers and volumes, and the app's probes as they were."""
    out: dict[str, Any] = copy.deepcopy(dict(pod))
    spec = out.get("spec", {})
    init = [c for c in spec.get("initContainers") or [] if isinstance(c, dict)]
    originals: dict[str, Any] = {}
    for c in init:
        if c.get("name") == AGENT:
            for e in c.get("env") or []:
                if isinstance(e, dict) and e.get("name") == PROBES_ENV:
                    try:
                        parsed = json.loads(str(e.get("value") or "{}"))
                    except ValueError:
                        parsed = {}
                    originals = parsed if isinstance(parsed, dict) else {}
    kept = [c for c in init if c.get("name") not in (INIT, AGENT, PROXY)]
    for c in [*(spec.get("containers") or []), *kept]:
        if not isinstance(c, dict):
            continue
        for key, kind in _PROBE_KINDS:
            probe = c.get(key)
            get = probe.get("httpGet") if isinstance(probe, dict) else None
            path = f"/app-health/{c.get('name')}/{kind}"  # only what the injector itself rewrote is restored
            original = originals.get(path) if isinstance(get, dict) and get.get("port") == AGENT_ADMIN_PORT and \
                get.get("path") == path and not get.get("host") else None
            handlers = {"httpGet", "tcpSocket", "grpc"}
            if isinstance(probe, dict) and isinstance(original, dict) and len(handlers & set(original)) == 1:
                handler = {k: v for k, v in original.items() if k in handlers}
                c[key] = {**{k: v for k, v in probe.items() if k != "httpGet"}, **handler}
    if "initContainers" in spec:
        if kept:
            spec["initContainers"] = kept
        else:
            del spec["initContainers"]
    if "volumes" in spec:
        mesh = (SOCKETS, BUNDLE, TOKEN)
        volumes = [v for v in spec["volumes"] if not (isinstance(v, dict) and v.get("name") in mesh)]
        if volumes:
            spec["volumes"] = volumes
        else:
            del spec["volumes"]
    return out


def inject(pod: Mapping[str, Any], settings: InjectSettings, services: Sequence[Mapping[str, Any]] = ()
           ) -> dict[str, Any]:
    """`pod` with the mesh added (unchanged if it has it already); raise InjectRefused if it cannot be protected.

    `services` are the Services of the pod's namespace: the ports they declare TCP for it (service_tcp_ports) are
    declared as if its annotation named them, but for ports it excludes from capture (the exclusion wins).
    """
    out: dict[str, Any] = uninject(pod) if is_injected(pod) else copy.deepcopy(dict(pod))
    if not settings.image:
        raise InjectRefused("the operator has no image to inject (--inject-image, the chart's injection.image); "
                            "fix the operator's installation")
    check_annotation_bounds(out)
    _check(out)
    try:
        setting = f"annotation {EXCLUDE_INBOUND_PORTS}"
        named = resolve_port_names(_annotation(out, EXCLUDE_INBOUND_PORTS), out, f"metadata.{setting}")
        excluded_in = parse_ports(named, setting)
        tcp_setting = f"annotation {TCP_PORTS}"
        tcp_ports = parse_ports(resolve_port_names(_annotation(out, TCP_PORTS), out, f"metadata.{tcp_setting}"),
                                tcp_setting)
        excluded_out = parse_ports(_annotation(out, EXCLUDE_OUTBOUND_PORTS), f"annotation {EXCLUDE_OUTBOUND_PORTS}")
        cidrs = parse_cidrs(_annotation(out, EXCLUDE_OUTBOUND_CIDRS), f"annotation {EXCLUDE_OUTBOUND_CIDRS}")
    except CaptureError as e:
        raise InjectRefused(f"metadata.{e}") from e
    both = sorted(set(tcp_ports) & set(excluded_in))
    if both:
        raise InjectRefused(f"metadata.annotations[{TCP_PORTS}]: port(s) {', '.join(map(str, both))} are also "
                            f"in {EXCLUDE_INBOUND_PORTS}: tunnelled over mTLS or not captured at all, not both; "
                            "keep each port in one of them")
    by_services = {p: by for p, by in service_tcp_ports(services, out).items()
                   if p not in excluded_in and p not in tcp_ports}
    tcp_ports = (*tcp_ports, *by_services)
    if len(tcp_ports) > ANNOTATION_BOUNDS[TCP_PORTS][1]:  # the bound the callers' destination map holds it to
        sources = sorted({by.rsplit(" port ", 1)[0] for by in by_services.values()})
        raise InjectRefused(f"{len(tcp_ports)} ports declared TCP (annotation {TCP_PORTS} and the ports of "
                            f"{', '.join(sources[:5])} selecting the pod, with an appProtocol such as postgresql or "
                            f"a tcp- name), more than the {ANNOTATION_BOUNDS[TCP_PORTS][1]} allowed; declare fewer")
    # The agent serves the outbound listener (LDS), Envoy's bootstrap holds the inbound one: both get the settings.
    http_args = _http_args(out)
    resources = _sidecar_resources(out, settings)
    spec = out.setdefault("spec", {})
    originals: dict[str, Any] = {}
    for n, c in enumerate(spec.get("containers") or []):
        _rewrite_probes(c, f"spec.containers[{n}]", excluded_in, originals)
    for n, c in enumerate(spec.get("initContainers") or []):
        if c.get("restartPolicy") == "Always":  # the user's own native sidecars are probed too
            _rewrite_probes(c, f"spec.initContainers[{n}]", excluded_in, originals)

    ns = settings.operator_namespace
    common = {"image": settings.image, "imagePullPolicy": settings.image_pull_policy}
    capture_args = [arg for flag, values in (("--exclude-inbound-ports", excluded_in),
                                             ("--exclude-outbound-ports", excluded_out),
                                             ("--exclude-outbound-cidrs", cidrs)) if values
                    for arg in (flag, ",".join(map(str, values)))]
    init = {"name": INIT, **common, "command": ["meshward-init", *capture_args],
            "securityContext": _security(0, add=("NET_ADMIN", "NET_RAW")),
            "resources": dict(settings.init_resources),
            # iptables takes a lock file; the root filesystem is read-only.
            "env": [{"name": "XTABLES_LOCKFILE", "value": f"{SOCKET_DIR}/xtables.lock"}],
            "volumeMounts": [{"name": SOCKETS, "mountPath": SOCKET_DIR}]}
    probes_env = [{"name": PROBES_ENV, "value": json.dumps(originals, sort_keys=True, separators=(",", ":"))}] \
        if originals else []
    agent = {
        "name": AGENT, **common, "restartPolicy": "Always",
        "command": ["meshward-sidecar",
                    "--http-listen", f"unix:{SOCKET_DIR}/authz.sock",
                    "--admin-listen", f"0.0.0.0:{AGENT_ADMIN_PORT}",
                    "--sds-listen", f"unix:{SOCKET_DIR}/sds.sock",
                    "--identity-signer", f"meshward-signer.{ns}.svc:15012",
                    "--identity-signer-name", f"meshward-signer.{ns}.svc",
                    "--policy-server", f"meshward-policy.{ns}.svc:15013",
                    "--trust-domain", settings.trust_domain,
                    "--log-level", settings.log_level, *http_args],
        "env": _env(*probes_env),
        "startupProbe": _http_probe("/readyz", AGENT_ADMIN_PORT, 1, STARTUP_FAILURE_THRESHOLD),
        "readinessProbe": _http_probe("/readyz", AGENT_ADMIN_PORT, 5, 3),
        "livenessProbe": _http_probe("/healthz", AGENT_ADMIN_PORT, 10, 3),
        "securityContext": _security(PROXY_UID),
        "resources": resources["agent"],
        "volumeMounts": [{"name": SOCKETS, "mountPath": SOCKET_DIR},
                         {"name": BUNDLE, "mountPath": f"{SOCKET_DIR}/bundle", "readOnly": True},
                         {"name": TOKEN, "mountPath": "/var/run/secrets/meshward", "readOnly": True}],
    }
    proxy = {
        "name": PROXY, **common, "restartPolicy": "Always",
        "command": ["meshward-proxy", "--inbound-plaintext", _annotation(out, INBOUND_PLAINTEXT) or "refuse",
                    "--log-level", "warn", *http_args,
                    *(["--tcp-ports", ",".join(map(str, tcp_ports))] if tcp_ports else [])],
        "env": _env(),
        "startupProbe": _http_probe("/healthz/ready", PROXY_HEALTH_PORT, 1, STARTUP_FAILURE_THRESHOLD),
        "readinessProbe": _http_probe("/healthz/ready", PROXY_HEALTH_PORT, 5, 3),
        "securityContext": _security(PROXY_UID),
        "resources": resources["proxy"],
        "volumeMounts": [{"name": SOCKETS, "mountPath": SOCKET_DIR}],
    }
    spec["initContainers"] = [init, agent, proxy, *(spec.get("initContainers") or [])]
    spec["volumes"] = [*(spec.get("volumes") or []),
                       {"name": SOCKETS, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                       {"name": BUNDLE, "configMap": {"name": "meshward-trust-bundle"}},
                       {"name": TOKEN, "projected": {"sources": [{"serviceAccountToken": {
                           "audience": MESH_AUDIENCE, "expirationSeconds": TOKEN_EXPIRATION_S, "path": "token"}}]}}]
    meta = out.setdefault("metadata", {})
    meta["annotations"] = {**(meta.get("annotations") or {}), INJECTED_ANNOTATION: settings.version}
    # Opted in through its namespace: the label makes the pod's opt-in visible to the operator and to users.
    meta["labels"] = {**(meta.get("labels") or {}), INJECT_LABEL: ENABLED}
    return out


# Where each workload kind keeps its pod template.
_TEMPLATES = {"Deployment": ("spec", "template"), "StatefulSet": ("spec", "template"),
              "DaemonSet": ("spec", "template"), "ReplicaSet": ("spec", "template"),
              "ReplicationController": ("spec", "template"), "Job": ("spec", "template"),
              "CronJob": ("spec", "jobTemplate", "spec", "template")}


def inject_manifest(doc: Mapping[str, Any], settings: InjectSettings, namespace_opted_in: bool = False,
                    services: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """A manifest with the mesh in its pods: a Pod, or a workload's pod template, if it opted in (else unchanged).

    What the webhook would do to each pod it creates, done before the manifest reaches the cluster (GitOps); the
    pods it then creates are already injected, and the webhook leaves them alone. `services`: the Services known
    (those of the same manifests): the ports those of the pod's namespace declare TCP are declared.
    """
    out: dict[str, Any] = copy.deepcopy(dict(doc))
    kind = out.get("kind")
    namespace = str((out.get("metadata") or {}).get("namespace") or "default")
    services = [svc for svc in services if str((svc.get("metadata") or {}).get("namespace") or "default") == namespace]
    if kind == "Pod":
        return inject(out, settings, services) \
            if opted_in(out, namespace, namespace_opted_in, settings.operator_namespace) else out
    path = _TEMPLATES.get(str(kind))
    if path is None:
        return out
    parent = out
    for key in path[:-1]:
        child = parent.get(key)
        if not isinstance(child, dict):
            return out
        parent = child
    template = parent.get(path[-1])
    if isinstance(template, dict) and opted_in(template, namespace, namespace_opted_in, settings.operator_namespace):
        try:
            parent[path[-1]] = inject(template, settings, services)
        except InjectRefused as e:
            raise InjectRefused(f"{kind} {namespace}/{(out.get('metadata') or {}).get('name')}: "
                                f"{'.'.join(path)}: {e}") from e
    return out


# The parts of a pod injection changes: the JSON patch replaces (or adds) each whole.
_PATCHED = (("metadata", "labels"), ("metadata", "annotations"), ("spec", "initContainers"),
            ("spec", "containers"), ("spec", "volumes"))


def json_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The RFC 6902 patch that turns `before` into `after` (for the fields injection changes)."""
    ops: list[dict[str, Any]] = []
    made: set[str] = set()
    for top, key in _PATCHED:
        old = (before.get(top) or {}).get(key)
        new = (after.get(top) or {}).get(key)
        if old == new:
            continue
        if top not in before and top not in made:
            ops.append({"op": "add", "path": f"/{top}", "value": {}})
            made.add(top)
        ops.append({"op": "add" if old is None else "replace", "path": f"/{top}/{key}", "value": new})
    return ops
