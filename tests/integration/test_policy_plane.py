"""The policy plane end to end: kubectl apply → operator → real agents (one path through a real Envoy).

The operator runs as a process against the real API server; agents are real
`meshward-sidecar` processes that get their identity from it and subscribe to their
workload's config over mTLS. Pods are created through the API (they stay Pending:
there is no kubelet), which is all the operator needs to know a workload.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshward.sidecar.domain.envoy import Endpoint, InboundConfig, build_inbound_bootstrap
from tests.kube import Cluster, opted_in_pod, service_identity, wait_until
from tests.support.idp import IdP
from tests.support.procs import Agent, Echo, Operator, free_port, http_status, run_envoy

pytestmark = pytest.mark.integration
API = "meshward.io/v1alpha1"


def policy(ns: str, name: str = "orders-api", *, rules: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "AuthPolicy", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": "orders"}}, "rules": rules, **spec}}


READS = [{"name": "reads", "to": {"methods": ["GET"], "paths": ["/orders/*"]}}]


def ready(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    status = cluster.get_json("-n", ns, "authpolicy", name).get("status", {})
    cond: dict[str, Any] = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
    return {**status, "ready": cond}


@dataclass
class Plane:
    cluster: Cluster
    operator: Operator
    ns: str
    workdir: Path
    agents: list[Agent]
    idp: IdP
    tokens: dict[str, Path]  # pod -> its pod-bound token (as kubelet would project it)
    bundle: Path

    def all_answer(self, path: str, status: int, headers: dict[str, str] | None = None) -> bool:
        return all(a.check(path, headers=headers) == status for a in self.agents)


@pytest.fixture(scope="module")
def plane(crds: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    wd = tmp_path_factory.mktemp("plane")
    op_ns = crds.new_namespace("mw")
    operator = Operator(wd, crds.kubeconfig, op_ns, "--status-interval", "0.5", "--ca-interval", "1").start()
    ns = crds.new_namespace("shop")
    crds.kubectl("-n", ns, "create", "serviceaccount", "orders")
    crds.apply(service_identity(ns, "orders"),
               opted_in_pod(ns, "orders-1", "orders", app="orders"), opted_in_pod(ns, "orders-2", "orders", app="orders"),
               opted_in_pod(ns, "orders-3", "orders", app="orders"))
    bundle = wd / "bundle.crt"
    bundle.write_text(crds.trust_bundle(ns))
    tokens = {}
    for p in ("orders-1", "orders-2", "orders-3"):
        tokens[p] = wd / f"{p}.token"
        tokens[p].write_text(crds.pod_token(ns, "orders", p))
    agents = [Agent(wd, None, name=p, extra_args=operator.agent_args(tokens[p], bundle, wd / f"{p}-sds.sock", p)
                    ).start() for p in ("orders-1", "orders-2")]
    idp = IdP(None)
    try:
        yield Plane(crds, operator, ns, wd, agents, idp, tokens, bundle)
    finally:
        for a in agents:
            a.stop()
        operator.stop()
        idp.close()
        for n in (ns, op_ns):
            crds.kubectl("delete", "namespace", n, "--wait=false", check=False)


@pytest.fixture(autouse=True)
def clean_slate(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts and ends with no AuthPolicy and no test Revocation, so one failure never cascades."""
    yield
    if "plane" not in request.fixturenames:
        return
    plane: Plane = request.getfixturevalue("plane")
    plane.cluster.kubectl("-n", plane.ns, "delete", "authpolicies", "--all", check=False)
    plane.cluster.kubectl("delete", "revocation", "incident-42", "--ignore-not-found", check=False)
    if plane.operator.proc is not None and plane.operator.proc.poll() is None:
        wait_until("agents back to no policy", lambda: plane.all_answer("/admin", 200), timeout=15)


