"""``lockgate audit verify`` and ``lockgate audit prune``: walking the hash chain, and cutting its
old end without breaking it (gateway/audit/chain.py, docs/audit.md)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.chain import GENESIS, Broken, checkpoint_mac, walk
from gateway.store import AuditCheckpoint, DecisionRecord, utcnow

_decisions = DecisionRecord.__table__  # type: ignore[attr-defined]
_checkpoints = AuditCheckpoint.__table__  # type: ignore[attr-defined]
PAGE = 2000


@dataclass
class Report:
    records: int = 0
    first: int | None = None
    last: int | None = None
    broken: Broken | None = None
    notes: list[str] = field(default_factory=list)


async def _checkpoint(connection: Any, kind: str) -> Any:
    return (await connection.execute(select(_checkpoints).where(_checkpoints.c.kind == kind)
                                     .order_by(_checkpoints.c.seq.desc()).limit(1))).first()


def _signed(row: Any, key: str, report: Report) -> bool:
    if not key:
        report.notes.append(f"the {row.kind} checkpoint at record {row.seq} is not checked: no key is set")
        return True
    return row.mac is not None and row.mac == checkpoint_mac(key, row.seq, row.record_hash, row.kind)


async def verify(engine: AsyncEngine, key: str) -> Report:
    """Walk the chain from its start (or the last prune) to its end, then hold the end against
    the last signed checkpoint: the first record that does not fit, if any."""
    report = Report()
    async with engine.connect() as connection:
        pruned = await _checkpoint(connection, "prune")
        if pruned is not None and not _signed(pruned, key, report):
            report.broken = Broken(pruned.seq, None, "the prune checkpoint's signature is wrong")
            return report
        seq, prev = (pruned.seq, pruned.record_hash) if pruned is not None else (0, GENESIS)
        while True:
            rows = [dict(r._mapping) for r in (await connection.execute(
                select(_decisions).where(_decisions.c.seq > seq).order_by(_decisions.c.seq).limit(PAGE))).all()]
            if not rows:
                break
            report.broken = walk(rows, seq, prev)
            if report.broken is not None:
                return report
            report.first = report.first if report.first is not None else rows[0]["seq"]
            report.records += len(rows)
            seq, prev = rows[-1]["seq"], rows[-1]["record_hash"]
        report.last = seq if report.records else None
        tip = await _checkpoint(connection, "tip")
        if tip is not None:
            if not _signed(tip, key, report):
                report.broken = Broken(tip.seq, None, "the checkpoint's signature is wrong: it was forged or changed")
            elif tip.seq > seq or (tip.seq == seq and tip.record_hash != prev):
                report.broken = Broken(tip.seq, None, f"a checkpoint says the chain reached record {tip.seq}, "
                                                      f"but it ends at {seq}: its tail was cut off")
    return report


async def prune(engine: AsyncEngine, before: datetime, key: str) -> tuple[int, int | None]:
    """Delete the records made before ``before`` (and their spans), from the start of the chain,
    and leave a signed prune checkpoint, so ``verify`` starts after them. (records, last seq)."""
    postgres = engine.dialect.name == "postgresql"
    async with engine.begin() as connection:
        first_kept = (await connection.execute(
            select(func.min(_decisions.c.seq)).where(_decisions.c.created_at >= before))).scalar()
        last = (await connection.execute(
            select(func.max(_decisions.c.seq)).where(_decisions.c.seq < first_kept) if first_kept is not None
            else select(func.max(_decisions.c.seq)))).scalar()
        if last is None:
            return 0, None
        end = str((await connection.execute(select(_decisions.c.record_hash).where(_decisions.c.seq == last))).scalar())
        await _lift(connection, postgres, True)
        await connection.execute(text("DELETE FROM spans WHERE trace_id IN (SELECT trace_id FROM decision_records "
                                      "WHERE seq <= :last)"), {"last": last})
        deleted = (await connection.execute(
            text("DELETE FROM decision_records WHERE seq <= :last OR (seq IS NULL AND created_at < :before)"),
            {"last": last, "before": before})).rowcount
        await connection.execute(_checkpoints.insert().values(
            id="cp_" + secrets.token_hex(8), kind="prune", seq=last, record_hash=end, created_at=utcnow(),
            mac=checkpoint_mac(key, last, end, "prune") if key else None))
        await _lift(connection, postgres, False)
    return int(deleted or 0), last


async def _lift(connection: Any, postgres: bool, lift: bool) -> None:
    """Lift (or put back) the append-only triggers of the records and spans, inside the prune's
    transaction only."""
    for table in ("decision_records", "spans"):
        if postgres:
            verb = "DISABLE" if lift else "ENABLE"
            await connection.exec_driver_sql(f"ALTER TABLE {table} {verb} TRIGGER {table}_append_only")
        elif lift:
            await connection.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_no_delete")
        else:
            await connection.exec_driver_sql(
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_delete BEFORE DELETE ON {table} BEGIN SELECT "
                f"RAISE(ABORT, 'lockgate: DELETE on {table} is refused: the audit is append-only'); END")
