"""The Helm chart installs on a real API server and refuses clusters too old for its CRDs."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.kube import Cluster

pytestmark = pytest.mark.integration

CHART = Path(__file__).resolve().parents[2] / "charts" / "meshward"


def test_every_rendered_object_passes_the_api_servers_dry_run(cluster: Cluster) -> None:
    """`helm template | kubectl apply --dry-run=server`: the API server validates every object the chart makes (with
    a topology spread constraint too, which the defaults leave out)."""
    spread = '[{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}]'
    rendered = subprocess.run([cluster.helm_bin, "template", "mw", str(CHART), "-n", "default", "--include-crds",
                               "--set-json", f"operator.topologySpreadConstraints={spread}"],
                              capture_output=True, text=True, check=True).stdout
    crds = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "CustomResourceDefinition"]
    others = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] != "CustomResourceDefinition"]
    assert len(crds) == 3 and len(others) >= 9
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump_all(crds + others)).stdout
    assert out.count("(server dry run)") == len(crds) + len(others), out


def test_helm_install_creates_the_operator_deployment(cluster: Cluster, namespace: str) -> None:
    release = f"mw-{namespace}"
    try:
        cluster.helm("install", release, str(CHART), "-n", namespace)
        dep = cluster.get_json("-n", namespace, "deployment", f"{release}-operator")
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["meshward-operator"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert dep["spec"]["template"]["spec"]["serviceAccountName"] == f"{release}-operator"
        cluster.get_json("crd", "authpolicies.meshward.io")
        can = cluster.kubectl("auth", "can-i", "create", "tokenreviews.authentication.k8s.io",
                              f"--as=system:serviceaccount:{namespace}:{release}-operator").stdout.strip()
        assert can == "yes"
    finally:
        cluster.helm("uninstall", release, "-n", namespace, check=False)


@pytest.mark.parametrize(("verb", "what", "where", "allowed"), [
    # The attack: the chart let the operator create, patch and update every ConfigMap in the cluster.
    ("patch", "configmaps", "kube-system", "no"),
    ("update", "configmaps/coredns", "kube-system", "no"),
    ("delete", "configmaps/meshward-trust-bundle", "shop", "no"),
    ("list", "configmaps", "shop", "no"),
    ("patch", "configmaps/meshward-trust-bundle", "shop", "yes"),   # the one it owns, in any namespace
    ("create", "configmaps", "shop", "yes"),                         # a create never overwrites
    ("get", "secrets", "kube-system", "no"),
    ("patch", "secrets/other", "{release_ns}", "no"),
    ("patch", "secrets/meshward-mesh-ca", "{release_ns}", "yes"),
    ("patch", "leases/kube-controller-manager", "kube-system", "no"),
    ("update", "leases/meshward-operator", "{release_ns}", "yes"),
    ("create", "tokenreviews.authentication.k8s.io", "", "yes"),
    # Its own webhook configurations' caBundle, and no one else's admission control.
    ("patch", "mutatingwebhookconfigurations.admissionregistration.k8s.io/mw-operator-inject", "", "yes"),
    ("patch", "validatingwebhookconfigurations.admissionregistration.k8s.io/mw-operator-validate", "", "yes"),
    ("patch", "mutatingwebhookconfigurations.admissionregistration.k8s.io/istio-sidecar-injector", "", "no"),
    ("delete", "validatingwebhookconfigurations.admissionregistration.k8s.io/mw-operator-validate", "", "no"),
    ("create", "mutatingwebhookconfigurations.admissionregistration.k8s.io", "", "no"),
])
def test_the_charts_rbac_lets_the_operator_write_only_what_it_owns(installed: tuple[Cluster, str], verb: str,
                                                                   what: str, where: str, allowed: str) -> None:
    cluster, namespace = installed
    where_args = ["-n", where.format(release_ns=namespace)] if where else []
    can = cluster.kubectl("auth", "can-i", verb, what, *where_args,
                          f"--as=system:serviceaccount:{namespace}:mw-operator", check=False).stdout.strip()
    assert can == allowed, f"can-i {verb} {what} in {where or 'the cluster'}: {can}"


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> Iterator[tuple[Cluster, str]]:
    """The chart installed once (release `mw`) in a namespace of its own, without webhooks (their configurations
    are cluster-wide: with no operator behind them they would refuse other tests' opted-in pods and objects)."""
    namespace = cluster.new_namespace("rbac")
    cluster.helm("install", "mw", str(CHART), "-n", namespace, "--skip-crds", "--set", "injection.enabled=false",
                 "--set", "validation.enabled=false")
    try:
        yield cluster, namespace
    finally:
        cluster.helm("uninstall", "mw", "-n", namespace, check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _kubeconfig_for(cluster: Cluster, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as `service_account` with a real TokenRequest token."""
    admin = yaml.safe_load(cluster.kubectl("config", "view", "--raw", "--minify").stdout)
    token = cluster.kubectl("-n", namespace, "create", "token", service_account, "--duration", "1h").stdout.strip()
    admin["users"] = [{"name": "sa", "user": {"token": token}}]
    admin["contexts"][0]["context"]["user"] = "sa"
    path.write_text(yaml.safe_dump(admin))
    return path


def test_the_operator_does_its_whole_job_with_only_the_charts_rbac(crds: Cluster, namespace: str,
                                                                  tmp_path: Path) -> None:
    """The real operator runs as the chart's ServiceAccount (a TokenRequest token, so every call is authorized
    by the chart's ClusterRole and Role, not by admin credentials) and loads the CA, reports every kind's status,
    publishes the trust bundle, posts Events, keeps its webhooks' caBundle and serves them (the API server calls
    them: an opted-in pod comes back injected, an AuthPolicy whose CEL does not compile is refused at apply)."""
    import datetime as dt

    from tests.kube import opted_in_pod, service_identity, wait_until
    from tests.support.procs import Operator

    release = f"mw-{namespace}"
    crds.helm("install", release, str(CHART), "-n", namespace, "--skip-crds")
    operator = Operator(tmp_path, _kubeconfig_for(crds, namespace, f"{release}-operator", tmp_path / "sa.kubeconfig"),
                        namespace, "--status-interval", "1", "--inject-image", "meshward:test",
                        "--webhook-configurations", f"mutating:{release}-operator-inject,"
                                                    f"validating:{release}-operator-validate")
    crds.webhooks_to_loopback(f"{release}-operator", operator.webhook_port)
    apps = crds.new_namespace("rbac")
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    revocation = f"rbac-{apps}"
    try:
        operator.start()
        crds.kubectl("-n", apps, "create", "serviceaccount", "orders")
        crds.apply(service_identity(apps, "orders"), service_identity(apps, "ghost"),
                   opted_in_pod(apps, "orders-1", "orders", app="orders"),
                   {"apiVersion": "meshward.io/v1alpha1", "kind": "AuthPolicy",
                    "metadata": {"name": "reads", "namespace": apps},
                    "spec": {"selector": {"matchLabels": {"app": "orders"}},
                             "rules": [{"name": "reads", "to": {"methods": ["GET"]}}]}},
                   {"apiVersion": "meshward.io/v1alpha1", "kind": "Revocation", "metadata": {"name": revocation},
                    "spec": {"entries": [{"sub": "mallory", "expiresAt": expires}]}})

        def ready(*args: str) -> str:
            conds = crds.get_json(*args).get("status", {}).get("conditions", [])
            return next((f"{c['status']}/{c['reason']}" for c in conds if c["type"] == "Ready"), "")

        pod = crds.get_json("-n", apps, "pod", "orders-1")
        assert [c["name"] for c in pod["spec"]["initContainers"]] == ["meshward-init", "meshward-agent",
                                                                       "meshward-proxy"]
        refused = crds.kubectl("apply", "-f", "-", check=False, stdin=yaml.safe_dump(
            {"apiVersion": "meshward.io/v1alpha1", "kind": "AuthPolicy", "metadata": {"name": "bad", "namespace": apps},
             "spec": {"selector": {"matchLabels": {"app": "orders"}}, "rules": [{"name": "r", "when": ["nope("]}]}}))
        assert refused.returncode != 0 and "spec.rules[0].when[0]" in refused.stderr, refused.stderr
        wait_until("ServiceIdentity Ready", lambda: ready("-n", apps, "serviceidentity", "orders").startswith("True"))
        wait_until("ServiceAccountMissing reported", lambda: ready("-n", apps, "serviceidentity", "ghost")
                   == "False/ServiceAccountMissing")
        wait_until("AuthPolicy status", lambda: ready("-n", apps, "authpolicy", "reads") != "")
        wait_until("Revocation status", lambda: ready("revocation", revocation) != "")
        assert crds.trust_bundle(apps).startswith("-----BEGIN CERTIFICATE-----")
        ca = crds.get_json("-n", namespace, "secret", "meshward-mesh-ca")
        assert {"tls.crt", "tls.key"} <= set(ca["data"]), "the CA Secret, made by the operator as the chart's SA"
        wait_until("a Warning Event", lambda: any(e["reason"] == "ServiceAccountMissing" for e in crds.get_json(
            "-n", apps, "events")["items"]))
        log = operator.log.read_text()
        # A word of its own: namespace names are random hex ("t-20403ece" once made this test fail).
        assert not re.search(r"\b403\b", log) and "Forbidden" not in log, log[-2000:]
    finally:
        operator.stop()
        crds.kubectl("delete", "revocation", revocation, "--wait=false", check=False)
        crds.kubectl("delete", "namespace", apps, "--wait=false", check=False)
        crds.helm("uninstall", release, "-n", namespace, check=False)