def test_agents_enforce_every_applied_version_also_through_envoy(plane: Plane) -> None:
    c, ns = plane.cluster, plane.ns
    assert plane.all_answer("/admin", 200)  # no policy selects the workload yet: nothing to enforce
    c.apply(policy(ns, rules=READS))
    wait_until("the policy in force", lambda: plane.all_answer("/admin", 403), timeout=10)
    assert plane.all_answer("/orders/1", 200)
    echo = Echo()
    port, admin = free_port(), free_port()
    boot = build_inbound_bootstrap(InboundConfig(
        listen=Endpoint(port=port), admin=Endpoint(port=admin), app=Endpoint(port=echo.port),
        authz=Endpoint(unix=plane.agents[0].http.removeprefix("unix:"))))
    try:
        with run_envoy(boot, plane.workdir, admin, name="envoy-plane"):
            assert http_status(f"http://127.0.0.1:{port}/orders/1") == 200
            c.apply(policy(ns, rules=[{"name": "no-secrets", "action": "Deny", "to": {"paths": ["/orders/secret"]}},
                                      *READS]))
            wait_until("the new version through Envoy", lambda: http_status(
                f"http://127.0.0.1:{port}/orders/secret") == 403, timeout=10)
            assert http_status(f"http://127.0.0.1:{port}/orders/1") == 200
    finally:
        echo.close()
    c.kubectl("-n", ns, "delete", "authpolicy", "orders-api")
    wait_until("the deletion in force", lambda: plane.all_answer("/admin", 200), timeout=10)


class SilentSubscriber:
    """A subscriber process that receives its configs and never acknowledges them (tests/support)."""

    def __init__(self, plane: Plane, pod_name: str, token: Path | None = None, spiffe_ns: str = "",
                 name: str = "", sign_token: Path | None = None) -> None:
        import subprocess
        import sys

        self.out = plane.workdir / f"silent-{name or pod_name}.out"
        op = plane.operator
        with self.out.open("wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.silent_subscriber",
                 "--signer", f"127.0.0.1:{op.signer_port}", "--policy", f"127.0.0.1:{op.policy_port}",
                 "--server-name", f"meshward-signer.{op.namespace}.svc", "--bundle", str(plane.bundle),
                 "--token", str(token or plane.tokens[pod_name]),
                 "--spiffe", f"spiffe://cluster.local/ns/{spiffe_ns or plane.ns}/sa/orders",
                 "--pod", pod_name, *(["--sign-token", str(sign_token)] if sign_token else [])],
                stdout=f, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])

    def refusal(self, timeout: float = 30) -> str:
        """The error line of a refused subscription (waits for the process to end)."""
        self.proc.wait(timeout)
        return next((x for x in self.lines() if x.startswith("error ")), "")

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    @property
    def received(self) -> list[str]:
        return [x.split()[1] for x in self.lines() if x.startswith("version ")]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # gone, like a crashed agent
        self.proc.wait(10)


def test_status_tells_the_truth_through_apply_invalid_spec_lagging_and_gone(plane: Plane) -> None:
    c, ns = plane.cluster, plane.ns
    c.apply(policy(ns, "status-demo", rules=READS))
    st = wait_until("Ready with 2/2", lambda: (s := ready(c, ns, "status-demo"))["ready"].get("status") == "True"
                    and s.get("workloads") == "2/2" and s)
    assert st["ready"]["reason"] == "Enforced" and st["observedGeneration"] == 1
    # An update CEL cannot compile: rejected, named, and generation 1 stays in force.
    bad = policy(ns, "status-demo", rules=[{"name": "reads", "to": {"paths": ["/orders/*"]},
                                            "when": ["claims.scope.("]}])
    c.apply(bad)
    st = wait_until("InvalidSpec", lambda: (s := ready(c, ns, "status-demo"))["ready"].get("reason") == "InvalidSpec"
                    and s)
    assert st["ready"]["status"] == "False"
    assert "spec.rules[0].when[0]" in st["ready"]["message"]
    assert "generation 1 stays in force" in st["ready"]["message"]
    assert plane.all_answer("/admin", 403)  # still enforcing generation 1
    events = c.get_json("-n", ns, "events")["items"]
    assert any(e["reason"] == "InvalidSpec" and e["involvedObject"]["name"] == "status-demo" for e in events)
    c.apply(policy(ns, "status-demo", rules=[*READS, {"name": "writes", "to": {"methods": ["POST"]}}]))
    wait_until("Ready again at generation 3", lambda: (s := ready(c, ns, "status-demo"))["ready"].get(
        "status") == "True" and s.get("observedGeneration") == 3)
    # A third workload that receives configs but never acknowledges them.
    silent = SilentSubscriber(plane, "orders-3")
    try:
        st = wait_until("2/3 with the laggard named", lambda: (s := ready(c, ns, "status-demo")).get(
            "workloads") == "2/3" and s)
        assert st["ready"]["reason"] == "WorkloadsLagging"
        assert any("orders-3" in w for w in st["laggingWorkloads"])
        assert silent.received  # it did get its config
        op = plane.operator
        assert op.metric("meshward_policy_subscribers") == 3
        assert op.metric("meshward_policy_subscribers_lagging") >= 1  # version lag
        assert op.metric("meshward_policy_recompile_seconds_count") > 0  # reconcile latency is measured
        assert op.metric("meshward_policy_config_bytes_max") > 100
    finally:
        silent.close()
    wait_until("2/2 once the laggard is gone", lambda: ready(c, ns, "status-demo").get("workloads") == "2/2")
    c.kubectl("-n", ns, "delete", "authpolicy", "status-demo")


