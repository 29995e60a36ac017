"""An injected pod's Envoy: its bootstrap and the outbound listener and clusters built from the destination map,
against golden files (refresh with `pytest --update-golden`), Envoy's own validation and the security they
promise."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshward.sidecar.domain.capture import PROXY_HEALTH_PORT
from meshward.sidecar.domain.context import WIRE_HEADER
from meshward.sidecar.domain.envoy import (
    ATTR_DEST,
    ATTR_L4,
    ATTR_PEER,
    ENVOY_ADMIN_SOCKET,
    INBOUND_TCP_APP,
    L4_TCP,
    SNIFF_TIMEOUT_S,
    TCP_ALPN,
    TCP_TUNNEL_PATH,
    TCP_TUNNELS_PER_PORT,
    Destination,
    HttpSettings,
    PodProxy,
    Transport,
    build_pod_bootstrap,
    check_bootstrap,
    outbound_resources,
    owned_except,
    parse_destinations,
    parse_duration,
)
from tests.support.procs import envoy_binary, free_port, http_status, run_envoy, unix_get, wait_for

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
PAYMENTS = "spiffe://cluster.local/ns/shop/sa/payments"
MAP = {
    "10.244.0.7": Destination((ORDERS,), (9090,)),    # an orders pod leaving its metrics port uncaptured
    "10.244.0.8": Destination((ORDERS,)),
    "10.96.0.20": Destination((ORDERS,)),              # the orders Service
    "10.96.0.30": Destination((PAYMENTS, ORDERS)),     # a Service over two identities
    "10.244.0.9": Destination((PAYMENTS,)),            # this pod
    "10.244.1.4": Destination(("spiffe://cluster.local/ns/web/sa/*",)),  # a pod of another namespace
}
OWN_IP = "10.244.0.9"


def golden(name: str, doc: Any, request: pytest.FixtureRequest) -> None:
    text = yaml.safe_dump(doc, sort_keys=False)
    path = GOLDEN / f"envoy-{name}.yaml"
    if request.config.getoption("--update-golden"):
        path.write_text(text)
    assert path.exists(), f"{path} missing: run pytest --update-golden"
    assert text == path.read_text(), f"{path} differs from the builder: review, then run pytest --update-golden"


@pytest.mark.parametrize("plaintext", [False, True], ids=["strict", "plaintext-allowed"])
def test_pod_bootstrap_matches_golden(plaintext: bool, request: pytest.FixtureRequest) -> None:
    golden(f"pod-{'plaintext' if plaintext else 'strict'}",
           build_pod_bootstrap(PodProxy("shop/orders-1", inbound_plaintext=plaintext)), request)


# A workload that set every HTTP annotation (meshward.io/route-timeout, stream-idle-timeout, accept-http10).
TUNED = HttpSettings(route_timeout_s=30, stream_idle_timeout_s=3600, accept_http10=True)


def test_pod_bootstrap_with_a_workloads_http_settings_matches_golden(request: pytest.FixtureRequest) -> None:
    golden("pod-http-settings", build_pod_bootstrap(PodProxy("shop/orders-1", http=TUNED)), request)


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_pod_bootstrap_with_declared_tcp_ports_matches_golden(transport: Transport, request: pytest.FixtureRequest,
                                                              tmp_path: Path) -> None:
    """meshward.io/tcp-ports: 5432 (a tunnel chain per port; over gRPC the L4 marker is a context extension); Envoy
    accepts it."""
    boot = build_pod_bootstrap(PodProxy("shop/db-1", transport=transport, tcp_ports=(5432,)))
    golden(f"pod-tcp-ports-{transport}", boot, request)
    _validate(boot, tmp_path)


def test_outbound_resources_match_golden(request: pytest.FixtureRequest) -> None:
    listeners, clusters = outbound_resources(MAP, OWN_IP)
    golden("outbound", {"listeners": listeners, "clusters": clusters}, request)


def _validate(doc: dict[str, Any], tmp_path: Path) -> str:
    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


@pytest.mark.parametrize(("plaintext", "http"), [(False, HttpSettings()), (True, HttpSettings()), (False, TUNED)],
                         ids=["strict", "plaintext-allowed", "http-settings"])
def test_envoy_accepts_the_pod_bootstrap_and_the_outbound_resources(plaintext: bool, http: HttpSettings,
                                                                    tmp_path: Path) -> None:
    """`envoy --mode validate` on the bootstrap with the outbound listener and clusters made static: valid, and
    no deprecated field, no warning."""
    boot = build_pod_bootstrap(PodProxy("shop/orders-1", inbound_plaintext=plaintext, http=http))
    _assert_envoy_accepts(boot, *outbound_resources(MAP, OWN_IP, http=http), tmp_path)


DB = "spiffe://cluster.local/ns/shop/sa/db"
# A database pod and its Service declaring 5432 TCP, and a second pod of the same identity that does not.
TCP_MAP = {**MAP, "10.244.0.20": Destination((DB,), (), (5432,)), "10.96.0.40": Destination((DB,), (), (5432,)),
           "10.244.0.21": Destination((DB,))}


def test_outbound_resources_with_declared_tcp_ports_match_golden(request: pytest.FixtureRequest,
                                                                   tmp_path: Path) -> None:
    """To a declared TCP port every connection is tunnelled over mTLS (TCP_ALPN, the destination's identity pinned),
    whatever its first bytes look like (the HTTP inspector took `hello x` for HTTP: a client was reset); the same
    port of an address not declaring it is HTTP's as before. Envoy accepts it."""
    listeners, clusters = outbound_resources(TCP_MAP, OWN_IP)
    golden("outbound-tcp", {"listeners": listeners, "clusters": clusters}, request)
    chains = {c["name"]: c for c in listeners[0]["filter_chains"]}
    group, tcp = f"outbound|{DB}", f"outbound_tcp|{DB}"
    tunnel = chains[f"{tcp}|5432"]
    assert tunnel["filter_chain_match"] == {
        "prefix_ranges": [{"address_prefix": "10.244.0.20", "prefix_len": 32},
                          {"address_prefix": "10.96.0.40", "prefix_len": 32}], "destination_port": 5432}
    assert tunnel["filters"][0]["typed_config"]["tunneling_config"]["post_path"] == TCP_TUNNEL_PATH
    assert [p["address_prefix"] for p in chains[f"{group}|5432"]["filter_chain_match"]["prefix_ranges"]] == [
        "10.244.0.21"]
    assert not any("application_protocols" in c["filter_chain_match"] and
                   "10.244.0.20" in str(c["filter_chain_match"]) for c in chains.values())
    cluster = next(c for c in clusters if c["name"] == tcp)
    tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["alpn_protocols"] == [TCP_ALPN]
    assert tls["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": DB}}]
    _assert_envoy_accepts(build_pod_bootstrap(PodProxy("shop/orders-1")), listeners, clusters, tmp_path)


