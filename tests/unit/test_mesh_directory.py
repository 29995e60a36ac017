"""The meshed-destination map (operator/domain/destinations.py, engines/mesh_directory.py) and the safety net
(engines/safety_net.py): which addresses answer with mTLS and as whom, and who runs opted in without the mesh."""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshward.operator.domain.destinations import (
    bounded,
    mesh_destinations,
    mesh_pod,
    mesh_service,
    tcp_declarations_pending,
    version_of,
    view_for,
)
from meshward.operator.domain.inject import InjectSettings, inject
from meshward.operator.engines.mesh_directory import MeshDirectory
from meshward.operator.engines.safety_net import SafetyNet
from meshward.operator.servers.policy import MAX_MESSAGE_BYTES
from meshward.operator.servers.wire import dumps

TD = "cluster.local"


SETTINGS = InjectSettings(image="localhost/meshward:t")


@functools.cache
def _injected_spec(sa: str, exclusions: str) -> str:
    """The spec the injector makes (JSON, cached: some tests make thousands of pods); `exclusions` given to its
    capture container as they are, also beyond the injector's bounds (a pod made where no webhook runs)."""
    body = inject({"metadata": {"labels": {"meshward.io/inject": "enabled"}},
                   "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "x"}]}}, SETTINGS)
    if exclusions:
        body["spec"]["initContainers"][0]["command"] += ["--exclude-inbound-ports", exclusions]
    return json.dumps(body["spec"])


def pod(name: str, ip: str, sa: str = "orders", injected: bool = True, ns: str = "shop",
        annotations: dict[str, str] | None = None, **labels: str) -> dict[str, Any]:
    """A running pod; `injected` ones as the webhook made them (opted in, the mesh's containers added, the
    exclusion annotation given to the capture container)."""
    annotations = annotations or {}
    all_labels = {"app": "orders", **labels, **({"meshward.io/inject": "enabled"} if injected else {})}
    spec = json.loads(_injected_spec(sa, annotations.get("meshward.io/exclude-inbound-ports", ""))) if injected \
        else {"serviceAccountName": sa, "containers": [{"name": "app", "image": "x"}]}
    return {"metadata": {"name": name, "namespace": ns, "labels": all_labels, "annotations": annotations,
                         "uid": f"uid-{ns}-{name}"},
            "spec": spec, "status": {"podIP": ip, "phase": "Running"}}


def service(name: str, ip: str, ns: str = "shop", target: int | str = 8080, **selector: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "selector": selector or {"app": "orders"},
                     "ports": [{"port": 80, "targetPort": target, "protocol": "TCP"},
                               {"port": 9090, "targetPort": 9090}]}}


def dmap(pods: list[dict[str, Any]], services: list[dict[str, Any]]) -> dict[str, dict[str, list[Any]]]:
    return mesh_destinations([p for p in map(mesh_pod, pods) if p], [s for s in map(mesh_service, services) if s], TD)


def test_injected_pods_and_services_over_them_are_meshed_with_their_identities() -> None:
    got = dmap([pod("o-1", "10.0.0.1"), pod("o-2", "10.0.0.2", sa="orders-v2")], [service("orders", "10.96.0.1")])
    assert got["10.0.0.1"] == {"identities": [f"spiffe://{TD}/ns/shop/sa/orders"], "plaintextPorts": []}
    assert got["10.96.0.1"]["identities"] == [f"spiffe://{TD}/ns/shop/sa/orders",
                                              f"spiffe://{TD}/ns/shop/sa/orders-v2"]


def test_a_service_with_any_uninjected_pod_behind_it_is_not_meshed() -> None:
    got = dmap([pod("o-1", "10.0.0.1"), pod("o-2", "10.0.0.2", injected=False)], [service("orders", "10.96.0.1")])
    assert "10.96.0.1" not in got and "10.0.0.2" not in got and "10.0.0.1" in got


def test_uncaptured_ports_stay_plaintext_for_pods_and_for_services_whose_pods_all_leave_them() -> None:
    excl = {"meshward.io/exclude-inbound-ports": "9090"}
    got = dmap([pod("o-1", "10.0.0.1", annotations=excl), pod("o-2", "10.0.0.2", annotations=excl)],
               [service("orders", "10.96.0.1")])
    assert got["10.0.0.1"]["plaintextPorts"] == [9090] and got["10.96.0.1"]["plaintextPorts"] == [9090]
    mixed = dmap([pod("o-1", "10.0.0.1", annotations=excl), pod("o-2", "10.0.0.2")], [service("orders", "10.96.0.1")])
    assert mixed["10.96.0.1"]["plaintextPorts"] == []


def _named(body: dict[str, Any], ports: dict[str, int]) -> dict[str, Any]:
    """`body` with its app container declaring `ports` (name -> number)."""
    body["spec"]["containers"][0]["ports"] = [{"name": n, "containerPort": v} for n, v in ports.items()]
    return body


def test_a_named_target_port_excluded_behind_a_service_is_plaintext_for_its_callers() -> None:
    """Excluded port behind a named targetPort: only numeric target ports counted, so callers of a Service whose
    `targetPort: grpc` every pod excluded still originated mTLS to it and failed (UNAVAILABLE). The name resolves
    per pod, as the Service's EndpointSlices do; pods that do not name it are no endpoint of that port."""
    excl = {"meshward.io/exclude-inbound-ports": "50051"}
    svc = service("greeter", "10.96.0.1", target="grpc")
    both = [_named(pod("g-1", "10.0.0.1", annotations=excl), {"grpc": 50051}),
            _named(pod("g-2", "10.0.0.2", annotations=excl), {"grpc": 50051}),
            pod("g-3", "10.0.0.3")]  # names no `grpc`: not an endpoint of port 80
    assert dmap(both, [svc])["10.96.0.1"]["plaintextPorts"] == [80]
    # One endpoint resolves the name to a port it captures: mTLS, as for a numeric port some pod captures.
    mixed = [_named(pod("g-1", "10.0.0.1", annotations=excl), {"grpc": 50051}),
             _named(pod("g-2", "10.0.0.2", annotations=excl), {"grpc": 50052})]
    assert dmap(mixed, [svc])["10.96.0.1"]["plaintextPorts"] == []
    # No pod names it: no endpoint, nothing to call in plaintext.
    assert dmap([pod("g-1", "10.0.0.1", annotations=excl)], [svc])["10.96.0.1"]["plaintextPorts"] == []


def _tcp_pod(name: str, ip: str, tcp: str, annotation: str | None = None) -> dict[str, Any]:
    """An injected pod declaring `tcp` (meshward.io/tcp-ports) through the injector, its port named `pg`."""
    body = {"metadata": {"name": name, "namespace": "shop", "labels": {"app": "orders", "meshward.io/inject": "enabled"},
                         "annotations": {"meshward.io/tcp-ports": tcp}, "uid": f"uid-{name}"},
            "spec": {"serviceAccountName": "db", "containers": [
                {"name": "app", "image": "x", "ports": [{"name": "pg", "containerPort": 5432}]}]},
            "status": {"podIP": ip, "phase": "Running"}}
    out = inject(body, SETTINGS)
    if annotation is not None:  # edited after admission: the capture and the proxy keep what they were given
        out["metadata"]["annotations"]["meshward.io/tcp-ports"] = annotation
    return out


def test_declared_tcp_ports_reach_callers_from_the_spec_for_pods_and_services() -> None:
    """Callers tunnel what is not HTTP to declared TCP ports only: a pod's come from its proxy's --tcp-ports (not
    the annotation, editable after admission), a Service's port counts when every endpoint declares its target."""
    got = dmap([_tcp_pod("db-1", "10.0.0.1", "pg", annotation="1-65535"), _tcp_pod("db-2", "10.0.0.2", "5432")],
               [service("db", "10.96.0.1", target="pg")])
    assert got["10.0.0.1"]["tcpPorts"] == [5432] and got["10.0.0.2"]["tcpPorts"] == [5432]
    assert got["10.96.0.1"]["tcpPorts"] == [80] and got["10.96.0.1"]["plaintextPorts"] == []
    mixed = dmap([_tcp_pod("db-1", "10.0.0.1", "pg"), _tcp_pod("db-2", "10.0.0.2", "")],
                 [service("db", "10.96.0.1", target=5432)])
    assert "tcpPorts" not in mixed["10.96.0.1"] and "tcpPorts" not in mixed["10.0.0.2"]


def test_pods_created_before_a_service_declared_their_port_tcp_are_named_for_a_restart() -> None:
    """The injector reads Services when it creates a pod: a Service that declares a port TCP afterwards leaves the
    running pods without it (callers keep speaking HTTP there). `meshward check` names each such pod, port and
    Service port; a pod injected with it declared, a pod of another namespace, and an excluded port are not."""
    db = {"metadata": {"name": "db", "namespace": "shop"}, "spec": {"selector": {"app": "orders"}, "ports": [
        {"name": "sql", "port": 5432, "targetPort": "pg", "appProtocol": "postgresql"}]}}
    before, after = _tcp_pod("db-1", "10.0.0.1", ""), inject(_tcp_pod("db-2", "10.0.0.2", ""), SETTINGS, [db])
    other = _tcp_pod("db-3", "10.0.0.3", "")
    other["metadata"]["namespace"] = "billing"
    assert tcp_declarations_pending([before, after, other], [db]) == [("shop/db-1", {5432: "Service db port sql"})]
    excluded = _tcp_pod("db-4", "10.0.0.4", "")
    excluded["metadata"]["annotations"] = {"meshward.io/exclude-inbound-ports": "5432"}
    assert tcp_declarations_pending([inject(excluded, SETTINGS)], [db]) == []


def test_an_annotation_claiming_injection_does_not_make_a_pod_meshed() -> None:
    """Forged injected annotation: an unlabelled pod annotated meshward.io/injected was listed as meshed, so its meshed
    callers sent it mTLS it could not answer (503). Meshed is decided from the spec the injector made."""
    forged = pod("o-1", "10.0.0.1", injected=False, annotations={"meshward.io/injected": "0.1"})
    labelled_only = pod("o-2", "10.0.0.2", injected=False, annotations={"meshward.io/injected": "0.1"})
    labelled_only["metadata"]["labels"]["meshward.io/inject"] = "enabled"
    assert dmap([forged, labelled_only], []) == {}


def test_exclusions_edited_after_admission_change_nothing_in_the_map() -> None:
    """Annotation inflation after admission: a pod's annotations can be edited (a 256 KiB exclude-inbound-ports made
    every agent's map too large to receive); the map reads the exclusions the capture container was given."""
    edited = pod("o-1", "10.0.0.1", annotations={"meshward.io/exclude-inbound-ports": "9090"})
    edited["metadata"]["annotations"]["meshward.io/exclude-inbound-ports"] = ",".join(str(p) for p in range(1, 60000))
    assert dmap([edited], [])["10.0.0.1"]["plaintextPorts"] == [9090]


def test_pods_without_an_address_or_leaving_and_headless_services_are_left_out() -> None:
    leaving = pod("o-3", "10.0.0.3")
    leaving["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    headless = service("orders", "None")
    assert mesh_pod(leaving) is None and mesh_pod(pod("o-4", "")) is None and mesh_service(headless) is None
    other_ns = dmap([pod("o-1", "10.0.0.1", ns="web")], [service("orders", "10.96.0.1")])
    assert "10.96.0.1" not in other_ns  # a Service selects pods of its own namespace only


def test_an_agent_never_learns_another_namespaces_service_accounts() -> None:
    """Information leak (issue: every sidecar receiving every SPIFFE ID): an agent of `web` gets shop's pods and
    Service pinned to `ns/shop/sa/*`, its own namespace's exact, and the same map version for both views."""
    full = dmap([pod("o-1", "10.0.0.1"), pod("p-1", "10.0.0.2", sa="payments", app="orders"),
                 pod("w-1", "10.0.1.1", sa="frontend", ns="web")], [service("orders", "10.96.0.1")])
    web = view_for(full, "web", TD)
    assert web["10.0.0.1"]["identities"] == web["10.96.0.1"]["identities"] == [f"spiffe://{TD}/ns/shop/sa/*"]
    assert web["10.0.1.1"]["identities"] == [f"spiffe://{TD}/ns/web/sa/frontend"]
    assert "orders" not in str(web) and "payments" not in str(web)
    shop = view_for(full, "shop", TD)
    assert shop["10.96.0.1"]["identities"] == [f"spiffe://{TD}/ns/shop/sa/orders", f"spiffe://{TD}/ns/shop/sa/payments"]
    assert shop["10.0.1.1"]["identities"] == [f"spiffe://{TD}/ns/web/sa/*"]

    async def views() -> tuple[tuple[str, dict[str, Any], dict[str, Any]], tuple[str, dict[str, Any], dict[str, Any]]]:
        d = MeshDirectory(TD)
        for body in (pod("o-1", "10.0.0.1"), pod("w-1", "10.0.1.1", sa="frontend", ns="web")):
            d.apply_pod(body)
        d.publish()
        return await d.next("", "web"), await d.next("", "shop")
    (v_web, doc_web, _), (v_shop, doc_shop, _) = asyncio.run(views())
    assert v_web == v_shop and doc_web["10.0.0.1"]["identities"] == [f"spiffe://{TD}/ns/shop/sa/*"]
    assert doc_shop["10.0.0.1"]["identities"] == [f"spiffe://{TD}/ns/shop/sa/orders"]


def test_equal_maps_have_equal_versions() -> None:
    assert version_of({"a": 1}) == version_of({"a": 1}) != version_of({"a": 2})


def test_the_directory_publishes_a_burst_once_and_wakes_every_waiter() -> None:
    async def scenario() -> tuple[int, list[str], dict[str, Any]]:
        d = MeshDirectory(TD, debounce_s=0.01)
        runner = asyncio.create_task(d.run())
        first, _, _ = await d.next("", "shop")
        waiters = [asyncio.create_task(d.next(first, "shop")) for _ in range(3)]
        published = 0
        original = d.publish

        def counting() -> bool:
            nonlocal published
            changed = original()
            published += changed
            return changed
        d.publish = counting  # type: ignore[method-assign]
        for n in range(20):
            d.apply_pod(pod(f"o-{n}", f"10.0.1.{n}"))
        results = await asyncio.gather(*waiters)
        runner.cancel()
        return published, [v for v, _, _ in results], results[0][1]
    published, versions, doc = asyncio.run(scenario())
    assert published == 1 and len(set(versions)) == 1 and len(doc) == 20


def test_status_only_pod_updates_publish_nothing() -> None:
    d = MeshDirectory(TD)

    async def scenario() -> bool:
        d.apply_pod(pod("o-1", "10.0.0.1"))
        d.publish()
        updated = pod("o-1", "10.0.0.1")
        updated["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        d.apply_pod(updated)
        return d.publish()
    assert asyncio.run(scenario()) is False


def test_the_safety_net_reports_an_uninjected_opted_in_pod_once() -> None:
    posted: list[tuple[str, str, str]] = []

    async def post(namespace: str, name: str, uid: str, message: str) -> None:
        posted.append((namespace, name, uid))

    async def scenario() -> tuple[list[str], list[str]]:
        net = SafetyNet("meshward-system", post)
        bare = pod("bare", "10.0.0.1", injected=False)
        bare["metadata"]["labels"]["meshward.io/inject"] = "enabled"
        bare["metadata"]["uid"] = "uid-1"
        net.apply_pod(bare)
        net.apply_pod(bare)  # an update: still one Event
        net.apply_pod({"metadata": {"name": "late", "namespace": "web", "uid": "uid-2"}, "spec": {}, "status": {}})
        before = list(net.unprotected)
        net.apply_namespace({"metadata": {"name": "web", "labels": {"meshward.io/inject": "enabled"}}})
        await asyncio.sleep(0)  # let the posting tasks run
        after = list(net.unprotected)
        net.apply_pod(bare, deleted=True)
        assert net.unprotected == ["web/late"]
        return before, after
    before, after = asyncio.run(scenario())
    assert before == ["shop/bare"] and after == ["shop/bare", "web/late"]
    assert posted == [("shop", "bare", "uid-1"), ("web", "late", "uid-2")]


# ---------------------------------------------------------------- bounds (issue 18 item 3)

def _entries(n: int, ns: str, ports: int = 0) -> dict[str, dict[str, list[Any]]]:
    return {f"10.{ord(ns[0])}.{i // 250}.{i % 250}": {"identities": [f"spiffe://{TD}/ns/{ns}/sa/a"],
                                                     "plaintextPorts": list(range(1, ports + 1))} for i in range(n)}


def test_an_exclusion_annotation_inflated_after_admission_never_reaches_the_map() -> None:
    """Exclusion inflation around the injector (issue 18: a 256 KiB exclude-inbound-ports): a pod made where no
    webhook runs whose capture container was given more than the injector allows is meshed with no plaintext ports,
    reported once with a Warning Event on the pod, and its entry stays ~100 bytes."""
    posted: list[tuple[str, str, str]] = []

    async def post(namespace: str, name: str, uid: str, reason: str, message: str) -> None:
        posted.append((f"{namespace}/{name}", reason, message))

    async def scenario() -> MeshDirectory:
        d = MeshDirectory(TD, post=post)
        big = pod("evil-1", "10.0.0.1", ns="evil",
                  annotations={"meshward.io/exclude-inbound-ports": ",".join(str(p) for p in range(1, 65536))})
        d.apply_pod(big)
        d.apply_pod(big)  # an update: still one Event
        d.publish()
        await asyncio.sleep(0)  # let the posting task run
        return d
    d = asyncio.run(scenario())
    assert d.document["10.0.0.1"] == {"identities": [f"spiffe://{TD}/ns/evil/sa/orders"], "plaintextPorts": []}
    assert d.map_bytes < 200
    assert list(d.ignored) == ["evil/evil-1"] and "exclude-inbound-ports" in d.ignored["evil/evil-1"]
    assert [(who, reason) for who, reason, _ in posted] == [("evil/evil-1", "MeshAnnotationIgnored")]
    fixed = pod("evil-1", "10.0.0.1", ns="evil", annotations={"meshward.io/exclude-inbound-ports": "9090"})
    d.apply_pod(fixed)
    assert d.ignored == {}


def test_a_namespace_over_its_share_is_left_out_of_every_view_and_only_it() -> None:
    """Inflation by pod count: one namespace's entries over its share are left out of every agent's map as a
    whole (fail closed toward it), reported (log, Event on its largest pod), and no other namespace loses one."""
    posted: list[tuple[str, str]] = []

    async def post(namespace: str, name: str, uid: str, reason: str, message: str) -> None:
        posted.append((f"{namespace}/{name}", reason))

    async def scenario() -> MeshDirectory:
        d = MeshDirectory(TD, post=post, max_namespace_bytes=4096)
        d.apply_pod(pod("o-1", "10.0.0.1"))
        d.apply_service(service("orders", "10.96.0.1"))
        for n in range(60):
            d.apply_pod(pod(f"evil-{n}", f"10.9.0.{n}", ns="evil", annotations={
                "meshward.io/exclude-inbound-ports": "9090,9100" if n == 7 else ""}))
        d.publish()
        await asyncio.sleep(0)
        return d
    d = asyncio.run(scenario())
    assert list(d.cut) == ["evil"] and "more than the 4096 one namespace may" in d.cut["evil"]
    for viewer in ("shop", "evil", "web"):
        view = d.view(viewer)
        assert set(view) == {"10.0.0.1", "10.96.0.1"}
    assert posted == [("evil/evil-7", "MeshDestinationsCut")]

    async def shrink() -> None:
        for n in range(5, 60):
            d.remove_pod("evil", f"evil-{n}")
        d.publish()
    asyncio.run(shrink())
    assert d.cut == {} and "10.9.0.0" in d.view("shop")


def test_while_the_map_is_over_its_bound_the_largest_namespaces_are_left_out() -> None:
    by_ns = {"a": _entries(30, "a"), "b": _entries(20, "b"), "c": _entries(10, "c")}
    sizes = {ns: len(json.dumps(e, separators=(",", ":"))) for ns, e in by_ns.items()}
    doc, cut = bounded(by_ns, max_namespace_bytes=10**6, max_map_bytes=sizes["b"] + sizes["c"] + 10)
    assert list(cut) == ["a"] and "namespace a, the largest left" in cut["a"]
    assert set(doc) == set(by_ns["b"]) | set(by_ns["c"])


@given(st.dictionaries(st.sampled_from(["a", "bb", "ccc", "dddd", "e"]),
                       st.tuples(st.integers(0, 60), st.integers(0, 64)), max_size=5),
       st.integers(200, 5000), st.integers(200, 20000))
@settings(max_examples=60, deadline=None)
def test_the_bounded_map_never_exceeds_its_bound_and_cuts_whole_namespaces(
        shape: dict[str, tuple[int, int]], per_ns: int, total: int) -> None:
    by_ns = {ns: _entries(n, ns, ports) for ns, (n, ports) in shape.items()}
    doc, cut = bounded(by_ns, per_ns, total)
    assert len(json.dumps(doc, separators=(",", ":"))) <= total
    for ns, entries in by_ns.items():
        assert (ns in cut) == (not set(entries) <= set(doc))
        assert ns in cut or all(doc[ip] == e for ip, e in entries.items())
        assert ns not in cut or not set(entries) & set(doc)


def _labelled(body: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    body["metadata"]["labels"].update(labels)
    return body


def test_no_tenant_controlled_input_grows_another_namespaces_message_past_grpcs_limit() -> None:
    """Tenant inflation of the destination map (issue 18 item 3), each input in turn with the real bounds: pod
    count, 17 pods with 256 KiB exclusion annotations, maximal admitted annotations, labels, Services with many
    ports and IPs. The message another namespace's agent receives stays under MAX_MESSAGE_BYTES and keeps every
    entry of the well-behaved namespaces."""
    many_ports = {"meshward.io/exclude-inbound-ports": ",".join(str(p) for p in range(1, 65536))}
    maximal = {"meshward.io/exclude-inbound-ports": ",".join(str(65535 - n) for n in range(64))}
    labels = {f"l{n}": "x" * 63 for n in range(200)}
    attacks: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
        "pod count": ([pod(f"e-{n}", f"10.{100 + n // 62500}.{n // 250 % 250}.{n % 250}", ns="evil")
                       for n in range(40000)], []),
        "inflated annotations": ([pod(f"e-{n}", f"10.100.0.{n}", ns="evil", annotations=many_ports)
                                  for n in range(17)], []),
        "maximal admitted annotations": ([pod(f"e-{n}", f"10.100.{n // 250}.{n % 250}", ns="evil",
                                              sa="s" * 253, annotations=maximal) for n in range(6000)], []),
        "labels": ([_labelled(pod(f"e-{n}", f"10.100.0.{n}", ns="evil"), labels) for n in range(200)], []),
        "services": ([pod("e-0", "10.100.0.1", ns="evil", annotations=maximal)],
                     [{"metadata": {"name": f"s-{n}", "namespace": "evil"},
                       "spec": {"clusterIP": f"10.200.{n // 250}.{n % 250}",
                                "clusterIPs": [f"10.200.{n // 250}.{n % 250}"], "selector": {"app": "orders"},
                                "ports": [{"port": p, "targetPort": 65535 - (p % 64)} for p in range(1, 1001)]}}
                      for n in range(300)]),
    }
    for attack, (pods, services) in attacks.items():
        d = MeshDirectory(TD)
        d.apply_pod(pod("o-1", "10.0.0.1"))
        d.apply_pod(pod("w-1", "10.0.1.1", ns="web", sa="frontend"))
        d.apply_service(service("orders", "10.96.0.1"))
        for body in pods:
            d.apply_pod(body)
        for body in services:
            d.apply_service(body)
        d.publish()
        for viewer in ("web", "shop", "evil"):
            message = dumps({"destinations": {"version": d.version, "peers": d.view(viewer)}})
            assert len(message) < MAX_MESSAGE_BYTES, attack
            assert {"10.0.0.1", "10.0.1.1", "10.96.0.1"} <= set(d.view(viewer)), attack


def test_meshward_check_names_an_app_port_excluded_from_capture() -> None:
    """`meshward.io/exclude-inbound-ports` naming a port the app declares: plaintext reaches the app there from anyone,
    and `meshward check` (ports_outside_mesh) names the pod and port; undeclared excluded ports, uninjected or finished
    pods and UDP ports are not listed."""
    from meshward.operator.domain.destinations import ports_outside_mesh

    def pod(name: str, exclude: str, injected: bool = True, phase: str = "Running") -> dict[str, Any]:
        mesh = [{"name": "meshward-init", "command": ["meshward-init", "--exclude-inbound-ports", exclude]},
                {"name": "meshward-agent"}] if injected else []
        return {"metadata": {"namespace": "shop", "name": name,
                             "annotations": {"meshward.io/exclude-inbound-ports": exclude}},
                "spec": {"initContainers": mesh,
                         "containers": [{"name": "app", "ports": [{"containerPort": 8080}, {"containerPort": 9090},
                                                                  {"containerPort": 5353, "protocol": "UDP"}]}]},
                "status": {"phase": phase}}

    pods = [pod("orders-1", "8080,9090,7000"), pod("orders-2", "7000,5353"), pod("plain", "8080", injected=False),
            pod("done", "8080", phase="Succeeded"), pod("bad", "not-a-port")]
    assert ports_outside_mesh(pods) == [("shop/orders-1", (8080, 9090))]


# ------------------------------------------------------------------------------ dual-stack (issue 18, item 1)


def dual_pod(name: str, ip: str, ip6: str, **kwargs: Any) -> dict[str, Any]:
    """A running pod of a dual-stack cluster: `status.podIPs` has an address of each family, podIP the first."""
    body = pod(name, ip, **kwargs)
    body["status"]["podIPs"] = [{"ip": ip}, {"ip": ip6}]
    return body


def dual_service(name: str, ip: str, ip6: str, **kwargs: Any) -> dict[str, Any]:
    body = service(name, ip, **kwargs)
    body["spec"]["clusterIPs"] = [ip, ip6]
    body["spec"]["ipFamilies"] = ["IPv4", "IPv6"]
    return body


def test_dual_stack_pods_and_services_are_meshed_by_both_families_alike() -> None:
    """A meshed caller dialling a pod or Service over IPv6 must get the same mTLS, pinned to the same identities,
    with the same plaintext ports, as over IPv4: the IPv6 addresses were left out and went out in plaintext."""
    excl = {"meshward.io/exclude-inbound-ports": "9090"}
    got = dmap([dual_pod("o-1", "10.0.0.1", "fd00:10::1", annotations=excl),
                dual_pod("o-2", "10.0.0.2", "fd00:10::2", annotations=excl, sa="orders-v2")],
               [dual_service("orders", "10.96.0.1", "fd00:96::1")])
    for v4, v6 in (("10.0.0.1", "fd00:10::1"), ("10.0.0.2", "fd00:10::2"), ("10.96.0.1", "fd00:96::1")):
        assert got[v6] == got[v4]
    assert got["fd00:10::1"] == {"identities": [f"spiffe://{TD}/ns/shop/sa/orders"], "plaintextPorts": [9090]}
    assert got["fd00:96::1"]["identities"] == [f"spiffe://{TD}/ns/shop/sa/orders", f"spiffe://{TD}/ns/shop/sa/orders-v2"]
    assert len(got) == 6
    view = view_for(got, "web", TD)
    assert view["fd00:96::1"]["identities"] == [f"spiffe://{TD}/ns/shop/sa/*"]


def test_an_ipv6_only_pod_and_service_are_meshed() -> None:
    """Single-stack IPv6: `podIP` is an IPv6 address (it was skipped for containing ':')."""
    v6 = pod("o-1", "fd00:10::1")
    got = dmap([v6], [service("orders", "fd00:96::1")])
    assert set(got) == {"fd00:10::1", "fd00:96::1"}


def test_addresses_are_canonical_and_at_most_one_per_family() -> None:
    """Addresses enter the map as Envoy and the agent's own-address check compare them (canonical), and a pod or
    Service takes at most one per family, whatever its status or spec lists: an entry's count is bounded."""
    odd = pod("o-1", "10.0.0.1")
    odd["status"]["podIPs"] = [{"ip": "10.0.0.1"}, {"ip": "FD00:10:0::0001"}, {"ip": "fd00:10::99"},
                               {"ip": "10.0.0.99"}, {"ip": "fe80::1%eth0"}, {"ip": "nonsense"}, "10.0.0.5", {}]
    many = service("orders", "10.96.0.1")
    many["spec"]["clusterIPs"] = ["10.96.0.1", *(f"fd00:96::{n:x}" for n in range(1, 1000)), "None"]
    got = dmap([odd], [many])
    assert set(got) == {"10.0.0.1", "fd00:10::1", "10.96.0.1", "fd00:96::1"}


def test_dual_stack_entries_count_against_their_namespaces_share() -> None:
    """The per-namespace bound is of the entries as sent: a namespace whose IPv4 entries alone fit its share but
    whose IPv4 and IPv6 ones together do not is left out as a whole, both families, and only it."""
    async def scenario(dual: bool) -> MeshDirectory:
        d = MeshDirectory(TD, max_namespace_bytes=4096)
        d.apply_pod(dual_pod("o-1", "10.0.0.1", "fd00:10::1"))
        for n in range(30):
            body = dual_pod(f"e-{n}", f"10.9.0.{n}", f"fd00:9::{n:x}", ns="evil") if dual else \
                pod(f"e-{n}", f"10.9.0.{n}", ns="evil")
            d.apply_pod(body)
        d.publish()
        return d
    single = asyncio.run(scenario(False))
    assert single.cut == {} and "10.9.0.0" in single.view("shop")
    dual = asyncio.run(scenario(True))
    assert list(dual.cut) == ["evil"]
    assert set(dual.view("shop")) == set(dual.view("evil")) == {"10.0.0.1", "fd00:10::1"}