def test_a_sidecar_only_gets_a_pod_of_its_own_service_account(plane: Plane) -> None:
    c, ns = plane.cluster, plane.ns
    c.kubectl("-n", ns, "create", "serviceaccount", "billing")
    c.apply(opted_in_pod(ns, "billing-1", "billing", app="billing"))
    silent = SilentSubscriber(plane, "billing-1", token=plane.tokens["orders-3"], name="billing-claim")
    try:
        err = silent.refusal()  # a certificate and a token of SA orders claiming billing's pod
    finally:
        silent.close()
    assert err.startswith("error PERMISSION_DENIED"), err
    assert f"belongs to pod {ns}/orders-3, which cannot subscribe as {ns}/billing-1" in err


def test_a_pod_cannot_subscribe_as_a_sibling_of_its_service_account(plane: Plane) -> None:
    """Sibling silencing: any pod of the same ServiceAccount could name another pod and take its stream. The
    pod name is now proven by the pod-bound token (TokenReview names its pod), not self-asserted."""
    silent = SilentSubscriber(plane, "orders-1", token=plane.tokens["orders-3"], name="sibling-claim")
    try:
        err = silent.refusal()
    finally:
        silent.close()
    assert err.startswith("error PERMISSION_DENIED") and "belongs to pod" in err, err
    assert plane.all_answer("/admin", 200)


def test_a_token_not_bound_to_a_pod_is_refused(plane: Plane) -> None:
    """By the policy service (the subscriber holds a certificate got with the pod's own token), and by the signer."""
    unbound = plane.workdir / "unbound.token"
    unbound.write_text(plane.cluster.kubectl("-n", plane.ns, "create", "token", "orders", "--audience",
                                             "meshward").stdout.strip())
    for sign_token, who in ((plane.tokens["orders-3"], "policy"), (None, "signer")):
        silent = SilentSubscriber(plane, "orders-3", token=unbound, name=f"unbound-{who}", sign_token=sign_token)
        try:
            err = silent.refusal()
        finally:
            silent.close()
        assert err.startswith("error PERMISSION_DENIED") and "not bound to a pod" in err, (who, err)
        assert ("(signer)" in err) == (who == "signer"), (who, err)


def test_a_second_stream_of_a_pod_never_silences_the_first(plane: Plane) -> None:
    """The real agent of orders-1 keeps receiving every update (and a Revocation) while a second stream of the
    same pod (its own token: an agent restarting, say) is open; both get each version."""
    c, ns, idp = plane.cluster, plane.ns, plane.idp
    second = SilentSubscriber(plane, "orders-1", name="second-stream")
    try:
        wait_until("the second stream subscribed", lambda: second.received, timeout=30)
        c.apply(policy(ns, "two-streams", rules=READS, jwt=[{"issuer": idp.issuer, "audiences": ["orders"],
                                                            "jwksUri": idp.jwks_uri}]))
        wait_until("the first stream's agent enforcing the change", lambda: plane.agents[0].check("/orders/1") == 401,
                   timeout=10)
        tok = idp.token(jti="stolen-2")
        auth = {"authorization": f"Bearer {tok}"}
        wait_until("the token accepted", lambda: plane.agents[0].check("/orders/1", headers=auth) == 200, timeout=15)
        versions = len(second.received)
        expires = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        c.apply({"apiVersion": API, "kind": "Revocation", "metadata": {"name": "incident-42"},
                 "spec": {"entries": [{"jti": "stolen-2", "expiresAt": expires}]}})
        wait_until("the revocation enforced by the first stream's agent",
                   lambda: plane.agents[0].check("/orders/1", headers=auth) == 401, timeout=5)
        wait_until("the second stream got it too", lambda: len(second.received) > versions, timeout=5)
    finally:
        second.close()
    c.kubectl("-n", ns, "delete", "authpolicy", "two-streams")



