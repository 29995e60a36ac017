"""Many subscribers in one process: the agent's own subscription engine and config loader, N times.

Used by the 50-subscriber propagation test and the 200-subscriber benchmark, where N
agent processes would measure process start-up instead of propagation. Each
subscriber is a real `PolicySubscription` with its own `Agent` (the same parser and
compiler as `meshward-sidecar`), on one event loop in a background thread, over the
real network to the real operator with a real workload certificate.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from meshward.sidecar.clients.policy import PolicyClient
from meshward.sidecar.domain.certificate import build_csr, key_pem, new_key
from meshward.sidecar.engines.agent import Agent, load_snapshot
from meshward.sidecar.engines.observe import JsonLineAudit, Metrics
from meshward.sidecar.engines.subscription import PolicySubscription

PLACEHOLDER = {"apiVersion": "sidecar.meshward.io/v1alpha1", "kind": "SidecarConfig", "workload": "fleet",
               "policies": []}


class _NoFetch:
    async def get(self, url: str, *, ca_file: str | None, timeout: float) -> bytes:
        raise OSError("the fleet does not fetch JWKS")


async def sign(signer: str, server_name: str, bundle: bytes, token: str, spiffe: str) -> tuple[bytes, bytes, bytes]:
    """(key, chain, bundle) for `spiffe` from the operator's signing service."""
    key = new_key()
    creds = grpc.ssl_channel_credentials(root_certificates=bundle)
    async with grpc.aio.secure_channel(signer, creds, options=[("grpc.ssl_target_name_override", server_name)]) as ch:
        call = ch.unary_unary("/meshward.identity.v1.Identity/Sign",
                              request_serializer=lambda d: json.dumps(d).encode(), response_deserializer=json.loads)
        doc = await call({"csr": build_csr(key, spiffe).decode()}, metadata=(("authorization", f"Bearer {token}"),))
    return key_pem(key), doc["certificateChain"].encode(), doc["trustBundle"].encode()


class Fleet:
    """N subscribed agents; records when each applied a config in which `marker(config)` holds."""

    def __init__(self, address: str, server_name: str, pods: list[str],
                 credentials: tuple[bytes, bytes, bytes] | Mapping[str, tuple[bytes, bytes, bytes]],
                 tokens: Mapping[str, str], clock: Callable[[], float] = time.monotonic) -> None:
        """`credentials`: (key, chain, bundle) for every pod, or per pod (pods of several namespaces)."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.clock = clock
        self.applied: dict[str, list[tuple[float, dict[str, Any]]]] = {p: [] for p in pods}
        self.subs: list[PolicySubscription] = []
        for pod in pods:
            key, chain, bundle = credentials if isinstance(credentials, tuple) else credentials[pod]
            registry = CollectorRegistry()
            agent = Agent(load_snapshot(json.dumps(PLACEHOLDER)), _NoFetch(), Metrics(registry),
                          JsonLineAudit(io.StringIO()))
            self._record(agent, pod)
            client = PolicyClient(address, server_name, functools.partial(lambda *c: c, bundle, key, chain),
                                  functools.partial(str, tokens[pod]))
            self.subs.append(PolicySubscription(client, agent, pod, registry))
        self.thread.start()
        self.tasks = [asyncio.run_coroutine_threadsafe(s.run(), self.loop) for s in self.subs]

    def _record(self, agent: Agent, pod: str) -> None:
        apply = agent.apply

        async def recording(doc: Any) -> None:
            await apply(doc)
            self.applied[pod].append((self.clock(), doc))

        agent.apply = recording  # type: ignore[method-assign]

    def first_time(self, pod: str, marker: Callable[[dict[str, Any]], bool]) -> float | None:
        """When `pod` first applied a config satisfying `marker`."""
        return next((t for t, doc in list(self.applied[pod]) if marker(doc)), None)

    def all_applied(self, marker: Callable[[dict[str, Any]], bool]) -> bool:
        """Whether every subscriber applied such a config."""
        return all(self.first_time(p, marker) is not None for p in self.applied)

    def close(self) -> None:
        for t in self.tasks:
            self.loop.call_soon_threadsafe(t.cancel)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def pod_tokens(kubeconfig: str, namespace: str, service_account: str, pods: list[str]) -> dict[str, str]:
    """A projected-style token per pod: audience meshward, bound to the pod (as kubelet mounts it)."""
    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(kubeconfig))  # type: ignore[no-untyped-call]
    out: dict[str, str] = {}
    for pod in pods:
        uid = core.read_namespaced_pod(pod, namespace).metadata.uid  # type: ignore[union-attr]
        body = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=["meshward"], expiration_seconds=3600,
            bound_object_ref=client.V1BoundObjectReference(kind="Pod", api_version="v1", name=pod, uid=uid)))
        status = core.create_namespaced_service_account_token(service_account, namespace, body).status
        out[pod] = str(status.token)  # type: ignore[union-attr]
    return out


def has_rule(name: str) -> Callable[[dict[str, Any]], bool]:
    """A marker: the config has a rule called `name`."""
    return lambda doc: any(r.get("name") == name for p in doc.get("policies", []) for r in p.get("rules", []))


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]