def _assert_envoy_accepts(boot: dict[str, Any], listeners: list[dict[str, Any]], clusters: list[dict[str, Any]],
                          tmp_path: Path) -> None:
    """`boot` with `listeners` and `clusters` made static passes `envoy --mode validate`, with no deprecated field
    and no warning."""
    boot["static_resources"]["listeners"] += listeners
    boot["static_resources"]["clusters"] += clusters
    check_bootstrap(boot)
    out = _validate(boot, tmp_path)
    assert "deprecated" not in out.lower() and "[warning]" not in out, out


def _chains(plaintext: bool) -> dict[str, dict[str, Any]]:
    inbound = build_pod_bootstrap(PodProxy("shop/orders-1", inbound_plaintext=plaintext))["static_resources"][
        "listeners"][0]
    return {c["filter_chain_match"]["transport_protocol"]: c for c in inbound["filter_chains"]
            if "application_protocols" not in c["filter_chain_match"]}  # the HTTP chains (not TCP's: below)


def test_tunnelled_tcp_is_taken_on_declared_ports_only_and_decided_as_a_connection() -> None:
    """TCP smuggled to an HTTP port: a tunnel to any port would hand an HTTP app bytes its HTTP rules never saw (a
    caller an L4 rule admits, sending what the HTTP inspector does not call HTTP). Only declared ports get a tunnel
    chain; ALPN meshward-tcp anywhere else meets a chain that closes the connection. The tunnel's check carries
    Envoy's L4 marker, and no header of the caller's."""
    inbound = build_pod_bootstrap(PodProxy("shop/db-1", tcp_ports=(5432, 6379)))["static_resources"]["listeners"][0]
    tcp = [c for c in inbound["filter_chains"] if TCP_ALPN in c["filter_chain_match"].get("application_protocols", [])]
    assert [c["filter_chain_match"].get("destination_port") for c in tcp] == [5432, 6379, None]
    refused = tcp[-1]
    assert [f["name"] for f in refused["filters"]] == ["envoy.filters.network.direct_response"]
    assert "transport_socket" not in refused
    for chain in tcp[:2]:
        tls = chain["transport_socket"]["typed_config"]
        assert tls["require_client_certificate"] is True
        assert tls["common_tls_context"]["alpn_protocols"] == [TCP_ALPN]
        limit, hcm_filter = chain["filters"]
        assert limit["typed_config"]["max_connections"] == TCP_TUNNELS_PER_PORT  # per port, apart from HTTP's
        hcm = hcm_filter["typed_config"]
        authz = hcm["http_filters"][0]["typed_config"]
        assert authz["failure_mode_allow"] is False
        assert authz["allowed_headers"] == {"patterns": [{"exact": "x-request-id"}]}
        added = {h["key"]: h["value"] for h in authz["http_service"]["authorization_request"]["headers_to_add"]}
        assert added[ATTR_L4] == L4_TCP and added[ATTR_PEER] == "%DOWNSTREAM_PEER_URI_SAN%"
        # One tunnel per mTLS connection: a peer cannot multiplex tunnels past the listener's connection limit.
        assert hcm["http2_protocol_options"] == {"max_concurrent_streams": 1}
        assert hcm["common_http_protocol_options"] == {"max_requests_per_connection": 1}
        tunnel, rest = hcm["route_config"]["virtual_hosts"][0]["routes"]
        assert tunnel["match"]["path"] == TCP_TUNNEL_PATH
        assert tunnel["route"]["cluster"] == INBOUND_TCP_APP
        assert tunnel["route"]["upgrade_configs"] == [
            {"upgrade_type": "CONNECT", "connect_config": {"allow_post": True}}]
        assert rest["direct_response"] == {"status": 404}
    none = build_pod_bootstrap(PodProxy("shop/web-1"))["static_resources"]["listeners"][0]
    assert [c["name"] for c in none["filter_chains"] if "application_protocols" in c["filter_chain_match"]] == [
        "inbound_tcp_refused"]


