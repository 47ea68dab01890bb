"""Buffered writes of what each call leaves behind: decision records, spans and ledger settlements.

Requests never wait on these writes. Rows are written every ``audit_flush_interval_s`` or as
soon as ``audit_batch_size`` are waiting, and always on shutdown, in one transaction per flush:
a call's decision record and the settlement of its budget reservation land together or not at
all, so the audit's cost and the ledger's spend always agree. While the store does not answer,
a failed write keeps its rows and tries again on the next flush. When the store answers but
refuses the batch, one of its rows is bad (a value the store cannot hold): the rows are then
written one at a time and only the ones the store refuses are dropped, with an error in the
log, so one bad row never holds back every later record and settlement.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from gateway.budgets import Reservation, settlement, settlement_statement
from gateway.store import DecisionRecord, DirectStatements, SpanRecord

log = logging.getLogger("lockgate.audit")

_TABLES = {"decision": DecisionRecord.__table__, "span": SpanRecord.__table__}  # type: ignore[attr-defined]
_KINDS = (*_TABLES, "settlement")
_SLICE = 128  # rows turned into statement parameters between two turns of the event loop


class AuditWriter:
    def __init__(self, direct: DirectStatements, flush_interval_s: float, batch_size: int) -> None:
        self._direct = direct
        self._interval = flush_interval_s
        self._batch_size = batch_size
        # deque.append is atomic, so a span ended on another thread may add its row without a lock.
        self._pending: dict[str, deque[dict[str, Any]]] = {kind: deque() for kind in _KINDS}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closing = False

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

    def add_span(self, row: dict[str, Any]) -> None:
        self._pending["span"].append(row)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lockgate-audit-writer")

    async def _run(self) -> None:
        while not self._closing:
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
            handed_on = False  # until the rows are written, or passed to a path that keeps what it cannot write
            try:
                try:
                    await self._write(batches)
                    handed_on = True
                    return
                except Exception:
                    if not await self._store_answers():
                        raise
                    log.exception("the store refused a batch of %d audit rows; writing them one at a time",
                                  sum(len(rows) for rows in batches.values()))
                handed_on = True
                await self._write_one_at_a_time(batches)
            finally:
                if not handed_on:  # the store is away, or the flush was cancelled: keep all for the next
                    self._keep(batches)

    async def _write(self, batches: dict[str, list[dict[str, Any]]]) -> None:
        """One transaction; the settlements last, so PostgreSQL holds their ledger rows' locks
        (which reserving calls wait for) only for the end of it."""
        statements = []
        for kind, table in _TABLES.items():
            rows = batches.get(kind)
            for start in range(0, len(rows or ()), _SLICE):
                statements.append(self._direct.insert(table, rows[start:start + _SLICE]))  # type: ignore[index]
                await asyncio.sleep(0)  # let calls run between slices of this work on the event loop
        statements.append(settlement_statement(batches.get("settlement", ())))
        await self._direct.write_batch(statements)

    async def _write_one_at_a_time(self, batches: dict[str, list[dict[str, Any]]]) -> None:
        """Each row alone; drop those the store refuses while it answers; keep the rest if it stops."""
        rows = [(kind, row) for kind, kind_rows in batches.items() for row in kind_rows]
        done = 0
        try:
            for kind, row in rows:
                try:
                    await self._write({kind: [row]})
                except Exception:
                    if not await self._store_answers():
                        raise
                    name = row.get("id") or row.get("span_id") or row.get("scope")
                    log.exception("the store refuses audit %s row %s; it is dropped", kind, name)
                done += 1
        finally:
            rest: dict[str, list[dict[str, Any]]] = {}
            for kind, row in rows[done:]:
                rest.setdefault(kind, []).append(row)
            self._keep(rest)

    async def _store_answers(self) -> bool:
        try:
            await self._direct.ping()
        except Exception:
            return False
        return True

    def _keep(self, batches: dict[str, list[dict[str, Any]]]) -> None:
        for kind, rows in batches.items():
            self._pending[kind].extendleft(reversed(rows))

    async def close(self) -> None:
        """Let a flush under way finish (cancelled inside its commit, it could not know whether
        its rows were written, and a retry could apply a settlement twice), then write the rest."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.flush()
