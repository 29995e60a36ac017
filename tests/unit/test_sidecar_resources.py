"""The sidecars' CPU and memory per workload (pod-template annotations) and per mesh (the chart's injection.resources):
Kubernetes quantities parsed exactly, what the injector puts in the pod, and what it refuses, naming the annotation."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest

from meshward.operator.domain.inject import (
    AGENT,
    PROXY,
    RESOURCE_ANNOTATIONS,
    RESOURCE_BOUNDS,
    InjectRefused,
    InjectSettings,
    inject,
)
from meshward.operator.domain.quantity import QuantityError, parse_quantity
from meshward.operator.entrypoints.main import _inject_settings, _parser

SETTINGS = InjectSettings(image="localhost/meshward:test", version="test")


@pytest.mark.parametrize(("text", "amount"), [
    ("50m", Fraction(1, 20)), ("1", Fraction(1)), ("1.5", Fraction(3, 2)), (".5", Fraction(1, 2)), ("2.", Fraction(2)),
    ("+2", Fraction(2)), ("0", Fraction(0)), ("-0", Fraction(0)),
    ("64Mi", Fraction(64 * 2**20)), ("1Gi", Fraction(2**30)), ("1.5Gi", Fraction(3 * 2**29)), ("128k", Fraction(128000)),
    ("100M", Fraction(10**8)), ("1e3", Fraction(1000)), ("1E3", Fraction(1000)), ("5e-3", Fraction(1, 200)),
    ("1E", Fraction(10**18)),  # E alone is exa, as in apimachinery
])
def test_quantities_parse_exactly_as_kubernetes_reads_them(text: str, amount: Fraction) -> None:
    assert parse_quantity(text) == amount


@pytest.mark.parametrize("text", ["", "Mi", "64 Mi", "64mi", "1ki", "1KB", "1.2.3", "1e3m", "0x10", "1_000", "-1",
                                  "-64Mi", "64Mi ", "١٢٣"])
def test_what_is_not_a_non_negative_quantity_is_refused(text: str) -> None:
    with pytest.raises(QuantityError):
        parse_quantity(text)


@pytest.mark.parametrize("text", ["1e999999999", "1e19", "1e-4", "1e+0000000000009"])
def test_an_exponent_bomb_is_refused_before_any_arithmetic(text: str) -> None:
    """Fits the annotation's 16 characters; 10**999999999 would take the webhook's whole CPU (and its 5 s timeout)."""
    with pytest.raises(QuantityError, match="exponent is out of range"):
        parse_quantity(text)


def _pod(annotations: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "shop", "labels": {"meshward.io/inject": "enabled"},
                         "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "x"}]}}


def _resources(pod: dict[str, Any]) -> dict[str, Any]:
    return {c["name"]: c["resources"] for c in pod["spec"]["initContainers"]}


def test_without_annotations_the_sidecars_get_the_meshs_resources() -> None:
    got = _resources(inject(_pod({}), SETTINGS))
    assert got[AGENT] == SETTINGS.agent_resources and got[PROXY] == SETTINGS.proxy_resources


def test_each_annotation_replaces_one_field_and_the_others_stay_the_meshs() -> None:
    settings = InjectSettings(image="x", proxy_resources={"requests": {"cpu": "100m", "memory": "64Mi"},
                                                          "limits": {"cpu": "1", "memory": "256Mi"}})
    got = _resources(inject(_pod({"meshward.io/proxy-memory-limit": "1Gi", "meshward.io/agent-cpu": "250m"}),
                            settings))
    assert got[PROXY] == {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    assert got[AGENT] == {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    assert settings.proxy_resources["limits"]["memory"] == "256Mi", "the mesh's settings are not changed"


def test_every_annotation_reaches_its_container_and_field() -> None:
    annotations = {key: {"cpu": "1", "memory": "1Gi"}[resource] for key, (_, _, resource) in
                   RESOURCE_ANNOTATIONS.items()}
    got = _resources(inject(_pod(annotations), SETTINGS))
    names = {"agent": AGENT, "proxy": PROXY}
    for key, (role, kind, resource) in RESOURCE_ANNOTATIONS.items():
        assert got[names[role]][kind][resource] == annotations[key], key
    assert set(RESOURCE_ANNOTATIONS) == {f"meshward.io/{role}-{resource}{suffix}" for role in ("agent", "proxy")
                                         for resource in ("cpu", "memory") for suffix in ("", "-limit")}


def test_the_bounds_themselves_are_allowed() -> None:
    for key, (_, kind, resource) in RESOURCE_ANNOTATIONS.items():
        least, most = RESOURCE_BOUNDS[kind, resource]
        for value in (least, most):
            # the other side of the pair at its own extreme, so request <= limit holds
            partner = next(k for k, v in RESOURCE_ANNOTATIONS.items() if v[0] == RESOURCE_ANNOTATIONS[key][0]
                           and v[2] == resource and v[1] != kind)
            partner_value = RESOURCE_BOUNDS["limits" if kind == "requests" else "requests", resource][
                1 if kind == "requests" else 0]
            inject(_pod({key: value, partner: partner_value}), SETTINGS)


@pytest.mark.parametrize(("annotation", "value", "says"), [
    ("meshward.io/proxy-memory", "64 Mi", "not a Kubernetes quantity"),
    ("meshward.io/proxy-memory", "64MB", "not a Kubernetes quantity"),
    ("meshward.io/agent-cpu", "half", "not a Kubernetes quantity"),
    ("meshward.io/agent-cpu", "-100m", "negative"),
    ("meshward.io/agent-memory", "1e99999999", "exponent is out of range"),
    ("meshward.io/proxy-cpu", "100m,200m", "2 values; it takes one"),
    ("meshward.io/proxy-memory", "64", "outside 16Mi to 8Gi"),          # 64 bytes: the unit forgotten
    ("meshward.io/proxy-memory-limit", "256m", "outside 96Mi to 8Gi"),  # 0.256 bytes
    ("meshward.io/agent-memory-limit", "64Mi", "outside 96Mi to 8Gi"),  # under the agent's measured ~68 MiB
    ("meshward.io/agent-memory-limit", "64Gi", "outside 96Mi to 8Gi"),  # Gi for Mi
    ("meshward.io/proxy-cpu", "0", "outside 1m to 16"),
    ("meshward.io/proxy-cpu", "100", "outside 1m to 16"),               # 100 cores for 100m
    ("meshward.io/proxy-cpu-limit", "10m", "outside 50m to 16"),        # throttled to nothing
    ("meshward.io/agent-cpu-limit", "1" * 16, "outside 50m to 16"),
    ("meshward.io/agent-cpu-limit", "1" * 17, "17 characters, more than the 16 allowed"),
])
def test_malformed_and_absurd_resources_are_refused_naming_the_annotation(annotation: str, value: str,
                                                                          says: str) -> None:
    with pytest.raises(InjectRefused) as e:
        inject(_pod({annotation: value}), SETTINGS)
    assert f"metadata.annotations[{annotation}]" in str(e.value)
    assert says in str(e.value)


@pytest.mark.parametrize(("annotations", "annotation", "says"), [
    # a request above the mesh's limit (256Mi): the fix is to raise the limit too
    ({"meshward.io/proxy-memory": "512Mi"}, "meshward.io/proxy-memory",
     "above the proxy's memory limit 256Mi (the mesh's, the chart's injection.resources.proxy.limits.memory); set "
     "meshward.io/proxy-memory-limit too"),
    # both given, crossed
    ({"meshward.io/agent-cpu": "1", "meshward.io/agent-cpu-limit": "500m"}, "meshward.io/agent-cpu",
     "1 is above meshward.io/agent-cpu-limit, 500m"),
    ({"meshward.io/agent-memory": "1Gi", "meshward.io/agent-memory-limit": "1000Mi"}, "meshward.io/agent-memory",
     "above meshward.io/agent-memory-limit"),
])
def test_a_request_above_its_limit_is_refused_naming_the_fix(annotations: dict[str, str], annotation: str,
                                                             says: str) -> None:
    """The API server would refuse the pod too, naming a container the app team never wrote; ours names theirs."""
    with pytest.raises(InjectRefused) as e:
        inject(_pod(annotations), SETTINGS)
    assert str(e.value).startswith(f"metadata.annotations[{annotation}]: ")
    assert says in str(e.value)


def test_a_limit_below_the_meshs_request_is_refused_naming_the_request_annotation() -> None:
    settings = InjectSettings(image="x", agent_resources={"requests": {"memory": "200Mi"},
                                                          "limits": {"memory": "1Gi"}})
    with pytest.raises(InjectRefused) as e:
        inject(_pod({"meshward.io/agent-memory-limit": "128Mi"}), settings)
    assert str(e.value).startswith("metadata.annotations[meshward.io/agent-memory-limit]: 128Mi is below the agent's "
                                   "memory request 200Mi")
    assert "set meshward.io/agent-memory too" in str(e.value)
    got = _resources(inject(_pod({"meshward.io/agent-memory-limit": "128Mi", "meshward.io/agent-memory": "100Mi"}),
                            settings))
    assert got[AGENT] == {"requests": {"memory": "100Mi"}, "limits": {"memory": "128Mi"}}


def test_equal_request_and_limit_are_allowed_whatever_their_spelling() -> None:
    """Guaranteed QoS asks for both equal; 1Gi and 1073741824 and 1024Mi are the same amount to the API server."""
    got = _resources(inject(_pod({"meshward.io/proxy-memory": "1073741824", "meshward.io/proxy-memory-limit": "1024Mi",
                                  "meshward.io/proxy-cpu": "0.5", "meshward.io/proxy-cpu-limit": "500m"}), SETTINGS))
    assert got[PROXY] == {"requests": {"cpu": "0.5", "memory": "1073741824"},
                          "limits": {"cpu": "500m", "memory": "1024Mi"}}


def test_a_second_pass_keeps_the_workloads_resources() -> None:
    once = inject(_pod({"meshward.io/proxy-cpu": "300m"}), SETTINGS)
    assert inject(once, SETTINGS) == once


def _args(resources: str) -> Any:
    return _parser().parse_args(["--inject-image", "x", "--inject-resources", resources])


def test_the_meshs_resources_come_from_the_chart() -> None:
    settings = _inject_settings(_args('{"proxy": {"requests": {"cpu": "100m"}, "limits": {"cpu": "1"}}}'))
    assert settings.proxy_resources == {"requests": {"cpu": "100m"}, "limits": {"cpu": "1"}}
    assert settings.agent_resources == SETTINGS.agent_resources


@pytest.mark.parametrize(("resources", "says"), [
    ('{"agent": {"requests": {"memory": "64 Mi"}}}', "agent.requests.memory: '64 Mi' is not a Kubernetes quantity"),
    ('{"proxy": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}', "proxy.requests.cpu: above proxy.limits.cpu"),
    ('{"init": {"requests": ["cpu"]}}', "init.requests: want an object"),
    ('{"init": "small"}', "init: want an object"),
])
def test_the_operator_refuses_to_start_with_unusable_mesh_resources(resources: str, says: str) -> None:
    """Else every opted-in pod would be refused by the API server, one at a time, at its creation."""
    with pytest.raises(SystemExit) as e:
        _inject_settings(_args(resources))
    assert says in str(e.value) and "--inject-resources" in str(e.value)
