"""In-process cost of one HTTP ext_authz decision, without Envoy, wrk or sockets.

Why: on a 2-core machine the through-Envoy benchmark (authz_bench.py) moves by ±10%
between runs, more than most hot-path changes are worth. This drives the real HTTP/1.1
protocol object with the bytes Envoy sends (request line, the original headers and the
`x-meshward-authz-*` ones), into the real agent and pipeline with the benchmark's 5-rule
policy and a cached RS256 token, and prints the best of several rounds in µs per
request. Its baseline, measured in the same run, is a no-op handler behind the same
protocol object (the framing every transport pays); the decision's own cost is the
difference. The JWKS comes from an in-memory fetcher: no I/O is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jwt  # noqa: E402
from bench.authz_bench import ISSUER, sidecar_config  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from tests.support.idp import SigningKey  # noqa: E402

from meshward.sidecar.engines.agent import Agent, load_snapshot  # noqa: E402
from meshward.sidecar.engines.observe import JsonLineAudit, Metrics  # noqa: E402
from meshward.sidecar.servers import http1  # noqa: E402
from meshward.sidecar.servers.authz_http import HttpAuthz  # noqa: E402


class _Jwks:
    """The agent's Fetcher, answering from memory."""

    def __init__(self, jwk: dict[str, object]) -> None:
        self._body = json.dumps({"keys": [jwk]}).encode()

    async def get(self, url: str, *, ca_file: str | None, timeout: float) -> bytes:
        return self._body


class _Sink:
    """A transport that counts what would be written."""

    def __init__(self) -> None:
        self.writes = 0
        self.last = b""

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.last = data

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


def _best_us(feed: Callable[[], None], n: int, rounds: int) -> float:
    for _ in range(n // 10):
        feed()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            feed()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


async def _run(n: int, rounds: int) -> tuple[float, float]:
    key = SigningKey("RS256", kid="bench")
    now = int(time.time())
    token = jwt.encode({"iss": ISSUER, "aud": "orders", "sub": "alice", "tenant": "acme", "iat": now,
                        "exp": now + 3600}, key.private, algorithm="RS256", headers={"kid": key.kid})
    agent = Agent(load_snapshot(json.dumps(sidecar_config(1, 10_000))), _Jwks(key.jwk),
                  Metrics(CollectorRegistry()), JsonLineAudit(io.StringIO()))
    keys = asyncio.create_task(agent.keys.run())
    deadline = time.monotonic() + 10
    while not agent.ready:
        if time.monotonic() > deadline:
            raise SystemExit(f"agent not ready: {agent.readiness()}")
        await asyncio.sleep(0.01)
    request = (f"GET /orders/1 HTTP/1.1\r\nhost: 127.0.0.1:15006\r\nauthorization: Bearer {token}\r\n"
               "x-forwarded-proto: http\r\nx-request-id: 6f1c7a3e-3b1d-4c55-9d7b-1b2a3c4d5e6f\r\n"
               "x-envoy-expected-rq-timeout-ms: 200\r\nx-meshward-authz-peer: -\r\n"
               "x-meshward-authz-port: 15006\r\nx-meshward-authz-host: orders\r\ncontent-length: 0\r\n\r\n").encode()
    noop_response = http1.Response(200, [("x-meshward-decision-id", "0" * 22)])
    noop, noop_sink = http1._Protocol(lambda _req: noop_response), _Sink()
    real, real_sink = http1._Protocol(HttpAuthz(lambda: agent.pipeline)), _Sink()
    noop.connection_made(noop_sink)  # type: ignore[arg-type]
    real.connection_made(real_sink)  # type: ignore[arg-type]
    real.data_received(request)
    if not real_sink.last.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"the hot request was not allowed: {real_sink.last[:200]!r}")
    gc.collect()
    gc.freeze()
    base = _best_us(lambda: noop.data_received(request), n, rounds)
    full = _best_us(lambda: real.data_received(request), n, rounds)
    keys.cancel()
    return base, full


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20_000, help="requests per round")
    ap.add_argument("--rounds", type=int, default=7, help="rounds; the best is reported")
    args = ap.parse_args()
    base, full = asyncio.run(_run(args.requests, args.rounds))
    print(f"no-op handler behind the same HTTP/1.1 protocol object: {base:.2f} us/request")
    print(f"meshward hot token, 5 rules: {full:.2f} us/request ({full - base:.2f} us for the decision)")
    print(f"authz_inprocess_us={full:.2f} authz_inprocess_decision_us={full - base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
