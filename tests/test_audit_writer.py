"""The audit writer: a call's decision record and its budget settlement land in one transaction,
and neither an absent store nor one bad row loses the others."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.writer import CALLS_PER_TRANSACTION, AuditWriter
from gateway.budgets import BudgetLedgerStore, Reservation
from gateway.store import (
    BudgetLedger,
    DecisionRecord,
    DirectStatements,
    LedgerReservation,
    create_store_engine,
    create_tables,
)
from gateway.types import Budget

NOW = datetime(2026, 11, 25, 4, 0, tzinfo=UTC)
_decisions = DecisionRecord.__table__  # type: ignore[attr-defined]
_ledger = BudgetLedger.__table__  # type: ignore[attr-defined]
_leases = LedgerReservation.__table__  # type: ignore[attr-defined]


def decision_row(decision_id: str, cost: int) -> dict[str, Any]:
    return {"id": decision_id, "trace_id": "t" * 32, "created_at": NOW, "outcome": "allowed", "status_code": 200,
            "endpoint": "chat.completions", "stream": False, "reasons": [], "input_tokens": 1, "output_tokens": 1,
            "cost_micro_usd": cost, "duration_ms": 1.0}


async def state(engine: AsyncEngine) -> tuple[list[str], tuple[int, int]]:
    """The decision ids in the store, and (spent, reserved) of the one ledger row."""
    async with engine.connect() as connection:
        ids = [r.id for r in (await connection.execute(select(_decisions.c.id).order_by(_decisions.c.id))).all()]
        row = (await connection.execute(select(_ledger.c.spent_micro_usd, _ledger.c.reserved_micro_usd))).one()
    return ids, (row.spent_micro_usd, row.reserved_micro_usd)


async def test_a_decision_record_and_its_settlement_are_written_together(
        engine: AsyncEngine, direct: DirectStatements, ledger: BudgetLedgerStore) -> None:
    writer = AuditWriter(direct, flush_interval_s=3600, batch_size=1000)
    reservation = await ledger.reserve([Budget("team:a", "month", 10_000)], 900, NOW)

    writer.add_settlement(reservation, 120)
    writer.add_decision(decision_row("dec_1", 120))
    assert await state(engine) == ([], (0, 900))  # buffered: the reservation is still held

    await writer.flush()

    assert await state(engine) == (["dec_1"], (120, 0))
    assert writer.pending == 0


async def test_while_the_store_is_away_nothing_is_written_and_everything_is_kept(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/not-yet/lockgate.db"  # its folder does not exist: the store cannot open
    engine = create_store_engine(url)
    direct = await DirectStatements.open(url)
    writer = AuditWriter(direct, flush_interval_s=3600, batch_size=1000)
    reservation = Reservation(rows=(("team:a", "month", "2026-11", 900),), id="dec_1")
    writer.add_decision(decision_row("dec_1", 120))
    writer.add_settlement(reservation, 120)
    try:
        with pytest.raises(sqlite3.OperationalError):
            await writer.flush()
        assert writer.pending == 2

        (tmp_path / "not-yet").mkdir()  # the store comes back, with a call's reservation held in it
        await create_tables(engine)
        async with engine.begin() as connection:
            await connection.execute(_ledger.insert(), [{"scope": "team:a", "window": "month", "period": "2026-11",
                                                         "spent_micro_usd": 0, "reserved_micro_usd": 900}])
            await connection.execute(_leases.insert(), [{"id": "dec_1", "rows": [["team:a", "month", "2026-11", 900]],
                                                         "amount_micro_usd": 900, "lease_until": NOW, "state": "held"}])
        await writer.flush()

        assert await state(engine) == (["dec_1"], (120, 0))
        assert writer.pending == 0
    finally:
        await direct.close()
        await engine.dispose()


async def test_a_row_the_store_refuses_is_dropped_alone(engine: AsyncEngine, direct: DirectStatements,
                                                        ledger: BudgetLedgerStore) -> None:
    writer = AuditWriter(direct, flush_interval_s=3600, batch_size=1000)
    first = await ledger.reserve([Budget("team:a", "month", 10_000)], 900, NOW)
    second = await ledger.reserve([Budget("team:a", "month", 10_000)], 900, NOW)
    async with engine.begin() as connection:  # a row in the way: one insert of the batch will conflict
        await connection.execute(_decisions.insert(), [decision_row("dec_1", 0)])

    writer.add_decision(decision_row("dec_1", 120))
    writer.add_settlement(first, 120)
    writer.add_decision(decision_row("dec_2", 80))
    writer.add_settlement(second, 80)
    await writer.flush()  # no error: the store answers, so the batch is written row by row

    assert await state(engine) == (["dec_1", "dec_2"], (200, 0))  # the conflicting copy alone is gone
    assert writer.pending == 0


async def test_a_nul_in_a_text_field_is_replaced_so_the_row_can_be_stored(engine: AsyncEngine,
                                                                           direct: DirectStatements) -> None:
    # A provider's error message may echo what the client sent, NUL included; PostgreSQL's text
    # columns refuse NUL, and a row that cannot be stored would hold back every later one.
    writer = AuditWriter(direct, flush_interval_s=3600, batch_size=1000)
    writer.add_decision({**decision_row("dec_1", 0), "error_message": "rejected: 'a\x00b'"})

    await writer.flush()

    async with engine.connect() as connection:
        stored = (await connection.execute(select(_decisions.c.error_message))).scalar_one()
    assert stored == "rejected: 'a\ufffdb'"


async def test_close_lets_the_running_flush_finish_and_writes_what_came_after(
        engine: AsyncEngine, direct: DirectStatements, ledger: BudgetLedgerStore) -> None:
    writer = AuditWriter(direct, flush_interval_s=3600, batch_size=1)  # one decision wakes the writer
    writer.start()
    held = [await ledger.reserve([Budget("team:a", "month", 10_000)], 900, NOW) for _ in range(2)]
    writer.add_settlement(held[0], 100)
    writer.add_decision(decision_row("dec_1", 100))  # wakes the writer's own flush
    await asyncio.sleep(0)
    writer.add_settlement(held[1], 50)
    writer.add_decision(decision_row("dec_2", 50))

    # Cancelling a flush while it checks out SQLite's one pooled connection used to leave the
    # last flush waiting for that connection for good: bound the wait, so that fails, not hangs.
    await asyncio.wait_for(writer.close(), timeout=15)

    # The running flush was not cancelled: cancelled just after its COMMIT, it would have kept
    # rows already written, and the last flush would have applied their settlements again.
    assert writer._task is not None and not writer._task.cancelled()
    assert await state(engine) == (["dec_1", "dec_2"], (150, 0))  # each settlement applied exactly once
    assert writer.pending == 0


async def test_a_long_flush_is_written_in_transactions_of_whole_calls(
        engine: AsyncEngine, direct: DirectStatements, ledger: BudgetLedgerStore,
        caplog: pytest.LogCaptureFixture) -> None:
    writer = AuditWriter(direct, flush_interval_s=3600, batch_size=10**6)
    calls = 2 * CALLS_PER_TRANSACTION + 10  # three transactions: 64, 64 and 10 calls
    held = [await ledger.reserve([Budget("team:a", "month", 10**9)], 100, NOW) for _ in range(calls)]
    bad = CALLS_PER_TRANSACTION + 5  # a row the store refuses, in the second transaction only
    for index, reservation in enumerate(held):
        writer.add_settlement(reservation, 10)
        writer.add_decision({**decision_row(f"dec_{index:03d}", 10), **({"outcome": None} if index == bad else {})})

    await writer.flush()

    ids, (spent, reserved) = await state(engine)
    assert len(ids) == calls - 1 and (spent, reserved) == (10 * calls, 0)  # every settlement exactly once
    refused = [r.getMessage() for r in caplog.records if "refused a batch" in r.getMessage()]
    # Only the second transaction was refused and written row by row: 64 settlements, 64 records.
    assert refused == [f"the store refused a batch of {2 * CALLS_PER_TRANSACTION} audit rows; "
                       "writing them one at a time"]
    assert writer.pending == 0


async def test_a_batch_committed_but_not_acknowledged_is_retried_without_charging_twice(
        engine: AsyncEngine, direct: DirectStatements, ledger: BudgetLedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store committed the batch, then the connection broke before it said so: the writer keeps
    the rows and writes them again. The ledger must still equal the audit, with nothing reserved."""
    writer = AuditWriter(direct, flush_interval_s=3600, batch_size=1000)
    held = [await ledger.reserve([Budget("team:a", "month", 100_000)], 900, NOW, f"dec_{i}") for i in range(3)]
    for i, reservation in enumerate(held):
        writer.add_settlement(reservation, 100 * (i + 1))
        writer.add_decision(decision_row(f"dec_{i}", 100 * (i + 1)))
    commit = direct.write_batch
    lost = []

    async def commit_then_lose_the_answer(*args: Any) -> None:
        await commit(*args)
        if not lost:
            lost.append(True)
            raise ConnectionResetError("the connection broke after COMMIT")

    monkeypatch.setattr(direct, "write_batch", commit_then_lose_the_answer)
    monkeypatch.setattr(writer, "_store_answers", _answers_after_the_break)
    with pytest.raises(ConnectionResetError):
        await writer.flush()
    assert writer.pending == 6  # kept: the writer cannot know the commit went through
    monkeypatch.undo()  # the connection is back
    await writer.flush()  # the records are there already: refused, then written one by one

    assert await state(engine) == (["dec_0", "dec_1", "dec_2"], (600, 0))
    assert writer.pending == 0


async def _answers_after_the_break() -> bool:
    return False  # while the connection is broken, the store does not answer: keep the rows
