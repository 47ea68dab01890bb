"""Buffered writes of what each call leaves behind: decision records, spans and ledger settlements.

Requests never wait on these writes. Rows are written every ``audit_flush_interval_s`` or as
soon as ``audit_batch_size`` are waiting, and always on shutdown, in one transaction per flush:
a call's decision record and the settlement of its budget reservation land together or not at
all, so the audit's cost and the ledger's spend always agree. A failed write keeps its rows and
tries again on the next flush; nothing is dropped while the process lives.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.budgets import Reservation, settlement, write_settlements
from gateway.store import DecisionRecord, SpanRecord

log = logging.getLogger("lockgate.audit")

_TABLES = {"decision": DecisionRecord.__table__, "span": SpanRecord.__table__}  # type: ignore[attr-defined]
_KINDS = (*_TABLES, "settlement")


class AuditWriter:
    def __init__(self, engine: AsyncEngine, flush_interval_s: float, batch_size: int) -> None:
        self._engine = engine
        self._interval = flush_interval_s
        self._batch_size = batch_size
        # deque.append is atomic, so the span exporter's thread may add rows without a lock.
        self._pending: dict[str, deque[dict[str, Any]]] = {kind: deque() for kind in _KINDS}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def add_decision(self, row: dict[str, Any]) -> None:
        for name, value in row.items():
            if isinstance(value, str) and "\x00" in value:
                # PostgreSQL text refuses NUL, and one row it refuses would hold back every
                # later one (and the settlements written with them).
                row[name] = value.replace("\x00", "\ufffd")
        self._pending["decision"].append(row)
        if len(self._pending["decision"]) >= self._batch_size:
            self._wake.set()

    def add_settlement(self, reservation: Reservation, actual_micro_usd: int) -> None:
        """Replace a reservation by the actual cost, in the flush that writes the call's record."""
        self._pending["settlement"].extend(settlement(reservation, actual_micro_usd))

    def add_spans(self, rows: list[dict[str, Any]]) -> None:
        """Called from the span processor's thread."""
        self._pending["span"].extend(rows)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lockgate-audit-writer")

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # keep the rows; the next flush tries again
                log.exception("audit write failed; %d rows kept for the next try", self.pending)

    @property
    def pending(self) -> int:
        return sum(len(rows) for rows in self._pending.values())

    async def flush(self) -> None:
        async with self._lock:
            batches = {kind: [rows.popleft() for _ in range(len(rows))] for kind, rows in self._pending.items()}
            if not any(batches.values()):
                return
            try:
                async with self._engine.begin() as connection:
                    for kind, table in _TABLES.items():
                        if batches[kind]:
                            await connection.execute(table.insert(), batches[kind])
                    await write_settlements(connection, batches["settlement"])
            except BaseException:
                for kind, rows in batches.items():
                    self._pending[kind].extendleft(reversed(rows))
                raise

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()
