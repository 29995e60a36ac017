"""The agent's policy subscription loop survives what it does not expect, keeping its config; a new config is
compiled away from the event loop that answers Envoy's checks (issue 21), from the document as received."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from meshward.sidecar.clients.policy import PolicyStreamError, decode
from meshward.sidecar.domain.decision import Outcome
from meshward.sidecar.domain.policy import RULES_PER_FUNCTION
from meshward.sidecar.domain.request import CheckInput
from meshward.sidecar.engines import agent as agent_module
from meshward.sidecar.engines.agent import Agent, load_snapshot
from meshward.sidecar.engines.observe import JsonLineAudit, Metrics
from meshward.sidecar.engines.subscription import PolicySubscription

CONFIG = {"apiVersion": "sidecar.meshward.io/v1alpha1", "kind": "SidecarConfig", "workload": "shop/orders-1",
          "policies": [{"name": "p", "rules": [{"name": "r", "to": {"paths": ["/orders/*"]}}]}]}


class _NoFetch:
    async def get(self, url: str, *, ca_file: str | None, timeout: float) -> bytes:
        raise OSError("no JWKS in this test")


class FlakyClient:
    """Stands in for PolicyClient (whose real failures are PolicyStreamError): the first stream raises an
    unexpected error, as a bug would; the second delivers a config and then ends."""

    def __init__(self) -> None:
        self.calls = 0

    async def subscribe(self, pod: str, apply: Callable[[str, dict[str, Any]], Awaitable[str | None]],
                        connected: Callable[[], None], destinations: Callable[[Any], object] | None = None) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug")
        connected()
        await apply("v1", CONFIG)


def test_an_unexpected_stream_error_does_not_end_the_subscription() -> None:
    async def scenario() -> tuple[int, str | None]:
        registry = CollectorRegistry()
        agent = Agent(load_snapshot(json.dumps({**CONFIG, "policies": []})), _NoFetch(), Metrics(registry),
                      JsonLineAudit(io.StringIO()))
        client = FlakyClient()
        sub = PolicySubscription(client, agent, "orders-1", registry)  # type: ignore[arg-type]
        runner = asyncio.create_task(sub.run())
        try:
            deadline = time.monotonic() + 10
            while sub.version is None and time.monotonic() < deadline and not runner.done():
                await asyncio.sleep(0.01)
            return client.calls, sub.version
        finally:
            runner.cancel()

    calls, version = asyncio.run(scenario())
    assert calls >= 2 and version == "v1"


class ExhaustedClient:
    """Every stream fails as one carrying a message over gRPC's limit did (issue 18)."""

    def __init__(self) -> None:
        self.calls = 0

    async def subscribe(self, pod: str, apply: Callable[[str, dict[str, Any]], Awaitable[str | None]],
                        connected: Callable[[], None], destinations: Callable[[Any], object] | None = None) -> None:
        self.calls += 1
        raise PolicyStreamError("RESOURCE_EXHAUSTED", "Received message larger than max (6497576 vs. 4194304)")


def test_an_agent_whose_stream_keeps_failing_says_so_in_its_metrics() -> None:
    async def scenario() -> CollectorRegistry:
        registry = CollectorRegistry()
        agent = Agent(load_snapshot(json.dumps(CONFIG)), _NoFetch(), Metrics(registry), JsonLineAudit(io.StringIO()))
        client = ExhaustedClient()
        sub = PolicySubscription(client, agent, "orders-1", registry)  # type: ignore[arg-type]
        runner = asyncio.create_task(sub.run())
        try:
            deadline = time.monotonic() + 10
            while client.calls < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return registry
        finally:
            runner.cancel()

    registry = asyncio.run(scenario())
    assert (registry.get_sample_value("meshward_policy_stream_errors_total", {"code": "RESOURCE_EXHAUSTED"}) or 0) >= 2
    assert registry.get_sample_value("meshward_policy_connected") == 0


def test_until_its_first_config_an_agent_answers_unavailable_not_forbidden() -> None:
    """A restarted agent that has not heard from the operator cannot decide: 503, which clients retry, never a
    403 the policy might not mean; its first config ends that."""
    registry = CollectorRegistry()
    awaiting = load_snapshot(json.dumps({**CONFIG, "policies": [{"name": "p", "rules": []}]}))
    agent = Agent(awaiting, _NoFetch(), Metrics(registry), JsonLineAudit(io.StringIO()), awaiting="no policy yet")
    first = agent.pipeline.decide_now(CheckInput("GET", "/orders/1"), "http")
    assert first.outcome is Outcome.UNAVAILABLE and first.reason == "no policy yet"  # type: ignore[union-attr]
    asyncio.run(agent.reload(json.dumps(CONFIG)))
    after = agent.pipeline.decide_now(CheckInput("GET", "/orders/1"), "http")
    assert after.outcome is Outcome.ALLOW  # type: ignore[union-attr]


