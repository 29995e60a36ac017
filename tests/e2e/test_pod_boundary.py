"""The pod is the trust boundary: attacks on a meshed pod's edges, run from where an attacker stands, in real pods.

Each test is one finding of an adversarial review (issue 18), named after its trick, and tries it: from an unmeshed
pod in another namespace (the IPv6 side door), from the app container of a meshed pod (the proxy's group, the
workload key), and as a namespace admin writing pods (mesh volumes, shared processes, `kubectl debug`, pre-injected
imitations, annotations that claim what only the injector decides).

One release and one namespace: `victim` (meshed, the echo app listening on `::`, an AuthPolicy that admits only
`GET /public` from `client`, behind a dual-stack Service: the e2e cluster is dual-stack), `client` (meshed, its app running as root, as many images do), `plain` (unmeshed,
behind a Service), and an unmeshed `attacker` pod in a namespace of its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from meshward.operator.domain.inject import AGENT, INIT, PROXY
from tests.e2e.conftest import Mesh, deployment, dual_stack_service, envoy_admin, installed, service
from tests.kube import KindSession, service_identity, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def victim_policy(ns: str) -> dict[str, Any]:
    """Only `client` may GET /public; everything else (e.g. /admin) is denied to everyone."""
    return {"apiVersion": "meshward.io/v1alpha1", "kind": "AuthPolicy", "metadata": {"name": "victim", "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": "victim"}}, "rules": [
                {"name": "client-reads-public", "from": {"principals": [f"spiffe://cluster.local/ns/{ns}/sa/client"]},
                 "to": {"methods": ["GET"], "paths": ["/public"]}}]}}


@pytest.fixture(scope="module")
def boundary(kind_session: KindSession) -> Iterator[tuple[Mesh, Mesh]]:
    """(the meshed namespace, the attacker's namespace)."""
    with installed(kind_session) as rel:
        c = rel.cluster
        ns, other = c.new_namespace("boundary"), c.new_namespace("attacker")
        echo = kind_session.images["echo"]
        try:
            for sa in ("victim", "client", "plain"):
                c.kubectl("-n", ns, "create", "serviceaccount", sa)
            c.kubectl("-n", other, "create", "serviceaccount", "attacker")
            c.apply(service_identity(ns, "victim"), service_identity(ns, "client"), victim_policy(ns))
            c.trust_bundle(ns, timeout=60)
            c.apply(deployment(ns, "victim", echo, inject=True, env={"HOST": "::"}), dual_stack_service(ns, "victim"),
                    deployment(ns, "client", echo, inject=True, probe=False, env={"HOST": "::"},
                               security={"runAsUser": 0, "runAsNonRoot": False}),
                    deployment(ns, "plain", echo, inject=False), service(ns, "plain"),
                    deployment(other, "attacker", echo, inject=False, probe=False))
            for namespace, name in ((ns, "victim"), (ns, "client"), (ns, "plain"), (other, "attacker")):
                c.kubectl("-n", namespace, "rollout", "status", f"deployment/{name}", "--timeout=180s", timeout=200)
            mesh, outside = Mesh(rel, ns, echo), Mesh(rel, other, echo)
            wait_until("victim routable", lambda: mesh.curl("client", f"http://victim.{ns}/public")[0] == 200,
                       timeout=60)
            yield mesh, outside
        finally:
            for n in (ns, other):
                c.kubectl("delete", "namespace", n, "--wait=false", check=False)


def _addresses(mesh: Mesh, kind: str, name: str) -> tuple[str, str]:
    """(IPv4, IPv6) of pod or Service `name`."""
    if kind == "pod":
        ips = [p["ip"] for p in mesh.cluster.get_json("-n", mesh.ns, "pod", mesh.pod(name))["status"]["podIPs"]]
    else:
        ips = mesh.cluster.get_json("-n", mesh.ns, "service", name)["spec"]["clusterIPs"]
    v4, v6 = [ip for ip in ips if ":" not in ip], [ip for ip in ips if ":" in ip]
    assert v4 and v6, f"{kind} {name} is not dual-stack: {ips} (the e2e cluster is)"
    return v4[0], v6[0]


def _link_local(mesh: Mesh, app: str) -> str:
    """The fe80:: address of `app`'s pod on eth0 (what its neighbours see in their neighbour table)."""
    table = mesh.cluster.kubectl("-n", mesh.ns, "exec", mesh.pod(app), "-c", "app", "--", "cat",
                                 "/proc/net/if_inet6").stdout
    for line in table.splitlines():
        hexaddr, _, _, scope, _, dev = line.split()
        if dev == "eth0" and scope == "20":
            return ":".join(hexaddr[i:i + 4] for i in range(0, 32, 4))
    raise AssertionError(f"{app} has no link-local IPv6 address on eth0:\n{table}")


def test_ipv6_link_local_side_door_into_a_meshed_app_is_closed(boundary: tuple[Mesh, Mesh]) -> None:
    """IPv6 side door: capture was IPv4 only, so an unmeshed pod in another namespace reached a meshed app listening
    on `::` over its link-local address: a denied path answered 200, a spoofed identity header reached the app, and
    no audit line was written. Now IPv6 is captured like IPv4 (the capture container loaded the ip6tables nat rules,
    not the reset fallback; Envoy's inbound listener has a `[::]` socket): plaintext over link-local IPv6 meets the
    inbound listener, which takes mTLS only. A meshed caller dialling a link-local address is not in the
    destination map and Envoy cannot dial a link-local destination (no zone): it fails closed, never reaching the
    app around mTLS."""
    mesh, outside = boundary
    victim = mesh.pod("victim")
    init_log = mesh.cluster.kubectl("-n", mesh.ns, "logs", victim, "-c", INIT).stdout
    assert "-A MESHWARD_OUTPUT -d ::1/128 -j RETURN" in init_log, init_log
    assert "IPv6 reset, not captured" not in init_log, init_log
    assert init_log.count("rules installed with") == 2, init_log  # IPv4, then IPv6: both nat tables
    statuses = json.loads(envoy_admin(mesh.cluster, mesh.ns, victim, "/listeners?format=json"))["listener_statuses"]
    inbound = next(st for st in statuses if st["name"] == "inbound")
    assert [a["socket_address"]["address"] for a in inbound.get("additional_local_addresses", [])] == ["::"]

    address = _link_local(mesh, "victim")
    for path in ("/admin", "/public"):
        code, body = outside.curl("attacker", f"http://[{address}%25eth0]:8080{path}", "-g", "-H",
                                  "x-meshward-sub: admin")
        assert code == 0, f"an unmeshed pod in another namespace reached the app over IPv6: {code} {body}"
    code, body = mesh.curl("client", f"http://[{address}%25eth0]:8080/admin", "-g")
    assert code in (0, 503), f"a meshed pod reached the app over link-local IPv6 around mTLS: {code} {body}"
    assert not any(d["path"] in ("/admin", "/public") and not d.get("peer") for d in mesh.decisions("victim"))
    assert not any(d["path"] == "/admin" and d["outcome"] == "allow" for d in mesh.decisions("victim"))
    assert mesh.curl("client", f"http://victim.{mesh.ns}/admin")[0] == 403  # IPv4: mTLS, and the policy decides
    assert outside.curl("attacker", f"http://victim.{mesh.ns}/public")[0] == 0  # plaintext refused


def test_dual_stack_meshed_calls_over_ipv6_are_mtls_and_the_policy_decides(boundary: tuple[Mesh, Mesh]) -> None:
    """Pod to pod over IPv6 on the dual-stack cluster: the client app dials the victim's global IPv6 pod address and
    its Service's IPv6 ClusterIP in plaintext; its Envoy sends both over mTLS pinned to the victim's identity (the
    destination map has both families), and the victim's agent decides with the caller's SPIFFE ID: GET /public
    200, /admin 403. The other way too: the victim's app dials the client's IPv6 pod address, and the client's
    agent (no policy selects it: it allows) sees the victim's SPIFFE ID. Before, IPv6 was reset (and before that
    went around the mesh)."""
    mesh, _ = boundary
    _, pod6 = _addresses(mesh, "pod", "victim")
    _, svc6 = _addresses(mesh, "service", "victim")
    client = f"spiffe://cluster.local/ns/{mesh.ns}/sa/client"
    for url in (f"http://[{pod6}]:8080", f"http://[{svc6}]:80"):
        code, body = mesh.curl("client", f"{url}/public", "-g")
        assert code == 200, (url, code, body)
        code, body = mesh.curl("client", f"{url}/admin", "-g")
        assert code == 403, (url, code, body)
    decided = {(d["path"], d["outcome"], d.get("peer")) for d in mesh.decisions("victim")}
    assert {("/public", "allow", client), ("/admin", "forbidden", client)} <= decided
    _, client6 = _addresses(mesh, "pod", "client")
    code, body = mesh.curl("victim", f"http://[{client6}]:8080/from-victim", "-g")
    assert code == 200, (code, body)
    victim = f"spiffe://cluster.local/ns/{mesh.ns}/sa/victim"
    wait_until("the client's audit line naming the victim", lambda: any(
        d["path"] == "/from-victim" and d.get("peer") == victim for d in mesh.decisions("client")), timeout=15)


def test_dual_stack_unmeshed_caller_over_ipv6_is_refused(boundary: tuple[Mesh, Mesh]) -> None:
    """An unmeshed pod in another namespace dialling the meshed victim over IPv6 (its global pod address and its
    Service's IPv6 ClusterIP) in plaintext, with a spoofed identity header, meets the victim's inbound `[::]`
    socket, which takes mTLS only: no HTTP answer, no decision."""
    mesh, outside = boundary
    _, pod6 = _addresses(mesh, "pod", "victim")
    _, svc6 = _addresses(mesh, "service", "victim")
    for url in (f"http://[{pod6}]:8080/v6-unmeshed", f"http://[{svc6}]:80/v6-unmeshed"):
        code, body = outside.curl("attacker", url, "-g", "-H", "x-meshward-sub: admin")
        assert code == 0, f"an unmeshed pod reached the app over IPv6: {url} {code} {body}"
    assert not any(d["path"] == "/v6-unmeshed" for d in mesh.decisions("victim"))


def test_a_root_app_calling_setgid_1337_is_still_captured(boundary: tuple[Mesh, Mesh]) -> None:
    """Capture bypass by group: the proxy's GID was exempt from capture, so a root app that called setgid(1337)
    skipped Envoy outbound, and its context header reached an unmeshed pod. Its traffic is captured now: Envoy
    removes the header toward the unmeshed Service."""
    mesh, _ = boundary
    script = ("import os, urllib.request; os.setgid(1337); os.setgroups([1337]); "
              f"r = urllib.request.Request('http://plain.{mesh.ns}/leak', headers={{'x-meshward-context': 'stolen'}}); "
              "print(urllib.request.urlopen(r, timeout=10).read().decode())")
    out = mesh.cluster.kubectl("-n", mesh.ns, "exec", mesh.pod("client"), "-c", "app", "--", "python3", "-c",
                               script).stdout
    seen = json.loads(out)["headers"]
    assert "x-meshward-context" not in seen, "the app's traffic went around Envoy (GID 1337 exempt from capture)"


def _refusal(mesh: Mesh, manifest: dict[str, Any]) -> str:
    """The API server's answer to creating `manifest` (a server-side dry run: the webhooks run, nothing is created).

    `create`, not `apply`: apply copies the manifest into a last-applied annotation, which doubled an inflated
    annotation past the API server's own 256 KiB bound, so the old code's refusal was the API server's, not ours."""
    proc = mesh.cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", stdin=yaml.safe_dump(manifest),
                                check=False)
    return proc.stderr if proc.returncode else ""


