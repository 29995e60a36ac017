"""Workload identity end to end: the real operator, real agents with SDS, two real Envoys talking mTLS.

The operator runs as a process against the real API server with `--max-leaf-ttl 10s`
(the demo/test setting that goes below the 5m minimum), so renewals happen every
~5 s and a whole CA rotation takes ~20 s. Tokens come from the TokenRequest API.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from meshward.operator.domain.ca import CertificateAuthority, check_csr, generate_root, issue_leaf, random_serial
from meshward.sidecar.domain.certificate import build_csr, new_key
from meshward.sidecar.domain.context import WIRE_HEADER, MintingKey, mint, x5c_of
from meshward.sidecar.domain.envoy import Endpoint, InboundConfig, Outbound, SdsTls, build_inbound_bootstrap
from tests.kube import Cluster, service_identity, wait_until
from tests.support.pki import TestCA
from tests.support.procs import Agent, Echo, Operator, free_port, run_envoy

pytestmark = pytest.mark.integration
API = "meshward.io/v1alpha1"
LEAF_TTL = "10s"


def ready_condition(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    status = cluster.get_json("-n", ns, "serviceidentity", name).get("status", {})
    return next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})


def ca_secret(cluster: Cluster, ns: str) -> dict[str, bytes]:
    data = cluster.get_json("-n", ns, "secret", "meshward-mesh-ca")["data"]
    return {k: base64.b64decode(v) for k, v in data.items()}


@pytest.fixture(scope="module")
def operator(crds: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    ns = crds.new_namespace("mw")
    op = Operator(tmp_path_factory.mktemp("operator"), crds.kubeconfig, ns, "--max-leaf-ttl", LEAF_TTL,
                  "--status-interval", "1", "--ca-interval", "0.5").start()
    try:
        yield op
    finally:
        op.stop()
        crds.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@dataclass
class Workload:
    name: str
    spiffe: str
    agent: Agent
    admin: int


@dataclass
class Mesh:
    ns: str
    workdir: Path
    frontend: Workload
    backend: Workload
    outbound_port: int
    backend_port: int
    bundle_file: Path
    echo: Echo
    envoy_admin: dict[str, int] = field(default_factory=dict)

    def get(self, path: str = "/orders/1") -> int:
        return self.call(path)[0]

    def call(self, path: str = "/orders/1", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body) of a request through the frontend's Envoy to the backend."""
        conn = http.client.HTTPConnection("127.0.0.1", self.outbound_port, timeout=5)
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()


def backend_config(principal: str) -> dict[str, Any]:
    return {"apiVersion": "sidecar.meshward.io/v1alpha1", "kind": "SidecarConfig", "workload": "backend",
            "policies": [{"name": "callers", "rules": [
                {"name": "caller-reads", "from": {"principals": [principal]}, "to": {"methods": ["GET"]}}]}]}


def start_workload(cluster: Cluster, op: Operator, ns: str, wd: Path, sa: str, bundle: Path,
                   config: dict[str, Any]) -> Workload:
    token = wd / f"{sa}.token"
    token.write_text(cluster.bound_token(ns, sa))
    agent = Agent(wd, config, name=sa, extra_args=(
        *op.agent_args(token, bundle, wd / f"{sa}-sds.sock"), "--log-level", "DEBUG")).start()
    return Workload(sa, f"spiffe://cluster.local/ns/{ns}/sa/{sa}", agent, free_port())


