"""Does an app's traffic still work once its pods are meshed? Third-party servers and clients, unmeshed and meshed.

Issue 19's table, one test per row: each case runs twice in the same test, from an unmeshed caller to an
unmeshed server and from a meshed caller to the meshed server, and both runs must end the same way (statuses,
bytes, events received, RPC results, what the server saw); the meshed run must also be in the server's audit
log, allowed, with the caller's SPIFFE ID. The servers and clients are Debian's, not ours (the compat image,
hack/images/compat): nginx, Apache with mod_http2, python3-websockets, a python3-grpcio greeter in
helloworld's shape, curl, h2load; SSE and the long poll are held by a little stdlib glue, as neither web server
holds them by itself.

One release, one namespace, five pods (the kind node is small): `compat-plain` and `compat-meshed` are the
same pod (one container per server, on the image's five ports) behind a multi-port Service and a headless one,
one of them opted in; `caller-plain` and `caller` are the same client pod; `caller-http10` is a meshed caller
that accepts HTTP/1.0 (meshward.io/accept-http10: the setting belongs to the workload that speaks it, and
`caller` must keep the default to show the 426). The Jobs row adds two short-lived pods. Unmeshed and meshed
runs of a case go concurrently, so the 60 s row takes 60 s, not 120.

The release caps leaf certificates at 30 s (as test_mesh.py's does), so every row above runs while the meshed
pods renew their certificates every ~15 s, and the last test can rotate the CA within a minute: a rotation's
steps each wait one maximum leaf lifetime (24 h without the cap), and a ServiceIdentity's own ttl cannot go
below 5 min. The CA rotation is release-wide, so that test is the module's last (tests run in file order).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.e2e.conftest import Mesh, envoy_admin, installed
from tests.kube import KindSession, service_identity, wait_until
from tests.support.procs import metric_sum

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

T = TypeVar("T")

# The servers of the compat image (its `run ROLE`), each a container of the server pod, and their ports.
PORTS = {"nginx": 8080, "apache": 8081, "glue": 8082, "websocket": 8083, "greeter": 50051, "redis": 6379,
         "postgres": 5432, "banner": 2525}
# Each Service port as an app would name it; nginx behind port 80, as web servers are.
SERVICE_PORTS = {"nginx": 80, "apache": 8081, "glue": 8082, "websocket": 8083, "greeter": 50051, "redis": 6379,
                 "postgres": 5432, "banner": 2525}
# The servers that do not speak HTTP, declared TCP by the meshed server's annotation (by their port names), and
# PostgreSQL's by its Service port's appProtocol: tunnelled over mTLS.
TCP_ROLES = ("redis", "banner")
APP_PROTOCOLS = {"postgres": "postgresql"}
MB = 1024 * 1024
# The long-lived rows: what the issue asks (60 s held; a slow client reading 30 MB at 1 MiB/s, as in its table:
# "What to build" says 200 MB, which would hold the module 200 s for the same finding).
HELD_S = 60
EVERY_S = 5
SLOW_BYTES = 30 * MB
# What cut SSE, long polls and slow downloads before (Envoy's default route timeout).
ENVOY_DEFAULT_ROUTE_TIMEOUT_S = 15
GREETER = "/helloworld.Greeter/"
# Leaves live 30 s (renewed every ~15 s) and the operator checks the CA every 2 s, so a rotation's two steps take
# about a minute; the same values as test_mesh.py's release (docs/identity.md, "Operator settings").
SHORT_LEAVES = ("--set", "operator.extraArgs={--max-leaf-ttl=30s,--ca-interval=2,--status-interval=2}")


@dataclass(frozen=True)
class Side:
    """One run of a case: who calls, and which server it calls."""

    name: str
    caller: str
    server: str


UNMESHED = Side("unmeshed", "caller-plain", "compat-plain")
MESHED = Side("meshed", "caller", "compat-meshed")
SIDES = (UNMESHED, MESHED)


def spiffe(ns: str, sa: str) -> str:
    return f"spiffe://cluster.local/ns/{ns}/sa/{sa}"


def server_deployment(ns: str, name: str, image: str, *, inject: bool) -> dict[str, Any]:
    """The server pod: one container per server of the compat image, each with a readiness probe."""
    def probe(role: str) -> dict[str, Any]:
        port = PORTS[role]
        paths = {"nginx": "/ok/ready", "apache": "/h2c/ready", "glue": "/ready"}
        handler = ({"httpGet": {"path": paths[role], "port": port}} if role in paths
                   else {"tcpSocket": {"port": port}})
        return {**handler, "periodSeconds": 2}
    containers = [{"name": role, "image": image, "imagePullPolicy": "Never", "args": [role],
                   "ports": [{"name": role, "containerPort": port}], "readinessProbe": probe(role),
                   "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False}}
                  for role, port in PORTS.items()]
    return _deployment(ns, name, inject, containers, {"meshward.io/tcp-ports": ",".join(TCP_ROLES)})


def caller_deployment(ns: str, name: str, image: str, *, inject: bool,
                      annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A client pod: the compat image idle, for the tests to exec its clients in."""
    container = {"name": "app", "image": image, "imagePullPolicy": "Never", "args": ["idle"],
                 "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False}}
    return _deployment(ns, name, inject, [container], annotations)


def _deployment(ns: str, name: str, inject: bool, containers: list[dict[str, Any]],
                annotations: dict[str, str] | None = None) -> dict[str, Any]:
    labels = {"app": name, **({"meshward.io/inject": "enabled"} if inject else {})}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
                "metadata": {"labels": labels, **({"annotations": annotations} if annotations else {})},
                "spec": {"serviceAccountName": name, "terminationGracePeriodSeconds": 5,
                         "containers": containers}}}}


def services(ns: str, name: str) -> list[dict[str, Any]]:
    """A multi-port Service in front of the server pod, and a headless one (its DNS name gives the pod's IP)."""
    ports = [{"name": role, "port": SERVICE_PORTS[role], "targetPort": PORTS[role],
              **({"appProtocol": APP_PROTOCOLS[role]} if role in APP_PROTOCOLS else {})} for role in PORTS]
    return [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": n, "namespace": ns},
             "spec": {"selector": {"app": name}, "ports": ports, **extra}}
            for n, extra in ((name, {}), (f"{name}-headless", {"clusterIP": "None"}))]


def server_policy(ns: str) -> dict[str, Any]:
    """The meshed server admits its two meshed callers, to any path and method, but for one Deny: `caller-http10`'s
    DELETEs to the database's port, which on a TCP port denies every connection of it there (fail closed)."""
    return {"apiVersion": "meshward.io/v1alpha1", "kind": "AuthPolicy",
            "metadata": {"name": MESHED.server, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": MESHED.server}}, "rules": [
                {"name": "callers", "from": {"principals": [spiffe(ns, MESHED.caller), spiffe(ns, "caller-http10")]}},
                {"name": "no-deletes-on-the-database", "action": "Deny",
                 "from": {"principals": [spiffe(ns, "caller-http10")]},
                 "to": {"ports": [PORTS["postgres"]], "methods": ["DELETE"]}}]}}


