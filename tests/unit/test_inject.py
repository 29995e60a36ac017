"""Sidecar injection as a pure function: golden files (refresh with `pytest --update-golden`), idempotence, the
JSON patch, what is refused and why, who opted in, and the safety net's view of unprotected pods."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshward.operator.domain.inject import (
    AGENT,
    INIT,
    PROXY,
    InjectRefused,
    InjectSettings,
    check_ephemeral,
    declares_tcp,
    inject,
    is_injected,
    json_patch,
    may_become_the_proxy,
    opted_in,
    service_tcp_ports,
    unprotected,
)
from meshward.sidecar.domain.capture import AGENT_ADMIN_PORT, PROXY_UID
from meshward.sidecar.domain.probes import PROBES_ENV, parse_probes
from tests.support.jsonpatch import apply_patch

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "inject"
INPUTS = sorted(p for p in GOLDEN.glob("*.yaml") if not p.name.endswith(".injected.yaml"))
SETTINGS = InjectSettings(image="localhost/meshward:golden", version="golden")


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def test_there_are_at_least_twelve_golden_pods() -> None:
    assert len(INPUTS) >= 12


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: p.stem)
def test_injection_matches_golden(path: Path, request: pytest.FixtureRequest) -> None:
    text = yaml.safe_dump(inject(load(path), SETTINGS), sort_keys=False)
    golden = path.with_name(f"{path.stem}.injected.yaml")
    if request.config.getoption("--update-golden"):
        golden.write_text(text)
    assert golden.exists(), f"{golden} missing: run pytest --update-golden"
    assert text == golden.read_text(), f"{golden} differs from the injector: review, then run pytest --update-golden"


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: p.stem)
def test_a_second_pass_changes_nothing_and_the_patch_makes_the_injected_pod(path: Path) -> None:
    pod = load(path)
    once = inject(pod, SETTINGS)
    assert inject(once, SETTINGS) == once
    assert json_patch(once, inject(once, SETTINGS)) == []
    assert apply_patch(pod, json_patch(pod, once)) == once


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: p.stem)
def test_the_users_containers_ports_volumes_and_security_context_are_kept(path: Path) -> None:
    pod = load(path)
    out = inject(pod, SETTINGS)
    spec, got = pod["spec"], out["spec"]
    assert [c["name"] for c in got["initContainers"]] == [INIT, AGENT, PROXY] + [
        c["name"] for c in spec.get("initContainers", [])]
    assert [c["name"] for c in got["containers"]] == [c["name"] for c in spec["containers"]]
    for before, after in zip(spec["containers"], got["containers"], strict=True):
        for key in ("image", "ports", "securityContext", "volumeMounts", "command", "env"):
            assert before.get(key) == after.get(key), key
    assert got.get("securityContext") == spec.get("securityContext")
    assert got["volumes"][:len(spec.get("volumes", []))] == spec.get("volumes", [])
    assert out["metadata"]["labels"] | pod["metadata"]["labels"] == out["metadata"]["labels"]
    for key, value in (pod["metadata"].get("annotations") or {}).items():
        assert out["metadata"]["annotations"][key] == value


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: p.stem)
def test_everything_added_runs_unprivileged_but_the_capture_step(path: Path) -> None:
    init, agent, proxy = inject(load(path), SETTINGS)["spec"]["initContainers"][:3]
    for c in (agent, proxy):
        ctx = c["securityContext"]
        assert ctx["runAsUser"] == PROXY_UID and ctx["runAsNonRoot"] is True
        assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert c["restartPolicy"] == "Always", "native sidecars: up before the app, down after it"
        assert "startupProbe" in c and "resources" in c
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert "restartPolicy" not in init


def test_probes_go_to_the_agent_which_knows_the_originals() -> None:
    out = inject(load(GOLDEN / "http-probes.yaml"), SETTINGS)
    app = out["spec"]["containers"][0]
    assert app["livenessProbe"]["httpGet"] == {"path": "/app-health/app/livez", "port": AGENT_ADMIN_PORT,
                                               "scheme": "HTTP"}
    assert app["livenessProbe"]["periodSeconds"] == 10  # timing kept
    assert app["readinessProbe"]["timeoutSeconds"] == 3
    agent = out["spec"]["initContainers"][1]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    probes = parse_probes(env[PROBES_ENV])
    assert probes["/app-health/app/livez"].port == 8080
    assert probes["/app-health/app/livez"].headers == (("X-Probe", "1"),)
    assert probes["/app-health/app/readyz"].timeout_s == 3


def test_probes_on_excluded_ports_and_other_hosts_are_left_alone() -> None:
    out = inject(load(GOLDEN / "excluded-probe-port.yaml"), SETTINGS)["spec"]["containers"][0]
    assert out["livenessProbe"]["httpGet"]["port"] == "admin"  # 9090 is not captured
    assert out["readinessProbe"]["httpGet"]["port"] == AGENT_ADMIN_PORT
    other = inject(load(GOLDEN / "other-host-probe.yaml"), SETTINGS)["spec"]["containers"][0]
    assert other["readinessProbe"]["httpGet"]["host"] == "10.0.0.9"


def _pod(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "shop", "labels": {"meshward.io/inject": "enabled"}},
            "spec": {"containers": [{"name": "app", "image": "x"}], **spec}}


@pytest.mark.parametrize(("pod", "says"), [
    (_pod(hostNetwork=True), "spec.hostNetwork"),
    (_pod(securityContext={"runAsUser": PROXY_UID}), f"runs as UID {PROXY_UID}"),
    (_pod(containers=[{"name": "app", "image": "x", "securityContext": {"runAsUser": PROXY_UID}}]),
     "spec.containers[0] (app)"),
    (_pod(containers=[{"name": "meshward-agent", "image": "x"}]), "names starting with meshward- are Meshward's"),
    (_pod(volumes=[{"name": "meshward-sockets", "emptyDir": {}}]), "spec.volumes[0].name"),
    (_pod(containers=[{"name": "app", "image": "x", "readinessProbe": {"httpGet": {"port": "nope"}}}]),
     "port 'nope' is not a port of this container"),
])
def test_what_cannot_be_protected_is_refused_with_the_field(pod: dict[str, Any], says: str) -> None:
    with pytest.raises(InjectRefused) as e:
        inject(pod, SETTINGS)
    assert says in str(e.value)


def _app(**fields: Any) -> dict[str, Any]:
    return {"name": "app", "image": "x", **fields}


@pytest.mark.parametrize(("pod", "says"), [
    (_pod(containers=[_app(volumeMounts=[{"name": "meshward-sockets", "mountPath": "/s"}])]),
     "spec.containers[0].volumeMounts[0].name: 'meshward-sockets' is a volume of the mesh"),
    (_pod(initContainers=[_app(volumeMounts=[{"name": "meshward-token", "mountPath": "/t"}])]),
     "spec.initContainers[0].volumeMounts[0].name"),
    (_pod(containers=[_app(volumeDevices=[{"name": "meshward-bundle", "devicePath": "/dev/x"}])]),
     "spec.containers[0].volumeDevices[0].name"),
    (_pod(shareProcessNamespace=True), "spec.shareProcessNamespace"),
    (_pod(volumes=[{"name": "t", "projected": {"sources": [{"serviceAccountToken": {"audience": "meshward",
                                                                                   "path": "t"}}]}}]),
     "spec.volumes[0].projected.sources[0].serviceAccountToken.audience: 'meshward' is the mesh's own"),
], ids=["app-mounts-the-sds-socket-volume", "init-mounts-the-token", "device-of-a-mesh-volume",
        "share-process-namespace-reads-proc-pid-mem", "own-token-with-the-mesh-audience-asks-the-signer"])
def test_key_theft_through_a_mesh_volume_or_the_agents_processes_is_refused(pod: dict[str, Any], says: str) -> None:
    """Workload key theft: an app container mounting the mesh's socket volume asked the SDS socket for the key and
    minted context tokens naming any user; with shareProcessNamespace a root app switching to the proxy's UID read
    the key from /proc/<agent>/mem. Only Meshward's containers mount its volumes; no opted-in pod shares processes."""
    with pytest.raises(InjectRefused) as e:
        inject(pod, SETTINGS)
    assert says in str(e.value)