def _opted_in_pod(ns: str, name: str, echo: str, **spec: Any) -> dict[str, Any]:
    container = {"name": "app", "image": echo, "imagePullPolicy": "Never", **spec.pop("app", {})}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"meshward.io/inject": "enabled"}},
            "spec": {"serviceAccountName": "client", "containers": [container], **spec}}


@pytest.mark.parametrize(("name", "spec", "says"), [
    ("sds-socket-mount", {"app": {"volumeMounts": [{"name": "meshward-sockets", "mountPath": "/steal"}]}},
     "spec.containers[0].volumeMounts[0].name: 'meshward-sockets' is a volume of the mesh"),
    ("token-mount-by-init", {"initContainers": [{"name": "grab", "image": "x", "volumeMounts": [
        {"name": "meshward-token", "mountPath": "/t"}]}]}, "spec.initContainers[0].volumeMounts[0].name"),
    ("shared-processes", {"shareProcessNamespace": True}, "spec.shareProcessNamespace"),
    ("runas-group-1337", {"app": {"securityContext": {"runAsGroup": 1337}}}, "runAsGroup: 1337"),
    ("supplemental-1337", {"securityContext": {"supplementalGroups": [1337]}}, "supplementalGroups"),
    ("pre-injected-imitation", {"hostNetwork": True, "initContainers": [
        {"name": AGENT, "image": "x", "command": ["sleep", "1d"]}]}, "spec.hostNetwork"),
])
def test_a_namespace_admin_cannot_write_a_pod_that_reaches_the_key_or_skips_capture(
        boundary: tuple[Mesh, Mesh], name: str, spec: dict[str, Any], says: str) -> None:
    """Workload key theft and capture bypass by pod spec: an app container mounting the mesh's socket volume asked the
    SDS socket for the key and minted context tokens naming any user; shareProcessNamespace let a root app read the
    key from /proc/<agent>/mem; GID 1337 skipped capture; a pod arriving with a container named meshward-agent was
    trusted as injected and skipped every refusal. The webhook refuses each, naming the field."""
    mesh, _ = boundary
    refusal = _refusal(mesh, _opted_in_pod(mesh.ns, f"attack-{name}", mesh.echo, **spec))
    assert "cannot be protected" in refusal and says in refusal, refusal