@pytest.fixture(scope="module")
def mesh(crds: Cluster, operator: Operator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    wd = tmp_path_factory.mktemp("idmesh")
    ns = crds.new_namespace("shop")
    for sa in ("frontend", "backend"):
        crds.kubectl("-n", ns, "create", "serviceaccount", sa)
        crds.apply(service_identity(ns, sa))
    bundle = wd / "bundle.crt"
    bundle.write_text(crds.trust_bundle(ns))
    frontend_id = f"spiffe://cluster.local/ns/{ns}/sa/frontend"
    backend = start_workload(crds, operator, ns, wd, "backend", bundle, backend_config(frontend_id))
    frontend = start_workload(crds, operator, ns, wd, "frontend", bundle, {
        "apiVersion": "sidecar.meshward.io/v1alpha1", "kind": "SidecarConfig", "workload": "frontend",
        "policies": []})
    echo = Echo()
    backend_port, outbound_port = free_port(), free_port()
    boot_b = build_inbound_bootstrap(InboundConfig(
        listen=Endpoint(port=backend_port), admin=Endpoint(port=backend.admin), app=Endpoint(port=echo.port),
        authz=Endpoint(unix=backend.agent.http.removeprefix("unix:")),
        tls=SdsTls(Endpoint(unix=str(wd / "backend-sds.sock")))))
    boot_a = build_inbound_bootstrap(InboundConfig(
        listen=Endpoint(port=free_port()), admin=Endpoint(port=frontend.admin), app=Endpoint(port=echo.port),
        authz=Endpoint(unix=frontend.agent.http.removeprefix("unix:")),
        tls=SdsTls(Endpoint(unix=str(wd / "frontend-sds.sock"))),
        # Recycle connections so rotations are exercised by fresh handshakes, not one long-lived one.
        outbound=(Outbound("backend", Endpoint(port=outbound_port), Endpoint(port=backend_port), backend.spiffe,
                           max_requests_per_connection=20),)))
    m = Mesh(ns, wd, frontend, backend, outbound_port, backend_port, bundle, echo)
    try:
        with run_envoy(boot_b, wd, backend.admin, name="envoy-backend"), \
                run_envoy(boot_a, wd, frontend.admin, name="envoy-frontend"):
            yield m
    finally:
        frontend.agent.stop()
        backend.agent.stop()
        echo.close()
        crds.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def served_leaf(port: int) -> x509.Certificate:
    """The workload certificate an Envoy presents (TLS 1.3 shows it before the client's is judged)."""
    return x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", port), timeout=5).encode())


def issued_by(port: int, root_pem: bytes) -> bool:
    try:
        served_leaf(port).verify_directly_issued_by(x509.load_pem_x509_certificate(root_pem))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class Load:
    """Requests in a loop from the frontend's Envoy to the backend; every non-200 is a failure."""

    def __init__(self, mesh: Mesh, workers: int = 2) -> None:
        self.mesh = mesh
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = self.mesh.get()
            except OSError as e:
                self.failures.append(repr(e))
                continue
            if status == 200:
                self.ok += 1
            else:
                self.failures.append(f"HTTP {status}")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


def test_operator_bootstraps_the_ca_and_reports_service_identities(crds: Cluster, operator: Operator,
                                                                    namespace: str) -> None:
    crds.apply(service_identity(namespace, "ghost"))
    cond = wait_until("Ready=False for a missing ServiceAccount",
                      lambda: (c := ready_condition(crds, namespace, "ghost")).get("status") == "False" and c)
    assert cond["reason"] == "ServiceAccountMissing"
    assert f"kubectl -n {namespace} create serviceaccount ghost" in cond["message"]
    events = wait_until("a Warning Event", lambda: [e for e in crds.get_json("-n", namespace, "events")["items"]
                                                     if e["reason"] == "ServiceAccountMissing"])
    assert events[0]["type"] == "Warning"
    crds.kubectl("-n", namespace, "create", "serviceaccount", "ghost")
    wait_until("Ready=True once the ServiceAccount exists",
               lambda: ready_condition(crds, namespace, "ghost").get("status") == "True")
    si = crds.get_json("-n", namespace, "serviceidentity", "ghost")
    assert si["status"]["spiffeID"] == f"spiffe://cluster.local/ns/{namespace}/sa/ghost"
    assert si["status"]["observedGeneration"] == si["metadata"]["generation"]
    bundle = crds.trust_bundle(namespace)
    assert bundle.encode() == ca_secret(crds, operator.namespace)["tls.crt"]


def test_two_envoys_talk_mtls_over_sds_and_authz_sees_the_peer(crds: Cluster, mesh: Mesh) -> None:
    assert wait_until("a request through both Envoys", lambda: mesh.get() == 200, timeout=30)
    allowed: list[dict[str, Any]] = []

    def audited() -> bool:  # audit lines are written in batches (--audit-flush-interval)
        allowed[:] = [a for a in mesh.backend.agent.audit_lines() if a["outcome"] == "allow"]
        return bool(allowed)

    assert wait_until("the allow's audit line", audited, timeout=10)
    line = allowed[-1]
    assert line["peer"] == mesh.frontend.spiffe  # ext_authz saw the client's SPIFFE ID from the handshake
    # The policy admits only that peer: name another one and the same call is refused.
    mesh.backend.agent.write_config(backend_config(f"spiffe://cluster.local/ns/{mesh.ns}/sa/batch"))
    wait_until("403 once the peer is no longer admitted", lambda: mesh.get() == 403, timeout=10)
    mesh.backend.agent.write_config(backend_config(mesh.frontend.spiffe))
    wait_until("200 again", lambda: mesh.get() == 200, timeout=10)
    si = crds.get_json("-n", mesh.ns, "serviceidentity", "frontend")["status"]
    assert wait_until("issuance counted in status", lambda: crds.get_json(
        "-n", mesh.ns, "serviceidentity", "frontend")["status"].get("issuedCertificates", 0) >= 1), si


def _mesh_ca(crds: Cluster, operator: Operator) -> CertificateAuthority:
    secret = ca_secret(crds, operator.namespace)
    return CertificateAuthority.from_pem(secret["tls.crt"], secret["tls.key"])


def _minter(ca: CertificateAuthority, spiffe: str) -> MintingKey:
    """A genuine certificate for `spiffe` from `ca` (what any holder of that identity has) as a minting key."""
    key = new_key()
    now = dt.datetime.now(dt.UTC)
    leaf = issue_leaf(ca, check_csr(build_csr(key, spiffe), spiffe), spiffe, dt.timedelta(minutes=5), now,
                      random_serial(os.urandom))
    return MintingKey(spiffe, key, x5c_of(leaf.public_bytes(Encoding.PEM)), leaf.not_valid_after_utc.timestamp())


def test_context_tokens_are_verified_at_a_real_inbound_before_any_rule(crds: Cluster, operator: Operator,
                                                                       mesh: Mesh) -> None:
    """The backend's real Envoy and agent, a real mTLS peer (the frontend's Envoy, whose static outbound listener
    passes headers unchanged, so tokens reach the inbound exactly as a compromised or buggy minter would send
    them). Tokens are minted with genuine certificates from the operator's mesh CA; attack vectors are named
    after what they attack."""
    assert wait_until("a request through both Envoys", lambda: mesh.get() == 200, timeout=30)
    ca = _mesh_ca(crds, operator)
    frontend, batch = _minter(ca, mesh.frontend.spiffe), _minter(ca, f"spiffe://cluster.local/ns/{mesh.ns}/sa/batch")

    def send(key: MintingKey, audience: str = mesh.backend.spiffe, *, ttl: float = 30, now: float | None = None,
             jti: str = "hop-1") -> tuple[int, dict[str, Any]]:
        at = time.time() if now is None else now
        token, _ = mint(key, audience, "https://idp.example.com", {"sub": "alice", "email": "alice@example.com"},
                        (key.spiffe_id,), jti, at, ttl)
        status, body = mesh.call("/ctx", {WIRE_HEADER: token})
        return status, json.loads(body)

    status, body = send(frontend)
    assert status == 200, body
    app_token, *proofs = body["headers"][WIRE_HEADER].split("~")
    app = jwt.decode(app_token, options={"verify_signature": False})
    assert (app["iss"], app["aud"], app["sub"]) == (mesh.backend.spiffe, mesh.backend.spiffe, "alice")
    assert "email" not in app, "only what the backend's policies use reaches its app"
    assert app["act"] == {"sub": mesh.frontend.spiffe}
    # ...and behind it the frontend's hop proof, which names the user and no claim.
    assert [jwt.decode(p, options={"verify_signature": False})["iss"] for p in proofs] == [mesh.frontend.spiffe]
    assert "email" not in jwt.decode(proofs[0], options={"verify_signature": False})

    def audited(jti: str) -> dict[str, Any]:
        found: dict[str, Any] = wait_until(f"the audit line of {jti}", lambda: next(
            (a for a in mesh.backend.agent.audit_lines() if a.get("parent") == jti), None), timeout=10)
        return found
    line = audited("hop-1")
    assert line["outcome"] == "allow" and line["act"] == mesh.frontend.spiffe

    # Issue 18: the frontend (its own genuine key) names in `act` a workload that never passed it the user, and
    # sends its token without the proofs: neither reaches a rule, nor the audit line's act.
    genuine, own_proof = mint(frontend, mesh.backend.spiffe, "https://idp.example.com", {"sub": "alice"},
                              (frontend.spiffe_id,), "forged", time.time(), 30)[0].split("~")
    header, claims = (json.loads(base64.urlsafe_b64decode(part + "==")) for part in genuine.split(".")[:2])
    ghost = f"spiffe://cluster.local/ns/{mesh.ns}/sa/ghost"
    forged = _signed(frontend, header, {**claims, "act": {"sub": frontend.spiffe_id, "act": {"sub": ghost}}})
    for presentation in (f"{forged}~{own_proof}", genuine):
        status, raw = mesh.call("/ctx", {WIRE_HEADER: presentation})
        assert status == 401 and "hop proofs" in json.loads(raw)["reason"], raw
    assert not any(ghost in a.get("act", "") for a in mesh.backend.agent.audit_lines())

    # Audience (RFC 7519 §4.1.3): a token the frontend minted for another workload.
    status, body = send(frontend, f"spiffe://cluster.local/ns/{mesh.ns}/sa/payments")
    assert status == 401 and "audience" in body["reason"], body
    # Binding: batch's genuine token for the backend, replayed over the frontend's connection.
    status, body = send(batch)
    assert status == 401 and "peer" in body["reason"], body
    # Expired: minted two minutes ago with a 30 s life.
    status, body = send(frontend, now=time.time() - 120)
    assert status == 401 and "expired" in body["reason"], body
    # A foreign CA: a self-made root issuing "frontend".
    foreign = generate_root("cluster.local", dt.datetime.now(dt.UTC))
    status, body = send(_minter(foreign, mesh.frontend.spiffe))
    assert status == 401 and "does not chain" in body["reason"], body


def test_a_namespace_audience_is_accepted_at_a_real_inbound_only_from_the_minter_and_for_its_namespace(
        crds: Cluster, operator: Operator, mesh: Mesh) -> None:
    """Issue 19, at the backend's real Envoy and agent over real mTLS: a token the frontend minted for the
    backend's namespace (`ns/<ns>/sa/*`, as toward a Service of several ServiceAccounts or from another namespace)
    reaches the app as the backend's own token; the same token from a workload of that namespace that is not the
    peer, and the minter's token for another namespace, are refused before any rule."""
    assert wait_until("a request through both Envoys", lambda: mesh.get() == 200, timeout=30)
    ca = _mesh_ca(crds, operator)
    namespace = f"spiffe://cluster.local/ns/{mesh.ns}/sa/*"
    frontend, batch = _minter(ca, mesh.frontend.spiffe), _minter(ca, f"spiffe://cluster.local/ns/{mesh.ns}/sa/batch")

    def send(key: MintingKey, audience: str) -> tuple[int, dict[str, Any]]:
        token, _ = mint(key, audience, "https://idp.example.com", {"sub": "alice", "email": "alice@example.com"},
                        (key.spiffe_id,), "ns-hop", time.time(), 30)
        status, body = mesh.call("/ctx", {WIRE_HEADER: token})
        return status, json.loads(body)

    status, body = send(frontend, namespace)
    assert status == 200, body
    app = jwt.decode(body["headers"][WIRE_HEADER].split("~")[0], options={"verify_signature": False})
    assert (app["iss"], app["aud"], app["act"]) == (mesh.backend.spiffe, mesh.backend.spiffe,
                                                     {"sub": mesh.frontend.spiffe})
    # A workload of the namespace replaying a namespace token over the frontend's connection: not the peer.
    status, body = send(batch, namespace)
    assert status == 401 and "not minted by the peer" in body["reason"], body
    # The minter's token for another namespace presented here: not this namespace.
    status, body = send(frontend, "spiffe://cluster.local/ns/billing/sa/*")
    assert status == 401 and "nor its namespace" in body["reason"], body


def _signed(key: MintingKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A JWS with this header and these claims, validly signed with `key` (what a compromised minter can sign)."""
    def b64(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
    signing_input = f"{b64(header)}.{b64(claims)}"
    r, s = decode_dss_signature(key.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{base64.urlsafe_b64encode(r.to_bytes(32, 'big') + s.to_bytes(32, 'big')).rstrip(b'=').decode()}"


def meshward(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "meshward"
    return subprocess.run([str(exe), *args, "--kubeconfig", str(cluster.kubeconfig)], capture_output=True, text=True,
                          timeout=30)


def _handshake(port: int, cert: Path | None, key: Path | None, bundle: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(bundle))
    ctx.check_hostname = False  # workload certificates carry SPIFFE IDs, not host names
    if cert and key:
        ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw) as tls:
        tls.sendall(b"GET /orders/1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        if not tls.recv(100):
            raise ConnectionResetError("closed without an answer")


def test_client_certificate_from_another_ca_is_refused(mesh: Mesh) -> None:
    stranger = TestCA(mesh.workdir / "stranger-ca").issue("stranger", uris=(mesh.frontend.spiffe,))
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        _handshake(mesh.backend_port, stranger.cert, stranger.key, mesh.bundle_file)
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        _handshake(mesh.backend_port, None, None, mesh.bundle_file)  # no client certificate at all


def test_certificate_rotation_under_load_drops_nothing(mesh: Mesh) -> None:
    """Both workloads renew every ~5 s (10 s leaves); traffic flows across three rotations each."""
    before = {w.name: w.agent.metric("meshward_workload_cert_requests_total", result="ok")
              for w in (mesh.frontend, mesh.backend)}
    serial = served_leaf(mesh.backend_port).serial_number
    with Load(mesh) as load:
        wait_until("three renewals on each side", lambda: all(
            w.agent.metric("meshward_workload_cert_requests_total", result="ok") >= before[w.name] + 3
            for w in (mesh.frontend, mesh.backend)), timeout=60)
        wait_until("some requests after the last renewal", lambda: load.ok > 200, timeout=30)
    assert load.failures == []
    # Envoy took the new certificate over SDS, without a restart.
    leaf = served_leaf(mesh.backend_port)
    assert leaf.serial_number != serial
    expiry = mesh.backend.agent.metric("meshward_workload_cert_expiry_timestamp_seconds")
    assert abs(expiry - leaf.not_valid_after_utc.timestamp()) < 15  # the metric follows the served certificate


def test_ca_rotation_under_load_drops_nothing(crds: Cluster, operator: Operator, mesh: Mesh) -> None:
    """Rotate the mesh CA (annotation) while traffic flows: staged, activated, old root retired."""
    old_root = ca_secret(crds, operator.namespace)["tls.crt"]
    with Load(mesh) as load:
        wait_until("traffic", lambda: load.ok > 50)
        assert issued_by(mesh.backend_port, old_root)
        assert meshward(crds, "ca", "rotate", "--namespace", operator.namespace).returncode == 0
        wait_until("the new root staged", lambda: operator.metric("meshward_ca_rotation_phase", phase="staged") == 1)
        status = meshward(crds, "ca", "status", "--namespace", operator.namespace)
        assert "phase: staged" in status.stdout and "next " in status.stdout
        again = meshward(crds, "ca", "rotate", "--namespace", operator.namespace)
        assert again.returncode == 1 and "already in phase" in again.stderr
        wait_until("the rotation to complete", lambda: operator.metric(
            "meshward_ca_rotation_phase", phase="steady") == 1 and ca_secret(crds, operator.namespace)[
            "tls.crt"] != old_root, timeout=90)
        new_root = ca_secret(crds, operator.namespace)["tls.crt"]
        wait_until("the backend's Envoy serving a leaf of the new root", lambda: issued_by(
            mesh.backend_port, new_root), timeout=30)
        done = load.ok
        wait_until("traffic after the rotation", lambda: load.ok > done + 100)
    assert load.failures == []
    assert "CaRotationCompleted" in {e["reason"] for e in crds.get_json("-n", operator.namespace,
                                                                         "events")["items"]}
    bundle = crds.get_json("-n", mesh.ns, "configmap", "meshward-trust-bundle")["data"]["ca.crt"]
    wait_until("the ConfigMap bundle to hold only the new root", lambda: crds.get_json(
        "-n", mesh.ns, "configmap", "meshward-trust-bundle")["data"]["ca.crt"].encode() == new_root), bundle


def test_deleting_the_service_identity_stops_issuance(crds: Cluster, operator: Operator, mesh: Mesh) -> None:
    crds.kubectl("-n", mesh.ns, "create", "serviceaccount", "reports")
    crds.apply(service_identity(mesh.ns, "reports"))
    # What the kubelet does for a mounted ConfigMap (the CA may have rotated since the mesh started).
    mesh.bundle_file.write_text(crds.trust_bundle(mesh.ns))
    w = start_workload(crds, operator, mesh.ns, mesh.workdir, "reports", mesh.bundle_file, backend_config(mesh.frontend.spiffe))
    try:
        crds.kubectl("-n", mesh.ns, "delete", "serviceidentity", "reports")
        errors = w.agent.metric("meshward_workload_cert_requests_total", result="error")
        wait_until("a refused renewal", lambda: w.agent.metric(
            "meshward_workload_cert_requests_total", result="error") > errors, timeout=30)
        assert "PERMISSION_DENIED: no ServiceIdentity in namespace" in w.agent.log.read_text()
    finally:
        w.agent.stop()


def test_operator_restart_keeps_the_ca(crds: Cluster, operator: Operator) -> None:
    before = ca_secret(crds, operator.namespace)["tls.crt"]
    operator.stop()
    operator.start()
    assert ca_secret(crds, operator.namespace)["tls.crt"] == before

