"""Admission reviews (operator/domain/admission.py): injection patches only opted-in pods, refusals say why,
validation runs the operator's own checks; fuzzed reviews never crash it and never patch a pod that did not
opt in."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshward.operator.domain.admission import (
    ReviewError,
    ephemeral_response,
    inject_response,
    parse_review,
    review,
    validate_response,
)
from meshward.operator.domain.inject import InjectSettings, inject
from tests.support.jsonpatch import apply_patch

SETTINGS = InjectSettings(image="localhost/meshward:t")
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def pod_request(pod: dict[str, Any], namespace: str = "shop", operation: str = "CREATE") -> dict[str, Any]:
    return {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": operation,
            "namespace": namespace, "object": pod}


def opted(**labels: str) -> dict[str, Any]:
    return {"metadata": {"name": "p", "labels": {"meshward.io/inject": "enabled", **labels}},
            "spec": {"containers": [{"name": "app", "image": "x"}]}}


def test_an_opted_in_pod_comes_back_as_the_injector_makes_it() -> None:
    pod = opted()
    resp = inject_response(pod_request(pod), SETTINGS, namespace_opted_in=False)
    assert resp["allowed"] is True and resp["patchType"] == "JSONPatch" and resp["uid"] == "u-1"
    patch = json.loads(base64.b64decode(resp["patch"]))
    assert apply_patch(pod, patch) == inject(pod, SETTINGS)


@pytest.mark.parametrize(("pod", "namespace", "via_namespace"), [
    ({"metadata": {"name": "p"}, "spec": {"containers": []}}, "shop", False),
    (opted(**{"meshward.io/inject": "disabled"}), "shop", True),
    (opted(), "kube-system", False),
    (opted(), "meshward-system", False),
])
def test_pods_that_did_not_opt_in_pass_unchanged(pod: dict[str, Any], namespace: str, via_namespace: bool) -> None:
    resp = inject_response(pod_request(pod, namespace), SETTINGS, via_namespace)
    assert resp == {"uid": "u-1", "allowed": True}


def test_an_opted_in_pod_that_cannot_be_protected_is_refused_with_the_reason() -> None:
    pod = opted()
    pod["spec"]["hostNetwork"] = True
    resp = inject_response(pod_request(pod), SETTINGS, False)
    assert resp["allowed"] is False and resp["status"]["code"] == 403
    assert "spec.hostNetwork" in resp["status"]["message"]


def test_a_pod_already_injected_gets_no_patch() -> None:
    once = inject(opted(), SETTINGS)
    assert inject_response(pod_request(once), SETTINGS, False) == {"uid": "u-1", "allowed": True}


def test_only_pod_creations_are_injected() -> None:
    assert "patch" not in inject_response(pod_request(opted(), operation="UPDATE"), SETTINGS, False)
    req = {**pod_request(opted()), "kind": {"group": "apps", "version": "v1", "kind": "Deployment"}}
    assert "patch" not in inject_response(req, SETTINGS, False)


def test_kubectl_debug_mounting_the_socket_volume_is_refused_and_an_ordinary_one_allowed() -> None:
    """`kubectl debug` adds ephemeral containers through pods/ephemeralcontainers, which no webhook reviewed."""
    pod = inject(opted(), SETTINGS)
    pod["spec"]["ephemeralContainers"] = [{"name": "dbg", "image": "x",
                                           "volumeMounts": [{"name": "meshward-sockets", "mountPath": "/s"}]}]
    req = {**pod_request(pod, operation="UPDATE"), "subResource": "ephemeralcontainers"}
    resp = ephemeral_response(req)
    assert resp["allowed"] is False and resp["status"]["code"] == 403
    assert "spec.ephemeralContainers[0].volumeMounts[0].name" in resp["status"]["message"]
    pod["spec"]["ephemeralContainers"] = [{"name": "dbg", "image": "x", "targetContainerName": "app"}]
    assert ephemeral_response({**req, "object": pod}) == {"uid": "u-1", "allowed": True}


def policy_request(spec: dict[str, Any], old_spec: dict[str, Any] | None = None, kind: str = "AuthPolicy"
                   ) -> dict[str, Any]:
    obj = {"apiVersion": "meshward.io/v1alpha1", "kind": kind, "metadata": {"name": "p", "namespace": "shop"},
           "spec": spec}
    req: dict[str, Any] = {"uid": "u-2", "kind": {"group": "meshward.io", "version": "v1alpha1", "kind": kind},
                           "operation": "CREATE" if old_spec is None else "UPDATE", "namespace": "shop",
                           "name": "p", "object": obj}
    if old_spec is not None:
        req["oldObject"] = {**obj, "spec": old_spec}
    return req


BAD_CEL = {"selector": {"matchLabels": {"app": "orders"}}, "rules": [{"name": "r", "when": ["claims.x.("]}]}
GOOD = {"selector": {"matchLabels": {"app": "orders"}}, "rules": [{"name": "r", "to": {"methods": ["GET"]}}]}


def test_a_policy_the_operator_would_reject_is_refused_naming_the_field() -> None:
    resp = validate_response(policy_request(BAD_CEL), "cluster.local", NOW)
    assert resp["allowed"] is False and resp["status"]["code"] == 422
    assert resp["status"]["message"].startswith("AuthPolicy shop/p: spec.rules[0].when[0]:")
    assert validate_response(policy_request(GOOD), "cluster.local", NOW)["allowed"] is True


def test_an_update_that_leaves_the_spec_alone_is_always_allowed() -> None:
    """An object stored before a check existed (or by a bypassed webhook) can still lose its finalizers."""
    assert validate_response(policy_request(BAD_CEL, old_spec=BAD_CEL), "cluster.local", NOW)["allowed"] is True
    assert validate_response(policy_request(BAD_CEL, old_spec=GOOD), "cluster.local", NOW)["allowed"] is False


def test_service_identities_and_revocations_get_the_operators_checks() -> None:
    ttl = validate_response(policy_request({"serviceAccountName": "orders", "certificate": {"ttl": "90s"}},
                                           kind="ServiceIdentity"), "cluster.local", NOW)
    assert ttl["allowed"] is False and "spec.certificate.ttl" in ttl["status"]["message"]
    issuer = validate_response(policy_request({"entries": [{"sub": "a", "issuer": "http://idp.example.com",
                                                            "expiresAt": "2027-01-01T00:00:00Z"}]},
                                              kind="Revocation"), "cluster.local", NOW)
    assert issuer["allowed"] is False and "spec.entries[0].issuer" in issuer["status"]["message"]
    expired = validate_response(policy_request({"entries": [{"jti": "t1", "expiresAt": "2020-01-01T00:00:00Z"}]},
                                               kind="Revocation"), "cluster.local", NOW)
    assert expired["allowed"] is True and "already expired" in expired["warnings"][0]


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"kind": "AdmissionReview"}',
                                  b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}',
                                  b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {}}',
                                  b"\xff\xfe"])
def test_what_is_not_a_review_is_a_review_error(body: bytes) -> None:
    with pytest.raises(ReviewError):
        parse_review(body)


def test_a_review_round_trips() -> None:
    doc = review({"uid": "u", "allowed": True})
    assert parse_review(json.dumps({**doc, "request": {"uid": "u"}}).encode())["uid"] == "u"


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=12)
containers = st.lists(st.dictionaries(st.sampled_from(["name", "image", "ports", "readinessProbe", "securityContext",
                                                       "livenessProbe", "restartPolicy"]), json_values, max_size=5),
                      max_size=3)
pods = st.fixed_dictionaries({
    "metadata": st.fixed_dictionaries({}, optional={
        "labels": st.dictionaries(st.sampled_from(["meshward.io/inject", "app"]),
                                  st.sampled_from(["enabled", "disabled", "true", ""]), max_size=2),
        "annotations": st.dictionaries(st.sampled_from(["meshward.io/exclude-inbound-ports",
                                                        "meshward.io/inbound-plaintext", "meshward.io/route-timeout",
                                                        "meshward.io/accept-http10", "x"]), json_values, max_size=2),
        "name": json_values}),
    "spec": st.fixed_dictionaries({}, optional={"containers": containers, "initContainers": containers,
                                                "volumes": json_values, "hostNetwork": json_values,
                                                "securityContext": json_values}),
})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=pods | json_values, namespace=st.sampled_from(["shop", "kube-system", "meshward-system", ""]),
       via_namespace=st.booleans(), operation=st.sampled_from(["CREATE", "UPDATE", "DELETE", 7]))
def test_fuzzed_pod_reviews_never_crash_and_never_patch_a_pod_that_did_not_opt_in(
        pod: Any, namespace: str, via_namespace: bool, operation: Any) -> None:
    req = {"uid": "u", "kind": {"group": "", "kind": "Pod"}, "operation": operation, "namespace": namespace,
           "object": pod}
    resp = inject_response(req, SETTINGS, via_namespace)
    assert resp["uid"] == "u" and isinstance(resp["allowed"], bool)
    json.dumps(resp)
    labels = pod.get("metadata", {}).get("labels") if isinstance(pod, dict) else None
    label = labels.get("meshward.io/inject") if isinstance(labels, dict) else None
    opted_in = namespace not in ("kube-system", "meshward-system") and (
        label == "enabled" or (via_namespace and label != "disabled"))
    if "patch" in resp or not resp["allowed"]:
        assert opted_in and operation == "CREATE"


@settings(max_examples=300, deadline=None)
@given(spec=json_values, kind=st.sampled_from(["AuthPolicy", "ServiceIdentity", "Revocation", "Other"]),
       old=st.none() | json_values)
def test_fuzzed_object_reviews_never_crash(spec: Any, kind: str, old: Any) -> None:
    req = policy_request(spec if isinstance(spec, dict) else {"x": spec}, kind=kind)
    if old is not None:
        req["operation"], req["oldObject"] = "UPDATE", {"spec": old}
    resp = validate_response(req, "cluster.local", NOW)
    assert resp["uid"] == "u-2" and isinstance(resp["allowed"], bool)
    json.dumps(resp)


def _annotated(annotation: str, value: str) -> dict[str, Any]:
    pod = opted()
    pod["metadata"]["annotations"] = {annotation: value}
    return pod


_MAXIMAL = {"meshward.io/exclude-inbound-ports": ",".join(str(65535 - n) for n in range(64)),
            "meshward.io/exclude-outbound-ports": ",".join(str(10000 + n) for n in range(64)),
            "meshward.io/exclude-outbound-cidrs": ",".join(f"255.255.255.{n}/32" for n in range(64)),
            "meshward.io/inbound-plaintext": "allow",
            "meshward.io/route-timeout": "86400.000s",
            "meshward.io/stream-idle-timeout": "1440m",
            "meshward.io/accept-http10": "false"}


@pytest.mark.parametrize("annotation", sorted(_MAXIMAL))
def test_an_inflated_mesh_annotation_is_refused_at_admission_naming_it(annotation: str) -> None:
    """Tenant inflation through annotations (issue 18: 17 pods with a 256 KiB exclude-inbound-ports pushed the
    destination map every agent receives past gRPC's 4 MiB): a value over its bound is refused at the door, the
    refusal names the annotation and the fix, and it does not echo the 256 KiB back."""
    for value in ("8080," * (256 * 1024 // 5), ",".join(str(n) for n in range(1, 66))):
        resp = inject_response(pod_request(_annotated(annotation, value)), SETTINGS, namespace_opted_in=False)
        assert resp["allowed"] is False and resp["status"]["code"] == 403
        message = resp["status"]["message"]
        assert f"metadata.annotations[{annotation}]" in message and "allowed" in message and len(message) < 400


@pytest.mark.parametrize("annotation", sorted(_MAXIMAL))
def test_the_largest_mesh_annotation_within_its_bound_is_admitted(annotation: str) -> None:
    resp = inject_response(pod_request(_annotated(annotation, _MAXIMAL[annotation])), SETTINGS, False)
    assert resp["allowed"] is True and "patch" in resp