_COMPILE = agent_module.compile_config  # the real one, whatever a test patches
DENY_ALL = {**CONFIG, "generation": "deny-all", "policies": [{"name": "p", "rules": []}]}


def _agent(config: dict[str, Any] = DENY_ALL) -> tuple[Agent, CollectorRegistry]:
    registry = CollectorRegistry()
    return Agent(_COMPILE(config), _NoFetch(), Metrics(registry), JsonLineAudit(io.StringIO())), registry


def _outcome(agent: Agent) -> Outcome:
    decision = agent.pipeline.decide_now(CheckInput("GET", "/orders/1"), "http")
    return decision.outcome  # type: ignore[union-attr]


def test_a_pushed_config_is_compiled_while_the_loop_keeps_deciding_with_the_old_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A large push (3 MiB: seconds of parsing) used to run on the loop that answers Envoy, which fails closed
    after 0.5 s. The compile now waits until the loop has decided a check, with the config still in force; had it
    run on the loop, that would deadlock (and the assertion in the worker fail)."""
    decided: list[Outcome] = []
    loop_decided = threading.Event()
    real = agent_module.compile_config

    def compile_config(doc: Any) -> Any:
        assert loop_decided.wait(10), "the event loop decided nothing while the config was being compiled"
        return real(doc)

    monkeypatch.setattr(agent_module, "compile_config", compile_config)

    async def scenario() -> tuple[str | None, Outcome]:
        agent, registry = _agent()
        sub = PolicySubscription(None, agent, "orders-1", registry)  # type: ignore[arg-type]

        def decide() -> None:
            decided.append(_outcome(agent))
            loop_decided.set()
        asyncio.get_running_loop().call_later(0.05, decide)
        error = await asyncio.wait_for(sub._apply("v2", {**CONFIG, "generation": "v2"}), 20)
        return error, _outcome(agent)

    error, after = asyncio.run(scenario())
    assert error is None and decided == [Outcome.FORBIDDEN] and after is Outcome.ALLOW


def test_a_config_from_the_operator_is_applied_as_received_never_through_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's dict was turned into JSON and parsed again with PyYAML (0.86 s for 250 KB, against 3 ms
    for json.loads): the document received is validated as it is."""
    def no_yaml(_text: Any) -> Any:
        raise AssertionError("a received config went through YAML")

    monkeypatch.setattr("meshward.sidecar.engines.agent.yaml.safe_load", no_yaml)

    async def scenario() -> tuple[str | None, str | None, Outcome, float | None]:
        agent, registry = _agent()
        sub = PolicySubscription(None, agent, "orders-1", registry)  # type: ignore[arg-type]
        error = await sub._apply("v2", {**CONFIG, "generation": "v2"})
        return error, sub.version, _outcome(agent), registry.get_sample_value("meshward_policy_snapshots_total",
                                                                               {"result": "applied"})

    assert asyncio.run(scenario()) == (None, "v2", Outcome.ALLOW, 1.0)


def test_a_rejected_push_is_acknowledged_with_the_field_and_the_last_good_config_stays() -> None:
    """Unchanged by compiling in a worker: CEL that does not compile is the error the operator is sent back
    (naming the rule), the version and the pipeline in force stay, and the next good config is adopted."""
    async def scenario() -> None:
        agent, registry = _agent(CONFIG)
        sub = PolicySubscription(None, agent, "orders-1", registry)  # type: ignore[arg-type]
        assert await sub._apply("v1", CONFIG) is None
        in_force = agent.pipeline
        bad = {**CONFIG, "policies": [{"name": "p", "rules": [{"name": "r", "when": ["request.path =="]}]}]}
        error = await sub._apply("v2", bad)
        assert error is not None and "policies[0].rules[0].when[0]" in error, error
        assert sub.version == "v1" and agent.pipeline is in_force and _outcome(agent) is Outcome.ALLOW
        assert registry.get_sample_value("meshward_policy_snapshots_total", {"result": "rejected"}) == 1
        assert registry.get_sample_value("meshward_config_reloads_total", {"result": "failure"}) == 1
        assert gc.isenabled()  # paused while compiling, never left off
        assert await sub._apply("v3", DENY_ALL) is None
        assert sub.version == "v3" and _outcome(agent) is Outcome.FORBIDDEN

    asyncio.run(scenario())


