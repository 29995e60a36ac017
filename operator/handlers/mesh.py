"""The mesh's watches: pods, Services and Namespaces (egress) feed the map; pods and Namespaces the safety net.

Thin: each event goes straight into the engines (engines/mesh_directory.py,
engines/safety_net.py). Kopf serves this pod handler and the policy plane's from one
watch of pods.
"""

from __future__ import annotations

from typing import Any

import kopf

from meshward.operator.engines.mesh_directory import MeshDirectory
from meshward.operator.engines.safety_net import SafetyNet


def register(registry: kopf.OperatorRegistry, directory: MeshDirectory, safety: SafetyNet) -> None:
    """Register the mesh's watches on `registry`."""

    @kopf.on.event("", "v1", "pods", id="mesh-pods", registry=registry)
    async def pod_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        meta = body.get("metadata", {})
        if type == "DELETED":
            directory.remove_pod(meta.get("namespace", ""), meta.get("name", ""))
        else:
            directory.apply_pod(body)
        safety.apply_pod(body, deleted=type == "DELETED")

    @kopf.on.event("", "v1", "services", id="mesh-services", registry=registry)
    async def service_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        meta = body.get("metadata", {})
        if type == "DELETED":
            directory.remove_service(meta.get("namespace", ""), meta.get("name", ""))
        else:
            directory.apply_service(body)

    @kopf.on.event("", "v1", "namespaces", id="mesh-namespaces", registry=registry)
    async def namespace_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        safety.apply_namespace(body, deleted=type == "DELETED")
        if type == "DELETED":
            directory.remove_namespace(body.get("metadata", {}).get("name", ""))
        else:
            directory.apply_namespace(body)
