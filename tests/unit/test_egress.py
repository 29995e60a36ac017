"""Egress control (issue 20): the allowed list's grammar, how mesh and namespace locks combine, and the chains.

The chains are checked here as Envoy matches them (port first, then the longest prefix, then the detected
protocol) and validated by Envoy itself; what they do to real connections is tested in real pods
(tests/e2e/test_egress.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshward.sidecar.domain.egress import (
    Allowed,
    Egress,
    combine,
    from_wire,
    parse_allow,
    parse_entry,
    parse_mode,
)
from meshward.sidecar.domain.envoy import EGRESS_REFUSED, PodProxy, build_pod_bootstrap, outbound_resources
from tests.unit.test_envoy_pod import MAP, OWN_IP, _assert_envoy_accepts, golden

LOCKED = Egress(True, parse_allow("203.0.113.0/24:443, 198.51.100.7"))


@pytest.mark.parametrize(("text", "entry"), [
    ("10.0.0.0/8", Allowed("10.0.0.0/8")),
    (" 10.0.0.0/8:5432 ", Allowed("10.0.0.0/8", 5432)),
    ("192.0.2.7", Allowed("192.0.2.7/32")),
    ("192.0.2.7:443", Allowed("192.0.2.7/32", 443)),
    ("2001:db8::/32", Allowed("2001:db8::/32")),
    ("[2001:db8::]/32:5432", Allowed("2001:db8::/32", 5432)),
    ("[2001:db8::1]:443", Allowed("2001:db8::1/128", 443)),
])
def test_an_allowed_entry_is_a_network_with_an_optional_port(text: str, entry: Allowed) -> None:
    assert parse_entry(text) == entry
    assert parse_entry(str(entry)) == entry  # the wire form parses back


@pytest.mark.parametrize(("text", "says"), [
    ("10.0.0.1/8", "CIDR"),            # host bits set: a typo for 10.0.0.0/8 or 10.0.0.1/32, refused, not guessed
    ("example.com:443", "CIDR"),
    ("10.0.0.0/8:http", "port"),
    ("10.0.0.0/8:0", "port"),
    ("10.0.0.0/8:70000", "port"),
    ("0.0.0.0/0", "mode open"),         # allows everything: no lock at all
    ("[2001:db8::/32:5432", "[2001:db8::]/32:5432"),
])
def test_a_wrong_entry_is_refused_naming_it_and_the_fix(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=r"(?s)" + repr(text.strip())[1:-1].replace("[", r"\[").replace(".", r"\.")
                       + ".*" + says.replace("[", r"\[").replace(".", r"\.")):
        parse_entry(text)


def test_a_list_is_sorted_deduplicated_and_bounded() -> None:
    assert parse_allow("10.0.0.0/8, 10.0.0.0/8,,192.0.2.0/24:53") == (Allowed("10.0.0.0/8"),
                                                                      Allowed("192.0.2.0/24", 53))
    with pytest.raises(ValueError, match="at most 64"):
        parse_allow(",".join(f"10.0.{i}.0/24" for i in range(65)))


def test_a_mode_is_open_or_meshed_only() -> None:
    assert parse_mode("meshed-only") and not parse_mode("open")
    with pytest.raises(ValueError, match="open or meshed-only"):
        parse_mode("registry-only")


def test_a_namespace_narrows_the_mesh_lock_and_never_widens_it() -> None:
    """Where both lock, a connection must be allowed by both: a namespace adding a network the mesh does not allow
    gains nothing; a namespace narrowing one keeps the narrower."""
    mesh = Egress(True, (Allowed("10.0.0.0/8"), Allowed("192.0.2.0/24", 443)))
    ns = Egress(True, (Allowed("10.1.0.0/16", 5432), Allowed("198.51.100.0/24"), Allowed("192.0.2.0/24", 80)))
    assert combine(mesh, ns) == Egress(True, (Allowed("10.1.0.0/16", 5432),))
    assert combine(mesh, Egress()) == mesh        # a namespace that says nothing, or open, keeps the mesh's lock
    assert combine(Egress(), ns) == ns
    assert combine(Egress(), Egress()) == Egress()


def test_the_wire_form_round_trips_and_absent_means_open() -> None:
    assert from_wire(LOCKED.to_wire()) == LOCKED
    assert from_wire(None) == Egress()  # an operator that predates egress control
    bads: list[Any] = [[], {"mode": "meshed-only", "allow": "10.0.0.0/8"}, {"mode": "closed"}, {"allow": [7]}]
    for bad in bads:
        with pytest.raises(ValueError, match=r"egress|mode"):
            from_wire(bad)


def test_an_entry_for_every_port_and_one_for_a_port_of_the_same_network_sort_together() -> None:
    """`10.0.0.0/8` and `10.0.0.0/8:5432` in one list (an entry for every port has no order against a port: before,
    sorting them raised TypeError, which the operator's namespace handler did not catch, so the namespace stayed
    open), and where a combination or the listener's own additions meet them."""
    assert parse_allow("10.0.0.0/8:5432, 10.0.0.0/8") == (Allowed("10.0.0.0/8"), Allowed("10.0.0.0/8", 5432))
    mesh = Egress(True, parse_allow("10.0.0.0/8, 10.1.0.0/16:80"))
    assert set(combine(mesh, Egress(True, parse_allow("10.1.0.0/16"))).allow) == {
        Allowed("10.1.0.0/16"), Allowed("10.1.0.0/16", 80)}
    # an allowed /32 that is a meshed address with an uncaptured port, and this pod's own address with a port
    outbound_resources(MAP, OWN_IP, egress=Egress(True, parse_allow(f"10.244.0.7/32, {OWN_IP}:8080")))