@pytest.mark.parametrize(("pod", "says"), [
    (_pod(containers=[_app(securityContext={"runAsGroup": PROXY_UID})]), "spec.containers[0] (app).securityContext"),
    (_pod(securityContext={"runAsGroup": PROXY_UID}), "spec.securityContext.runAsGroup"),
    (_pod(securityContext={"fsGroup": PROXY_UID}), "spec.securityContext.fsGroup"),
    (_pod(securityContext={"supplementalGroups": [5, PROXY_UID]}), "spec.securityContext.supplementalGroups"),
], ids=["container-runas-group", "pod-runas-group", "fs-group", "supplemental-groups"])
def test_capture_bypass_by_the_proxys_group_is_refused(pod: dict[str, Any], says: str) -> None:
    """Capture bypass by group: the proxy's GID was exempt from capture, so `runAsGroup: 1337` skipped Envoy. The
    capture exempts the proxy's user only now, and no app container may hold its group either."""
    with pytest.raises(InjectRefused) as e:
        inject(pod, SETTINGS)
    assert says in str(e.value) and str(PROXY_UID) in str(e.value)


def _fake_agent(**fields: Any) -> dict[str, Any]:
    return {"name": AGENT, "image": "attacker/agent", "command": ["sh", "-c", "sleep 1d"], **fields}


