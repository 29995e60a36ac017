"""Decision latency while a 3 MiB config is pushed to the agent, against none, in the same run (issue 21).

Why: the agent parses and compiles each config it is sent on the machine that answers
Envoy's ext_authz checks, and Envoy fails closed after 0.5 s: a push that holds up the
event loop denies the pod's traffic. This runs the real agent's HTTP/1.1 ext_authz
server on a Unix socket, under a steady open-loop load of checks from another process
(each latency measured from the moment the request was due, so a stalled loop counts
for every request it delays), and pushes configs of ~3 MiB (`MAX_CONFIG_BYTES`, the
most the operator sends) compiled by the operator's own compiler through the agent's
own subscription: the stream message decoded (`clients/policy.decode`), then
`PolicySubscription` applying it. The baseline is the same load on the same agent and
config before any push. `--old` also pushes once the way the agent did before: the
message decoded, turned back into JSON and parsed with PyYAML, and compiled, all on the
loop. Loopback only: the socket lives in a temporary directory.

Prints p50/p99.9/max and the decisions slower than 0.5 s for each window, then
`config_baseline_decision_p999_ms=`, `config_push_decision_p999_ms=`, their ratio and,
with `--old`, `config_push_old_decision_p999_ms=`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402
from tests.support.fleet import percentile  # noqa: E402

from meshward.operator.domain.compile import PolicyObject, Workload, compile_workload  # noqa: E402
from meshward.operator.engines.policy_hub import MAX_CONFIG_BYTES  # noqa: E402
from meshward.sidecar.clients.policy import decode  # noqa: E402
from meshward.sidecar.engines.agent import GIL_SWITCH_INTERVAL_S, Agent, compile_config  # noqa: E402
from meshward.sidecar.engines.observe import JsonLineAudit, Metrics  # noqa: E402
from meshward.sidecar.engines.subscription import PolicySubscription  # noqa: E402
from meshward.sidecar.servers.authz_http import HttpAuthz  # noqa: E402
from meshward.sidecar.servers.http1 import serve_unix  # noqa: E402

API = "meshward.io/v1alpha1"
# Envoy's ext_authz timeout in an injected pod: a decision slower than this is a denied request.
ENVOY_TIMEOUT_S = 0.5
# The caller of every check the load makes (allowed by a rule of the first policy).
PEER = "spiffe://cluster.local/ns/shop/sa/frontend"
RULES_PER_POLICY = 20


def request_bytes(path: str) -> bytes:
    """A check as Envoy's HTTP/1.1 ext_authz sends it (the original request plus the x-meshward-authz-* headers)."""
    return (f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1:15006\r\nx-forwarded-proto: http\r\n"
            "x-request-id: 6f1c7a3e-3b1d-4c55-9d7b-1b2a3c4d5e6f\r\nx-envoy-expected-rq-timeout-ms: 500\r\n"
            f"x-meshward-authz-peer: {PEER}\r\nx-meshward-authz-port: 15006\r\nx-meshward-authz-host: orders\r\n"
            "content-length: 0\r\n\r\n").encode()


def _policy(n: int, variant: int) -> PolicyObject:
    """One AuthPolicy selecting the workload: a deny, then rules for one caller each (methods, paths, CEL).

    Only the first policy's rules name the load's caller, so a check costs what a small config's does and
    the load stays steady: what moves the latency is the push, not the decision.
    """
    rules: list[dict[str, Any]] = [{"name": "no-admin", "action": "Deny",
                                    "from": {"principals": [f"spiffe://cluster.local/ns/shop/sa/intruder-{n}"]},
                                    "to": {"paths": [f"/admin/{n}/**"]}}]
    for r in range(1, RULES_PER_POLICY):
        caller = PEER if n == 0 else f"spiffe://cluster.local/ns/shop/sa/caller-{n}-{r}"
        rules.append({"name": f"r-{r}", "from": {"principals": [caller]},
                      "to": {"methods": ["GET", "HEAD"], "paths": [f"/p{n}/r{r}/*", f"/v{variant}/items/{n}/{r}/**"]},
                      **({"when": [f"request.headers['x-tenant'] == 'tenant-{r}' || "
                                   f"request.path.startsWith('/p{n}/r{r}/')"]} if r % 2 else {})})
    return PolicyObject("shop", f"policy-{n:05d}", 1, f"2026-01-01T00:00:{n % 60:02d}Z",
                        {"selector": {"matchLabels": {"app": "orders"}}, "rules": rules})