def test_a_pre_injected_imitation_runs_the_injectors_containers(boundary: tuple[Mesh, Mesh]) -> None:
    """Pre-injected imitation: a pod carrying its own meshward-init (that captures nothing) and meshward-agent was
    left as it was. The webhook now injects it again from what it is without the mesh."""
    mesh, _ = boundary
    fake = [{"name": INIT, "image": mesh.echo, "command": ["true"]},
            {"name": AGENT, "image": mesh.echo, "restartPolicy": "Always", "command": ["sleep", "1d"]},
            {"name": PROXY, "image": mesh.echo, "restartPolicy": "Always", "command": ["sleep", "1d"]}]
    proc = mesh.cluster.kubectl("apply", "--dry-run=server", "-o", "json", "-f", "-", stdin=yaml.safe_dump(
        _opted_in_pod(mesh.ns, "imitation", mesh.echo, initContainers=fake)))
    init = {c["name"]: c for c in json.loads(proc.stdout)["spec"]["initContainers"]}
    assert init[INIT]["command"][0] == "meshward-init" and init[AGENT]["command"][0] == "meshward-sidecar"
    assert init[PROXY]["command"][0] == "meshward-proxy"


@pytest.mark.parametrize(("name", "custom", "target", "says"), [
    ("mount", {"volumeMounts": [{"name": "meshward-sockets", "mountPath": "/steal"}]}, "",
     "volumeMounts[0].name: 'meshward-sockets' is a volume of the mesh"),
    ("proxy-uid", {"securityContext": {"runAsUser": 1337}}, "", "runs as UID 1337"),
    ("proxy-gid", {"securityContext": {"runAsGroup": 1337}}, "", "runAsGroup: 1337"),
    ("target-agent", {}, AGENT, "targetContainerName"),
])
def test_kubectl_debug_cannot_get_around_the_mesh(boundary: tuple[Mesh, Mesh], tmp_path: Any, name: str,
                                                  custom: dict[str, Any], target: str, says: str) -> None:
    """Ephemeral containers had no admission review: `kubectl debug` could run a container as the proxy's UID or GID
    (uncaptured), mount the socket volume, or share the agent's processes (--target). Now refused like app containers."""
    mesh, _ = boundary
    spec = tmp_path / "custom.json"
    spec.write_text(json.dumps(custom))
    proc = mesh.cluster.kubectl("-n", mesh.ns, "debug", mesh.pod("victim"), f"--image={mesh.echo}",
                                "--image-pull-policy=Never", f"--container=dbg-{name}", f"--custom={spec}",
                                *([f"--target={target}"] if target else []), "--", "sleep", "60", check=False)
    assert proc.returncode != 0 and says in proc.stderr, (proc.stdout, proc.stderr)


