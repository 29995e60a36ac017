"""Builders for sidecar configs and in-process pipelines (real keys, real verification)."""

from __future__ import annotations

import asyncio
import io
import json
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from meshward.sidecar.config.schema import API_VERSION, KIND, parse_config
from meshward.sidecar.domain.request import CheckInput
from meshward.sidecar.domain.snapshot import compile_snapshot
from meshward.sidecar.engines.keystore import KeyStore
from meshward.sidecar.engines.observe import JsonLineAudit, Metrics
from meshward.sidecar.engines.pipeline import Pipeline, decision_ids
from meshward.sidecar.engines.token_cache import TokenCache

ISSUER = "https://idp.example.com"


def config(*policies: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "workload": "shop/orders", "policies": list(policies), **extra}


def policy(name: str = "orders-api", *, jwt: list[dict[str, Any]] | None = None, rules: list[dict[str, Any]] | None = None,
           **extra: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"name": name, "rules": rules or []}
    if jwt is not None:
        p["jwt"] = jwt
    p.update(extra)
    return p


def issuer(iss: str = ISSUER, **extra: Any) -> dict[str, Any]:
    return {"issuer": iss, "audiences": ["orders"], "jwksUri": f"{iss}/jwks.json", **extra}


class StaticFetcher:
    """Serves fixed documents by URL: for in-process pipelines whose keys the test holds (no network)."""

    def __init__(self, docs: dict[str, bytes]) -> None:
        self.docs = docs

    async def get(self, url: str, *, ca_file: str | None, timeout: float) -> bytes:
        from meshward.sidecar.clients.errors import FetchError

        if url not in self.docs:
            raise FetchError(f"GET {url}: 404")
        return self.docs[url]


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """A real pipeline and the collaborators it was built with (for tests that need one of them)."""

    pipeline: Pipeline
    audit: io.StringIO
    metrics: Metrics
    keys: KeyStore
    fetcher: StaticFetcher
    clock: Clock


def harness(cfg: dict[str, Any], jwks: dict[str, list[dict[str, Any]]] | None = None, clock: Clock | None = None,
            *, kids_just_refetched: bool = False, authorizer: Any = None, context: Any = None) -> Harness:
    """A real pipeline whose key store fetched `jwks` (issuer -> JWK list) through its own fetch path.

    `kids_just_refetched`: an unknown-kid refetch just happened for every issuer, so another one is rate-limited
    and `decide_now` answers at once (what attack tests need).
    """
    clock = clock or Clock()
    snap = compile_snapshot(parse_config(cfg))
    docs = {f"{iss}/jwks.json": json.dumps({"keys": keys}).encode() for iss, keys in (jwks or {}).items()}
    fetcher = StaticFetcher(docs)
    keys = KeyStore(snap.issuers, snap.config.jwks, fetcher, clock)
    for iss in jwks or {}:
        assert asyncio.run(keys.refresh(iss)), keys.status()[iss]
        if kids_just_refetched:
            asyncio.run(keys.refetch_for_unknown_kid(iss))
    audit = io.StringIO()
    metrics = Metrics(CollectorRegistry())
    cache = TokenCache(snap.config.token_cache_size, clock, keys.generation)
    p = Pipeline(snap, keys, cache, clock=clock, ids=decision_ids(), audit=JsonLineAudit(audit), observer=metrics,
                 authorizer=authorizer, context=context)
    return Harness(p, audit, metrics, keys, fetcher, clock)


def pipeline(cfg: dict[str, Any], jwks: dict[str, list[dict[str, Any]]] | None = None,
             clock: Clock | None = None) -> tuple[Pipeline, io.StringIO, Metrics]:
    """A real pipeline whose key store was loaded from `jwks` (issuer -> JWK list), its audit stream and metrics."""
    h = harness(cfg, jwks, clock)
    return h.pipeline, h.audit, h.metrics


def request(path: str = "/orders/1", method: str = "GET", token: str | None = None, peer: str | None = None,
            **headers: str) -> CheckInput:
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    return CheckInput(method=method, path=path, host="orders.shop", headers=h, peer=peer, request_id="r1", port=8080)