def big_config(target_bytes: int, variant: int) -> tuple[dict[str, Any], int]:
    """A config for one workload compiled by the operator, as close to `target_bytes` as whole policies go."""
    w = Workload("shop", "orders-1", "orders", {"app": "orders"})
    now = dt.datetime.now(dt.UTC)
    per = compile_workload(w, [_policy(0, variant), _policy(1, variant)], [], now).size / 2
    count = max(1, int(target_bytes / per))
    while True:
        compiled = compile_workload(w, [_policy(n, variant) for n in range(count)], [], now)
        if compiled.size <= target_bytes or count == 1:
            return compiled.document, count
        count = int(count * target_bytes / compiled.size) - 1


# ---------------------------------------------------------------------------------------------- the load client


def client_main(sock: str, rate: float, connections: int, path: str) -> None:
    """Open-loop checks at `rate` over `connections` until stdin closes; print (due, latency, status) as JSON."""
    request = request_bytes(path)
    samples: list[tuple[float, float, int]] = []

    async def run(first: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
        interval = connections / rate

        async def one(k: int) -> None:
            reader, writer = await asyncio.open_unix_connection(sock)
            due = time.monotonic() + k * interval / connections
            while not stop.is_set():
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if length:
                    await reader.readexactly(length)
                samples.append((due, time.monotonic() - due, int(head.split(b" ", 2)[1])))
                if not first.done():
                    first.set_result(None)
                due += interval
            writer.close()

        await asyncio.gather(*(one(k) for k in range(connections)))

    async def main() -> None:
        # Announced once the first check was answered: the agent's warm-up starts then.
        first = asyncio.get_running_loop().create_future()
        running = asyncio.create_task(run(first))
        await first
        print("connected", flush=True)
        await running

    asyncio.run(main())
    json.dump(samples, sys.stdout)


# ---------------------------------------------------------------------------------------------- the agent side


class _NoFetch:
    async def get(self, url: str, *, ca_file: str | None, timeout: float) -> bytes:
        raise OSError("no JWKS in this benchmark")


class _Stream:
    """Stands in for PolicyClient's stream: raw messages, decoded and applied as PolicyClient does it."""

    def __init__(self, phases: list[tuple[str, float, float]]) -> None:
        self.messages: asyncio.Queue[bytes] = asyncio.Queue()
        self.acks: asyncio.Queue[tuple[float, float, str | None]] = asyncio.Queue()
        self.phases = phases

    async def subscribe(self, pod: str, on_config: Callable[[str, dict[str, Any]], Awaitable[str | None]],
                        on_connected: Callable[[], None], on_destinations: Callable[[Any], object] | None = None,
                        ) -> None:
        while True:
            raw = await self.messages.get()
            start = time.monotonic()
            msg = await decode(raw)
            self.phases.append(("decode", start, time.monotonic()))
            on_connected()
            error = await on_config(str(msg["version"]), msg["config"])
            self.phases.append(("ack", time.monotonic(), time.monotonic()))
            await self.acks.put((start, time.monotonic(), error))


def _timed_offload(phases: list[tuple[str, float, float]]) -> Callable[..., Awaitable[Any]]:
    """The agent's worker-thread offload, recording when each call ran (compile, release) and when the loop resumed."""

    async def offload(fn: Callable[..., Any], *args: Any) -> Any:
        name = getattr(fn, "__name__", "offload").strip("_")

        def timed() -> Any:
            begun = time.monotonic()
            try:
                return fn(*args)
            finally:
                phases.append((name, begun, time.monotonic()))

        result = await asyncio.to_thread(timed)
        phases.append((f"loop after {name}", time.monotonic(), time.monotonic()))
        return result

    return offload


def _stalls(samples: list[tuple[float, float, int]], pauses: list[tuple[float, float, int]],
            phases: list[tuple[str, float, float]], spans: list[tuple[float, float]], worst: int = 6) -> list[str]:
    """The window's worst episodes of slow checks (over 20 ms, overlapping), with the GC passes and phases meanwhile."""
    slow = sorted((due, due + lat) for due, lat, _ in samples
                  if lat > 0.02 and any(a <= due <= b for a, b in spans))
    episodes: list[tuple[float, float, float]] = []  # (start, end, the slowest check's latency)
    for due, end in slow:
        if episodes and due <= episodes[-1][1]:
            a, b, top = episodes[-1]
            episodes[-1] = (a, max(b, end), max(top, end - due))
        else:
            episodes.append((due, end, end - due))
    origin = spans[0][0] if spans else 0.0
    lines = []
    for a, b, top in sorted(episodes, key=lambda e: -e[2])[:worst]:
        gcs = [f"gen{g} {ms:.0f} ms" for at, ms, g in pauses if at <= b and at + ms / 1000 >= a]
        during = sorted({name for name, pa, pb in phases if pa <= b and pb >= a})
        lines.append(f"  {top * 1000:6.1f} ms, checks due +{a - origin:.2f} to +{b - origin:.2f} s: "
                     f"GC [{', '.join(gcs)}] phases [{', '.join(during)}]")
    return lines


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _gc_pauses() -> list[tuple[float, float, int]]:
    """(when, ms, generation) of every cyclic GC pass from now on: the stalls the compile cannot move off the loop."""
    pauses: list[tuple[float, float, int]] = []
    started = [0.0]

    def timed(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.monotonic()
        else:
            pauses.append((started[0], (time.monotonic() - started[0]) * 1000, int(info["generation"])))

    gc.callbacks.append(timed)
    return pauses


async def agent_main(args: argparse.Namespace) -> dict[str, list[float]]:
    """Serve, load, push; the latencies (ms) of each window."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as meshward-sidecar's entry point does
    pauses = _gc_pauses()
    t0 = time.perf_counter()
    docs = [big_config(args.config_bytes, v) for v in (0, 1)]
    count = docs[0][1]
    messages = [json.dumps({"version": f"v{n}", "config": {**docs[n % 2][0], "generation": f"v{n}"}},
                           separators=(",", ":")).encode() for n in range(args.pushes + 1)]
    rules = count * RULES_PER_POLICY
    print(f"config: {count} policies, {rules} rules, {len(messages[1]) / 2**20:.2f} MiB per message "
          f"(built in {time.perf_counter() - t0:.1f} s)", flush=True)
    phases: list[tuple[str, float, float]] = []
    agent = Agent(compile_config(docs[0][0]), _NoFetch(), Metrics(CollectorRegistry()),
                  JsonLineAudit(open(os.devnull, "w")),  # noqa: SIM115 - lives as long as the process
                  offload=_timed_offload(phases))
    del docs  # only the messages stay, as bytes: the heap is the agent's, as in a pod
    gc.collect()
    gc.freeze()  # as meshward-sidecar does once serving
    frozen = gc.get_freeze_count()
    stream = _Stream(phases)
    sub = PolicySubscription(stream, agent, "orders-1", CollectorRegistry())  # type: ignore[arg-type]
    subscribing = asyncio.create_task(sub.run())
    windows: dict[str, list[tuple[float, float]]] = {"baseline": [], "push": [], "old": []}
    with tempfile.TemporaryDirectory(prefix="meshward-bench-") as tmp:
        sock = f"{tmp}/authz.sock"
        server = await serve_unix(HttpAuthz(lambda: agent.pipeline), sock)
        path = f"/p0/r{RULES_PER_POLICY - 1}/x"
        client = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--client", sock, "--rate", str(args.rate), "--connections",
            str(args.connections), "--path", path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert client.stdout is not None
        out = b""
        try:
            if await asyncio.wait_for(client.stdout.readline(), 60) != b"connected\n":
                raise SystemExit("the load client did not start")
            await asyncio.sleep(args.warmup)
            start = time.monotonic()
            await asyncio.sleep(args.baseline)
            windows["baseline"].append((start, time.monotonic()))
            for raw in messages[:args.pushes]:
                stream.messages.put_nowait(raw)
                begun, ended, error = await stream.acks.get()
                if error:
                    raise SystemExit(f"the pushed config was rejected: {error}")
                windows["push"].append((begun, ended))
                await asyncio.sleep(args.gap)
            print(f"pushes: {', '.join(f'{b - a:.2f}' for a, b in windows['push'])} s each "
                  f"(decode, validate, compile, swap)", flush=True)
            if args.old:
                raw = messages[args.pushes]
                agent._offload = _inline  # the old path ran everything on the loop
                begun = time.monotonic()
                msg = json.loads(raw)  # the gRPC deserializer ran on the loop
                await agent.reload(json.dumps(msg["config"]))  # the subscription's json.dumps, then PyYAML
                windows["old"].append((begun, time.monotonic()))
                print(f"old path push: {windows['old'][0][1] - begun:.2f} s on the loop", flush=True)
                await asyncio.sleep(args.gap)
        finally:
            out, _ = await asyncio.wait_for(client.communicate(b""), 60)
            server.close()
            subscribing.cancel()
    samples = json.loads(out)
    print(f"objects outside the GC's scans (gc.freeze): {frozen} before the pushes, {gc.get_freeze_count()} after")
    for name, spans in windows.items():
        during = [(ms, g) for at, ms, g in pauses if any(a <= at <= b for a, b in spans)]
        if during:
            ms, g = max(during)
            print(f"GC passes during {name}: {len(during)}, the longest {ms:.0f} ms (generation {g})")
        if spans and name != "baseline":
            print(f"longest waits during {name} (from its start):", *_stalls(samples, pauses, phases, spans), sep="\n")
    bad = [s for s in samples if s[2] != 200]
    if bad:
        raise SystemExit(f"{len(bad)} of {len(samples)} checks were not allowed (first status {bad[0][2]})")
    return {name: [lat * 1000 for due, lat, _ in samples if any(a <= due <= b for a, b in spans)]
            for name, spans in windows.items()}


def _summary(name: str, ms: list[float]) -> str:
    over = sum(1 for v in ms if v > ENVOY_TIMEOUT_S * 1000)
    return (f"{name}: {len(ms)} decisions, p50 {percentile(ms, 0.5):.2f} ms, p99.9 {percentile(ms, 0.999):.2f} ms, "
            f"max {max(ms):.2f} ms, {over} over Envoy's {ENVOY_TIMEOUT_S} s timeout")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config-bytes", type=int, default=MAX_CONFIG_BYTES - 64 * 1024,
                    help="size of each pushed config (default: the operator's limit less the envelope)")
    ap.add_argument("--pushes", type=int, default=2, help="configs pushed one after the other")
    ap.add_argument("--rate", type=float, default=400.0, help="checks per second")
    ap.add_argument("--connections", type=int, default=8, help="keep-alive connections the checks use")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    ap.add_argument("--baseline", type=float, default=6.0, help="seconds of load without a push")
    ap.add_argument("--gap", type=float, default=0.3, help="seconds between pushes")
    ap.add_argument("--old", action="store_true", help="also push once the old way (PyYAML, all on the loop)")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main(args.client, args.rate, args.connections, args.path)
        return 0
    ms = asyncio.run(agent_main(args))
    base, push = percentile(ms["baseline"], 0.999), percentile(ms["push"], 0.999)
    print(_summary("no push (baseline)", ms["baseline"]))
    print(_summary("during a push", ms["push"]))
    if ms["old"]:
        print(_summary("during an old-path push", ms["old"]))
    print(f"config_baseline_decision_p999_ms={base:.2f} config_push_decision_p999_ms={push:.2f} "
          f"config_push_p999_ratio={push / base:.1f}"
          + (f" config_push_old_decision_p999_ms={percentile(ms['old'], 0.999):.2f}" if ms["old"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
