"""The operator installed by its Helm chart, in pods: replicas, leader failover, certificates for pods, uninstall."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from meshward.sidecar.domain.envoy import Endpoint, InboundConfig, SdsTls, build_inbound_bootstrap
from tests.e2e.conftest import Release
from tests.kube import Cluster, KindSession, service_identity, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def ready(cluster: Cluster, ns: str, kind: str, name: str) -> str:
    conds = cluster.get_json("-n", ns, kind, name).get("status", {}).get("conditions", [])
    return next((f"{c['status']}/{c['reason']}" for c in conds if c["type"] == "Ready"), "")


def test_helm_install_runs_two_ready_replicas_one_leading_and_makes_the_ca(release: Release) -> None:
    cluster = release.cluster
    pods = release.pods()
    assert len(pods) == 2
    for p in pods:
        assert p["status"]["phase"] == "Running"
        assert all(c["ready"] for c in p["status"]["containerStatuses"]), p["status"]
        assert p["spec"]["containers"][0]["image"] == release.image
    leader = release.leader()
    assert leader in {p["metadata"]["name"] for p in pods}
    # The Services reach the leader alone.
    for svc in ("meshward-signer", "meshward-policy"):
        slices = cluster.get_json("-n", release.namespace, "endpointslices", "-l", f"kubernetes.io/service-name={svc}")
        targets = {ep["targetRef"]["name"] for s in slices["items"] for ep in s.get("endpoints") or []}
        assert targets == {leader}, (svc, targets)
    secret = cluster.get_json("-n", release.namespace, "secret", "meshward-mesh-ca")
    assert {"tls.crt", "tls.key"} <= set(secret["data"]), sorted(secret["data"])
    pdb = cluster.get_json("-n", release.namespace, "pdb", f"{release.name}-operator")
    assert pdb["status"]["currentHealthy"] == 2


def test_deleting_the_leader_pod_fails_over_and_status_keeps_updating(release: Release) -> None:
    cluster = release.cluster
    ns = cluster.new_namespace("failover")
    try:
        first = release.leader()
        cluster.kubectl("-n", release.namespace, "delete", "pod", first, "--wait=false")
        second = wait_until("another replica leading", lambda: (lambda n: n if n and n != first else "")(
            release.leader()), timeout=60)
        assert second != first
        # The new leader writes status: a ServiceIdentity made after the failover becomes Ready, and its
        # trust bundle appears. Its validating webhook takes writes once the Service's endpoints reach it
        # (labelled only once it listens; kube-proxy follows within moments).
        cluster.kubectl("-n", ns, "create", "serviceaccount", "orders")
        doc = yaml.safe_dump(service_identity(ns, "orders"))
        wait_until("the new leader's webhook admitting", lambda: cluster.kubectl(
            "apply", "--dry-run=server", "-f", "-", stdin=doc, check=False).returncode == 0, timeout=30)
        cluster.apply(service_identity(ns, "orders"))
        wait_until("the new ServiceIdentity Ready", lambda: ready(cluster, ns, "serviceidentity", "orders")
                   .startswith("True"), timeout=60)
        assert cluster.trust_bundle(ns).startswith("-----BEGIN CERTIFICATE-----")
        wait_until("both replicas Ready again", lambda: release.ready_replicas() == 2, timeout=120)
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def agent_pod(ns: str, image: str, bootstrap: dict[str, Any], namespace_of_operator: str) -> list[dict[str, Any]]:
    """A pod with the agent (certificate from the operator's Service) and Envoy (SDS from the agent)."""
    config = {"apiVersion": "sidecar.meshward.io/v1alpha1", "kind": "SidecarConfig", "workload": "orders",
              "policies": []}
    common = {"image": image, "imagePullPolicy": "Never",
              "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                  "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}}
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "orders-mesh", "namespace": ns},
         "data": {"config.json": json.dumps(config), "envoy.json": json.dumps(bootstrap)}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "orders", "namespace": ns},
         "spec": {
             "serviceAccountName": "orders",
             "containers": [
                 {"name": "agent", **common, "command": [
                     "meshward-sidecar", "--config", "/etc/meshward/config.json",
                     "--http-listen", "unix:/var/run/meshward/authz.sock", "--admin-listen", "127.0.0.1:9192",
                     "--identity-signer", f"meshward-signer.{namespace_of_operator}.svc:15012",
                     "--identity-signer-name", f"meshward-signer.{namespace_of_operator}.svc",
                     "--sds-listen", "unix:/var/run/meshward/sds.sock"],
                  "volumeMounts": [{"name": "mesh", "mountPath": "/etc/meshward"},
                                   {"name": "sockets", "mountPath": "/var/run/meshward"},
                                   {"name": "bundle", "mountPath": "/var/run/meshward/bundle"},
                                   {"name": "token", "mountPath": "/var/run/secrets/meshward"}]},
                 {"name": "envoy", **common, "command": [
                     "envoy", "-c", "/etc/meshward/envoy.json", "--concurrency", "1", "--log-level", "warn",
                     "--disable-hot-restart"],
                  "volumeMounts": [{"name": "mesh", "mountPath": "/etc/meshward"},
                                   {"name": "sockets", "mountPath": "/var/run/meshward"}]},
             ],
             "volumes": [
                 {"name": "mesh", "configMap": {"name": "orders-mesh"}},
                 {"name": "sockets", "emptyDir": {}},
                 {"name": "bundle", "configMap": {"name": "meshward-trust-bundle"}},
                 {"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                     "audience": "meshward", "expirationSeconds": 600, "path": "token"}}]}},
             ]}},
    ]