def test_a_locked_namespace_reaches_the_cluster_dns_service_never_a_nameserver_the_pod_chose() -> None:
    """TCP DNS stays open to the cluster DNS Service's addresses on port 53 (not its metrics port), which the
    operator reads from the Service: a pod's resolv.conf is its spec's to choose (`dnsConfig.nameservers: [203.0.113.9]` would have opened
    port 53 anywhere)."""
    from meshward.operator.engines.mesh_directory import MeshDirectory

    d = MeshDirectory("cluster.local")
    d.apply_service({"metadata": {"namespace": "kube-system", "name": "kube-dns"}, "spec": {
        "clusterIPs": ["10.96.0.10", "fd00:10:96::a"], "selector": {"k8s-app": "kube-dns"},
        "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                  {"name": "metrics", "port": 9153, "protocol": "TCP"}]}})
    d.apply_namespace(_namespace("shop", **{"meshward.io/egress": "meshed-only"}))
    assert set(d.egress("shop").allow) == {Allowed("10.96.0.10/32", 53), Allowed("fd00:10:96::a/128", 53)}
    assert d.egress("web") == Egress()  # open namespaces get nothing added
    d.remove_service("kube-system", "kube-dns")
    assert d.egress("shop") == Egress(True)


@pytest.mark.parametrize("annotation", ["meshward.io/exclude-outbound-cidrs", "meshward.io/exclude-outbound-ports"])
def test_outbound_exclusions_around_a_locked_egress_are_refused_at_admission(annotation: str) -> None:
    """The trick: a tenant who may create pods in a locked namespace excludes the internet from capture
    (`exclude-outbound-cidrs: 0.0.0.0/1,128.0.0.0/1`) and connects around its Envoy. In a locked namespace the
    webhook refuses such a pod, naming the annotation and what to do instead; elsewhere it is injected as before."""
    from meshward.operator.domain.admission import inject_response
    from meshward.operator.domain.inject import InjectSettings

    value = "0.0.0.0/1,128.0.0.0/1" if annotation.endswith("cidrs") else "443"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "p", "namespace": "shop", "labels": {"meshward.io/inject": "enabled"},
        "annotations": {annotation: value}}, "spec": {"serviceAccountName": "orders", "containers": [
            {"name": "app", "image": "app:1"}]}}
    request = {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
               "namespace": "shop", "object": pod}
    settings = InjectSettings(image="meshward:1", operator_namespace="meshward-system")
    refused = inject_response(request, settings, namespace_opted_in=False, egress_locked=True)
    assert refused["allowed"] is False and refused["status"]["code"] == 403
    assert annotation in refused["status"]["message"] and "meshward.io/egress-allow" in refused["status"]["message"]
    assert "patch" in inject_response(request, settings, namespace_opted_in=False, egress_locked=False)


def _chains(egress: Egress) -> dict[str, dict[str, Any]]:
    (listener,), _ = outbound_resources(MAP, OWN_IP, egress=egress)
    return {c["name"]: c for c in [*listener["filter_chains"], listener["default_filter_chain"]]}


def _match(chains: dict[str, dict[str, Any]], ip: str, port: int, http: bool) -> str:
    """The chain Envoy picks: destination port, then the longest prefix, then the detected protocol."""
    import ipaddress

    def prefix_len(c: dict[str, Any]) -> int:
        ranges = c.get("filter_chain_match", {}).get("prefix_ranges")
        if ranges is None:
            return 0
        hits = [r["prefix_len"] for r in ranges
                if ipaddress.ip_address(ip) in ipaddress.ip_network(f"{r['address_prefix']}/{r['prefix_len']}")]
        return max(hits) if hits else -1

    listed = [c for c in chains.values() if "filter_chain_match" in c]
    by_port = [c for c in listed if c["filter_chain_match"].get("destination_port") == port] or \
        [c for c in listed if "destination_port" not in c["filter_chain_match"]]
    best = max((prefix_len(c) for c in by_port), default=-1)
    if best < 0:
        return "default"
    cands = [c for c in by_port if prefix_len(c) == best]
    protocol = [c for c in cands if "application_protocols" in c["filter_chain_match"]]
    plain = [c for c in cands if "application_protocols" not in c["filter_chain_match"]]
    picked = (protocol if http and protocol else plain)
    return picked[0]["name"] if picked else "default"


@pytest.mark.parametrize(("ip", "port", "http", "chain"), [
    ("10.244.0.8", 8080, True, "outbound|spiffe://cluster.local/ns/shop/sa/orders|*"),  # meshed: mTLS as ever
    ("10.244.0.7", 9090, False, "passthrough|9090"),   # a meshed pod's uncaptured port: still reachable, plaintext
    ("10.244.0.9", 8080, True, "passthrough_http"),    # this pod itself
    ("203.0.113.9", 443, False, "passthrough|443"),    # allowed network and port
    ("203.0.113.9", 80, True, "default"),              # allowed network, other port: refused
    ("198.51.100.7", 5432, False, "passthrough"),      # allowed host, every port
    ("198.51.100.7", 9090, False, "passthrough|9090"),  # ... also on a port some other chain names
    ("192.0.2.1", 80, True, "default"),                # anything else: refused
])
def test_a_locked_pod_reaches_meshed_addresses_itself_and_the_allowed_list_only(ip: str, port: int, http: bool,
                                                                                 chain: str) -> None:
    chains = _chains(LOCKED)
    got = _match(chains, ip, port, http)
    assert got == chain
    if got == "default":
        assert chains["egress_refused"]["filters"][0]["typed_config"]["cluster"] == EGRESS_REFUSED


def test_open_egress_passes_everything_through_and_logs_it() -> None:
    chains = _chains(Egress())
    assert _match(chains, "192.0.2.1", 80, True) == "passthrough_http"
    assert chains["passthrough"]["filters"][0]["typed_config"]["cluster"] == "passthrough"
    assert chains["passthrough"]["filters"][0]["typed_config"]["access_log"][0]["name"] == \
        "envoy.access_loggers.tcp_grpc"


def test_a_meshed_address_allowed_by_name_stays_mtls() -> None:
    """An allowed /32 that is a meshed pod never turns its HTTP into plaintext passthrough (which would win over the
    meshed chain on the detected protocol)."""
    chains = _chains(Egress(True, (Allowed("10.244.0.8/32"),)))
    assert _match(chains, "10.244.0.8", 8080, True) == "outbound|spiffe://cluster.local/ns/shop/sa/orders|*"


def test_locked_outbound_matches_golden_and_envoy_accepts_it(request: pytest.FixtureRequest,
                                                              tmp_path: Path) -> None:
    listeners, clusters = outbound_resources(MAP, OWN_IP, egress=LOCKED)
    golden("outbound-egress-locked", {"listeners": listeners, "clusters": clusters}, request)
    assert yaml.safe_dump(clusters).count(EGRESS_REFUSED) >= 1
    _assert_envoy_accepts(build_pod_bootstrap(PodProxy("shop/orders-1")), listeners, clusters, tmp_path)


def _entry(address: str, port: int, cluster: str) -> Any:
    from envoy.data.accesslog.v3 import accesslog_pb2

    e = accesslog_pb2.TCPAccessLogEntry()
    e.common_properties.downstream_local_address.socket_address.address = address
    e.common_properties.downstream_local_address.socket_address.port_value = port
    e.common_properties.upstream_cluster = cluster
    e.common_properties.start_time.seconds = 1_800_000_000
    return e


class _Audit:
    """The audit records written, in order."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def write(self, r: Any) -> None:
        self.records.append(r)


def test_envoys_egress_log_is_counted_by_destination_and_each_refusal_audited() -> None:
    """The agent's access log service reads Envoy's stream (its messages as Envoy sends them: the log's name first,
    then batches): allowed connections are counted, a refused one is counted and written as an audit line; entries
    of another log name are ignored, and destinations past MAX_DESTINATIONS count as `other`."""
    import asyncio

    from envoy.service.accesslog.v3 import als_pb2
    from prometheus_client import CollectorRegistry

    from meshward.sidecar.domain.envoy import EGRESS_LOG, EGRESS_REFUSED_LOG
    from meshward.sidecar.engines.egress import MAX_DESTINATIONS, EgressLog
    from meshward.sidecar.servers.als import AccessLogs

    registry, audit = CollectorRegistry(), _Audit()
    servicer = AccessLogs(EgressLog(registry, audit, lambda: "shop/orders"))

    def batch(*entries: Any, name: str = "") -> Any:
        m = als_pb2.StreamAccessLogsMessage()
        if name:
            m.identifier.log_name = name
        m.tcp_logs.log_entry.extend(entries)
        return m

    async def stream(*msgs: Any) -> Any:
        for m in msgs:
            yield m

    asyncio.run(servicer.StreamAccessLogs(stream(
        batch(_entry("203.0.113.9", 443, "passthrough"), name=EGRESS_LOG),
        batch(_entry("203.0.113.9", 443, "passthrough"))), None))
    asyncio.run(servicer.StreamAccessLogs(stream(batch(_entry("192.0.2.1", 80, ""), name=EGRESS_REFUSED_LOG)), None))
    asyncio.run(servicer.StreamAccessLogs(stream(batch(_entry("192.0.2.1", 80, ""), name="other")), None))

    def total(destination: str, outcome: str) -> float | None:
        return registry.get_sample_value("meshward_egress_total", {"destination": destination, "protocol": "tcp",
                                                                    "outcome": outcome})
    assert total("203.0.113.9:443", "allowed") == 2
    assert total("192.0.2.1:80", "refused") == 1
    (line,) = audit.records
    assert (line.outcome, line.destination, line.port, line.workload, line.method, line.transport) == \
        ("forbidden", "192.0.2.1:80", 80, "shop/orders", "TCP", "egress")
    many = [_entry(f"198.51.100.{i}", 80, "passthrough") for i in range(MAX_DESTINATIONS + 5)]
    asyncio.run(servicer.StreamAccessLogs(stream(batch(*many, name=EGRESS_LOG)), None))
    assert total("other", "allowed") == 7  # 64 labels in all: two taken above


def _namespace(name: str, **annotations: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "annotations": annotations}}


def test_a_namespaces_annotations_lock_its_pods_and_only_its_pods() -> None:
    """The operator's directory sends each namespace's agents the egress in force there; a change moves the map's
    version (every stream resends), removing the annotation (or the Namespace) unlocks."""
    from meshward.operator.engines.mesh_directory import MeshDirectory

    d = MeshDirectory("cluster.local")
    d.publish()
    before = d.version
    d.apply_namespace(_namespace("shop", **{"meshward.io/egress": "meshed-only",
                                            "meshward.io/egress-allow": "192.0.2.0/24:5432"}))
    d.publish()
    assert d.version != before
    assert asyncio_next(d, before, "shop")[2] == {"mode": "meshed-only", "allow": ["192.0.2.0/24:5432"]}
    assert asyncio_next(d, before, "web")[2] == {"mode": "open", "allow": []}
    d.apply_namespace(_namespace("shop"))
    d.publish()
    assert d.egress("shop") == Egress()
    d.apply_namespace(_namespace("shop", **{"meshward.io/egress": "meshed-only"}))
    d.remove_namespace("shop")
    assert d.egress("shop") == Egress()


def asyncio_next(d: Any, after: str, namespace: str) -> Any:
    import asyncio

    return asyncio.run(d.next(after, namespace))


@pytest.mark.parametrize(("annotations", "says"), [
    ({"meshward.io/egress": "meshd-only"}, "not a mode"),
    ({"meshward.io/egress": "meshed-only", "meshward.io/egress-allow": "10.0.0.1/8"}, "CIDR"),
    ({"meshward.io/egress-allow": "10.0.0.0/8"}, "without meshward.io/egress"),
])
def test_a_wrong_annotation_fails_closed_and_is_reported_on_the_namespace(annotations: dict[str, str],
                                                                          says: str) -> None:
    """A typo never opens what was meant to be locked: the namespace is locked with nothing allowed, a Warning Event
    on the Namespace names the annotation and the fix, once; fixing it clears the report."""
    import asyncio

    from meshward.operator.engines.mesh_directory import MeshDirectory

    posted: list[tuple[str, str, str]] = []

    async def post(namespace: str, reason: str, message: str) -> None:
        posted.append((namespace, reason, message))

    async def run() -> MeshDirectory:
        d = MeshDirectory("cluster.local", post_namespace=post)
        d.apply_namespace(_namespace("shop", **annotations))
        d.apply_namespace(_namespace("shop", **annotations))  # the same again (a resync): reported once
        await asyncio.sleep(0)
        return d

    d = asyncio.run(run())
    assert d.egress("shop") == Egress(True)
    ((ns, reason, message),) = posted
    assert (ns, reason) == ("shop", "EgressAnnotationInvalid") and says in message and "meshward.io/egress" in message
    d.apply_namespace(_namespace("shop", **{"meshward.io/egress": "meshed-only"}))
    assert "shop" not in d.egress_problems


def test_the_mesh_lock_applies_everywhere_and_namespaces_narrow_it() -> None:
    from meshward.operator.domain.egress import mesh_egress
    from meshward.operator.engines.mesh_directory import MeshDirectory

    mesh = mesh_egress("meshed-only", "10.0.0.0/8,192.0.2.0/24:443")
    d = MeshDirectory("cluster.local", egress=mesh)
    d.apply_namespace(_namespace("shop", **{"meshward.io/egress": "meshed-only",
                                            "meshward.io/egress-allow": "10.1.0.0/16:5432,198.51.100.0/24"}))
    d.apply_namespace(_namespace("web", **{"meshward.io/egress": "open"}))
    assert d.egress("shop") == Egress(True, (Allowed("10.1.0.0/16", 5432),))
    assert d.egress("web") == mesh  # a namespace cannot open what the platform locked


@pytest.mark.parametrize(("mode", "allow", "says"), [
    ("closed", "", "--egress-mode: 'closed' is not a mode"),
    ("meshed-only", "10.0.0.0/33", "--egress-allow"),
    ("open", "10.0.0.0/8", "--egress-mode is open"),
])
def test_the_operator_refuses_a_wrong_mesh_egress_naming_the_flag(mode: str, allow: str, says: str) -> None:
    from meshward.operator.domain.egress import mesh_egress

    with pytest.raises(ValueError, match=re.escape(says)):
        mesh_egress(mode, allow)


def test_the_charts_egress_values_reach_the_operator_and_its_schema_refuses_a_wrong_mode() -> None:
    from tests.kube import tool_paths
    from tests.unit.test_chart import docs, render

    helm = tool_paths(only=("helm",))["helm"]
    rendered = docs(helm, "--set", "egress.mode=meshed-only", "--set", "egress.allow={10.0.0.0/8:5432,192.0.2.7/32}")
    env = {e["name"]: e.get("value") for e in next(d for d in rendered if d["kind"] == "Deployment")[
        "spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MESHWARD_EGRESS_MODE"] == "meshed-only"
    assert env["MESHWARD_EGRESS_ALLOW"] == "10.0.0.0/8:5432,192.0.2.7/32"
    proc = render(helm, "--set", "egress.mode=registry-only")
    assert proc.returncode != 0 and "egress" in proc.stderr


def test_a_client_retrying_a_refused_destination_in_a_loop_cannot_flood_the_audit_log() -> None:
    """The trick: an app (or an attacker in it) dials a refused address thousands of times a second, each refusal an
    audit line. One line per destination a second is written; the next says how many were not, and the counter
    counts every one."""
    from prometheus_client import CollectorRegistry

    from meshward.sidecar.engines.egress import EgressLog

    now = [100.0]
    registry, audit = CollectorRegistry(), _Audit()
    log = EgressLog(registry, audit, lambda: "shop/orders-1", clock=lambda: now[0])
    for _ in range(1000):
        log.record("tcp", "192.0.2.1", 80, True, 0.0)
    log.record("tcp", "192.0.2.2", 80, True, 0.0)  # another destination has its own budget
    assert [r.destination for r in audit.records] == ["192.0.2.1:80", "192.0.2.2:80"]
    now[0] += 1.0
    log.record("tcp", "192.0.2.1", 80, True, 0.0)
    assert len(audit.records) == 3 and "999 more refused" in audit.records[-1].reason
    assert registry.get_sample_value("meshward_egress_total", {
        "destination": "192.0.2.1:80", "protocol": "tcp", "outcome": "refused"}) == 1001


def test_a_locked_namespace_is_known_locked_before_the_first_map_and_webhook() -> None:
    """The window: the operator's watches deliver Namespaces only once its handlers run, after its policy service
    and webhook start; a new leader would have sent reconnecting agents `open` for a namespace locked by its
    annotations, and admitted outbound exclusions there, until then. The directory is primed from a list of the
    Namespaces and the DNS Service first (the operator's start-up waits for it)."""
    import asyncio

    from meshward.operator.engines.mesh_directory import MeshDirectory

    async def namespaces() -> list[dict[str, Any]]:
        return [_namespace("shop", **{"meshward.io/egress": "meshed-only"}), _namespace("web")]

    async def service(namespace: str, name: str) -> dict[str, Any] | None:
        assert (namespace, name) == ("kube-system", "kube-dns")
        return {"metadata": {"namespace": namespace, "name": name}, "spec": {"clusterIP": "10.96.0.10"}}

    d = MeshDirectory("cluster.local")
    asyncio.run(d.prime(namespaces, service))
    d.publish()
    assert d.egress("shop") == Egress(True, (Allowed("10.96.0.10/32", 53),))
    assert d.egress("web") == Egress()