def test_revocation_denies_a_token_everywhere_within_five_seconds(plane: Plane) -> None:
    c, ns, idp = plane.cluster, plane.ns, plane.idp
    c.apply(policy(ns, "jwt-demo", rules=READS, jwt=[{"issuer": idp.issuer, "audiences": ["orders"],
                                                      "jwksUri": idp.jwks_uri}]))
    tok = idp.token(jti="stolen-1")
    auth = {"authorization": f"Bearer {tok}"}
    wait_until("the JWT policy in force", lambda: plane.all_answer("/orders/1", 401), timeout=15)
    wait_until("the token accepted", lambda: plane.all_answer("/orders/1", 200, auth), timeout=15)
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    c.apply({"apiVersion": API, "kind": "Revocation", "metadata": {"name": "incident-42"},
             "spec": {"entries": [{"jti": "stolen-1", "expiresAt": expires, "reason": "INC-42"}]}})
    wait_until("the token denied by every agent", lambda: plane.all_answer("/orders/1", 401, auth), timeout=5)
    assert plane.all_answer("/orders/1", 200, {"authorization": f"Bearer {idp.token()}"})  # others unaffected
    st = wait_until("revocation status", lambda: (s := c.get_json("revocation", "incident-42").get("status", {}))
                    .get("workloads") == "2/2" and s)
    assert st["activeEntries"] == 1
    # An entry that expires stops applying by itself (the revoked token would have expired anyway).
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    c.apply({"apiVersion": API, "kind": "Revocation", "metadata": {"name": "incident-42"},
             "spec": {"entries": [{"jti": "stolen-1", "expiresAt": soon}]}})
    wait_until("the expired entry dropped", lambda: plane.all_answer("/orders/1", 200, auth), timeout=15)
    c.kubectl("delete", "revocation", "incident-42")
    c.kubectl("-n", ns, "delete", "authpolicy", "jwt-demo")


def test_agents_keep_enforcing_without_the_operator_and_catch_up_after(plane: Plane) -> None:
    c, ns = plane.cluster, plane.ns
    c.apply(policy(ns, "restart-demo", rules=READS))
    wait_until("in force", lambda: plane.all_answer("/admin", 403), timeout=10)
    plane.operator.stop()
    try:
        wait_until("agents notice", lambda: all(a.metric("meshward_policy_connected") == 0 for a in plane.agents))
        assert plane.all_answer("/admin", 403) and plane.all_answer("/orders/1", 200)  # last config, never allow-all
        wait_until("staleness reported", lambda: all(a.metric("meshward_policy_stale_seconds") > 0
                                                     for a in plane.agents))
        # A change while the operator is down is not lost.
        c.apply(policy(ns, "restart-demo", rules=[*READS, {"name": "admin", "to": {"paths": ["/admin"]}}]))
    finally:
        plane.operator.start()
    wait_until("the change delivered after the restart", lambda: plane.all_answer("/admin", 200), timeout=15)
    assert all(a.metric("meshward_policy_connected") == 1 for a in plane.agents)
    c.kubectl("-n", ns, "delete", "authpolicy", "restart-demo")


