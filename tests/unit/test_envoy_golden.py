"""The Envoy bootstrap builder against golden files (refresh with `pytest --update-golden`), and its safety."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from meshward.sidecar.domain.envoy import (
    Endpoint,
    InboundConfig,
    Outbound,
    SdsTls,
    Tls,
    build_inbound_bootstrap,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden"

CASES = {
    "inbound-http-mtls": InboundConfig(
        listen=Endpoint(port=15006), admin=Endpoint(port=15000), app=Endpoint(port=8080),
        authz=Endpoint(unix="/var/run/meshward/authz.sock"),
        tls=Tls("/var/run/meshward/cert.pem", "/var/run/meshward/key.pem", "/var/run/meshward/bundle.pem")),
    "inbound-grpc-mtls": InboundConfig(
        listen=Endpoint(port=15006), admin=Endpoint(port=15000), app=Endpoint(port=8080),
        authz=Endpoint(port=9191), transport="grpc",
        tls=Tls("/var/run/meshward/cert.pem", "/var/run/meshward/key.pem", "/var/run/meshward/bundle.pem")),
    "mesh-sds": InboundConfig(
        listen=Endpoint(port=15006), admin=Endpoint(port=15000), app=Endpoint(port=8080),
        authz=Endpoint(unix="/var/run/meshward/authz.sock"),
        tls=SdsTls(Endpoint(unix="/var/run/meshward/sds.sock")),
        outbound=(Outbound("orders", Endpoint(port=15101), Endpoint(host="10.0.0.7", port=15006),
                           "spiffe://cluster.local/ns/shop/sa/orders"),)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bootstrap_matches_golden(name: str, request: pytest.FixtureRequest) -> None:
    text = yaml.safe_dump(build_inbound_bootstrap(CASES[name]), sort_keys=False)
    path = GOLDEN / f"envoy-{name}.yaml"
    if request.config.getoption("--update-golden"):
        path.write_text(text)
    assert path.exists(), f"{path} missing: run pytest --update-golden"
    assert text == path.read_text(), f"{path} differs from the builder: review, then run pytest --update-golden"


def ext_authz(boot: dict[str, Any]) -> dict[str, Any]:
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    cfg: dict[str, Any] = hcm["http_filters"][0]["typed_config"]
    return cfg


@pytest.mark.parametrize("name", sorted(CASES))
def test_generated_configs_fail_closed(name: str) -> None:
    cfg = ext_authz(build_inbound_bootstrap(CASES[name]))
    assert cfg["failure_mode_allow"] is False
    assert cfg["status_on_error"] == {"code": "ServiceUnavailable"}


def test_default_transport_is_http() -> None:
    cfg = InboundConfig(listen=Endpoint(port=1), admin=Endpoint(port=2), app=Endpoint(port=3), authz=Endpoint(port=4))
    assert "http_service" in ext_authz(build_inbound_bootstrap(cfg))


def _clusters(boot: dict[str, Any]) -> dict[str, Any]:
    return {c["name"]: c for c in boot["static_resources"]["clusters"]}


def test_sds_inbound_admits_the_trust_domain_and_outbound_pins_the_peer() -> None:
    boot = build_inbound_bootstrap(CASES["mesh-sds"])
    inbound = boot["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]["typed_config"]
    assert inbound["require_client_certificate"] is True
    common = inbound["common_tls_context"]
    assert common["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    assert "tls_certificates" not in common  # no key material in the bootstrap
    upstream = _clusters(boot)["outbound_orders"]["transport_socket"]["typed_config"]["common_tls_context"]
    combined = upstream["combined_validation_context"]
    # Envoy ORs SAN matchers: the outbound side must not merge ROOTCA's trust-domain-wide matcher.
    assert combined["validation_context_sds_secret_config"]["name"] == "BUNDLE"
    assert combined["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/shop/sa/orders"}}]
    assert _clusters(boot)["meshward_sds"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"] == {"pipe": {"path": "/var/run/meshward/sds.sock"}}


def test_outbound_without_an_sds_certificate_is_refused() -> None:
    cfg = InboundConfig(listen=Endpoint(port=1), admin=Endpoint(port=2), app=Endpoint(port=3), authz=Endpoint(port=4),
                        outbound=(Outbound("x", Endpoint(port=5), Endpoint(port=6), "spiffe://td/ns/a/sa/b"),))
    with pytest.raises(ValueError, match="SdsTls"):
        build_inbound_bootstrap(cfg)


def _with_real_files(cfg: InboundConfig, tmp: Path) -> InboundConfig:
    """The same config with its certificate paths pointing at files that exist (Envoy's validation reads them)."""
    if not isinstance(cfg.tls, Tls):
        return cfg
    from dataclasses import replace

    from tests.support.pki import TestCA

    ca = TestCA(tmp / "pki")
    leaf = ca.issue("orders", dns=("localhost",))
    return replace(cfg, tls=Tls(str(leaf.cert), str(leaf.key), str(ca.ca_file)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_envoy_accepts_every_generated_config_without_a_deprecated_field(name: str, tmp_path: Path) -> None:
    """`envoy --mode validate` on each generated bootstrap: valid, and no field Envoy marks deprecated."""
    import subprocess

    from tests.support.procs import envoy_binary

    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(build_inbound_bootstrap(_with_real_files(CASES[name], tmp_path))))
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "deprecated" not in out.lower(), out


def test_headers_with_underscores_are_dropped_and_the_host_loses_a_trailing_dot() -> None:
    """WSGI/CGI apps read `x_meshward_sub` as HTTP_X_MESHWARD_SUB, and `shop.svc.` is the host `shop.svc`."""
    hcm = build_inbound_bootstrap(CASES["mesh-sds"])["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"][0]["typed_config"]
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == "DROP_HEADER"
    assert hcm["strip_trailing_host_dot"] is True


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_generated_bootstrap_is_made_of_envoys_typed_messages(name: str) -> None:
    from meshward.sidecar.domain.envoy import check_bootstrap

    check_bootstrap(build_inbound_bootstrap(CASES[name]))


@pytest.mark.parametrize(("where", "field"), [
    ((), "admn"),                                                              # misspelled, top level
    (("static_resources", "listeners", 0, "filter_chains", 0, "filters", 0, "typed_config"), "normalise_path"),
    (("static_resources", "clusters", 0), "connect_timeout_ms"),                # inside a cluster
])
def test_a_misspelled_field_fails_here_not_in_envoy(where: tuple[Any, ...], field: str) -> None:
    from meshward.sidecar.domain.envoy import check_bootstrap

    boot = build_inbound_bootstrap(CASES["mesh-sds"])
    node: Any = boot
    for step in where:
        node = node[step]
    node[field] = True
    with pytest.raises(ValueError, match=field):
        check_bootstrap(boot)