@pytest.mark.parametrize(("pod", "says"), [
    (_pod(hostNetwork=True, initContainers=[_fake_agent()]), "spec.hostNetwork"),
    (_pod(containers=[_app(securityContext={"runAsUser": PROXY_UID})], initContainers=[_fake_agent()]),
     f"runs as UID {PROXY_UID}"),
    (_pod(containers=[_app(volumeMounts=[{"name": "meshward-sockets", "mountPath": "/s"}])],
          initContainers=[_fake_agent()], volumes=[{"name": "meshward-sockets", "emptyDir": {}}]),
     "is a volume of the mesh"),
], ids=["host-network", "proxy-uid", "mounts-the-socket-volume"])
def test_a_pre_injected_imitation_does_not_skip_the_refusals(pod: dict[str, Any], says: str) -> None:
    """Pre-injected imitation: a pod arriving with a container named meshward-agent was trusted as injected and
    skipped every refusal. It is now injected again from what it is without the mesh, refusals included."""
    with pytest.raises(InjectRefused) as e:
        inject(pod, SETTINGS)
    assert says in str(e.value)


def test_a_pre_injected_imitation_runs_exactly_what_the_injector_makes() -> None:
    """The imitation's own agent, init and proxy containers and volumes are replaced by the injector's."""
    genuine = inject(_pod(), SETTINGS)
    forged = json.loads(json.dumps(genuine))
    forged["spec"]["initContainers"][0]["command"] = ["true"]  # no capture
    forged["spec"]["initContainers"][1] = _fake_agent()
    forged["spec"]["volumes"][0] = {"name": "meshward-sockets", "hostPath": {"path": "/"}}
    assert inject(forged, SETTINGS) == genuine
    assert json_patch(forged, inject(forged, SETTINGS)) != []