def test_an_agent_restarted_while_its_policy_and_a_revocation_changed_enforces_both_from_its_first_answer(
        plane: Plane) -> None:
    """Stale config on reconnect (the chaos issue's regression): agent down → policy changed and a Revocation
    applied → agent back. It was sent the operator's cached config and kept the old rules (a route the change
    opened stayed 403 for 30 s and more) and, with them, allowed the revoked token. Its first answers after it
    reports ready must be today's."""
    c, ns, idp = plane.cluster, plane.ns, plane.idp
    jwt = [{"issuer": idp.issuer, "audiences": ["orders"], "jwksUri": idp.jwks_uri}]
    c.apply(policy(ns, "restart-agent", rules=READS, jwt=jwt, requireJwt=False))
    stolen = {"authorization": f"Bearer {idp.token(jti='stolen-restart')}"}
    wait_until("in force", lambda: plane.all_answer("/admin", 403) and plane.all_answer("/orders/1", 200, stolen),
               timeout=15)
    agent = plane.agents[0]
    subscribers = plane.operator.metric("meshward_policy_subscribers")
    agent.stop()
    wait_until("the operator sees the agent gone",
               lambda: plane.operator.metric("meshward_policy_subscribers") == subscribers - 1, timeout=15)
    c.apply(policy(ns, "restart-agent", jwt=jwt, requireJwt=False,
                   rules=[*READS, {"name": "admin", "to": {"paths": ["/admin"]}}]))
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    c.apply({"apiVersion": API, "kind": "Revocation", "metadata": {"name": "incident-42"},
             "spec": {"entries": [{"jti": "stolen-restart", "expiresAt": expires}]}})
    wait_until("the other agent enforces both", lambda: plane.agents[1].check("/admin") == 200
               and plane.agents[1].check("/orders/1", headers=stolen) == 401, timeout=15)
    agent.start()  # ready = its first config applied
    assert agent.check("/admin") == 200, "the restarted agent enforces the policy from before its restart"
    assert agent.check("/orders/1", headers=stolen) == 401, "the restarted agent accepts a revoked token"
    c.kubectl("delete", "revocation", "incident-42")
    c.kubectl("-n", ns, "delete", "authpolicy", "restart-agent")


def test_meshward_explain_reads_the_pods_config_from_the_cluster(plane: Plane) -> None:
    import subprocess
    import sys

    c, ns = plane.cluster, plane.ns
    c.apply(policy(ns, "explain-demo", rules=[{"name": "no-admin", "action": "Deny", "to": {"paths": ["/admin/*"]}},
                                              *READS]))
    exe = Path(sys.executable).parent / "meshward"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(exe), "explain", "--pod", "orders-1", "-n", ns, "--kubeconfig",
                               str(c.kubeconfig), *args], capture_output=True, text=True, timeout=30)

    denied = run("--path", "/admin/users")
    assert denied.returncode == 3, denied.stderr
    assert f"decision: FORBIDDEN (403) by {ns}/explain-demo rule no-admin" in denied.stdout
    allowed = run("--path", "/orders/7")
    assert allowed.returncode == 0
    assert "rule reads" in allowed.stdout and "to.paths: '/orders/7' does not match ['/admin/*']" in allowed.stdout
    # The same answer the agent gives.
    wait_until("the agent to agree", lambda: plane.agents[0].check("/admin/users") == 403
               and plane.agents[0].check("/orders/7") == 200, timeout=10)
    # An invalid policy (the CRD accepts it, the operator rejects it) once made explain fail while the operator
    # kept enforcing: explain now compiles as the operator does, leaving it out and saying so.
    c.apply(policy(ns, "broken-demo", rules=[{"name": "r", "when": ["claims.scope.("]}]))
    again = run("--path", "/orders/7")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"note: {ns}/broken-demo generation 1 is invalid" in again.stdout
    assert "spec.rules[0].when[0]" in again.stdout
    assert plane.agents[0].check("/orders/7") == 200
    c.kubectl("-n", ns, "delete", "authpolicy", "explain-demo", "broken-demo")


def test_a_rule_naming_a_peer_without_service_identity_is_flagged(plane: Plane) -> None:
    c, ns = plane.cluster, plane.ns
    typo = f"spiffe://cluster.local/ns/{ns}/sa/frontnd"
    c.apply(policy(ns, "typo-demo", rules=[{"name": "peer", "from": {"principals": [
        typo, f"spiffe://cluster.local/ns/{ns}/sa/orders"]}}]))

    def degraded() -> dict[str, Any]:
        conds = c.get_json("-n", ns, "authpolicy", "typo-demo").get("status", {}).get("conditions", [])
        return next((x for x in conds if x["type"] == "Degraded" and x["status"] == "True"), {})

    cond = wait_until("Degraded for the unknown peer", degraded)
    assert cond["reason"] == "UnknownPrincipal" and typo in cond["message"]
    assert "sa/orders" not in cond["message"]  # orders has a ServiceIdentity
    c.kubectl("-n", ns, "delete", "authpolicy", "typo-demo")