def test_inbound_takes_mtls_only_unless_plaintext_is_allowed() -> None:
    """A plaintext caller (a non-meshed pod, or a pod dialling a meshed pod's IP directly) finds no filter
    chain and is disconnected; only with inbound-plaintext=allow does it reach ext_authz, with no peer."""
    strict = _chains(False)
    assert set(strict) == {"tls"}
    tls = strict["tls"]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    assert tls["common_tls_context"]["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    assert set(_chains(True)) == {"tls", "raw_buffer"}
    for chain in _chains(True).values():
        filters = chain["filters"][0]["typed_config"]["http_filters"]
        assert filters[0]["name"] == "envoy.filters.http.ext_authz"
        assert filters[0]["typed_config"]["failure_mode_allow"] is False


def _outbound_chains() -> dict[str, dict[str, Any]]:
    listeners, _ = outbound_resources(MAP, OWN_IP)
    return {c["name"]: c for c in listeners[0]["filter_chains"]}


def test_meshed_addresses_go_out_over_mtls_pinned_to_their_identities() -> None:
    listeners, clusters = outbound_resources(MAP, OWN_IP)
    by_name = {c["name"]: c for c in clusters}
    web = "spiffe://cluster.local/ns/web/sa/*"
    assert set(by_name) == {f"outbound|{ORDERS}", f"outbound|{ORDERS},{PAYMENTS}", f"outbound|{web}"}

    def pinned(name: str) -> list[dict[str, str]]:
        return [m["matcher"] for m in by_name[name]["transport_socket"]["typed_config"]["common_tls_context"][
            "combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"]]
    assert pinned(f"outbound|{ORDERS},{PAYMENTS}") == [{"exact": ORDERS}, {"exact": PAYMENTS}]
    # Another namespace's workloads are known by namespace only: any of its SPIFFE IDs, no other.
    assert pinned(f"outbound|{web}") == [{"prefix": "spiffe://cluster.local/ns/web/sa/"}]
    for cluster in clusters:
        assert cluster["type"] == "ORIGINAL_DST"
    default = listeners[0]["default_filter_chain"]["filters"][0]
    assert default["name"] == "envoy.filters.network.tcp_proxy", "anything else passes through untouched"


def test_plaintext_ports_are_carved_out_of_every_port_specific_chain() -> None:
    """Envoy matches the destination port before the address and never falls back to port-less chains: a
    meshed address's plaintext port 9090 must not take 9090 of the other meshed addresses out of the mesh."""
    chains = _outbound_chains()
    on_9090 = [c for c in chains.values() if c["filter_chain_match"].get("destination_port") == 9090]
    addresses = {r["address_prefix"] for c in on_9090 for r in c["filter_chain_match"].get("prefix_ranges", [])}
    assert addresses == {"10.244.0.8", "10.96.0.20", "10.96.0.30", "10.244.1.4"}
    # ...and plaintext HTTP/1 on 9090 (to the address that leaves it plain) still loses the context header.
    assert any(c["filter_chain_match"].get("application_protocols") for c in on_9090)
    any_port = {r["address_prefix"] for c in chains.values() if "destination_port" not in c["filter_chain_match"]
                for r in c["filter_chain_match"].get("prefix_ranges", [])}
    assert "10.244.0.7" in any_port and OWN_IP not in any_port


def test_nothing_meshed_means_everything_passes_through() -> None:
    listeners, clusters = outbound_resources({}, "")
    assert [c["name"] for c in listeners[0]["filter_chains"]] == ["passthrough_http"] and clusters == []
    assert listeners[0]["default_filter_chain"]["filters"][0]["name"] == "envoy.filters.network.tcp_proxy"


def _http_filters(chain: dict[str, Any]) -> list[str]:
    return [f["name"] for f in chain["filters"][0]["typed_config"]["http_filters"]]


def _route_config(chain: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = chain["filters"][0]["typed_config"]["route_config"]
    return config


def test_context_is_exchanged_only_toward_one_exact_workload() -> None:
    """The agent mints for exactly one audience: a chain to one SPIFFE ID checks (and exchanges) requests that
    carry the app's context header, with the destination set by Envoy; requests without it skip the agent."""
    listeners, _ = outbound_resources(MAP, OWN_IP, context_header="x-user-context")
    chains = {c["name"]: c for c in listeners[0]["filter_chains"]}
    chain = chains[f"outbound|{ORDERS}|*"]
    assert _http_filters(chain) == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]
    authz = chain["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]
    assert authz["failure_mode_allow"] is False
    service = authz["http_service"]
    assert service["authorization_request"]["headers_to_add"] == [{"key": ATTR_DEST, "value": ORDERS}]
    assert service["authorization_response"]["allowed_upstream_headers"]["patterns"] == [{"exact": WIRE_HEADER}]
    assert {"exact": "x-user-context"} in authz["allowed_headers"]["patterns"]
    with_header, without = _route_config(chain)["virtual_hosts"][0]["routes"]
    assert with_header["match"]["headers"] == [{"name": "x-user-context", "present_match": True}]
    assert "typed_per_filter_config" not in with_header
    assert without["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["disabled"] is True
    assert without["request_headers_to_remove"] == ["x-user-context", WIRE_HEADER]


@pytest.mark.parametrize(("group", "destination"), [
    (f"outbound|{ORDERS},{PAYMENTS}|*", f"{ORDERS},{PAYMENTS}"),
    ("outbound|spiffe://cluster.local/ns/web/sa/*|*", "spiffe://cluster.local/ns/web/sa/*")])
def test_context_is_exchanged_toward_a_namespace_when_no_single_workload_is_known(group: str, destination: str
                                                                                  ) -> None:
    """Issue 19: a Service over two ServiceAccounts, or a workload of another namespace (known only as its
    namespace): the exchange is asked, told every identity that may answer (set by Envoy), and mints for the
    namespace; a request without the app's header still skips the agent and loses the context headers."""
    chain = _outbound_chains()[group]
    assert _http_filters(chain) == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]
    authz = chain["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]
    assert authz["http_service"]["authorization_request"]["headers_to_add"] == [
        {"key": ATTR_DEST, "value": destination}]
    _, without = _route_config(chain)["virtual_hosts"][0]["routes"]
    assert without["request_headers_to_remove"] == [WIRE_HEADER]


def test_context_never_goes_to_a_destination_spanning_namespaces() -> None:
    """Identities of two namespaces behind one address (a Service selects pods of its own namespace, so only a
    malformed map has this): no one audience, so the context headers are removed and the agent is not asked."""
    spanning = {"10.96.0.40": Destination((ORDERS, "spiffe://cluster.local/ns/web/sa/*"))}
    listeners, _ = outbound_resources(spanning, OWN_IP)
    chain = {c["name"]: c for c in listeners[0]["filter_chains"]}[
        f"outbound|{ORDERS},spiffe://cluster.local/ns/web/sa/*|*"]
    assert _http_filters(chain) == ["envoy.filters.http.router"]
    assert _route_config(chain)["request_headers_to_remove"] == [WIRE_HEADER]


def test_context_header_is_removed_from_plaintext_http_to_non_meshed_addresses() -> None:
    """A context header sent to an address outside the mesh is removed, not leaked: HTTP/1 is recognized by the
    listener's HTTP inspector and passed on by a connection manager that changes nothing else."""
    listeners, _ = outbound_resources(MAP, OWN_IP, context_header="x-user-context")
    listener = listeners[0]
    assert [f["name"] for f in listener["listener_filters"]] == [
        "envoy.filters.listener.original_dst", "envoy.filters.listener.http_inspector"]
    assert listener["continue_on_listener_filters_timeout"] is True
    chain = {c["name"]: c for c in listener["filter_chains"]}["passthrough_http"]
    assert chain["filter_chain_match"] == {"application_protocols": ["http/1.0", "http/1.1"]}
    hcm = chain["filters"][0]["typed_config"]
    assert hcm["route_config"]["request_headers_to_remove"] == ["x-user-context", WIRE_HEADER]
    assert hcm["generate_request_id"] is False
    assert hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"] == {"cluster": "passthrough", "timeout": "0s"}


@pytest.mark.parametrize(("header", "removed"), [
    ("x-meshward-context", False), ("x-meshward-sub", True), ("x-meshward-contex", True),
    ("x-meshward-contexts", True), ("x-meshward-", True), ("x-meshward-authz-peer", True),
    ("x-meshward-cantext", True), ("x-other", False)])
def test_inbound_strips_every_meshward_header_but_the_context_token(header: str, removed: bool) -> None:
    """Spoofed identity headers never reach the app; the context token reaches the agent, which verifies it."""
    assert bool(re.fullmatch(owned_except(WIRE_HEADER), header)) is removed


@pytest.mark.parametrize("doc", [
    [], {"10.0.0.1": {"identities": "spiffe://x"}}, {"10.0.0.1": {"identities": ["https://x"]}},
    {"fe80::1%eth0": {"identities": ["spiffe://td/ns/a/sa/b"]}},  # a zone: an interface of the sender's pod
    {"10.0.0": {"identities": ["spiffe://td/ns/a/sa/b"]}}, {"orders.shop": {"identities": ["spiffe://td/ns/a/sa/b"]}},
    {"10.0.0.1": {"identities": ["spiffe://td/ns/a/sa/b"], "plaintextPorts": [0]}},
])
def test_a_malformed_destination_map_is_refused(doc: Any) -> None:
    with pytest.raises(ValueError, match="destinations"):
        parse_destinations(doc)


def test_the_wire_form_parses_into_the_map() -> None:
    got = parse_destinations({"10.0.0.1": {"identities": [ORDERS], "plaintextPorts": [9090]},
                              "FD00:10:0::0007": {"identities": [ORDERS]}})
    assert got == {"10.0.0.1": Destination((ORDERS,), (9090,)), "fd00:10::7": Destination((ORDERS,))}


def _tcp_addresses(doc: Any) -> list[dict[str, Any]]:
    """Every TCP address anywhere in a bootstrap."""
    if isinstance(doc, dict):
        return ([doc["socket_address"]] if "socket_address" in doc else []) + [
            a for v in doc.values() for a in _tcp_addresses(v)]
    if isinstance(doc, list):
        return [a for v in doc for a in _tcp_addresses(v)]
    return []


def test_the_app_cannot_reach_envoys_admin_on_loopback() -> None:
    """Envoy's admin on 127.0.0.1:15000 answered the app container (same network namespace): /certs,
    /config_dump, POST /logging, /quitquitquit. It is a Unix socket in the mesh's socket directory, mode 0600,
    and nothing in the bootstrap listens on or dials TCP loopback."""
    boot = build_pod_bootstrap(PodProxy("shop/orders-1", socket_dir="/var/run/meshward"))
    assert boot["admin"]["address"] == {"pipe": {"path": f"/var/run/meshward/{ENVOY_ADMIN_SOCKET}", "mode": 0o600}}
    loopback = [a for a in _tcp_addresses(boot) if a["address"].startswith("127.")]
    assert loopback == [], loopback
    admin_cluster = {c["name"]: c for c in boot["static_resources"]["clusters"]}["envoy_admin"]
    assert _tcp_addresses(admin_cluster) == [], "the health listener reaches the admin over its socket"


def test_envoys_admin_answers_on_its_socket_only_and_kubelets_readiness_probe_still_answers() -> None:
    """A real Envoy on the pod bootstrap (its health listener moved to a free port, xDS left out): the admin
    answers on the socket Envoy created mode 0600; the health port answers /healthz/ready and nothing else of
    the admin."""
    with tempfile.TemporaryDirectory(prefix="mw-") as tmp:  # short: a Unix socket path has ~100 bytes
        workdir = Path(tmp)
        boot = build_pod_bootstrap(PodProxy("shop/orders-1", socket_dir=tmp))
        health_port = free_port()
        health = next(lst for lst in boot["static_resources"]["listeners"] if lst["name"] == "health")
        assert health["address"]["socket_address"]["port_value"] == PROXY_HEALTH_PORT
        health["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": health_port}}
        boot["static_resources"]["listeners"] = [health]
        del boot["dynamic_resources"]
        socket_path = str(workdir / ENVOY_ADMIN_SOCKET)
        with run_envoy(boot, workdir, socket_path, name="envoy-admin-pipe"):
            assert stat.S_IMODE((workdir / ENVOY_ADMIN_SOCKET).stat().st_mode) == 0o600
            assert unix_get(socket_path, "/ready") == (200, "LIVE\n")
            status, certs = unix_get(socket_path, "/certs")
            assert status == 200 and "certificates" in certs, "tooling still reads the admin, from Envoy's container"
            # Envoy's admin says LIVE a moment before a worker takes connections on the listener: wait for it.
            wait_for("the health listener answering /healthz/ready",
                     lambda: _status_or_none(f"http://127.0.0.1:{health_port}/healthz/ready") == 200)
            for path in ("/certs", "/config_dump", "/ready", "/healthz/ready/../../certs"):
                assert http_status(f"http://127.0.0.1:{health_port}{path}") == 404, path
            assert http_status(f"http://127.0.0.1:{health_port}/logging?level=debug", method="POST") == 404


def test_a_late_first_request_to_a_non_meshed_address_is_passed_through_header_and_all() -> None:
    """Documented limit (docs/context-tokens.md, "What it does not defend against"; issue 18, item 6): the HTTP
    inspector waits SNIFF_TIMEOUT_S for a client's first bytes, then the connection continues (server-first
    protocols must) into the default chain, a TCP proxy that parses nothing, so a context header in a request
    written later reaches a non-meshed server. Pinned so that any change to the trade-off is deliberate."""
    listener = outbound_resources(MAP, OWN_IP, context_header="x-user-context")[0][0]
    assert SNIFF_TIMEOUT_S == 1.0 and listener["listener_filters_timeout"] == "1.000s"
    assert listener["continue_on_listener_filters_timeout"] is True
    (proxy,) = listener["default_filter_chain"]["filters"]
    assert proxy["name"] == "envoy.filters.network.tcp_proxy" and proxy["typed_config"]["cluster"] == "passthrough"
    assert set(proxy["typed_config"]) == {"@type", "stat_prefix", "cluster", "access_log"}  # parses nothing
    # Only a connection the inspector recognized in time reaches a chain that removes the header.
    removing = [c for c in listener["filter_chains"] if c["name"].startswith("passthrough_http")]
    assert removing and all(c["filter_chain_match"]["application_protocols"] == ["http/1.0", "http/1.1"]
                            for c in removing)


def _hcms(http: HttpSettings) -> list[dict[str, Any]]:
    """Every HTTP connection manager of a pod's Envoy (inbound, plaintext inbound, outbound chains)."""
    boot = build_pod_bootstrap(PodProxy("shop/orders-1", inbound_plaintext=True, http=http))
    listeners, _ = outbound_resources(MAP, OWN_IP, http=http)
    chains = [c for lis in [*boot["static_resources"]["listeners"], *listeners] if lis["name"] != "health"
              for c in lis["filter_chains"]]
    return [f["typed_config"] for c in chains for f in c["filters"] if f["name"].endswith("http_connection_manager")]


@pytest.mark.parametrize("http", [HttpSettings(), TUNED], ids=["default", "tuned"])
def test_every_route_upgrades_websockets_and_none_cuts_them(http: HttpSettings) -> None:
    """Issue 19: a WebSocket through the mesh got 403 (`downstream_rq_ws_on_non_ws_route`) and SSE, long polls
    and slow downloads were cut at Envoy's default 15 s route timeout."""
    hcms = _hcms(http)
    assert len(hcms) >= 8
    for hcm in hcms:
        assert hcm["upgrade_configs"] == [{"upgrade_type": "websocket"}]
        assert hcm["stream_idle_timeout"] == f"{http.stream_idle_timeout_s:.3f}s"
        assert hcm["http_protocol_options"] == {"accept_http_10": http.accept_http10}
        for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
            if "route" not in route:
                continue
            headers = route["match"].get("headers", [])
            websocket = any(h["name"] == "upgrade" for h in headers)
            passthrough = hcm["stat_prefix"] == "passthrough_http"
            want = 0 if websocket or passthrough else http.route_timeout_s
            assert route["route"]["timeout"] in (f"{want:.3f}s", f"{want:g}s"), route


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("1.5m", 90), ("24h", 86400), ("1500ms", 1.5),
                                               (" 5m ", 300)])
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "0", "0s", "-1s", "0.5s", "25h", "1h30m", "1e3s", "30 s", "3x",
                                  "9999999s"])
