"""The audit log writer: batched for speed, yet no decision's line is lost or left waiting."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time

import pytest
from prometheus_client import CollectorRegistry

from meshward.sidecar.domain.decision import AuditRecord, Decision, Outcome
from meshward.sidecar.engines.agent import Agent, load_snapshot
from meshward.sidecar.engines.observe import JsonLineAudit, Metrics
from meshward.sidecar.entrypoints.main import main
from tests.support.sidecar import StaticFetcher, config, policy, request


def record(n: int = 1) -> AuditRecord:
    return AuditRecord(1_800_000_000.123, f"id-{n}", "shop/orders", "http", "allow", False, "orders-api", "all",
                       "allowed by rule", "", "", "GET", f"/orders/{n}", "req", 12.5)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(x) for x in stream.getvalue().splitlines()]


async def until(what: str, cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def test_without_an_event_loop_every_line_is_written_at_once() -> None:
    out = io.StringIO()
    JsonLineAudit(out, flush_interval=3600).write(record())
    assert [x["decision_id"] for x in lines(out)] == ["id-1"]


def test_lines_wait_for_the_interval_then_reach_the_stream_together() -> None:
    async def go() -> None:
        out = io.StringIO()
        audit = JsonLineAudit(out, flush_interval=0.02)
        audit.write(record(1))
        audit.write(record(2))
        assert out.getvalue() == ""  # queued, not written per decision
        await until("the batch", lambda: out.getvalue())
        assert [x["decision_id"] for x in lines(out)] == ["id-1", "id-2"]
        audit.write(record(3))  # a later line starts a new batch
        await until("the next batch", lambda: len(lines(out)) == 3)

    asyncio.run(go())


def test_a_full_batch_is_written_without_waiting_for_the_interval() -> None:
    async def go() -> None:
        out = io.StringIO()
        audit = JsonLineAudit(out, flush_interval=3600)
        for n in range(JsonLineAudit.BATCH):
            audit.write(record(n))
        assert len(lines(out)) == JsonLineAudit.BATCH
        audit.write(record(-1))
        assert len(lines(out)) == JsonLineAudit.BATCH  # the next one waits again

    asyncio.run(go())


def test_flush_writes_what_is_pending_and_nothing_is_written_twice() -> None:
    async def go() -> None:
        out = io.StringIO()
        audit = JsonLineAudit(out, flush_interval=0.01)
        audit.write(record(1))
        audit.flush()
        assert [x["decision_id"] for x in lines(out)] == ["id-1"]
        audit.write(record(2))
        await until("the second line", lambda: len(lines(out)) == 2)
        audit.flush()
        assert [x["decision_id"] for x in lines(out)] == ["id-1", "id-2"]

    asyncio.run(go())


def test_interval_zero_writes_once_per_loop_iteration() -> None:
    async def go() -> None:
        out = io.StringIO()
        audit = JsonLineAudit(out, flush_interval=0)
        audit.write(record(1))
        audit.write(record(2))
        assert out.getvalue() == ""
        await asyncio.sleep(0)  # the flush was scheduled before this coroutine resumes
        assert len(lines(out)) == 2

    asyncio.run(go())


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_an_interval_that_is_not_a_finite_non_negative_number_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="audit flush interval"):
        JsonLineAudit(io.StringIO(), flush_interval=bad)


@pytest.mark.parametrize("bad", ["-1", "inf", "nan", "soon"])
def test_the_cli_names_the_flag_of_a_bad_interval(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--config", "x.yaml", "--audit-flush-interval", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--audit-flush-interval" in err and "seconds >= 0" in err


class BrokenPipe(io.StringIO):
    """A log stream whose reader went away, until `heal()`."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    def write(self, s: str) -> int:
        if self.broken:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(s)

    def heal(self) -> None:
        self.broken = False


def test_a_broken_log_stream_drops_lines_but_never_changes_a_decision(caplog: pytest.LogCaptureFixture) -> None:
    stream = BrokenPipe()
    metrics = Metrics(CollectorRegistry())
    agent = Agent(load_snapshot(json.dumps(config(policy(rules=[{"name": "reads", "to": {"methods": ["GET"]}}])))),
                  StaticFetcher({}), metrics, JsonLineAudit(stream, dropped=metrics.audit_dropped.inc))
    with caplog.at_level(logging.WARNING, logger="meshward.sidecar.audit"):
        outcomes = [agent.pipeline.decide_now(request(f"/orders/{n}"), "http") for n in range(3)]
        assert [d.outcome for d in outcomes if isinstance(d, Decision)] == [Outcome.ALLOW] * 3
        denied = agent.pipeline.decide_now(request("/orders/9", method="DELETE"), "http")
        assert isinstance(denied, Decision) and denied.outcome is Outcome.FORBIDDEN  # still decided, not 503
        assert metrics.registry.get_sample_value("meshward_audit_lines_dropped_total") == 4
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1  # once per outage, not per line
        stream.heal()
        agent.pipeline.decide_now(request("/orders/10"), "http")
    assert [x["path"] for x in lines(stream)] == ["/orders/10"]
    assert caplog.records[-1].message == "audit lines are written again"


def test_a_closed_log_stream_is_counted_not_raised() -> None:
    async def go() -> None:
        stream, dropped = io.StringIO(), list[int]()
        audit = JsonLineAudit(stream, flush_interval=0.01, dropped=dropped.append)
        stream.close()
        audit.write(record(1))
        audit.write(record(2))
        await until("the timer's flush", lambda: dropped == [2])

    asyncio.run(go())
