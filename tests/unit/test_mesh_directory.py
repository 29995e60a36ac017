"""The meshed-destination map (operator/domain/destinations.py, engines/mesh_directory.py) and the safety net
(engines/safety_net.py): which addresses answer with mTLS and as whom, and who runs opted in without the mesh."""

from __future__ import annotations

import asyncio
from typing import Any

from meshward.operator.domain.destinations import mesh_destinations, mesh_pod, mesh_service, version_of, view_for
from meshward.operator.engines.mesh_directory import MeshDirectory
from meshward.operator.engines.safety_net import SafetyNet

TD = "cluster.local"


def pod(name: str, ip: str, sa: str = "orders", injected: bool = True, ns: str = "shop",
        annotations: dict[str, str] | None = None, **labels: str) -> dict[str, Any]:
    ann = {**({"meshward.io/injected": "0.1"} if injected else {}), **(annotations or {})}
    return {"metadata": {"name": name, "namespace": ns, "labels": {"app": "orders", **labels}, "annotations": ann},
            "spec": {"serviceAccountName": sa}, "status": {"podIP": ip, "phase": "Running"}}


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

    async def views() -> tuple[tuple[str, dict[str, Any]], tuple[str, dict[str, Any]]]:
        d = MeshDirectory(TD)
        for body in (pod("o-1", "10.0.0.1"), pod("w-1", "10.0.1.1", sa="frontend", ns="web")):
            d.apply_pod(body)
        d.publish()
        return await d.next("", "web"), await d.next("", "shop")
    (v_web, doc_web), (v_shop, doc_shop) = asyncio.run(views())
    assert v_web == v_shop and doc_web["10.0.0.1"]["identities"] == [f"spiffe://{TD}/ns/shop/sa/*"]
    assert doc_shop["10.0.0.1"]["identities"] == [f"spiffe://{TD}/ns/shop/sa/orders"]


def test_equal_maps_have_equal_versions() -> None:
    assert version_of({"a": 1}) == version_of({"a": 1}) != version_of({"a": 2})


def test_the_directory_publishes_a_burst_once_and_wakes_every_waiter() -> None:
    async def scenario() -> tuple[int, list[str], dict[str, Any]]:
        d = MeshDirectory(TD, debounce_s=0.01)
        runner = asyncio.create_task(d.run())
        first, _ = await d.next("", "shop")
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
        return published, [v for v, _ in results], results[0][1]
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


def test_meshward_check_names_an_app_port_excluded_from_capture() -> None:
    """`meshward.io/exclude-inbound-ports` naming a port the app declares: plaintext reaches the app there from anyone,
    and `meshward check` (ports_outside_mesh) names the pod and port; undeclared excluded ports, uninjected or finished
    pods and UDP ports are not listed."""
    from meshward.operator.domain.destinations import ports_outside_mesh

    def pod(name: str, exclude: str, injected: bool = True, phase: str = "Running") -> dict[str, Any]:
        annotations = {"meshward.io/exclude-inbound-ports": exclude, **({"meshward.io/injected": "v"} if injected
                                                                          else {})}
        return {"metadata": {"namespace": "shop", "name": name, "annotations": annotations},
                "spec": {"containers": [{"name": "app", "ports": [{"containerPort": 8080}, {"containerPort": 9090},
                                                                  {"containerPort": 5353, "protocol": "UDP"}]}]},
                "status": {"phase": phase}}

    pods = [pod("orders-1", "8080,9090,7000"), pod("orders-2", "7000,5353"), pod("plain", "8080", injected=False),
            pod("done", "8080", phase="Succeeded"), pod("bad", "not-a-port")]
    assert ports_outside_mesh(pods) == [("shop/orders-1", (8080, 9090))]