def test_durations_out_of_form_or_bounds_are_refused_with_the_form(text: str) -> None:
    with pytest.raises(ValueError, match="like 30s, 5m or 1h"):
        parse_duration(text)


def test_zero_is_no_route_timeout_only_where_allowed() -> None:
    assert parse_duration("0", zero_is_none=True) == parse_duration("0s", zero_is_none=True) == 0


# ------------------------------------------------------------------------------ both families (issue 18, item 1)

# The same workloads on a dual-stack cluster: each pod and Service by its IPv6 address too (status.podIPs,
# spec.clusterIPs), with the same entry.
DUAL_MAP = {
    **MAP,
    "fd00:10:244::7": Destination((ORDERS,), (9090,)),
    "fd00:10:244::8": Destination((ORDERS,)),
    "fd00:10:96::20": Destination((ORDERS,)),
    "fd00:10:96::30": Destination((PAYMENTS, ORDERS)),
    "fd00:10:244::9": Destination((PAYMENTS,)),
    "fd00:10:244:1::4": Destination(("spiffe://cluster.local/ns/web/sa/*",)),
}
OWN_IPS = "10.244.0.9,fd00:10:244::9"


def test_dual_stack_pod_bootstrap_matches_golden(request: pytest.FixtureRequest) -> None:
    golden("pod-dual-stack", build_pod_bootstrap(PodProxy("shop/orders-1", ipv6=True)), request)


