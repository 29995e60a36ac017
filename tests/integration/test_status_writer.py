"""The StatusWriter against a real API server: writes, Events once per transition, deleted objects."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping
from typing import Any

import pytest

from meshward.operator.clients.kube import KubeClient
from meshward.operator.engines.status_writer import EventNote, Report, StatusWriter
from tests.kube import Cluster

pytestmark = pytest.mark.integration
API = "meshward.io/v1alpha1"


def _policy(ns: str, name: str) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "AuthPolicy", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": "x"}}, "rules": [{"name": "r", "to": {"methods": ["GET"]}}]}}


class Target:
    """A report function that wants Ready to carry `reason`, with an Event when the reason changes."""

    def __init__(self) -> None:
        self.reason = "Enforced"
        self.calls = 0

    async def __call__(self, body: Mapping[str, Any]) -> Report:
        self.calls += 1
        old: dict[str, Any] = next((c for c in (body.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), {})
        if old.get("reason") == self.reason:
            return Report()
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        cond = {"type": "Ready", "status": "True", "reason": self.reason, "message": "m", "lastTransitionTime": now}
        return Report({"conditions": [cond]}, (EventNote("Normal", self.reason, f"now {self.reason}"),))


def _events(c: Cluster, ns: str, name: str) -> list[str]:
    return [e["reason"] for e in c.get_json("-n", ns, "events")["items"] if e["involvedObject"]["name"] == name]


def test_a_late_watch_event_does_not_repeat_a_write_or_its_event(crds: Cluster, namespace: str) -> None:
    crds.apply(_policy(namespace, "p"))
    stale = crds.get_json("-n", namespace, "authpolicy", "p")  # as the watch saw it before any status
    target = Target()
    writer = StatusWriter("AuthPolicy", "authpolicies", KubeClient.from_kubeconfig(str(crds.kubeconfig)), target, 60)

    async def scenario() -> None:
        writer.seen(stale)
        assert await writer.tick() == 1
        writer.seen(stale)  # the watch delivers the pre-write body after the write returned
        assert await writer.tick() == 0
        target.reason = "WorkloadsLagging"
        assert await writer.tick() == 1

    asyncio.run(scenario())
    got = crds.get_json("-n", namespace, "authpolicy", "p")
    assert got["status"]["conditions"][0]["reason"] == "WorkloadsLagging"
    assert got["metadata"]["uid"] == stale["metadata"]["uid"]
    assert sorted(_events(crds, namespace, "p")) == ["Enforced", "WorkloadsLagging"]  # one per transition


def test_an_object_deleted_before_its_write_is_skipped_and_forgotten_ones_are_not_reported(
        crds: Cluster, namespace: str) -> None:
    crds.apply(_policy(namespace, "gone"), _policy(namespace, "forgotten"))
    gone = crds.get_json("-n", namespace, "authpolicy", "gone")
    forgotten = crds.get_json("-n", namespace, "authpolicy", "forgotten")
    crds.kubectl("-n", namespace, "delete", "authpolicy", "gone")
    target = Target()
    writer = StatusWriter("AuthPolicy", "authpolicies", KubeClient.from_kubeconfig(str(crds.kubeconfig)), target, 60)

    async def scenario() -> None:
        writer.seen(gone)
        writer.seen(forgotten)
        writer.forget(namespace, "forgotten")
        assert await writer.tick() == 0  # 404 on the status write: skipped, no Event, no error

    asyncio.run(scenario())
    assert target.calls == 1
    assert _events(crds, namespace, "gone") == []
    assert "status" not in crds.get_json("-n", namespace, "authpolicy", "forgotten")


def test_events_about_cluster_scoped_objects_go_to_the_default_namespace(crds: Cluster) -> None:
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    name = f"sw-{dt.datetime.now(dt.UTC).strftime('%H%M%S%f')}"
    crds.apply({"apiVersion": API, "kind": "Revocation", "metadata": {"name": name},
                "spec": {"entries": [{"sub": "mallory", "expiresAt": expires}]}})
    body = crds.get_json("revocation", name)
    writer = StatusWriter("Revocation", "revocations", KubeClient.from_kubeconfig(str(crds.kubeconfig)),
                          Target(), 60)

    async def scenario() -> None:
        writer.seen(body)
        assert await writer.tick() == 1

    try:
        asyncio.run(scenario())
        assert crds.get_json("revocation", name)["status"]["conditions"][0]["reason"] == "Enforced"
        ev = [e for e in crds.get_json("-n", "default", "events")["items"] if e["involvedObject"]["name"] == name]
        assert [(e["reason"], e["involvedObject"]["apiVersion"], e["involvedObject"]["uid"]) for e in ev] == [
            ("Enforced", API, body["metadata"]["uid"])]
    finally:
        crds.kubectl("delete", "revocation", name)


def test_one_failing_report_does_not_stop_the_others(crds: Cluster, namespace: str) -> None:
    crds.apply(_policy(namespace, "a-broken"), _policy(namespace, "b-fine"))
    bodies = [crds.get_json("-n", namespace, "authpolicy", n) for n in ("a-broken", "b-fine")]
    target = Target()

    async def report(body: Mapping[str, Any]) -> Report:
        if body["metadata"]["name"] == "a-broken":
            raise ValueError("a bug in one report")
        return await target(body)

    writer = StatusWriter("AuthPolicy", "authpolicies", KubeClient.from_kubeconfig(str(crds.kubeconfig)), report, 60)

    async def scenario() -> None:
        for b in bodies:
            writer.seen(b)
        assert await writer.tick() == 1

    asyncio.run(scenario())
    assert crds.get_json("-n", namespace, "authpolicy", "b-fine")["status"]["conditions"][0]["reason"] == "Enforced"