SERVED_SAN = """
import socket, ssl, sys
from cryptography import x509
ctx = ssl.create_default_context(cafile="/var/run/meshward/bundle/ca.crt")
ctx.check_hostname = False
with socket.create_connection(("127.0.0.1", 8443), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
    cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
print(san.get_values_for_type(x509.UniformResourceIdentifier)[0])
"""


def test_an_agent_in_a_pod_gets_its_certificate_and_serves_it_to_envoy_over_sds(
        kind_session: KindSession, release: Release) -> None:
    """The projected token (audience meshward) buys a certificate from the operator's signing Service; Envoy in
    the same pod gets it over SDS and presents it, verified against the namespace's trust bundle."""
    cluster = kind_session.cluster
    ns = cluster.new_namespace("shop")
    try:
        cluster.kubectl("-n", ns, "create", "serviceaccount", "orders")
        cluster.apply(service_identity(ns, "orders"))
        cluster.trust_bundle(ns, timeout=60)
        bootstrap = build_inbound_bootstrap(InboundConfig(
            listen=Endpoint(host="0.0.0.0", port=8443), admin=Endpoint(port=15000),
            app=Endpoint(port=8080), authz=Endpoint(unix="/var/run/meshward/authz.sock"),
            tls=SdsTls(Endpoint(unix="/var/run/meshward/sds.sock")), node=f"{ns}/orders"))
        cluster.apply(*agent_pod(ns, release.image, bootstrap, release.namespace))
        spiffe = f"spiffe://cluster.local/ns/{ns}/sa/orders"

        def served() -> str:
            proc = cluster.kubectl("-n", ns, "exec", "orders", "-c", "agent", "--", "python3", "-c", SERVED_SAN,
                                   check=False)
            return proc.stdout.strip() if proc.returncode == 0 else ""
        assert wait_until("Envoy presenting the workload certificate", served, timeout=120) == spiffe
        readiness = cluster.kubectl("-n", ns, "exec", "orders", "-c", "agent", "--", "python3", "-c",
                                    "import urllib.request; print(urllib.request.urlopen("
                                    "'http://127.0.0.1:9192/readyz').read().decode())").stdout
        assert json.loads(readiness)["certificate"] is True
        wait_until("issuance counted on the ServiceIdentity", lambda: cluster.get_json(
            "-n", ns, "serviceidentity", "orders").get("status", {}).get("issuedCertificates", 0) >= 1, timeout=60)
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_helm_uninstall_removes_everything_the_chart_made(release: Release) -> None:
    """Runs last in this module: it takes the release down (the fixture's own uninstall then finds nothing)."""
    cluster = release.cluster
    manifest = cluster.helm("get", "manifest", release.name, "-n", release.namespace).stdout
    made = [(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
            for d in yaml.safe_load_all(manifest) if d]
    assert {k for k, _, _ in made} >= {"Deployment", "Service", "ServiceAccount", "ClusterRole", "Role",
                                       "PodDisruptionBudget"}
    cluster.helm("uninstall", release.name, "-n", release.namespace, "--wait", timeout=180)
    for kind, name, namespace in made:
        where = ["-n", namespace] if namespace else []
        gone = cluster.kubectl("get", *where, kind, name, check=False)
        assert gone.returncode != 0 and "NotFound" in gone.stderr, (kind, name, gone.stdout)
    wait_until("the operator's pods gone", lambda: not release.pods(terminating=True), timeout=120)
    # CRDs stay (Helm never deletes them), and so does the CA Secret the operator made: a reinstall keeps trust.
    cluster.get_json("crd", "authpolicies.meshward.io")