def test_dual_stack_outbound_resources_match_golden(request: pytest.FixtureRequest) -> None:
    listeners, clusters = outbound_resources(DUAL_MAP, OWN_IPS, ipv6=True)
    golden("outbound-dual-stack", {"listeners": listeners, "clusters": clusters}, request)


def test_envoy_accepts_the_dual_stack_bootstrap_and_outbound_resources(tmp_path: Path) -> None:
    """`envoy --mode validate`: the additional addresses and the /128 prefixes are Envoy's spelling."""
    boot = build_pod_bootstrap(PodProxy("shop/orders-1", ipv6=True))
    _assert_envoy_accepts(boot, *outbound_resources(DUAL_MAP, OWN_IPS, ipv6=True), tmp_path)


def _sockets(listener: dict[str, Any]) -> list[tuple[str, int]]:
    addresses = [listener["address"], *(a["address"] for a in listener.get("additional_addresses", []))]
    return [(a["socket_address"]["address"], a["socket_address"]["port_value"]) for a in addresses]


def test_ipv6_side_door_every_listener_takes_the_family_capture_sends_it() -> None:
    """IPv6 side door: TCP over IPv6 is now redirected to Envoy (domain/capture.py), inbound to [::]:15006 and
    outbound to [::1]:15001. Each listener takes both families on one socket pair, so an IPv6 connection meets the
    same filter chains (mTLS only inbound); without IPv6 in the pod, no IPv6 socket (binding it would fail)."""
    def listeners(ipv6: bool) -> dict[str, dict[str, Any]]:
        boot = build_pod_bootstrap(PodProxy("shop/orders-1", ipv6=ipv6))
        outbound = outbound_resources(DUAL_MAP, OWN_IPS, ipv6=ipv6)[0]
        return {lis["name"]: lis for lis in [*boot["static_resources"]["listeners"], *outbound]}

    dual = listeners(True)
    assert _sockets(dual["inbound"]) == [("0.0.0.0", 15006), ("::", 15006)]
    assert _sockets(dual["health"]) == [("0.0.0.0", PROXY_HEALTH_PORT), ("::", PROXY_HEALTH_PORT)]
    assert _sockets(dual["outbound"]) == [("127.0.0.1", 15001), ("::1", 15001)]
    # Envoy's default without ipv4_compat is IPV6_V6ONLY: the [::] socket does not collide with 0.0.0.0's.
    assert "ipv4_compat" not in str(dual)
    single = listeners(False)
    assert [_sockets(single[n]) for n in ("inbound", "health", "outbound")] == [
        [("0.0.0.0", 15006)], [("0.0.0.0", PROXY_HEALTH_PORT)], [("127.0.0.1", 15001)]]