def test_a_container_another_webhook_adds_after_injection_gets_its_probe_rewritten_on_reinvocation() -> None:
    """Reinvocation (reinvocationPolicy: IfNeeded): a container added after injection is probed through the agent
    like the app's, or kubelet's plaintext probe would be refused by the capture."""
    once = inject(_pod(), SETTINGS)
    once["spec"]["containers"].append({"name": "vault", "image": "v", "ports": [{"containerPort": 8200}],
                                       "readinessProbe": {"httpGet": {"path": "/h", "port": 8200}}})
    again = inject(once, SETTINGS)
    assert again["spec"]["containers"][1]["readinessProbe"]["httpGet"]["port"] == AGENT_ADMIN_PORT
    assert inject(again, SETTINGS) == again


@pytest.mark.parametrize(("container", "says"), [
    ({"name": "dbg", "image": "x", "targetContainerName": "meshward-agent"}, "targetContainerName"),
    ({"name": "dbg", "image": "x", "volumeMounts": [{"name": "meshward-sockets", "mountPath": "/s"}]},
     "is a volume of the mesh"),
    ({"name": "dbg", "image": "x", "securityContext": {"runAsUser": PROXY_UID}}, f"runs as UID {PROXY_UID}"),
    ({"name": "dbg", "image": "x", "securityContext": {"runAsGroup": PROXY_UID}}, "runAsGroup"),
    ({"name": "dbg", "image": "x", "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}}},
     "rewrite the pod's traffic capture"),
    ({"name": "dbg", "image": "x", "securityContext": {"privileged": True}}, "rewrite the pod's traffic capture"),
], ids=["target-the-agent", "mount-the-socket-volume", "proxy-uid", "proxy-gid", "profile-netadmin-flushes-capture",
        "profile-sysadmin"])
def test_kubectl_debug_ephemeral_containers_get_the_same_refusals(container: dict[str, Any], says: str) -> None:
    """Ephemeral containers (`kubectl debug`) had no admission review: one could run as the proxy's UID (uncaptured),
    mount the socket volume or share the agent's processes."""
    pod = inject(_pod(), SETTINGS)
    pod["spec"]["ephemeralContainers"] = [container]
    with pytest.raises(InjectRefused) as e:
        check_ephemeral(pod)
    assert says in str(e.value) and "spec.ephemeralContainers[0]" in str(e.value)


@pytest.mark.parametrize(("app", "pod_ctx", "warned"), [
    ({}, {}, True),
    ({"securityContext": {"runAsUser": 0}}, {"runAsNonRoot": False}, True),
    ({}, {"runAsNonRoot": True}, False),
    ({"securityContext": {"runAsUser": 1000}}, {}, False),
    ({}, {"runAsUser": 1000}, False),
    ({"securityContext": {"capabilities": {"drop": ["ALL"]}}}, {}, False),
    ({"securityContext": {"capabilities": {"drop": ["CAP_SETUID"]}}}, {}, False),
    ({"securityContext": {"runAsUser": 0, "capabilities": {"drop": ["NET_RAW"]}}}, {"runAsUser": 1000}, True),
])
def test_meshward_check_warns_of_apps_that_may_setuid_to_the_proxy(app: dict[str, Any], pod_ctx: dict[str, Any],
                                                                    warned: bool) -> None:
    """A root app with CAP_SETUID can become UID 1337 (inherent to sidecars): `meshward check` names such containers."""
    pod = inject(_pod(containers=[_app(**app)], securityContext=pod_ctx), SETTINGS)
    assert may_become_the_proxy(pod) == (["app"] if warned else [])


def test_an_ordinary_debug_container_is_allowed() -> None:
    pod = inject(_pod(), SETTINGS)
    pod["spec"]["ephemeralContainers"] = [{"name": "dbg", "image": "x", "targetContainerName": "app",
                                           "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}}}]
    check_ephemeral(pod)  # kubectl debug --profile=general


@pytest.mark.parametrize("probe", [
    {"httpGet": {"path": "/app-health/other/livez", "port": AGENT_ADMIN_PORT, "host": "10.0.0.9"}},
    {"httpGet": {"path": "/app-health/app/livez", "port": AGENT_ADMIN_PORT}},
], ids=["another-containers-path-on-another-host", "the-agents-path-by-hand"])
def test_a_probe_aimed_at_the_agent_by_hand_is_not_restored_from_forged_originals(probe: dict[str, Any]) -> None:
    """Re-injection restores only the probes the injector itself rewrote: a hand-written probe at the agent's port
    must not become whatever a forged originals list says, and injecting twice changes nothing."""
    forged = inject(_pod(containers=[_app(ports=[{"containerPort": 8080}], livenessProbe=probe)]), SETTINGS)
    env = forged["spec"]["initContainers"][1].setdefault("env", [])
    env[:] = [e for e in env if e["name"] != PROBES_ENV] + [{"name": PROBES_ENV, "value": json.dumps(
        {"/app-health/other/livez": {"tcpSocket": {"port": 22}, "httpGet": {"port": 1}}})}]
    again = inject(forged, SETTINGS)
    assert inject(again, SETTINGS) == again
    assert "tcpSocket" not in again["spec"]["containers"][0]["livenessProbe"]


@pytest.mark.parametrize(("annotation", "value"), [
    ("meshward.io/exclude-inbound-ports", "http"),
    ("meshward.io/exclude-outbound-ports", "70000"),
    ("meshward.io/exclude-outbound-cidrs", "10.0.0.0/33"),
    ("meshward.io/exclude-outbound-cidrs", "fe80::%eth0/64"),  # a zone: no CIDR ip6tables takes
    ("meshward.io/inbound-plaintext", "yes"),
    ("meshward.io/route-timeout", "30"),        # no unit: seconds or milliseconds?
    ("meshward.io/route-timeout", "-5s"),
    ("meshward.io/route-timeout", "0.5s"),      # under a second cuts ordinary requests
    ("meshward.io/route-timeout", "25h"),       # over a day
    ("meshward.io/route-timeout", "1h30m"),
    ("meshward.io/stream-idle-timeout", "0"),   # no idle timeout at all: a stuck peer holds a stream for ever
    ("meshward.io/stream-idle-timeout", "forever"),
    ("meshward.io/stream-idle-timeout", "90000s"),
    ("meshward.io/accept-http10", "yes"),
    ("meshward.io/accept-http10", "True"),
])
def test_bad_settings_are_refused_naming_the_annotation(annotation: str, value: str) -> None:
    pod = _pod()
    pod["metadata"]["annotations"] = {annotation: value}
    with pytest.raises(InjectRefused) as e:
        inject(pod, SETTINGS)
    assert annotation in str(e.value)


def _commands(pod: dict[str, Any]) -> dict[str, list[str]]:
    return {c["name"]: c.get("command", []) for c in pod["spec"]["initContainers"]}


def test_excluded_cidrs_of_both_families_reach_the_capture_container() -> None:
    """Each family's capture rules take their own excluded CIDRs (sidecar/domain/capture.py)."""
    pod = _pod()
    pod["metadata"]["annotations"] = {"meshward.io/exclude-outbound-cidrs": "10.1.0.0/16, fd00:1::/64"}
    command = _commands(inject(pod, SETTINGS))["meshward-init"]
    assert command[command.index("--exclude-outbound-cidrs") + 1] == "10.1.0.0/16,fd00:1::/64"


def test_excluded_inbound_ports_may_name_the_pods_container_ports() -> None:
    """As a Service's targetPort may name a port, so may an exclusion: the name resolves to the container port of
    that name (any container of the pod), and the capture container gets numbers."""
    pod = _pod(initContainers=[{"name": "side", "image": "x", "restartPolicy": "Always",
                                "ports": [{"name": "metrics", "containerPort": 9100}]}])
    pod["spec"]["containers"][0]["ports"] = [{"name": "grpc", "containerPort": 50051},
                                             {"name": "dns", "containerPort": 53, "protocol": "UDP"}]
    pod["metadata"]["annotations"] = {"meshward.io/exclude-inbound-ports": "grpc, metrics,8081"}
    command = _commands(inject(pod, SETTINGS))["meshward-init"]
    assert command[command.index("--exclude-inbound-ports") + 1] == "8081,9100,50051"


def test_declared_tcp_ports_reach_the_proxy_by_number_and_clash_with_exclusions() -> None:
    """meshward.io/tcp-ports (numbers or the pod's port names) becomes the proxy's --tcp-ports: only those ports take
    tunnelled TCP. A port both declared TCP and excluded from capture is refused: it cannot be both."""
    pod = _pod()
    pod["spec"]["containers"][0]["ports"] = [{"name": "redis", "containerPort": 6379}]
    pod["metadata"]["annotations"] = {"meshward.io/tcp-ports": "redis,5432"}
    command = {c["name"]: c.get("command", []) for c in inject(pod, SETTINGS)["spec"]["initContainers"]}[PROXY]
    assert command[command.index("--tcp-ports") + 1] == "5432,6379"
    assert "--tcp-ports" not in {c["name"]: c.get("command", []) for c in inject(_pod(), SETTINGS)["spec"][
        "initContainers"]}[PROXY]
    pod["metadata"]["annotations"]["meshward.io/exclude-inbound-ports"] = "6379"
    with pytest.raises(InjectRefused, match=r"meshward\.io/tcp-ports\]: port\(s\) 6379 are also in"):
        inject(pod, SETTINGS)
    pod["metadata"]["annotations"] = {"meshward.io/tcp-ports": "postgres"}
    with pytest.raises(InjectRefused, match=r"annotation meshward\.io/tcp-ports: 'postgres' is neither"):
        inject(pod, SETTINGS)


def _service(name: str, selector: dict[str, str], *ports: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "shop"}, "spec": {"selector": selector, "ports": list(ports)}}


def test_service_ports_declaring_tcp_declare_the_pods_they_select() -> None:
    """A Service port with a non-HTTP appProtocol (`postgresql`, `tcp`, any case) or a `tcp`/`tcp-…` name declares
    its target port TCP on the pods the Service selects, as the annotation would: a named target port resolves on
    the pod (skipped where the pod has no such port: that Service sends it nothing there), `targetPort` defaults to
    `port`; HTTP-ish or vendor protocols, UDP, other selectors and selector-less Services declare nothing; a port
    the pod excludes from capture stays excluded; the annotation's own ports come first."""
    pod = _pod()
    pod["metadata"]["labels"]["app"] = "db"
    pod["spec"]["containers"][0]["ports"] = [{"name": "pg", "containerPort": 5432},
                                             {"name": "metrics", "containerPort": 9187}]
    pod["metadata"]["annotations"] = {"meshward.io/tcp-ports": "7000",
                                      "meshward.io/exclude-inbound-ports": "9187"}
    services = [
        _service("db", {"app": "db"}, {"name": "sql", "port": 5432, "targetPort": "pg", "appProtocol": "PostgreSQL"},
                 {"name": "tcp-replication", "port": 6000},
                 {"name": "web", "port": 80, "targetPort": 8080, "appProtocol": "http"},
                 {"name": "tls", "port": 443, "targetPort": 8443, "appProtocol": "https"},
                 {"name": "vendor", "port": 7100, "appProtocol": "example.com/custom"},
                 {"name": "tcp-metrics", "port": 9187, "targetPort": "metrics"},
                 {"name": "tcp-missing", "port": 7200, "targetPort": "nope"},
                 {"name": "tcp-dns", "port": 53, "protocol": "UDP"}),
        _service("other", {"app": "cache"}, {"name": "tcp", "port": 6379}),
        _service("no-selector", {}, {"name": "tcp", "port": 6380}),
        {"metadata": {"name": "odd"}, "spec": {"selector": {"app": "db"}, "ports": [{"name": "tcp", "port": 7300}]}},
    ]
    assert declares_tcp({"name": "tcp"}) and declares_tcp({"name": "x", "appProtocol": "redis"})
    assert not declares_tcp({"name": "tcpx"}) and not declares_tcp({"name": "h", "appProtocol": "kubernetes.io/h2c"})
    # Istio's non-HTTP port names, as Helm charts name their ports (Bitnami's redis, mysql, mongodb)
    for name in ("redis", "tcp-redis", "redis-sentinel", "mysql", "mysql-x", "mongo", "mongodb", "mongo-shard"):
        assert declares_tcp({"name": name}), name
    for name in ("redisui", "http-redis", "web", "mysqlweb", "grpc", "redis-exporter", "mysql-exporter",
                 "redis-metrics"):  # exporters' HTTP /metrics ports, as their charts name them
        assert not declares_tcp({"name": name}), name
    # appProtocol first, as Istio reads it: a tcp- name with an HTTP appProtocol is HTTP.
    assert not declares_tcp({"name": "tcp-web", "appProtocol": "http"})
    assert not declares_tcp({"name": "tcp", "appProtocol": "grpc"})
    assert service_tcp_ports(services, pod) == {5432: "Service db port sql", 6000: "Service db port tcp-replication",
                                                7300: "Service odd port tcp", 9187: "Service db port tcp-metrics"}
    # ExternalName Services select no pod (the EndpointSlice controller skips them); malformed ones declare nothing.
    odd: list[dict[str, Any]] = [{"metadata": {"name": "ext"}, "spec": {"type": "ExternalName", "selector": {"app": "db"},
                                                  "ports": [{"name": "tcp", "port": 7400}]}},
           {"metadata": {"name": "bad"}, "spec": {"selector": ["app"], "ports": [{"name": "tcp", "port": 7500}]}},
           {"metadata": {"name": "bad2"}, "spec": {"selector": {"app": "db"}, "ports": "tcp"}}, {"spec": None}]
    assert service_tcp_ports(odd, pod) == {}
    command = _commands(inject(pod, SETTINGS, services))[PROXY]
    assert command[command.index("--tcp-ports") + 1] == "7000,5432,6000,7300"  # 9187 stays excluded
    assert "--tcp-ports" not in _commands(inject(_pod(), SETTINGS, services))[PROXY]  # not selected: app=db only
    many = [_service("wide", {"app": "db"}, *({"name": f"tcp-{n}", "port": 20000 + n} for n in range(70)))]
    with pytest.raises(InjectRefused, match=r"71 ports declared TCP \(.* of Service wide selecting .* more than "
                                            r"the 64 allowed"):
        inject(pod, SETTINGS, many)


@pytest.mark.parametrize("value", ["grpc", "dns", "metrics-x"])
def test_an_excluded_port_name_no_container_declares_is_refused_naming_the_annotation(value: str) -> None:
    """A typo or a UDP port's name must not silently leave the port captured (or something else out)."""
    pod = _pod()
    pod["spec"]["containers"][0]["ports"] = [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                             {"name": "metrics", "containerPort": 9100}]
    pod["metadata"]["annotations"] = {"meshward.io/exclude-inbound-ports": value}
    with pytest.raises(InjectRefused, match=r"metadata\.annotation meshward\.io/exclude-inbound-ports: .*declared: "
                                            r"metrics=9100"):
        inject(pod, SETTINGS)


@pytest.mark.parametrize(("annotations", "flags"), [
    ({}, []),
    ({"meshward.io/route-timeout": "0"}, ["--route-timeout", "0"]),
    ({"meshward.io/route-timeout": "1.5m", "meshward.io/stream-idle-timeout": "30s"},
     ["--route-timeout", "1.5m", "--stream-idle-timeout", "30s"]),
    ({"meshward.io/accept-http10": "true"}, ["--accept-http10"]),
    ({"meshward.io/accept-http10": "false"}, []),
])
def test_http_settings_reach_both_envoy_and_the_agent_serving_its_outbound_listener(
        annotations: dict[str, str], flags: list[str]) -> None:
    """The inbound listener is in Envoy's bootstrap (meshward-proxy), the outbound one comes from the agent (LDS):
    a setting given to one only would hold on one side of the workload's traffic."""
    pod = _pod()
    pod["metadata"]["annotations"] = annotations
    commands = _commands(inject(pod, SETTINGS))
    for name in ("meshward-proxy", "meshward-sidecar"):
        command = commands["meshward-proxy" if name == "meshward-proxy" else "meshward-agent"]
        assert command[0] == name
        assert [a for a in command if a in {"--route-timeout", "--stream-idle-timeout", "--accept-http10"} or
                command[command.index(a) - 1] in {"--route-timeout", "--stream-idle-timeout"}] == flags


def test_the_injected_flags_parse_into_the_settings_the_annotations_say() -> None:
    from meshward.sidecar.domain.envoy import HttpSettings
    from meshward.sidecar.entrypoints.proxy import _parser, http_settings

    pod = load(GOLDEN / "http-settings.yaml")
    command = _commands(inject(pod, SETTINGS))["meshward-proxy"]
    assert http_settings(_parser().parse_args(command[1:])) == HttpSettings(30, 3600, True)


def test_an_operator_without_an_image_refuses_instead_of_injecting_nothing() -> None:
    with pytest.raises(InjectRefused, match="no image to inject"):
        inject(_pod(), InjectSettings(image=""))


@pytest.mark.parametrize(("label", "namespace", "namespace_opted_in", "expected"), [
    ("enabled", "shop", False, True),
    (None, "shop", True, True),
    ("disabled", "shop", True, False),
    (None, "shop", False, False),
    ("true", "shop", False, False),  # only "enabled" opts in
    ("enabled", "kube-system", True, False),
    ("enabled", "meshward-system", True, False),  # the operator's own namespace
])
def test_who_opted_in(label: str | None, namespace: str, namespace_opted_in: bool, expected: bool) -> None:
    pod = {"metadata": {"labels": {"meshward.io/inject": label} if label else {}}}
    assert opted_in(pod, namespace, namespace_opted_in, "meshward-system") is expected


def test_a_namespace_opt_in_is_recorded_on_the_pod() -> None:
    out = inject(load(GOLDEN / "namespace-opt-in.yaml"), SETTINGS)
    assert out["metadata"]["labels"]["meshward.io/inject"] == "enabled"
    assert out["metadata"]["annotations"]["meshward.io/injected"] == "golden"


def test_unprotected_pods_are_opted_in_running_and_uninjected() -> None:
    injected = inject(_pod(), SETTINGS)
    pods = [
        {**_pod(), "metadata": {**_pod()["metadata"], "name": "bare"}},
        {**injected, "metadata": {**injected["metadata"], "name": "meshed"}},
        {"metadata": {"name": "in-ns", "namespace": "shop"}, "spec": {}},
        {"metadata": {"name": "out", "namespace": "shop", "labels": {"meshward.io/inject": "disabled"}}, "spec": {}},
        {"metadata": {"name": "done", "namespace": "shop", "labels": {"meshward.io/inject": "enabled"}},
         "spec": {}, "status": {"phase": "Succeeded"}},
        {"metadata": {"name": "other", "namespace": "web"}, "spec": {}},
    ]
    assert unprotected(pods, {"shop"}, "meshward-system") == ["shop/bare", "shop/in-ns"]
    assert is_injected(injected) and not is_injected(pods[0])


def test_the_patch_of_a_pod_without_metadata_maps_creates_them() -> None:
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "x"}]}}
    out = inject(pod, SETTINGS)
    patch = json_patch(pod, out)
    assert {"op": "add", "path": "/metadata/labels", "value": {"meshward.io/inject": "enabled"}} in patch
    assert apply_patch(pod, patch) == out
    json.dumps(patch)  # what the webhook sends, base64'd