def test_the_agents_and_envoys_memory_is_out_of_reach_even_for_the_proxys_uid(boundary: tuple[Mesh, Mesh]) -> None:
    """Reading the workload key from /proc/<pid>/mem: a process of the proxy's UID read the agent's memory and found
    the PKCS#8 key. The agent and Envoy are non-dumpable now, so even a process of their own UID in their own
    container (here `kubectl exec`, UID 1337, no capabilities) cannot open their memory."""
    mesh, _ = boundary
    probe = ("import os\ntry:\n    open('/proc/1/mem', 'rb').close()\n    print('readable', os.getuid())\n"
             "except OSError as e:\n    print('refused', os.getuid(), e.errno)")
    for container in (AGENT, PROXY):
        out = mesh.cluster.kubectl("-n", mesh.ns, "exec", mesh.pod("victim"), "-c", container, "--", "python3", "-c",
                                   probe).stdout.split()
        assert out[:2] == ["refused", "1337"], f"{container}'s memory: {out}"


def test_an_annotation_cannot_make_a_pod_meshed(boundary: tuple[Mesh, Mesh]) -> None:
    """Forged `meshward.io/injected`: an unlabelled pod carrying the annotation was listed as meshed, so meshed
    callers sent it mTLS it could not answer (503). Meshed is decided from the spec the injector made: the callers
    reach the pod as the plain pod it is."""
    mesh, _ = boundary
    c = mesh.cluster
    forged = deployment(mesh.ns, "forged", mesh.echo, inject=False, annotations={"meshward.io/injected": "0.1"})
    forged["spec"]["template"]["spec"]["serviceAccountName"] = "plain"
    c.apply(forged)
    c.kubectl("-n", mesh.ns, "rollout", "status", "deployment/forged", "--timeout=120s", timeout=150)
    ip = c.get_json("-n", mesh.ns, "pod", mesh.pod("forged"))["status"]["podIP"]
    # A Service created after the pod runs: once the client's Envoy knows its address, the map has seen the pod too.
    marker = {**service(mesh.ns, "victim"), "metadata": {"name": "marker", "namespace": mesh.ns}}
    c.apply(marker)
    marker_ip = c.get_json("-n", mesh.ns, "service", "marker")["spec"]["clusterIP"]
    client = mesh.pod("client")
    wait_until("the marker Service in the client's map", lambda: marker_ip in envoy_admin(
        c, mesh.ns, client, "/config_dump?resource=dynamic_listeners"), timeout=60)
    assert ip not in envoy_admin(c, mesh.ns, client, "/config_dump?resource=dynamic_listeners")
    code, body = mesh.curl("client", f"http://{ip}:8080/hello")
    assert code == 200, f"a meshed caller cannot reach the pod that claims to be meshed: {code} {body}"
    c.kubectl("-n", mesh.ns, "delete", "deployment/forged", "service/marker", "--wait=false")