def _still_receives_a_change_and_a_revocation(plane: Plane, name: str, jti: str) -> None:
    """The plane's namespace enforces a new JWT policy `name` within 10 s, then a Revocation of `jti` within 5 s."""
    c, ns, idp = plane.cluster, plane.ns, plane.idp
    c.apply(policy(ns, name, rules=READS, jwt=[{"issuer": idp.issuer, "audiences": ["orders"],
                                                "jwksUri": idp.jwks_uri}]))
    wait_until("the other namespace enforcing its change", lambda: plane.all_answer("/orders/1", 401), timeout=10)
    auth = {"authorization": f"Bearer {idp.token(jti=jti)}"}
    wait_until("the token accepted", lambda: plane.all_answer("/orders/1", 200, auth), timeout=15)
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    c.apply({"apiVersion": API, "kind": "Revocation", "metadata": {"name": "incident-42"},
             "spec": {"entries": [{"jti": jti, "expiresAt": expires}]}})
    wait_until("the revocation enforced by the other namespace", lambda: plane.all_answer("/orders/1", 401, auth),
               timeout=5)


def inflated_policy(ns: str, name: str) -> dict[str, Any]:
    """A valid AuthPolicy of ~1 MB within the CRD's bounds: 64 rules of 16 `when` of ~1000 characters, each naming
    30 distinct claims (whose names once went into every config of the mesh)."""
    rules = []
    for r in range(64):
        whens = [" || ".join(f"claims.{name.replace('-', '_')}r{r}w{w}c{k} == 'v'" for k in range(30))
                 for w in range(16)]
        rules.append({"name": f"r{r}", "when": whens})
    return {"apiVersion": API, "kind": "AuthPolicy", "metadata": {"name": name, "namespace": ns},
            "spec": {"namespaceWide": True, "rules": rules}}


def test_the_inflation_attack_leaves_other_namespaces_untouched(plane: Plane) -> None:
    """Six ~1 MB AuthPolicies in one namespace made agents in other namespaces fail (RESOURCE_EXHAUSTED), a new
    Revocation never arrived and new pods stayed unready. Now the other namespace's agents get a policy change and
    a Revocation within the usual bounds (10 s, 5 s), and the inflated namespace's policies say what happened."""
    import json

    c, ns = plane.cluster, plane.ns
    evil = c.new_namespace("evil")
    try:
        c.kubectl("-n", evil, "create", "serviceaccount", "orders")
        c.apply(service_identity(evil, "orders"), opted_in_pod(evil, "w-1", "orders", app="w"))
        token = plane.workdir / "evil.token"
        token.write_text(c.pod_token(evil, "orders", "w-1"))
        victim = SilentSubscriber(plane, "w-1", token=token, spiffe_ns=evil, name="evil-w-1")
        for n in range(6):
            doc = inflated_policy(evil, f"big-{n}")
            assert len(json.dumps(doc)) > 900_000
            c.kubectl("create", "-f", "-", stdin=json.dumps(doc), timeout=120)  # too big for apply's annotation
        # Meanwhile, in the other namespace: a change and a Revocation arrive as usual.
        _still_receives_a_change_and_a_revocation(plane, "after-the-attack", "stolen-3")
        assert all(a.metric("meshward_policy_connected") == 1 for a in plane.agents)

        # The inflated namespace: its own policies report that its workload's config is too large.
        def too_large() -> dict[str, Any]:
            conds = c.get_json("-n", evil, "authpolicy", "big-5").get("status", {}).get("conditions", [])
            return next((x for x in conds if x["type"] == "Degraded" and x["reason"] == "ConfigTooLarge"), {})

        cond = wait_until("ConfigTooLarge on the inflating policy", too_large, timeout=60)
        assert f"{evil}/w-1" in cond["message"] and "a sidecar accepts" in cond["message"]
        wait_until("a Warning Event about it", lambda: any(
            e["reason"] == "ConfigTooLarge" for e in c.get_json("-n", evil, "events")["items"]), timeout=30)
        victim.close()
    finally:
        c.kubectl("delete", "namespace", evil, "--wait=false", check=False)
        c.kubectl("-n", ns, "delete", "authpolicy", "after-the-attack", check=False)