def test_an_older_config_finishing_its_compile_late_never_overtakes_a_newer_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiling off the loop opens a race: the file's reload and the operator's push (or two pushes) compile at
    once, and the slower, older one would be swapped in last. Reloads are adopted in the order they were asked."""
    release_first = threading.Event()
    real = agent_module.compile_config

    def compile_config(doc: Any) -> Any:
        if doc.get("generation") == "old":
            assert release_first.wait(10)
        return real(doc)

    monkeypatch.setattr(agent_module, "compile_config", compile_config)

    async def scenario() -> str:
        agent, _ = _agent()
        old = asyncio.create_task(agent.apply({**CONFIG, "generation": "old"}))
        await asyncio.sleep(0)
        new = asyncio.create_task(agent.apply({**DENY_ALL, "generation": "new"}))
        asyncio.get_running_loop().call_later(0.05, release_first.set)
        await asyncio.wait_for(asyncio.gather(old, new), 20)
        return agent.pipeline.snapshot.config.generation

    assert asyncio.run(scenario()) == "new"


def test_a_changed_config_file_is_read_and_parsed_off_the_loop(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """`--config` with `--reload-interval`: the file's YAML is parsed in the worker (it waits until the loop ran
    another task), and the new config is adopted."""
    loop_ran = threading.Event()
    real = agent_module.load_snapshot

    def load_snapshot_(text: str) -> Any:
        assert loop_ran.wait(10), "the event loop did not run while the file was being parsed"
        return real(text)

    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(DENY_ALL))

    async def scenario() -> Outcome:
        agent, _ = _agent()
        watching = asyncio.create_task(agent.watch(path, 0.01))
        try:
            while path.stat().st_size and agent.pipeline.snapshot.config.generation == "deny-all":
                await asyncio.sleep(0.01)
                if not loop_ran.is_set():  # the watch has read the file once: now change it
                    monkeypatch.setattr(agent_module, "load_snapshot", load_snapshot_)
                    path.write_text(f"# YAML this time\n{json.dumps({**CONFIG, 'generation': 'file'})}\n")
                    asyncio.get_running_loop().call_later(0.05, loop_ran.set)
            return _outcome(agent)
        finally:
            watching.cancel()

    assert asyncio.run(asyncio.wait_for(scenario(), 20)) is Outcome.ALLOW


def _every_condition(generation: str) -> dict[str, Any]:
    """A config with every kind of compiled condition, in more rules than one generated function holds."""
    rules: list[dict[str, Any]] = []
    for n in range(RULES_PER_FUNCTION + 20):
        rules.append({"name": f"d{n}", "action": "Deny", "to": {"paths": [f"/admin/{n}/*", f"/x/**/{n}.txt"]},
                      "from": {"namespaces": [f"ns-{n}"]}})
        rules.append({"name": f"a{n}", "to": {"methods": ["GET"], "paths": [f"/orders/{n}/*"], "hosts": ["*.shop"],
                                               "ports": [8080]},
                      "from": {"principals": [f"spiffe://cluster.local/ns/shop/sa/c{n}", "spiffe://x/*"],
                               "requestPrincipals": [f"https://idp.example.com/{n}*"]},
                      "when": [f"request.headers['x-tenant'] == 't{n}' || 'orders:read' in scopes"]})
    return {**CONFIG, "generation": generation, "identityHeaders": {"x-meshward-sub": "sub"},
            "policies": [{"name": "p", "mode": "Audit", "jwt": [{"issuer": "https://idp.example.com",
                                                                  "audiences": ["orders"],
                                                                  "jwksUri": "https://idp.example.com/jwks"}],
                          "rules": rules}]}


def test_a_built_snapshot_and_pipeline_hold_no_reference_cycles() -> None:
    """A 3 MiB config's rules are ~10^6 objects: in a reference cycle (a generated function in its own globals), a
    replaced config waited for a full collection, which holds the GIL ~0.2 s while the loop answers Envoy (issue
    21). Without cycles, dropping one leaves the collector nothing to find."""
    agent, _ = _agent()
    gc.collect()
    gc.disable()
    try:
        pipeline = agent._build(_COMPILE(_every_condition("v2")))
        seen = pipeline.snapshot.policies.evaluate(
            CheckInput("GET", "/admin/110/x", peer="spiffe://cluster.local/ns/ns-110/sa/a"), None)
        assert seen.would_deny and seen.audit_rule == "d110"  # in the second generated function
        del pipeline
        found = gc.collect()
    finally:
        gc.enable()
    assert found == 0


def _a_constant(agent: Any) -> Any:
    """A matcher the last Allow rule's generated code holds (its L4 guard, `not inp.l4`, has no constant)."""
    return next(c for _, c in agent.pipeline.snapshot.policies.allow[-1].parts if c is not None)