HUGE_PORTS = ",".join(str(p) for p in range(1, 45001))  # ~253 KiB: about all one object's annotations may hold


def test_an_inflated_mesh_annotation_is_refused_at_admission_naming_it(boundary: tuple[Mesh, Mesh]) -> None:
    """Annotation inflation at the door: an opted-in pod with a 253 KiB meshward.io/exclude-inbound-ports is refused
    by the injection webhook, naming the annotation and its bound, without echoing the value back."""
    mesh, _ = boundary
    pod = _opted_in_pod(mesh.ns, "inflated", mesh.echo)
    pod["metadata"]["annotations"] = {"meshward.io/exclude-inbound-ports": HUGE_PORTS}
    refusal = _refusal(mesh, pod)
    assert "metadata.annotations[meshward.io/exclude-inbound-ports]" in refusal and "allowed" in refusal, refusal
    assert len(refusal) < 2000, "the refusal does not echo the value back"


def _agent_metric(mesh: Mesh, app: str, name: str, label: str = "") -> float:
    """A metric of `app`'s agent (the samples whose labels contain `label`), read from inside its pod."""
    code, body = mesh.curl(app, "http://127.0.0.1:15020/metrics")
    assert code == 200, body
    return sum(float(line.rpartition(" ")[2]) for line in body.splitlines()
               if line.split("{")[0].split(" ")[0] == name and label in line)


