"""The agent: the config in force, hot reload, and the pipeline built from it.

An invalid new config (bad YAML, a field that fails validation, CEL that does not
compile) is rejected, logged and counted, and the last good config stays in force.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from meshward.sidecar.config.schema import ConfigError, parse_config
from meshward.sidecar.domain.snapshot import Snapshot, compile_snapshot
from meshward.sidecar.engines.context import ContextKeys, ContextService
from meshward.sidecar.engines.keystore import Fetcher, KeyStore
from meshward.sidecar.engines.observe import Metrics
from meshward.sidecar.engines.pipeline import AuditSink, Pipeline, decision_ids
from meshward.sidecar.engines.token_cache import TokenCache

log = logging.getLogger("meshward.sidecar.agent")


class ConfigRejected(Exception):
    """A config document was not accepted; the previous one stays in force."""


def load_snapshot(text: str) -> Snapshot:
    """Parse YAML or JSON text into a compiled snapshot, or raise ConfigRejected naming the field."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigRejected(f"not valid YAML/JSON: {e}") from e
    try:
        return compile_snapshot(parse_config(doc))
    except ConfigError as e:
        raise ConfigRejected(str(e)) from e


class Agent:
    """Owns the pipeline in force and swaps it atomically on reload."""

    def __init__(self, snapshot: Snapshot, fetcher: Fetcher, metrics: Metrics, audit: AuditSink,
                 clock: Callable[[], float] = time.time, *, awaiting: str | None = None,
                 context_keys: ContextKeys | None = None) -> None:
        """Own `snapshot`; with `awaiting` (why there is no config yet), answer 503 until the first reload.

        An agent that has not heard from the operator cannot decide: its requests are unavailable, never a
        403 the policy might not mean. With `context_keys` (a workload certificate) it verifies and mints
        context tokens.
        """
        self._context_keys = context_keys
        self._metrics = metrics
        self._audit = audit
        self._clock = clock
        self._ids = decision_ids()
        self.keys = KeyStore(snapshot.issuers, snapshot.config.jwks, fetcher, clock, metrics.jwks_fetched)
        self.pipeline = self._build(snapshot, awaiting)
        metrics.reloaded(True, snapshot.config.generation)
        metrics.cache_size_gauge(lambda: len(self._cache))

    def _build(self, snapshot: Snapshot, unavailable: str | None = None) -> Pipeline:
        self._cache = TokenCache(snapshot.config.token_cache_size, self._clock, self.keys.generation)
        context = ContextService(self._context_keys, self._clock) if self._context_keys is not None else None
        return Pipeline(snapshot, self.keys, self._cache, clock=self._clock, ids=self._ids,
                        audit=self._audit, observer=self._metrics, unavailable=unavailable, context=context)

    def reload(self, text: str) -> None:
        """Adopt a new config text, or raise ConfigRejected and keep the current one."""
        try:
            snapshot = load_snapshot(text)
        except ConfigRejected as e:
            self._metrics.reloaded(False)
            log.error("config rejected, keeping generation %r in force: %s",  # noqa: TRY400 - the message is the news
                      self.pipeline.snapshot.config.generation, e)
            raise
        self.keys.update(snapshot.issuers, snapshot.config.jwks)
        self.pipeline = self._build(snapshot)
        self._metrics.reloaded(True, snapshot.config.generation)
        log.info("config generation %r in force", snapshot.config.generation)

    @property
    def ready(self) -> bool:
        """Ready once every issuer's keys were fetched once."""
        return self.keys.ready

    def readiness(self) -> str:
        """A JSON summary for /readyz."""
        return json.dumps({"ready": self.ready, "generation": self.pipeline.snapshot.config.generation,
                           "issuers": self.keys.status()})

    async def watch(self, path: Path, interval: float = 1.0) -> None:
        """Reload `path` whenever its content changes, until cancelled."""
        last = path.read_bytes()
        while True:
            await asyncio.sleep(interval)
            try:
                data = path.read_bytes()
            except OSError as e:
                log.error("cannot read config %s (keeping the last good one): %s", path, e)  # noqa: TRY400
                continue
            if data == last:
                continue
            last = data
            try:
                self.reload(data.decode("utf-8", "replace"))
            except ConfigRejected:
                continue
            except Exception:  # a bug must not end hot reload; the last good config stays in force
                log.exception("reloading config %s failed; keeping the last good one", path)


