"""The agent: the config in force, hot reload, and the pipeline built from it.

An invalid new config (bad YAML, a field that fails validation, CEL that does not
compile) is rejected, logged and counted, and the last good config stays in force.
Reading, parsing, validating and compiling a new config run in a worker thread: the
event loop that does it also answers Envoy's ext_authz checks, and Envoy fails closed
after 0.5 s, while a 3 MiB config once took seconds to parse (issue 21). Only the swap
of the pipeline (and the key store's issuer set, whose fetchers belong to the loop)
happens on the loop, at once, so a check sees the old config or the new one; the replaced
one is freed in the worker, a piece at a time.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from meshward.sidecar.config.schema import ConfigError, parse_config
from meshward.sidecar.domain.snapshot import Snapshot, compile_snapshot, pieces
from meshward.sidecar.engines.context import ContextKeys, ContextService
from meshward.sidecar.engines.keystore import Fetcher, KeyStore
from meshward.sidecar.engines.observe import Metrics
from meshward.sidecar.engines.pipeline import AuditSink, Pipeline, decision_ids
from meshward.sidecar.engines.token_cache import TokenCache

log = logging.getLogger("meshward.sidecar.agent")
T = TypeVar("T")
# How long the event loop's thread waits for the GIL, at most, each time it needs it while a config compiles in
# the worker (the entry point sets it for the process). CPython's 5 ms is paid at every socket call of every
# check: the loop's wake-ups ran 77 ms late at p99 during a 3 MiB compile, 7 ms with 0.5 ms. It costs nothing
# while only one thread runs.
GIL_SWITCH_INTERVAL_S = 0.0005
# The longest the worker sleeps between two generated rule functions of a config it compiles (see _pacer).
PACE_MAX_S = 0.005
# How the agent runs a slow pure function away from the loop: fn(*args) awaited (tests inject their own).
Offload = Callable[..., Awaitable[Any]]


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` in the default executor's worker thread."""
    return await asyncio.to_thread(fn, *args)


class ConfigRejected(Exception):
    """A config document was not accepted; the previous one stays in force."""


def _pacer() -> Callable[[], None]:
    """A pause that sleeps as long as the work since the previous one (at most PACE_MAX_S): a 50 % duty cycle.

    Each generated rule function of a large config is one `compile()` of 100 rules, ~2.5 ms holding the GIL;
    back to back, they left the event loop waiting that long for the GIL at every socket call: it answered fewer
    checks than arrived, and 400 checks/s queued up to 0.3-0.5 s by the end of a 3 MiB compile (issue 21).
    Sleeping between them gives the loop the GIL for as long; that phase of the compile takes twice as long.
    Smaller functions would hold it less, but cost the hot path a call per function.
    """
    last = time.perf_counter()

    def pause() -> None:
        nonlocal last
        time.sleep(min(time.perf_counter() - last, PACE_MAX_S))
        last = time.perf_counter()

    return pause


def compile_config(doc: Any) -> Snapshot:
    """Validate and compile a decoded config document, or raise ConfigRejected naming the field."""
    try:
        return compile_snapshot(parse_config(doc), _pacer())
    except ConfigError as e:
        raise ConfigRejected(str(e)) from e


def load_snapshot(text: str) -> Snapshot:
    """Parse YAML or JSON text into a compiled snapshot, or raise ConfigRejected naming the field."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigRejected(f"not valid YAML/JSON: {e}") from e
    return compile_config(doc)


def _without_gc(load: Callable[[T], Snapshot], source: T) -> Snapshot:
    """`load(source)` with the cyclic GC paused (for the whole process) while it runs; what it built, frozen.

    Each full collection scans the config being built while holding the GIL, ~0.1 s for a 3 MiB one, several
    per compile: as long a stall of the loop as if it compiled there. Once built, the snapshot is moved out of
    the collector's generations (`gc.freeze`, as the entry point does with the start-up objects): otherwise
    the first young collection after the pause scans all of it (everything allocated while paused sits in
    the youngest generation), and a full collection follows once it reaches the oldest. Freezing is safe to
    repeat because a snapshot holds no reference cycles: a replaced one is freed by reference counting, frozen
    or not (tests/unit/test_subscription_loop.py). Cyclic garbage the loop made meanwhile is frozen with it
    and never freed: a few objects per push (docs/performance.md).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        snapshot = load(source)
        gc.freeze()
        return snapshot
    finally:
        if enabled:
            gc.enable()