def test_destination_map_inflation_in_one_namespace_never_reaches_another_namespaces_stream(
        boundary: tuple[Mesh, Mesh], tmp_path: Any) -> None:
    """Destination-map inflation: pods around the injector with a hand-written meshward.io/injected and a 253 KiB
    exclude-inbound-ports, and an injected pod whose exclusion is inflated after admission (`kubectl annotate`), once
    pushed every agent's destination message past gRPC's 4 MiB: every stream failed, a policy change and a Revocation
    never arrived. Now neither input reaches the map; the other namespace's agents stay connected and get a policy
    change within 10 s, and its Revocation reports Enforced."""
    mesh, outside = boundary
    c, ns, evil = mesh.cluster, mesh.ns, outside.ns
    for n in range(2):
        c.kubectl("create", "-f", "-", stdin=json.dumps({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"around-{n}", "namespace": evil, "annotations": {
                "meshward.io/injected": "hand-written", "meshward.io/exclude-inbound-ports": HUGE_PORTS}},
            "spec": {"serviceAccountName": "attacker", "containers": [
                {"name": "app", "image": mesh.echo, "imagePullPolicy": "Never"}]}}))
    c.apply(service_identity(evil, "attacker"))
    c.trust_bundle(evil, timeout=60)
    inflater = deployment(evil, "inflater", mesh.echo, inject=True, probe=False)
    inflater["spec"]["template"]["spec"]["serviceAccountName"] = "attacker"
    c.apply(inflater)
    try:
        c.kubectl("-n", evil, "rollout", "status", "deployment/inflater", "--timeout=180s", timeout=200)
        c.kubectl("-n", evil, "wait", "--for=condition=Ready", "pod/around-0", "pod/around-1", "--timeout=120s",
                  timeout=130)
        patch = tmp_path / "inflate.json"  # 253 KiB: too long for one argument
        patch.write_text(json.dumps({"metadata": {"annotations": {"meshward.io/exclude-inbound-ports": HUGE_PORTS}}}))
        c.kubectl("-n", evil, "patch", "pod", outside.pod("inflater"), "--type=merge", f"--patch-file={patch}")
        assert mesh.curl("client", f"http://victim.{ns}/public")[0] == 200
        c.apply({"apiVersion": "meshward.io/v1alpha1", "kind": "AuthPolicy",
                 "metadata": {"name": "victim-closed", "namespace": ns},
                 "spec": {"selector": {"matchLabels": {"app": "victim"}}, "rules": [
                     {"name": "no-public", "action": "Deny", "to": {"paths": ["/public"]}}]}})
        wait_until("victim enforcing its change", lambda: mesh.curl("client", f"http://victim.{ns}/public")[0] == 403,
                   timeout=10)
        c.apply({"apiVersion": "meshward.io/v1alpha1", "kind": "Revocation", "metadata": {"name": "e2e-inflation"},
                 "spec": {"entries": [{"jti": "stolen-e2e", "expiresAt": "2099-01-01T00:00:00Z"}]}})

        def revocation_ready() -> bool:
            conds = c.get_json("revocation", "e2e-inflation").get("status", {}).get("conditions", [])
            return any(x["type"] == "Ready" and x["reason"] == "Enforced" for x in conds)
        wait_until("the Revocation enforced", revocation_ready, timeout=30)
        for app in ("client", "victim"):
            assert _agent_metric(mesh, app, "meshward_policy_connected") == 1, app
            assert _agent_metric(mesh, app, "meshward_policy_stream_errors_total", 'code="RESOURCE_EXHAUSTED"') == 0, app
    finally:
        c.kubectl("-n", evil, "delete", "pod/around-0", "pod/around-1", "deployment/inflater", "--wait=false",
                  check=False)
        c.kubectl("-n", ns, "delete", "authpolicy", "victim-closed", check=False)
        c.kubectl("delete", "revocation", "e2e-inflation", "--ignore-not-found", check=False)


