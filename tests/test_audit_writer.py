"""The audit writer: a call's decision record and its budget settlement land in one transaction,
and neither an absent store nor one bad row loses the others."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.journal import Journal
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


async def test_a_record_already_in_the_store_is_written_once(engine: AsyncEngine, direct: DirectStatements,
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
    await writer.flush()

    assert await state(engine) == (["dec_1", "dec_2"], (200, 0))  # the second copy of dec_1 is skipped
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
    assert len(ids) == calls and (spent, reserved) == (10 * calls, 0)  # every settlement exactly once
    refused = [r.getMessage() for r in caplog.records if "refused a batch" in r.getMessage()]
    # Only the second transaction was refused and written row by row: 64 settlements, 64 records.
    assert len(refused) == 1
    assert refused[0].startswith(f"the store refused a batch of {2 * CALLS_PER_TRANSACTION} audit rows (")
    bad_record = (await stored_records(engine))[f"dec_{bad:03d}"]  # written reduced, not dropped
    assert bad_record["outcome"] == "unknown" and bad_record["cost_micro_usd"] == 10
    assert bad_record["reasons"][-1].startswith("audit record reduced, the store refused it as given")
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


async def stored_records(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as connection:
        rows = (await connection.execute(select(_decisions))).mappings().all()
    return {r["id"]: dict(r) for r in rows}


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": "x"}
    for _ in range(depth):
        value = {"deeper": value}
    return value


async def test_a_record_the_store_cannot_hold_as_given_is_written_reduced_never_dropped(
        engine: AsyncEngine, direct: DirectStatements, ledger: BudgetLedgerStore) -> None:
    # No journal: the store's own refusal (or the encoding for it) is what the writer sees.
    writer = AuditWriter(direct, flush_interval_s=3600, batch_size=1000)
    reservation = await ledger.reserve([Budget("team:a", "month", 10_000)], 900, NOW)
    writer.add_decision({**decision_row("dec_big", 0), "cost_micro_usd": 2**70})  # past BIGINT
    writer.add_decision({**decision_row("dec_deep", 0), "policy_input": nested(300)})  # JSON cannot encode it
    writer.add_settlement(reservation, 120)
    writer.add_decision(decision_row("dec_ok", 120))

    await writer.flush()

    records = await stored_records(engine)
    assert set(records) == {"dec_big", "dec_deep", "dec_ok"}
    assert records["dec_ok"]["reasons"] == [] and records["dec_ok"]["cost_micro_usd"] == 120
    big = records["dec_big"]
    assert big["cost_micro_usd"] == 0 and big["outcome"] == "allowed"
    assert "cost_micro_usd (was 1180591620717411303424)" in big["reasons"][-1]
    deep = records["dec_deep"]
    assert deep["policy_input"] == {"lockgate.reduced": "it could not be encoded as JSON (too deeply nested, or "
                                                        "values JSON cannot hold)"}
    assert deep["reasons"][-1].startswith("audit record reduced, the store refused it as given")
    assert "policy_input (could not be encoded as JSON)" in deep["reasons"][-1]
    assert (await state(engine))[1] == (120, 0)  # the settlement went with its record


async def test_an_oversized_or_unencodable_record_is_reduced_when_journaled(
        engine: AsyncEngine, direct: DirectStatements, tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    writer = AuditWriter(direct, flush_interval_s=3600, batch_size=1000, journal=journal)
    huge = {"metadata": {"note": "y" * 1_200_000}}
    writer.add_decision({**decision_row("dec_huge", 0), "policy_input": huge})
    writer.add_decision({**decision_row("dec_deep", 0), "decision": nested(300)})
    writer.durable()
    journaled = [line for path in sorted(journal.folder.glob("*.jsonl")) for line in path.read_bytes().splitlines()]
    assert len(journaled) == 2 and all(len(line) < 10_000 for line in journaled)

    await writer.flush()
    await writer.close()

    records = await stored_records(engine)
    encoded = orjson.dumps(huge)
    digest, size = hashlib.sha256(encoded).hexdigest(), len(encoded)
    assert records["dec_huge"]["policy_input"] == {"lockgate.reduced": f"{size} bytes (more than 524288)",
                                                   "bytes": size, "sha256": digest}
    assert f"policy_input ({size} bytes (more than 524288), sha256 {digest})" in records["dec_huge"]["reasons"][-1]
    assert records["dec_deep"]["decision"]["lockgate.reduced"].startswith("it could not be encoded")
    assert "it could not be encoded as JSON" in records["dec_deep"]["reasons"][-1]