def test_a_pod_whose_inject_label_is_removed_leaves_the_mesh(plane: Plane) -> None:
    """The pod watch once filtered on the label, so it never delivered the change that removes it: the pod kept
    its config (and its place in status) until deleted. Now its subscription ends, visibly."""
    c, ns = plane.cluster, plane.ns
    silent = SilentSubscriber(plane, "orders-3", name="opt-out")
    try:
        wait_until("orders-3 subscribed", lambda: silent.received, timeout=30)
        c.kubectl("-n", ns, "label", "pod", "orders-3", "meshward.io/inject-")
        err = silent.refusal()
        assert err.startswith("error NOT_FOUND") and "no longer opts in" in err, err
    finally:
        silent.close()
        c.kubectl("-n", ns, "label", "pod", "orders-3", "meshward.io/inject=enabled", "--overwrite")


def test_the_destination_map_inflation_leaves_other_namespaces_streams_untouched(plane: Plane) -> None:
    """Destination-map inflation (issue 18 item 3): 17 running pods with a hand-written meshward.io/injected and a
    ~250 KiB exclude-inbound-ports (never seen by the injector) once made every agent's destination message over
    gRPC's 4 MiB: every stream failed with RESOURCE_EXHAUSTED, a policy change and a Revocation never arrived, and
    status still read Ready. Annotations no longer make a pod meshed; here the 17 pods are made where no webhook runs
    (as the API server here has none), opted in with the mesh's containers and the ~250 KiB exclusion given to their
    capture container. The other namespace's agents stay connected and get both changes within the usual bounds
    (10 s, 5 s), and the operator reports the ignored exclusions on the inflating pods."""
    import json

    c, ns, op = plane.cluster, plane.ns, plane.operator
    evil = c.new_namespace("evil")
    ports = ",".join(str(p) for p in range(1, 45001))  # ~253 KiB: about all one object's annotations may hold
    try:
        c.kubectl("-n", evil, "create", "serviceaccount", "app")
        for n in range(17):
            c.kubectl("create", "-f", "-", stdin=json.dumps({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"big-{n}", "namespace": evil, "labels": {"meshward.io/inject": "enabled"},
                             "annotations": {"meshward.io/injected": "hand-written"}},
                "spec": {"serviceAccountName": "app", "initContainers": [
                    {"name": "meshward-init", "image": "registry.invalid/a:1",
                     "command": ["meshward-init", "--exclude-inbound-ports", ports]},
                    {"name": "meshward-agent", "image": "registry.invalid/a:1", "restartPolicy": "Always"}],
                    "containers": [{"name": "app", "image": "registry.invalid/a:1"}]}}))
            ip = f"10.77.0.{n + 1}"  # as kubelet would report it (there is no kubelet here)
            c.kubectl("-n", evil, "patch", "pod", f"big-{n}", "--subresource=status", "--type=merge", "-p",
                      json.dumps({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}))
        # The map with them is published (or, without the bounds, the streams have failed).
        wait_until("the operator to map the inflating pods", lambda: op.metric("meshward_mesh_annotations_ignored")
                   >= 17 or any(a.metric("meshward_policy_connected") == 0 for a in plane.agents), timeout=30)
        _still_receives_a_change_and_a_revocation(plane, "after-the-map", "stolen-4")
        assert all(a.metric("meshward_policy_connected") == 1 for a in plane.agents)
        assert sum(a.metric("meshward_policy_stream_errors_total", code="RESOURCE_EXHAUSTED") for a in plane.agents) == 0
        assert op.metric("meshward_policy_messages_refused_total") == 0
        assert op.metric("meshward_mesh_destination_map_bytes") < 64 * 1024
        st = wait_until("revocation status", lambda: (s := c.get_json("revocation", "incident-42").get("status", {}))
                        .get("workloads") == "2/2" and s)
        assert st["conditions"][0]["reason"] == "Enforced"
        wait_until("a Warning Event on an inflating pod", lambda: any(
            e["reason"] == "MeshAnnotationIgnored" and e["involvedObject"]["name"].startswith("big-")
            for e in c.get_json("-n", evil, "events")["items"]), timeout=30)
    finally:
        c.kubectl("delete", "namespace", evil, "--wait=false", check=False)
        c.kubectl("-n", ns, "delete", "authpolicy", "after-the-map", check=False)