def _release(replaced: list[Pipeline]) -> None:
    """Free replaced pipelines a piece at a time: their rules, constants and code, then the rest.

    Reference counting frees a dropped config at once, in one C cascade that holds the GIL throughout: ~0.1 s
    for a 3 MiB config (mostly its RE2 automata and CEL programs), on whichever thread drops it. Popped one by
    one here, in the worker, each piece costs microseconds and the loop gets the GIL back between them. A check
    still holding the old pipeline (one awaiting a JWKS fetch) keeps it whole; its last reference frees it.
    """
    parts = [p for pipeline in replaced for p in pieces(pipeline.snapshot)]
    replaced.clear()
    while parts:
        parts.pop()


def _load_file(data: bytes) -> Snapshot:
    """A config file's bytes compiled (undecodable bytes become U+FFFD, which validation then names)."""
    return load_snapshot(data.decode("utf-8", "replace"))


class Agent:
    """Owns the pipeline in force and swaps it atomically on reload."""

    def __init__(self, snapshot: Snapshot, fetcher: Fetcher, metrics: Metrics, audit: AuditSink,
                 clock: Callable[[], float] = time.time, *, awaiting: str | None = None,
                 context_keys: ContextKeys | None = None, offload: Offload = in_thread) -> None:
        """Own `snapshot`; with `awaiting` (why there is no config yet), answer 503 until the first reload.

        An agent that has not heard from the operator cannot decide: its requests are unavailable, never a
        403 the policy might not mean. With `context_keys` (a workload certificate) it verifies and mints
        context tokens. `offload` runs the parsing and compiling of new configs away from the loop.
        """
        self._offload = offload
        # Reloads (the subscription's, the file's) are adopted one at a time, in the order they were asked
        # for: one finishing its compile early must not be overtaken by an older one finishing late.
        self._reloading = asyncio.Lock()
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

    async def apply(self, doc: Any) -> None:
        """Adopt a decoded config document (as received), or raise ConfigRejected and keep the current one."""
        await self._adopt(compile_config, doc)

    async def reload(self, text: str) -> None:
        """Adopt a new config text (YAML or JSON), or raise ConfigRejected and keep the current one."""
        await self._adopt(load_snapshot, text)

    async def _adopt(self, load: Callable[[T], Snapshot], source: T) -> None:
        """Compile `source` with `load` in the worker, then swap the pipeline on the loop."""
        async with self._reloading:
            try:
                snapshot = await self._offload(_without_gc, load, source)
            except ConfigRejected as e:
                self._metrics.reloaded(False)
                log.error("config rejected, keeping generation %r in force: %s",  # noqa: TRY400 - the message is the news
                          self.pipeline.snapshot.config.generation, e)
                raise
            self.keys.update(snapshot.issuers, snapshot.config.jwks)
            replaced = [self.pipeline]
            self.pipeline = self._build(snapshot)
            self._metrics.reloaded(True, snapshot.config.generation)
            log.info("config generation %r in force", snapshot.config.generation)
            await self._offload(_release, replaced)

    @property
    def ready(self) -> bool:
        """Ready once every issuer's keys were fetched once."""
        return self.keys.ready

    def readiness(self) -> str:
        """A JSON summary for /readyz."""
        return json.dumps({"ready": self.ready, "generation": self.pipeline.snapshot.config.generation,
                           "issuers": self.keys.status()})

    async def watch(self, path: Path, interval: float = 1.0) -> None:
        """Reload `path` whenever its content changes, until cancelled (reading and parsing off the loop)."""
        last = await self._offload(path.read_bytes)
        while True:
            await asyncio.sleep(interval)
            try:
                data = await self._offload(path.read_bytes)
            except OSError as e:
                log.error("cannot read config %s (keeping the last good one): %s", path, e)  # noqa: TRY400
                continue
            if data == last:
                continue
            last = data
            try:
                await self._adopt(_load_file, data)
            except ConfigRejected:
                continue
            except Exception:  # a bug must not end hot reload; the last good config stays in force
                log.exception("reloading config %s failed; keeping the last good one", path)


