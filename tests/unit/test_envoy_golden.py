"""The Envoy bootstrap builder against golden files (refresh with `pytest --update-golden`), and its safety."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from meshward.sidecar.domain.envoy import Endpoint, InboundConfig, Tls, build_inbound_bootstrap

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