def test_a_hand_made_imitation_or_a_relabelled_meshed_pod_is_refused_by_the_api_server(
        boundary: tuple[Mesh, Mesh]) -> None:
    """Around the webhook, which sees only pods that opt in at creation: a pod with the mesh's containers and no
    opt-in label (then labelled, it counted as meshed, with the exclusions it chose), and a meshed pod unlabelled so
    that `kubectl debug` is no longer reviewed. The chart's ValidatingAdmissionPolicy refuses both."""
    mesh, _ = boundary
    imitation = _opted_in_pod(mesh.ns, "imitation", mesh.echo, initContainers=[
        {"name": INIT, "image": mesh.echo, "command": ["meshward-init", "--exclude-inbound-ports", "8080"]},
        {"name": AGENT, "image": mesh.echo, "restartPolicy": "Always", "command": ["sleep", "1d"]}])
    imitation["metadata"]["labels"] = {"app": "imitation"}
    refusal = _refusal(mesh, imitation)
    assert "without the label meshward.io/inject=enabled" in refusal, refusal
    for change in ("meshward.io/inject-", "meshward.io/inject=disabled"):
        proc = mesh.cluster.kubectl("-n", mesh.ns, "label", "pod", "--overwrite", mesh.pod("victim"), change,
                                    check=False)
        assert proc.returncode != 0 and "keeps its label" in proc.stderr, (change, proc.stdout, proc.stderr)


def test_a_meshed_namespace_keeps_pod_security_baseline_but_for_the_capture_container(
        boundary: tuple[Mesh, Mesh]) -> None:
    """Node takeover from a meshed namespace: such a namespace had to enforce Pod Security `privileged` (the capture
    container needs NET_ADMIN and NET_RAW), so any pod there could mount the kubelet's pod directory (hostPath) and
    talk to other namespaces' SDS sockets, or run privileged. The chart's baseline policy refuses that in namespaces
    labelled for it, while injected pods (their meshward-init's two capabilities) are still admitted."""
    mesh, _ = boundary
    c = mesh.cluster
    c.kubectl("label", "namespace", mesh.ns, "meshward.io/pod-security=baseline")
    try:
        steal = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "steal", "namespace": mesh.ns},
                 "spec": {"containers": [{"name": "app", "image": mesh.echo, "volumeMounts": [
                     {"name": "kubelet", "mountPath": "/kubelet"}]}],
                          "volumes": [{"name": "kubelet", "hostPath": {"path": "/var/lib/kubelet/pods"}}]}}
        refusal = _refusal(mesh, steal)
        assert "hostPath volumes are not allowed in a meshed namespace" in refusal, refusal
        privileged = _opted_in_pod(mesh.ns, "privileged", mesh.echo, app={"securityContext": {"privileged": True}})
        privileged["metadata"]["labels"] = {"app": "privileged"}
        assert "privileged containers" in _refusal(mesh, privileged)
        netadmin = _opted_in_pod(mesh.ns, "netadmin", mesh.echo,
                                 app={"securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}})
        netadmin["metadata"]["labels"] = {"app": "netadmin"}
        assert "capabilities beyond Pod Security baseline" in _refusal(mesh, netadmin)
        assert _refusal(mesh, _opted_in_pod(mesh.ns, "meshed", mesh.echo)) == "", "an injected pod is admitted"
    finally:
        c.kubectl("label", "namespace", mesh.ns, "meshward.io/pod-security-")
