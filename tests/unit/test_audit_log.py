"""The audit log writer: batched for speed, yet no decision's line is lost or left waiting."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest

from meshward.sidecar.domain.decision import AuditRecord
from meshward.sidecar.engines.observe import JsonLineAudit
from meshward.sidecar.entrypoints.main import main


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
