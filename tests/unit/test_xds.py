"""The agent's LDS/CDS encoding (sidecar/servers/xds.py): every resource the outbound builder makes turns into
Envoy's protobuf messages and back unchanged. A typed config whose message the server does not know is refused
by protobuf at run time only (Envoy then never gets its outbound listener): this catches it before a pod does."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import json_format

from meshward.sidecar.domain.envoy import Destination, outbound_resources
from meshward.sidecar.servers.xds import pack_resources

MAP = {
    "10.244.0.7": Destination(("spiffe://cluster.local/ns/shop/sa/orders",), (9090,)),
    "10.96.0.30": Destination(("spiffe://cluster.local/ns/shop/sa/orders", "spiffe://cluster.local/ns/shop/sa/pay")),
    "10.244.1.4": Destination(("spiffe://cluster.local/ns/web/sa/*",)),
    "10.244.0.20": Destination(("spiffe://cluster.local/ns/shop/sa/db",), (), (5432,)),  # TCP declared: tunnelled
}


def _unpacked(packed: list[Any], message: Any) -> list[dict[str, Any]]:
    out = []
    for p in packed:
        m = message()
        assert p.Unpack(m)
        out.append(json_format.MessageToDict(m, preserving_proto_field_name=True))
    return out


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "dual-stack"])
def test_every_outbound_resource_encodes_and_decodes_unchanged(ipv6: bool) -> None:
    dual = {**MAP, "fd00:10:244::7": MAP["10.244.0.7"], "fd00:10:96::30": MAP["10.96.0.30"]} if ipv6 else MAP
    listeners, clusters = outbound_resources(dual, "10.244.0.9,fd00:10:244::9", ipv6=ipv6)
    assert clusters and listeners
    for resources, message in ((listeners, listener_pb2.Listener), (clusters, cluster_pb2.Cluster)):
        back = _unpacked(pack_resources(resources, message), message)
        # Durations and enums print differently; compare the parts a typo or an unknown type would lose.
        for original, decoded in zip(resources, back, strict=True):
            assert decoded["name"] == original["name"]
            assert set(decoded) == set(original), (set(original) ^ set(decoded))
            assert _extra(decoded) == _extra(original)
    tunnels = [f["typed_config"]["tunneling_config"] for c in _unpacked(pack_resources(listeners, listener_pb2.Listener),
                                                                      listener_pb2.Listener)[0]["filter_chains"]
               for f in c["filters"] if "tunneling_config" in f["typed_config"]]
    assert tunnels and tunnels[0]["use_post"] is True


def _extra(resource: dict[str, Any]) -> list[tuple[Any, list[tuple[int, int, int]]]]:
    """A listener's additional addresses with their socket options as (level, name, value) (int64s print as strings
    in protobuf's JSON, and the default STATE_PREBIND not at all)."""
    return [(a["address"], [(int(o["level"]), int(o["name"]), int(o["int_value"]))
                            for o in a.get("socket_options", {}).get("socket_options", [])])
            for a in resource.get("additional_addresses", [])]