def test_meshed_ipv6_addresses_go_out_over_mtls_like_their_ipv4_ones() -> None:
    """A meshed pod or Service dialled by its IPv6 address is matched by a /128 prefix in the same chain as its IPv4
    address (/32), pinned to the same identities; this pod's own IPv6 address stays in the pod, and an IPv6 address's
    plaintext ports are carved out like an IPv4 one's."""
    listeners, clusters = outbound_resources(DUAL_MAP, OWN_IPS, ipv6=True)
    chains = {c["name"]: c for c in listeners[0]["filter_chains"]}
    ranges = {(r["address_prefix"], r["prefix_len"]) for r in chains[f"outbound|{ORDERS}|*"]["filter_chain_match"][
        "prefix_ranges"]}
    assert ranges == {("10.244.0.7", 32), ("10.244.0.8", 32), ("10.96.0.20", 32),
                      ("fd00:10:244::7", 128), ("fd00:10:244::8", 128), ("fd00:10:96::20", 128)}
    assert {c["name"] for c in clusters} == {f"outbound|{ORDERS}", f"outbound|{ORDERS},{PAYMENTS}",
                                             "outbound|spiffe://cluster.local/ns/web/sa/*"}
    everywhere = {r["address_prefix"] for c in chains.values() for r in c["filter_chain_match"].get("prefix_ranges", [])}
    assert "fd00:10:244::9" not in everywhere and "10.244.0.9" not in everywhere
    on_9090 = {r["address_prefix"] for c in chains.values() if c["filter_chain_match"].get("destination_port") == 9090
               for r in c["filter_chain_match"].get("prefix_ranges", [])}
    assert "fd00:10:244::7" not in on_9090 and "fd00:10:244::8" in on_9090