@dataclass(frozen=True)
class Compat:
    """The module's namespace: run commands in its pods, unmeshed and meshed side by side."""

    mesh: Mesh

    @property
    def ns(self) -> str:
        return self.mesh.ns

    def sh(self, app: str, script: str, container: str = "app", timeout: float = 120) -> str:
        """The stdout of `sh -c script` in `app`'s pod; a non-zero exit fails, with its stderr."""
        proc = self.mesh.cluster.kubectl("-n", self.ns, "exec", self.mesh.pod(app), "-c", container, "--",
                                         "sh", "-c", script, check=False, timeout=timeout)
        if proc.returncode:
            raise AssertionError(f"`{script}` in {app}/{container} exited {proc.returncode}:\n"
                                 f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return proc.stdout

    def target(self, side: Side, role: str) -> str:
        """host:port of `side`'s server `role`, through its Service."""
        return f"{side.server}.{self.ns}:{SERVICE_PORTS[role]}"

    def url(self, side: Side, role: str, path: str, scheme: str = "http") -> str:
        """The URL of `path` on `side`'s server `role`, through its Service."""
        return f"{scheme}://{self.target(side, role)}{path}"

    def server_log(self, side: Side, role: str) -> list[str]:
        """The lines `side`'s server `role` wrote to stdout and stderr."""
        return self.mesh.cluster.kubectl("-n", self.ns, "logs", self.mesh.pod(side.server), "-c", role).stdout \
            .splitlines()

    def logged(self, side: Side, role: str, needle: str, count: int = 1) -> list[str]:
        """Wait for `count` lines containing `needle` in the log of `side`'s server `role` (a server logs a call
        as it ends, and kubelet's log lags a little behind); return them."""
        def found() -> list[str]:
            lines = [line for line in self.server_log(side, role) if needle in line]
            return lines if len(lines) >= count else []
        lines: list[str] = wait_until(f"{count} line(s) with {needle!r} in {side.server}/{role}'s log", found,
                                      timeout=30, interval=0.5)
        return lines

    def events(self, side: Side, role: str, needle: str, count: int = 1) -> list[dict[str, Any]]:
        """The JSON lines (the glue, websocket and greeter servers write one per call) with `needle`, waited for."""
        return [json.loads(line) for line in self.logged(side, role, needle, count) if line.startswith("{")]

    def audited(self, *paths: str, caller: str = MESHED.caller) -> None:
        """Wait for the meshed server's allowed decisions on `paths` with `caller`'s SPIFFE ID as the peer."""
        peer = spiffe(self.ns, caller)

        def seen() -> set[str]:
            return {d["path"] for d in self.mesh.decisions(MESHED.server)
                    if d["peer"] == peer and d["outcome"] == "allow"} & set(paths)
        wait_until(f"the meshed server's audit lines for {paths} from {peer}", lambda: seen() == set(paths),
                   timeout=30, interval=1)


def both(case: Callable[[Side], T]) -> tuple[T, T]:
    """(unmeshed, meshed) outcomes of `case`, run at the same time."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        plain, meshed = pool.map(case, SIDES)
    return plain, meshed


@pytest.fixture(scope="module")
def compat(kind_session: KindSession) -> Iterator[Compat]:
    with installed(kind_session, *SHORT_LEAVES) as rel:
        c = rel.cluster
        ns = c.new_namespace("compat")
        image = kind_session.images["compat"]
        try:
            for sa in (*(s.server for s in SIDES), *(s.caller for s in SIDES), "caller-http10"):
                c.kubectl("-n", ns, "create", "serviceaccount", sa)
            c.apply(*(service_identity(ns, sa) for sa in (MESHED.server, MESHED.caller, "caller-http10")),
                    server_policy(ns))
            c.trust_bundle(ns, timeout=60)
            # The Services first: the injector reads them when it creates the meshed server's pod.
            c.apply(*services(ns, UNMESHED.server), *services(ns, MESHED.server),
                    server_deployment(ns, UNMESHED.server, image, inject=False),
                    server_deployment(ns, MESHED.server, image, inject=True),
                    caller_deployment(ns, UNMESHED.caller, image, inject=False),
                    caller_deployment(ns, MESHED.caller, image, inject=True),
                    caller_deployment(ns, "caller-http10", image, inject=True,
                                      annotations={"meshward.io/accept-http10": "true"}))
            for name in (UNMESHED.server, MESHED.server, UNMESHED.caller, MESHED.caller, "caller-http10"):
                c.kubectl("-n", ns, "rollout", "status", f"deployment/{name}", "--timeout=180s", timeout=200)
            compat = Compat(Mesh(rel, ns, image))
            # Ready pods are not yet routable Services (kube-proxy, the callers' destination maps): until then a
            # connection is refused or answered 503. Any other answer will do.
            for side, caller in (*((s, s.caller) for s in SIDES), (MESHED, "caller-http10")):
                def answers(side: Side = side, caller: str = caller) -> bool:
                    return compat.sh(caller, f"curl -sS -o /dev/null -w '%{{http_code}}' --max-time 5 "
                                             f"{compat.url(side, 'nginx', '/ok/warm-up')} || true") \
                        not in ("000", "503")
                wait_until(f"{side.server} routable from {caller}", answers, timeout=90, interval=1)
            yield compat
        finally:
            c.kubectl("delete", "namespace", ns, "--wait=false", check=False)


# ------------------------------------------------------------------------------------------------ TCP


def test_redis_and_a_server_first_banner_are_carried_over_mtls_and_decided_per_connection(compat: Compat) -> None:
    """Non-HTTP through the mesh (issue 20): before, a meshed redis-cli read `Protocol error, got "H"` (its bytes met
    an HTTP connection manager) and a server-first protocol hung. redis-cli's PING/SET/GET and a banner server
    (it speaks first) give the same answers unmeshed and meshed; meshed, each connection is one decision in the
    server's audit log, a TCP connection from the caller's SPIFFE ID."""
    key = f"compat-{uuid.uuid4().hex[:6]}"

    def case(side: Side) -> tuple[str, str, str, str]:
        host = f"{side.server}.{compat.ns}"
        redis = compat.sh(side.caller, f"redis-cli -h {host} -p 6379 PING && redis-cli -h {host} -p 6379 SET {key} v1 "
                                       f"&& redis-cli -h {host} -p 6379 GET {key}", timeout=60)
        banner = compat.sh(side.caller, f"printf 'hello {key}\\n' | timeout 10 socat -t 2 - TCP:{host}:2525",
                           timeout=60)
        # A client that says nothing until the server has spoken: only the banner, within the 4 s it waits.
        quiet = compat.sh(side.caller, f"timeout 4 socat -u TCP:{host}:2525 STDOUT || true", timeout=60)
        # Redis's inline protocol, sent and half-closed at once (a line an HTTP sniffer could take for HTTP).
        inline = compat.sh(side.caller, f"printf 'GET {key}\\r\\n' | timeout 10 socat -t 2 - TCP:{host}:6379",
                           timeout=60)
        return redis, banner, quiet, inline
    plain, meshed = both(case)
    assert plain == meshed == ("PONG\nOK\nv1\n", f"220 compat banner\nhello {key}\n", "220 compat banner\n",
                               "$2\nv1\n"), (plain, meshed)  # (text mode reads \r\n as \n)
    peer = spiffe(compat.ns, MESHED.caller)

    def connections() -> set[int]:
        return {d["port"] for d in compat.mesh.decisions(MESHED.server)
                if d["peer"] == peer and d["method"] == "TCP" and d["outcome"] == "allow"}
    wait_until("the meshed server's TCP decisions for redis and the banner", lambda: connections() >= {6379, 2525},
               timeout=30, interval=1)


def test_postgresql_is_carried_over_mtls_and_a_deny_with_an_http_field_keeps_every_byte_from_it(
        compat: Compat) -> None:
    """psql to PostgreSQL (issue 20's row: before, a meshed psql read `received invalid response to SSL negotiation:
    H`), its port declared TCP by its Service port's `appProtocol: postgresql` alone (not the pod's annotation): the
    same rows unmeshed and meshed, the meshed connection in the server's audit log from the caller's SPIFFE ID. Then a caller an L4 Deny names (a Deny on DELETE to the database's port: on a TCP port, its HTTP field
    cannot narrow it, so it denies the connection, Istio's fail-closed semantics) gets no byte to PostgreSQL: its
    startup message, which PostgreSQL logs with the client's application_name, never arrives, while a later
    allowed connection's does."""
    mark = uuid.uuid4().hex[:6]

    def psql(caller: str, host: str, name: str, check: bool = True) -> str:
        script = (f"PGAPPNAME={name} PGCONNECT_TIMEOUT=10 psql -h {host} -p 5432 -U postgres -d postgres -XAtc "
                  f"\"select '{name}', count(*) from generate_series(1, 1000)\"")
        return compat.sh(caller, script if check else f"{script} 2>&1; echo exit=$?", timeout=60)

    def case(side: Side) -> str:
        return psql(side.caller, f"{side.server}.{compat.ns}", f"rows-{mark}")
    pod = compat.mesh.cluster.get_json("-n", compat.ns, "pod", compat.mesh.pod(MESHED.server))
    proxy = next(c["command"] for c in pod["spec"]["initContainers"] if c["name"] == "meshward-proxy")
    assert "5432" in proxy[proxy.index("--tcp-ports") + 1].split(","), proxy  # from the Service, not the annotation
    plain, meshed = both(case)
    assert plain == meshed == f"rows-{mark}|1000\n", (plain, meshed)
    compat.logged(MESHED, "postgres", f"application_name=rows-{mark}")

    host = f"{MESHED.server}.{compat.ns}"
    denied = psql("caller-http10", host, f"denied-{mark}", check=False)
    assert "exit=2" in denied and f"denied-{mark}|" not in denied, denied  # psql: 2 is "connection to the server lost"
    psql(MESHED.caller, host, f"after-{mark}")
    compat.logged(MESHED, "postgres", f"application_name=after-{mark}")  # the log is read up to after the denial
    assert not [line for line in compat.server_log(MESHED, "postgres") if f"denied-{mark}" in line]

    def decided(caller: str, outcome: str) -> bool:
        return any(d["peer"] == spiffe(compat.ns, caller) and d["method"] == "TCP" and d["port"] == PORTS["postgres"]
                   and d["outcome"] == outcome for d in compat.mesh.decisions(MESHED.server))
    wait_until("the meshed server's TCP decisions on 5432: the caller allowed, caller-http10 denied",
               lambda: decided(MESHED.caller, "allow") and decided("caller-http10", "forbidden"), timeout=30,
               interval=1)


def _metric(compat: Compat, app: str, name: str, **labels: str) -> float:
    """The sum of `app`'s agent's samples of `name` with `labels` (0 if none), read from inside the pod."""
    return metric_sum(compat.sh(app, "curl -sS --max-time 5 http://127.0.0.1:15020/metrics"), name, **labels)


def test_a_namespace_locked_to_meshed_only_egress_reaches_meshed_and_allowed_destinations_only(
        compat: Compat) -> None:
    """Egress control (issue 20, Istio's REGISTRY_ONLY): the namespace annotated `meshward.io/egress: meshed-only`
    with the unmeshed server's redis and Apache ports allowed (by its ClusterIP). The meshed caller, where an
    attacker in its app container stands, can no longer reach the unmeshed server's nginx (the connection is closed
    before a byte leaves the pod: the unmeshed nginx logs nothing of it), while the allowed redis and Apache and
    the meshed server still answer; the refusal is in the caller's audit log and counted in its agent's metrics by
    destination, allowed connections too. The unmeshed caller is untouched (no Envoy), and removing the annotation
    opens egress again."""
    c, ns = compat.mesh.cluster, compat.ns
    ip = c.kubectl("-n", ns, "get", "service", UNMESHED.server, "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
    mark = uuid.uuid4().hex[:6]

    def nginx(caller: str, tag: str) -> str:
        return compat.sh(caller, f"curl -sS -o /dev/null -w '%{{http_code}}' --max-time 5 "
                                 f"http://{ip}:80/ok/{tag} 2>/dev/null || true")
    assert nginx(MESHED.caller, f"open-{mark}") == "200"
    c.kubectl("annotate", "namespace", ns, "meshward.io/egress=meshed-only",
              f"meshward.io/egress-allow={ip}:6379,{ip}/32:8081", "--overwrite")
    try:
        wait_until("the meshed caller's egress to nginx refused", lambda: nginx(MESHED.caller, f"probe-{mark}")
                   == "000", timeout=60, interval=1)
        assert nginx(MESHED.caller, f"locked-{mark}") == "000"
        assert nginx(UNMESHED.caller, f"unmeshed-{mark}") == "200"  # no Envoy there: not the mesh's to lock
        assert compat.sh(MESHED.caller, f"redis-cli -h {ip} -p 6379 PING", timeout=60) == "PONG\n"
        assert compat.sh(MESHED.caller, f"curl -sS -o /dev/null -w '%{{http_code}}' --max-time 5 "
                                        f"http://{ip}:8081/h2c/ready") == "200"
        assert compat.sh(MESHED.caller, f"curl -sS -o /dev/null -w '%{{http_code}}' --max-time 5 "
                                        f"{compat.url(MESHED, 'nginx', f'/ok/meshed-{mark}')}") == "200"
        assert not [line for line in compat.server_log(UNMESHED, "nginx") if f"locked-{mark}" in line]

        def refused() -> list[dict[str, Any]]:
            return [d for d in compat.mesh.decisions(MESHED.caller)
                    if d["transport"] == "egress" and d.get("destination") == f"{ip}:80"]
        (line, *_) = wait_until("the caller's audit line of the refused connection", refused, timeout=30,
                                interval=1)
        assert (line["outcome"], line["method"], line["port"]) == ("forbidden", "TCP", 80)
        assert line["workload"].startswith(f"{ns}/{MESHED.caller}-")  # the pod
        wait_until("the refusal and the allowed connections counted by destination", lambda: _metric(
            compat, MESHED.caller, "meshward_egress_total", destination=f"{ip}:80", outcome="refused") >= 1 and
            _metric(compat, MESHED.caller, "meshward_egress_total", destination=f"{ip}:6379",
                    outcome="allowed") >= 1, timeout=30, interval=1)
    finally:
        c.kubectl("annotate", "namespace", ns, "meshward.io/egress-", "meshward.io/egress-allow-")
    wait_until("the meshed caller's egress open again", lambda: nginx(MESHED.caller, f"reopened-{mark}") == "200",
               timeout=60, interval=1)


# ------------------------------------------------------------------------------------------------ HTTP/1.1


def test_http11_keep_alive_reuses_the_connection_to_the_caller_and_at_the_server(compat: Compat) -> None:
    """Two requests in one curl: the second rides the first's connection (curl opens one), and at the server it
    arrives on a connection that had served a request before (nginx's $connection_requests)."""
    def case(side: Side) -> tuple[str, int]:
        urls = " ".join(compat.url(side, "nginx", f"/ok/keepalive-{n}") for n in (1, 2))
        out = compat.sh(side.caller, f"curl -sS -o /dev/null -o /dev/null -w '%{{http_code}} %{{num_connects}}\\n' "
                                     f"--max-time 10 {urls}")
        second = compat.logged(side, "nginx", '"GET /ok/keepalive-2"')
        reused = re.search(r"reqs=(\d+)", second[0])
        assert len(second) == 1 and reused, second
        return out, min(int(reused.group(1)), 2)  # 2: not its connection's first (the meshed hop may warm it up)
    plain, meshed = both(case)
    assert plain == meshed == ("200 1\n200 0\n", 2), (plain, meshed)
    compat.audited("/ok/keepalive-1", "/ok/keepalive-2")


def test_head_204_and_304_keep_their_headers_and_send_no_body(compat: Compat) -> None:
    """HEAD of a 200 MB file: its Content-Length and no body; a 204 with no body; a conditional GET with the ETag
    of the first: 304 with no body."""
    def case(side: Side) -> tuple[str, str, str, str]:
        head = compat.sh(side.caller, f"curl -sS -I --max-time 10 {compat.url(side, 'nginx', '/files/200m')}")
        length = re.search(r"^content-length: *(\d+)", head, re.I | re.M)
        no_content = compat.sh(side.caller, f"curl -sS -o /dev/null -w '%{{http_code}} %{{size_download}}' "
                                            f"--max-time 10 {compat.url(side, 'nginx', '/status/204/none')}")
        url = compat.url(side, "nginx", "/files/small")
        first = compat.sh(side.caller, f"curl -sS -D - -o /dev/null --max-time 10 {url}")
        etag = re.search(r"^etag: *(\S+)", first, re.I | re.M)
        assert etag, first
        not_modified = compat.sh(side.caller, f"curl -sS -o /dev/null -w '%{{http_code}} %{{size_download}}' "
                                              f"--max-time 10 -H 'If-None-Match: {etag.group(1)}' {url}")
        return head.split(None, 2)[1], length.group(1) if length else "", no_content, not_modified
    plain, meshed = both(case)
    assert plain == meshed == ("200", str(200 * MB), "204 0", "304 0"), (plain, meshed)
    compat.audited("/files/200m", "/status/204/none", "/files/small")


def test_a_50_mb_chunked_upload_arrives_whole(compat: Compat) -> None:
    """50 MB of random bytes PUT from stdin (curl sends chunked, with Expect: 100-continue): 201, and the file
    nginx stored has the caller's SHA-256."""
    def case(side: Side) -> tuple[str, bool, str]:
        url = compat.url(side, "nginx", "/upload/chunked-50m")
        out = compat.sh(side.caller, f"head -c {50 * MB} /dev/urandom > /tmp/up && sha256sum < /tmp/up && "
                                     f"curl -sS -v -T - -o /dev/null -w '%{{http_code}}\\n' --max-time 150 {url} "
                                     f"< /tmp/up 2>/tmp/trace; grep -ci '^> transfer-encoding: chunked' /tmp/trace; "
                                     f"rm -f /tmp/up", timeout=180)
        digest, code, chunked = out.split()[0], out.split()[-2], out.split()[-1]
        stored = compat.sh(side.server, "sha256sum /tmp/compat/www/upload/chunked-50m", container="nginx").split()[0]
        return code, stored == digest, chunked
    plain, meshed = both(case)
    assert plain == meshed == ("201", True, "1"), (plain, meshed)
    compat.audited("/upload/chunked-50m")


def test_a_200_mb_download_arrives_whole(compat: Compat) -> None:
    def case(side: Side) -> str:
        return compat.sh(side.caller, f"curl -sS -o /dev/null -w '%{{http_code}} %{{size_download}}' --max-time 150 "
                                      f"{compat.url(side, 'nginx', '/files/200m')}", timeout=180)
    plain, meshed = both(case)
    assert plain == meshed == f"200 {200 * MB}", (plain, meshed)
    compat.audited("/files/200m")


def test_expect_100_continue_gets_the_interim_response_then_the_upload_is_stored(compat: Compat) -> None:
    """A 2 MB PUT with `Expect: 100-continue`: curl waits for `100 Continue` before the body, then 201 and the
    stored bytes are the caller's (meshed, the caller's Envoy answers the 100 itself, as Envoy does by default)."""
    def case(side: Side) -> tuple[int, str, bool]:
        url = compat.url(side, "nginx", "/upload/continue-2m")
        out = compat.sh(side.caller, f"head -c {2 * MB} /dev/urandom > /tmp/c && sha256sum < /tmp/c && "
                                     f"curl -sS -v -T /tmp/c -H 'Expect: 100-continue' -o /dev/null "
                                     f"-w '%{{http_code}}\\n' --max-time 30 {url} 2>/tmp/trace; "
                                     f"grep -c '^< HTTP/1.1 100' /tmp/trace; rm -f /tmp/c")
        digest, code, interim = out.split()[0], out.split()[-2], int(out.split()[-1])
        stored = compat.sh(side.server, "sha256sum /tmp/compat/www/upload/continue-2m", container="nginx").split()[0]
        return interim, code, stored == digest
    plain, meshed = both(case)
    assert plain == meshed == (1, "201", True), (plain, meshed)
    compat.audited("/upload/continue-2m")


def test_pod_ip_headless_and_multi_port_services_and_jobs(compat: Compat) -> None:
    """The server by its pod IP, through its headless Service, and on a second port of its multi-port Service
    (Apache, HTTP/1.1); and a Job (it completes: the mesh's native sidecars end with its app) calling it."""
    c = compat.mesh.cluster
    image = compat.mesh.echo  # the module's Mesh holds the compat image

    def job(side: Side) -> dict[str, Any]:
        labels = {"app": f"job-{side.name}", **({"meshward.io/inject": "enabled"} if side is MESHED else {})}
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"job-{side.name}", "namespace": compat.ns},
                "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": {
                    "serviceAccountName": side.caller, "restartPolicy": "Never",
                    "containers": [{"name": "app", "image": image, "imagePullPolicy": "Never",
                                    "command": ["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}\n",
                                                compat.url(side, "nginx", "/ok/job")],
                                    "securityContext": {"runAsNonRoot": True,
                                                        "allowPrivilegeEscalation": False}}]}}}}

    c.apply(*(job(side) for side in SIDES))

    def case(side: Side) -> tuple[str, str, str, str]:
        ip = c.kubectl("-n", compat.ns, "get", "pod", compat.mesh.pod(side.server), "-o",
                       "jsonpath={.status.podIP}").stdout.strip()
        def get(url: str) -> str:
            return compat.sh(side.caller, f"curl -sS -w ' %{{http_code}}' --max-time 10 {url}")
        by_ip = get(f"http://{ip}:{PORTS['nginx']}/ok/pod-ip")
        headless = get(f"http://{side.server}-headless.{compat.ns}:{PORTS['nginx']}/ok/headless")
        second_port = get(compat.url(side, "apache", "/h2c/multi-port"))
        c.kubectl("-n", compat.ns, "wait", "--for=condition=Complete", f"job/job-{side.name}", "--timeout=120s",
                  timeout=150)
        return by_ip, headless, second_port, c.kubectl("-n", compat.ns, "logs", f"job/job-{side.name}",
                                                       "-c", "app").stdout
    try:
        plain, meshed = both(case)
    finally:
        c.kubectl("-n", compat.ns, "delete", "job", "job-unmeshed", "job-meshed", "--wait=false", check=False)
    assert plain == meshed == ("ok\n 200", "ok\n 200", "served by apache\n 200", "ok\n\n200\n"), (plain, meshed)
    compat.audited("/ok/pod-ip", "/ok/headless", "/h2c/multi-port", "/ok/job")


# ------------------------------------------------------------------------------------------------ gRPC and h2c


def test_grpc_unary_server_stream_client_stream_bidi_deadline_and_cancel(compat: Compat) -> None:
    """The greeter's client makes every kind of call (grpcio, over HTTP/2): the replies are the same; the
    1 s deadline ends in DEADLINE_EXCEEDED and reaches the server (it saw at most ~1 s left, then the call end);
    a cancelled server stream ends there too."""
    tag = f"compat-{uuid.uuid4().hex[:6]}"

    def case(side: Side) -> dict[str, Any]:
        out = compat.sh(side.caller, f"/usr/bin/python3 /compat/greeter.py call {compat.target(side, 'greeter')} {tag}",
                        timeout=90)
        result: dict[str, Any] = json.loads(out)
        slow = compat.events(side, "greeter", f'"name": "{tag}-deadline"')
        cancelled = compat.events(side, "greeter", f'"name": "{tag}-cancel"')
        result["server_saw_deadline"] = len(slow) == 1 and 0 < slow[0]["time_remaining"] <= 1.1 and \
            slow[0]["cancelled"]
        result["server_saw_cancel"] = len(cancelled) == 1 and cancelled[0]["cancelled"] and \
            cancelled[0]["sent"] < 1000
        return result
    plain, meshed = both(case)
    names = [f"{tag}-{i}" for i in range(3)]
    assert plain == meshed == {
        "unary": f"Hello, {tag}!",
        "server_stream": [f"Hello number {i}, {tag}!" for i in range(5)],
        "client_stream": f"Hello, {' and '.join(names)}!",
        "bidi": [f"Hello, {n}!" for n in names],
        "deadline": "DEADLINE_EXCEEDED", "deadline_within_3s": True,
        "cancel": "CANCELLED", "cancel_received": 3,
        "server_saw_deadline": True, "server_saw_cancel": True}, (plain, meshed)
    compat.audited(*(GREETER + m for m in ("SayHello", "SayHelloStreamReply", "SayHelloClientStream",
                                           "SayHelloBidiStream", "SayHelloSlowly")))


def test_grpc_excluded_from_capture_behind_a_named_target_port_is_reached_in_plaintext(compat: Compat) -> None:
    """Excluded port behind a named targetPort (issue 20): a meshed greeter whose port is excluded by its name
    (`meshward.io/exclude-inbound-ports: greeter`), behind a Service with `targetPort: greeter`. Callers' maps
    counted only numeric target ports as plaintext, so a meshed caller still originated mTLS there: UNAVAILABLE.
    Now the name resolves (at admission for the exclusion, per pod for the Service): both callers get the same
    replies."""
    c, ns, tag, name = compat.mesh.cluster, compat.ns, f"named-{uuid.uuid4().hex[:6]}", "greeter-excluded"
    container = {"name": "greeter", "image": compat.mesh.echo, "imagePullPolicy": "Never", "args": ["greeter"],
                 "ports": [{"name": "greeter", "containerPort": PORTS["greeter"]}],
                 "readinessProbe": {"tcpSocket": {"port": "greeter"}, "periodSeconds": 2},
                 "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False}}
    deployment = _deployment(ns, name, True, [container], {"meshward.io/exclude-inbound-ports": "greeter"})
    deployment["spec"]["template"]["spec"]["serviceAccountName"] = MESHED.server  # an identity the mesh issues
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
           "spec": {"selector": {"app": name}, "ports": [{"name": "grpc", "port": 50051, "targetPort": "greeter"}]}}
    try:
        c.apply(deployment, svc)
        c.kubectl("-n", ns, "rollout", "status", f"deployment/{name}", "--timeout=180s", timeout=200)
        init = c.get_json("-n", ns, "pod", compat.mesh.pod(name))["spec"]["initContainers"][0]["command"]
        assert init[init.index("--exclude-inbound-ports") + 1] == str(PORTS["greeter"]), init

        def case(side: Side) -> str:
            def unary() -> str:
                out = compat.sh(side.caller, f"/usr/bin/python3 /compat/greeter.py call {name}.{ns}:50051 {tag} "
                                             "2>&1 || true", timeout=90)
                return str(json.loads(out).get("unary", "")) if out.strip().startswith("{") else out[-500:]
            # Until kube-proxy and the callers' destination maps know the new Service, a call may fail as it did
            # before the fix: the first success counts; at the deadline the failure says what the call said.
            said: list[str] = []

            def answered() -> str | None:
                said.append(unary())
                return said[-1] if said[-1] == f"Hello, {tag}!" else None
            try:
                got: str = wait_until(f"{name} answering {side.caller}", answered, timeout=60, interval=2)
            except AssertionError as e:
                raise AssertionError(f"{side.caller}'s last call to {name}: {said[-1:]}") from e
            return got
        plain, meshed = both(case)
        assert plain == meshed == f"Hello, {tag}!", (plain, meshed)
    finally:
        c.kubectl("-n", ns, "delete", "deployment", name, "--wait=false", check=False)
        c.kubectl("-n", ns, "delete", "service", name, "--wait=false", check=False)


def test_h2c_with_prior_knowledge_reaches_the_server_as_http2(compat: Compat) -> None:
    """curl --http2-prior-knowledge and h2load (100 requests, 10 streams at a time on each of 2 connections)
    against Apache's mod_http2: HTTP/2 answers, and Apache says (header and access log) it served HTTP/2."""
    def case(side: Side) -> tuple[str, str, list[str], set[str]]:
        head = compat.sh(side.caller, f"curl -sS --http2-prior-knowledge -D - -o /dev/null --max-time 10 "
                                      f"{compat.url(side, 'apache', '/h2c/curl')}")
        load = compat.sh(side.caller, f"h2load -n 100 -c 2 -m 10 {compat.url(side, 'apache', '/h2c/h2load')}",
                         timeout=90)
        summary = [line for line in load.splitlines()
                   if line.startswith(("requests:", "status codes:", "Application protocol:"))]
        served = re.search(r"^x-served-protocol: *(\S+)", head, re.I | re.M)
        lines = compat.logged(side, "apache", '"GET /h2c/curl"') + compat.logged(side, "apache", '"GET /h2c/h2load"',
                                                                                 count=100)
        seen = {m.group(1) for line in lines if (m := re.search(r"proto=(\S+)", line))}
        return head.split(None, 2)[0] + " " + head.split(None, 2)[1], served.group(1) if served else "", summary, seen
    plain, meshed = both(case)
    assert plain == meshed == ("HTTP/2 200", "HTTP/2.0", [
        "Application protocol: h2c",
        "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout",
        "status codes: 100 2xx, 0 3xx, 0 4xx, 0 5xx"], {"HTTP/2.0"}), (plain, meshed)
    compat.audited("/h2c/curl", "/h2c/h2load")


# ------------------------------------------------------------------------------------------------ long-lived


def test_websocket_both_ways_sse_and_a_long_poll_are_held_60_s(compat: Compat) -> None:
    """At the same time, for 60 s: a WebSocket session (python3-websockets) exchanging a message each way every
    5 s, an SSE stream of an event every 5 s (curl -N), and a long poll answered after 60 s. All complete on
    both sides, with every message and event, and each server saw its client to the end."""
    every, events = EVERY_S, HELD_S // EVERY_S

    def case(side: Side) -> dict[str, Any]:
        ws = f"/usr/bin/python3 /compat/websocket.py talk {compat.url(side, 'websocket', '/ws/held', 'ws')} " \
             f"{events + 1} {every}"
        sse = f"curl -sS -N --max-time {HELD_S + 30} -w '\\n%{{http_code}}' " \
              f"'{compat.url(side, 'glue', '/sse/held')}?events={events}&every={every}'"
        poll = f"curl -sS --max-time {HELD_S + 30} -w '\\n%{{http_code}} %{{time_total}}' " \
               f"'{compat.url(side, 'glue', '/poll/held')}?wait={HELD_S}'"
        with ThreadPoolExecutor(max_workers=3) as pool:
            talked, streamed, polled = pool.map(lambda s: compat.sh(side.caller, s, timeout=HELD_S + 60),
                                                (ws, sse, poll))
        session = json.loads(talked)
        poll_body, _, poll_status = polled.rpartition("\n")
        code, took = poll_status.split()
        return {"websocket": {k: session[k] for k in ("sent", "echoed", "close_code")},
                "websocket_held": session["held_s"] >= HELD_S - 1,
                "websocket_server": [{k: e[k] for k in ("received", "close_code")}
                                     for e in compat.events(side, "websocket", '"path": "/ws/held"')],
                "sse": (re.findall(r"^data: (.*)$", streamed, re.M), streamed.rsplit("\n", 1)[-1]),
                "sse_server": [{k: e[k] for k in ("sent", "complete")}
                               for e in compat.events(side, "glue", '"path": "/sse/held"')],
                "poll": (json.loads(poll_body), code, float(took) >= HELD_S),
                "poll_server": [e["complete"] for e in compat.events(side, "glue", '"path": "/poll/held"')]}
    plain, meshed = both(case)
    assert plain == meshed == {
        "websocket": {"sent": events + 1, "echoed": events + 1, "close_code": 1000}, "websocket_held": True,
        "websocket_server": [{"received": events + 1, "close_code": 1000}],
        "sse": ([f"tick {i}" for i in range(events)], "200"), "sse_server": [{"sent": events, "complete": True}],
        "poll": ({"event": "late", "waited_s": HELD_S}, "200", True), "poll_server": [True]}, (plain, meshed)
    compat.audited("/ws/held", "/sse/held", "/poll/held")


def test_a_slow_client_reads_30_mb_at_1_mib_per_s(compat: Compat) -> None:
    """curl --limit-rate 1M: about 30 s of a flowing download, all of it (the mesh's stream idle timeout is for
    streams with no byte either way; there is no route timeout to cut it)."""
    def case(side: Side) -> tuple[str, str, bool]:
        out = compat.sh(side.caller, f"curl -sS --limit-rate 1M -o /dev/null --max-time 120 "
                                     f"-w '%{{http_code}} %{{size_download}} %{{time_total}}' "
                                     f"{compat.url(side, 'nginx', '/files/30m')}", timeout=150)
        code, size, took = out.split()
        # Held past Envoy's default route timeout (15 s, which cut it at 26 MB); not 30 s exactly: curl's rate
        # limit lets bursts through (22 to 29 s seen for two such downloads at once on loopback).
        return code, size, float(took) > ENVOY_DEFAULT_ROUTE_TIMEOUT_S
    plain, meshed = both(case)
    assert plain == meshed == ("200", str(SLOW_BYTES), True), (plain, meshed)
    compat.audited("/files/30m")


# ------------------------------------------------------------------------------------------------ HTTP/1.0


def test_http10_is_served_to_a_workload_that_accepts_it_and_426_otherwise(compat: Compat) -> None:
    """curl -0: unmeshed, nginx answers; meshed, the caller's Envoy answers 426 unless the caller's workload
    sets meshward.io/accept-http10 (then the request crosses as HTTP/1.1 and nginx answers the same)."""
    def get(caller: str, side: Side) -> str:
        return compat.sh(caller, f"curl -sS -0 -w ' %{{http_code}}' --max-time 10 "
                                 f"{compat.url(side, 'nginx', '/ok/http10')}")
    plain, accepting, default = (get(UNMESHED.caller, UNMESHED), get("caller-http10", MESHED),
                                 get(MESHED.caller, MESHED))
    assert plain == accepting == "ok\n 200", (plain, accepting)
    assert default.endswith(" 426"), default
    compat.audited("/ok/http10", caller="caller-http10")
    seen = compat.logged(MESHED, "nginx", '"GET /ok/http10"')
    assert len(seen) == 1 and "proto=HTTP/1.1" in seen[0], seen


# ------------------------------------------------------------------------------------------------ rotation (last)

# How long the held calls run: across several leaf renewals (every ~15 s) and a whole CA rotation (two steps of
# 30 s, then the server's next renewal to drop the old root), with room for a slow node.
HELD_GRPC_S = 120
BIDI_EVERY_S = 0.5
UNARY_EVERY_S = 0.2
# The unary loop opens a new channel (a new HTTP/2 connection to the caller's Envoy) this often.
RECONNECT_S = 5.0
# greeter.py pauses this long between the messages of a stream longer than 10: the server stream's length.
STREAM_PACE_S = 0.05
HELD_SCRIPT = "/tmp/held-grpc.py"
HELD_RESULTS = "/tmp/held-grpc.jsonl"
# Runs in the caller pod (Debian's python3 with python3-grpcio, greeter.py's message helpers), in the background:
# a bidi conversation (a message every BIDI_EVERY_S, each reply awaited), one long server stream, and a unary
# loop, for SECONDS. Writes JSON lines to OUT: `open` as each call is under way, every failure as it happens,
# a summary per call, then `done`.
HELD_GRPC = r"""
import json, math, queue, sys, threading, time
sys.path.insert(0, "/compat")
import grpc
from greeter import SERVICE, decode, hello_request

target, seconds, tag, path = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
bidi_every, unary_every, reconnect, pace = (float(a) for a in sys.argv[5:9])
out, lock, start = open(path, "a", buffering=1), threading.Lock(), time.monotonic()


def emit(**fields):
    with lock:
        out.write(json.dumps({"t": round(time.monotonic() - start, 2), **fields}, sort_keys=True) + "\n")


def failure(kind, e, **fields):
    code = e.code().name if isinstance(e, grpc.RpcError) and hasattr(e, "code") else type(e).__name__
    detail = e.details() if isinstance(e, grpc.RpcError) and hasattr(e, "details") else str(e)
    emit(kind=kind, error=code, detail=str(detail)[:300], **fields)


def channel():
    ch = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    grpc.channel_ready_future(ch).result(timeout=20)
    return ch


def bidi(ch):
    outbox, sent, received, mismatched = queue.Queue(), 0, 0, 0
    total = math.ceil(seconds / bidi_every)
    try:
        call = ch.stream_stream(f"/{SERVICE}/SayHelloBidiStream")(iter(outbox.get, None), timeout=seconds + 60)
        began = time.monotonic()
        for n in range(total):
            pause = began + n * bidi_every - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            outbox.put(hello_request(f"{tag}-bidi-{n}"))
            sent += 1
            mismatched += decode(next(call))[1] != f"Hello, {tag}-bidi-{n}!"
            received += 1
            if n == 0:
                emit(kind="bidi", open=True)
        outbox.put(None)
        received += sum(1 for _ in call)  # nothing more is due: the server answers each message once
        emit(kind="bidi", end=True, sent=sent, received=received, mismatched=mismatched, status=call.code().name)
    except Exception as e:
        outbox.put(None)
        failure("bidi", e, sent=sent, received=received)


def server_stream(ch):
    asked, received, mismatched = int(seconds / pace), 0, 0
    try:
        call = ch.unary_stream(f"/{SERVICE}/SayHelloStreamReply")(hello_request(f"{tag}-stream", asked),
                                                                  timeout=3 * seconds + 60)
        for reply in call:
            mismatched += decode(reply)[1] != f"Hello number {received}, {tag}-stream!"
            received += 1
            if received == 1:
                emit(kind="server_stream", open=True)
        emit(kind="server_stream", end=True, asked=asked, received=received, mismatched=mismatched,
             status=call.code().name)
    except Exception as e:
        failure("server_stream", e, asked=asked, received=received)


def unary():
    calls = ok = channels = 0
    ch, opened = None, 0.0
    while time.monotonic() - start < seconds:
        try:
            if ch is None or time.monotonic() - opened > reconnect:
                if ch is not None:
                    ch.close()
                ch, opened = channel(), time.monotonic()
                channels += 1
            calls += 1
            reply = ch.unary_unary(f"/{SERVICE}/SayHello")(hello_request(f"{tag}-unary-{calls}"), timeout=5)
            if decode(reply)[1] == f"Hello, {tag}-unary-{calls}!":
                ok += 1
            else:
                emit(kind="unary", error="wrong reply", detail=decode(reply)[1])
            if calls == 1:
                emit(kind="unary", open=True)
        except Exception as e:
            failure("unary", e, call=calls)
            ch = None
        time.sleep(unary_every)
    emit(kind="unary", end=True, calls=calls, ok=ok, channels=channels)


try:
    shared = channel()
except Exception as e:
    failure("channel", e)
else:
    workers = [threading.Thread(target=bidi, args=(shared,)), threading.Thread(target=server_stream, args=(shared,)),
               threading.Thread(target=unary)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
emit(kind="done")
"""
# The agent's line for each certificate it obtains (sidecar/engines/certificate.py).
RENEWAL = re.compile(r"certificate for (\S+) \(serial ([0-9a-f]+)\)")


def _meshward(*args: str) -> subprocess.CompletedProcess[str]:
    """The `meshward` CLI of this virtualenv, against the module's cluster."""
    return subprocess.run([str(Path(sys.executable).parent / "meshward"), *args], capture_output=True, text=True,
                          timeout=60)


def _ca(compat: Compat) -> tuple[str, dict[str, int]]:
    """The CA's rotation phase and its roots' serials by role (active, next, previous), from `meshward ca status`."""
    proc = _meshward("ca", "status", "--namespace", compat.mesh.release.namespace, "--kubeconfig",
                     str(compat.mesh.cluster.kubeconfig))
    if proc.returncode:
        return "", {}
    lines = proc.stdout.splitlines()
    roots = {m.group(1): int(m.group(2), 16) for line in lines[1:] if (m := re.match(r"(\w+) +serial ([0-9a-f]+)", line))}
    return lines[0].split()[1], roots


def _served(compat: Compat) -> tuple[set[int], set[int]]:
    """(leaf serials for the meshed server's SPIFFE ID, CA serials it validates peers with) from its Envoy's /certs:
    the mesh's TLS contexts, inbound and outbound, are those presenting that leaf."""
    doc = json.loads(envoy_admin(compat.mesh.cluster, compat.ns, compat.mesh.pod(MESHED.server), "/certs"))
    me = spiffe(compat.ns, MESHED.server)
    leaves, roots = set(), set()
    for context in doc.get("certificates", []):
        mine = {int(cert["serial_number"], 16) for cert in context.get("cert_chain") or []
                if any(san.get("uri") == me for san in cert.get("subject_alt_names") or [])}
        if mine:
            leaves |= mine
            roots |= {int(cert["serial_number"], 16) for cert in context.get("ca_cert") or []}
    return leaves, roots


def _renewals(compat: Compat) -> list[int]:
    """The serials of the certificates the meshed server's agent obtained, in order."""
    log = compat.mesh.cluster.kubectl("-n", compat.ns, "logs", compat.mesh.pod(MESHED.server), "-c",
                                      "meshward-agent").stdout
    me = spiffe(compat.ns, MESHED.server)
    return [int(m.group(2), 16) for m in RENEWAL.finditer(log) if m.group(1) == me]


def _held(compat: Compat) -> list[dict[str, Any]]:
    """The held calls' JSON lines so far."""
    out = compat.sh(MESHED.caller, f"cat {HELD_RESULTS} 2>/dev/null || true")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_grpc_streams_held_across_leaf_renewals_and_a_ca_rotation_fail_no_rpc(compat: Compat) -> None:
    """In the meshed caller, for 120 s: a bidi conversation (a message every 0.5 s, each reply awaited), one
    server stream of 2,400 messages (one every 50 ms), and a unary loop (every 0.2 s, a new channel every 5 s).
    Meanwhile both pods renew their 30 s leaves and the CA rotates (`meshward ca rotate`: staged, retiring,
    steady). Not one RPC fails; every message of both streams arrives, in order, and the server saw them all; the
    streams are still open once the server's Envoy serves a new leaf and trusts only the new root. The module's
    last test: the rotation is release-wide."""
    c, ns = compat.mesh.cluster, compat.ns
    wait_until("the CA steady", lambda: _ca(compat)[0] == "steady", timeout=60)
    old_root = _ca(compat)[1]["active"]
    leaves, roots = wait_until("the server's Envoy serving its leaf", lambda: (s := _served(compat))[0] and s,
                               timeout=30)
    assert roots == {old_root}, (roots, old_root)
    renewed_before = len(_renewals(compat))
    tag = f"held-{uuid.uuid4().hex[:6]}"
    c.kubectl("-n", ns, "exec", "-i", compat.mesh.pod(MESHED.caller), "-c", "app", "--", "sh", "-c",
              f"cat > {HELD_SCRIPT} && rm -f {HELD_RESULTS}", stdin=HELD_GRPC)
    # In the background (its output to files), so no kubectl exec is held open for two minutes.
    compat.sh(MESHED.caller, f"nohup /usr/bin/python3 {HELD_SCRIPT} {compat.target(MESHED, 'greeter')} {HELD_GRPC_S} "
                             f"{tag} {HELD_RESULTS} {BIDI_EVERY_S} {UNARY_EVERY_S} {RECONNECT_S} {STREAM_PACE_S} "
                             f"</dev/null >/tmp/held-grpc.log 2>&1 &")

    def under_way() -> bool:
        lines = _held(compat)
        return {x["kind"] for x in lines if x.get("open")} == {"bidi", "server_stream", "unary"} or \
            any("error" in x for x in lines)  # a failure: the assertions below say which
    try:
        wait_until("the three held calls under way", under_way, timeout=30, interval=1)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{compat.sh(MESHED.caller, 'cat /tmp/held-grpc.log')}") from e

    rotate = _meshward("ca", "rotate", "--namespace", compat.mesh.release.namespace, "--kubeconfig", str(c.kubeconfig))
    assert rotate.returncode == 0, rotate.stderr
    wait_until("the rotation staged", lambda: _ca(compat)[0] == "staged", timeout=30, interval=1)
    wait_until("the rotation done", lambda: _ca(compat)[0] == "steady", timeout=100, interval=1)
    new_root = _ca(compat)[1]["active"]
    assert new_root != old_root

    def rotated() -> set[int] | None:
        # The old root leaves the server's Envoy with the first leaf after the rotation (the bundle comes with
        # it), and Envoy serves the leaf its agent obtained last.
        now_leaves, now_roots = _served(compat)
        return now_leaves if now_roots == {new_root} and now_leaves == set(_renewals(compat)[-1:]) else None
    now_leaves = wait_until("the server's Envoy on its agent's last leaf, trusting only the new root", rotated,
                            timeout=45, interval=1)
    assert now_leaves != leaves
    so_far = _held(compat)
    assert not any(x.get("end") and x["kind"] != "unary" for x in so_far), \
        f"the streams ended before the rotation was over: lengthen HELD_GRPC_S\n{so_far}"

    lines = wait_until("the held calls' end", lambda: (h := _held(compat)) and h[-1]["kind"] == "done" and h,
                       timeout=2 * HELD_GRPC_S + 60, interval=2)
    failures = [x for x in lines if "error" in x]
    ends = {x["kind"]: {k: v for k, v in x.items() if k not in ("kind", "end", "t")} for x in lines if x.get("end")}
    assert failures == [], failures
    messages = math.ceil(HELD_GRPC_S / BIDI_EVERY_S)
    streamed = int(HELD_GRPC_S / STREAM_PACE_S)
    unary = ends.get("unary", {})
    assert ends.get("bidi") == {"sent": messages, "received": messages, "mismatched": 0, "status": "OK"}, ends
    assert ends.get("server_stream") == {"asked": streamed, "received": streamed, "mismatched": 0, "status": "OK"}, \
        ends
    assert unary.get("ok") == unary.get("calls") and unary["calls"] >= HELD_GRPC_S / UNARY_EVERY_S / 2, ends
    assert unary["channels"] >= HELD_GRPC_S / RECONNECT_S / 2, ends
    # The server's side of both streams: every message, to the end.
    bidi = compat.events(MESHED, "greeter", f'"{tag}-bidi-0"')
    assert [len(e["names"]) for e in bidi] == [messages], bidi
    stream = compat.events(MESHED, "greeter", f'"name": "{tag}-stream"')
    assert [(e["sent"], e["cancelled"]) for e in stream] == [(streamed, False)], stream
    renewed = _renewals(compat)[renewed_before:]
    assert len(renewed) >= 4, renewed  # leaves of ~15 s: about eight renewals in the two minutes
    compat.audited(*(GREETER + m for m in ("SayHello", "SayHelloStreamReply", "SayHelloBidiStream")))