def test_a_replaced_config_is_freed_the_moment_it_is_swapped_out() -> None:
    """With the collector off, as while the next push compiles: the old rules are gone once the new ones are in
    force, by reference counting alone."""
    async def scenario() -> tuple[bool, str]:
        agent, _ = _agent(_every_condition("v1"))
        matcher = _a_constant(agent)  # a constant of the generated code
        assert callable(matcher)
        old = weakref.ref(matcher)
        del matcher
        gc.collect()
        gc.disable()
        try:
            await agent.apply(_every_condition("v2"))
            return old() is None, agent.pipeline.snapshot.config.generation
        finally:
            gc.enable()

    assert asyncio.run(scenario()) == (True, "v2")


def test_a_replaced_config_is_freed_in_the_worker_not_on_the_loop() -> None:
    """Freeing a 3 MiB config is ~0.1 s of deallocation (RE2 automata, CEL programs) holding the GIL: dropped on
    the loop at the swap, it stalled every check in flight. The worker frees it, a piece at a time."""
    freed_on: list[str] = []

    async def scenario() -> str:
        agent, _ = _agent(_every_condition("v1"))
        weakref.finalize(_a_constant(agent),
                         lambda: freed_on.append(threading.current_thread().name))
        await agent.apply(_every_condition("v2"))
        return threading.current_thread().name

    loop_thread = asyncio.run(scenario())
    assert freed_on and freed_on[0] != loop_thread


def test_a_large_config_compiles_with_pauses_between_its_generated_functions() -> None:
    """Each generated function is one compile() holding the GIL; back to back, the loop answered fewer checks than
    arrived. The compile pauses after each one (the agent sleeps there)."""
    from meshward.sidecar.config.schema import parse_config
    from meshward.sidecar.domain.policy import compile_policies

    pauses: list[None] = []
    doc = _every_condition("v1")
    config = parse_config({**doc, "policies": [{**doc["policies"][0], "mode": "Enforce"}]})
    rules = sum(len(p.rules) for p in config.policies)
    compile_policies(config.policies, lambda: pauses.append(None))
    # Two passes (the enforced rules; all of them), each split into functions of RULES_PER_FUNCTION rules.
    assert rules > RULES_PER_FUNCTION and len(pauses) == 2 * -(-rules // RULES_PER_FUNCTION)


def test_a_compiled_config_is_left_out_of_the_collectors_scans() -> None:
    """Compiled with the collector paused, a new config sat whole in the youngest generation: the first collection
    after the pause scanned all of it while holding the GIL, and a full one followed. It is frozen instead
    (`gc.freeze`), and the collector is running again afterwards."""
    async def scenario() -> tuple[bool, bool]:
        agent, _ = _agent()
        await agent.apply(_every_condition("v2"))
        policies = agent.pipeline.snapshot.policies
        scanned = {id(o) for o in gc.get_objects()}  # generations 0-2, not the frozen objects
        return id(policies) in scanned or id(policies.allow) in scanned, gc.isenabled()

    assert asyncio.run(scenario()) == (False, True)


def test_a_stream_message_is_decoded_with_the_collector_paused_and_resumed_even_when_it_is_not_json(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding 3 MiB made ~10^5 containers, enough for full collections scanning the half-built document (tens
    of ms holding the GIL); a malformed message must not leave the collector off for good."""
    seen: list[bool] = []
    real = json.loads

    def loads(raw: Any, **kwargs: Any) -> Any:
        seen.append(gc.isenabled())
        return real(raw, **kwargs)

    monkeypatch.setattr(json, "loads", loads)
    assert asyncio.run(decode(b'{"version": "v1", "config": {}}')) == {"version": "v1", "config": {}}
    with pytest.raises(ValueError, match="Expecting"):
        asyncio.run(decode(b'{"version": "v1", "config": {'))
    assert seen == [False, False] and gc.isenabled()


def test_a_decoded_message_is_left_out_of_the_collectors_scans() -> None:
    """Decoded with the collector paused, the document sat whole in the youngest generation, and the first
    collection afterwards scanned it (~35 ms holding the GIL for 3 MiB)."""
    msg = asyncio.run(decode(b'{"version": "v1", "config": {"policies": [{"name": "p"}]}}'))
    scanned = {id(o) for o in gc.get_objects()}
    assert id(msg) not in scanned and id(msg["config"]["policies"]) not in scanned and gc.isenabled()