def test_own_addresses_are_recognised_in_any_spelling() -> None:
    """`status.podIPs` as the downward API writes it; a non-canonical spelling of this pod's IPv6 address still
    keeps calls to it in the pod."""
    listeners, _ = outbound_resources(DUAL_MAP, "10.244.0.9, FD00:10:244:0::9", ipv6=True)
    everywhere = {r["address_prefix"] for c in listeners[0]["filter_chains"]
                  for r in c["filter_chain_match"].get("prefix_ranges", [])}
    assert "fd00:10:244::9" not in everywhere and "fd00:10:244::8" in everywhere


def test_the_app_cannot_reach_envoys_admin_on_ipv6_loopback_either() -> None:
    """With IPv6 the bootstrap still neither listens on nor dials `::1` (the outbound listener, from the agent, is
    the only socket there, and it is captured traffic's)."""
    boot = build_pod_bootstrap(PodProxy("shop/orders-1", ipv6=True))
    assert [a for a in _tcp_addresses(boot) if a["address"] in ("::1", "127.0.0.1")] == []


def _status_or_none(url: str) -> int | None:
    """The HTTP status of GET `url`, or None while nothing answers there."""
    try:
        return http_status(url)
    except OSError:
        return None


def test_meshward_proxy_takes_declared_tcp_ports_and_refuses_a_bad_list(capsys: pytest.CaptureFixture[str]) -> None:
    """The injected proxy container's --tcp-ports becomes one tunnel chain per port; a malformed list stops it
    with the flag named (argparse: exit 2) instead of starting an Envoy that takes no TCP."""
    from meshward.sidecar.entrypoints import proxy

    assert proxy.main(["--print", "--ipv6", "off", "--tcp-ports", "6379,5432"]) == 0
    boot = json.loads(capsys.readouterr().out)
    names = [c.get("name") for c in boot["static_resources"]["listeners"][0]["filter_chains"]]
    assert "inbound_tcp|5432" in names and "inbound_tcp|6379" in names
    with pytest.raises(SystemExit) as exit_:
        proxy.main(["--print", "--tcp-ports", "redis"])
    assert exit_.value.code == 2 and "--tcp-ports" in capsys.readouterr().err
