"""Buffered writes of what each call leaves behind: decision records, spans and ledger settlements.

Every row is journaled first (gateway/audit/journal.py): ``durable`` writes the journal out
before a call's answer ends, so an answered call's record survives the process being killed;
a process that starts replays the journals of the ones that are gone. Requests never wait on
the store's writes. Rows are written every ``audit_flush_interval_s`` or as
soon as ``audit_batch_size`` decision records are waiting, and always on shutdown, in
transactions of up to ``CALLS_PER_TRANSACTION`` calls: a call's decision record and the
settlement of its budget reservation land together or not at all, so the audit's cost and the
ledger's spend always agree. While the store does not answer (or is busy, or locked), a failed
write keeps its rows and tries again on the next flush. When the store refuses a value of a
transaction (``refuses_value``), its rows are written one at a time, and a decision record or
span the store refuses as given is written reduced (gateway/audit/reduce.py), so one bad row
never holds back every later record and settlement, and no record is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import DateTime

from gateway.audit.journal import Journal, encode, orphaned, read
from gateway.audit.reduce import MAX_ROW_BYTES, reduce_decision, reduce_span, skeleton
from gateway.budgets import Reservation, Used, settlement, settlement_statements
from gateway.errors import AuditUnavailable
from gateway.store import DecisionRecord, DirectStatements, SpanRecord, StoredResponse, refuses_value

log = logging.getLogger("lockgate.audit")

_TABLES = {"decision": DecisionRecord.__table__, "span": SpanRecord.__table__,  # type: ignore[attr-defined]
           "response": StoredResponse.__table__}  # type: ignore[attr-defined]
# Calls per transaction. A reservation on SQLite waits for the transaction under way (one
# connection runs both), and one call's rows cost ~30 us of SQLite's time on the bench machine:
# 64 calls keep that wait near 2 ms. A flush writes as many transactions as it needs.
CALLS_PER_TRANSACTION = 64
REDUCERS = {"decision": reduce_decision, "span": reduce_span}
REPLAY_EVERY_S = 30.0  # how often a running process looks for journals of processes that are gone
CHECKPOINT_EVERY_S = 10.0  # at most this often, a flush signs where the hash chain ends

Item = tuple[str, dict[str, Any]]  # ("decision" | "span" | "response" | "settlement" | "approval", row)

# The end of an approved call (gateway/approvals.py): only from executing, and only by the call
# that claimed it, so a retried batch or a late writer can never move it twice.
# Approved again (the provider cannot have billed the failed attempt), it is free to run once more.
APPROVAL_OUTCOME = ("UPDATE approvals SET status = $1, executed_at = $2, executed_by = $3 "
                    "WHERE id = $4 AND status = 'executing' AND executed_by = $5")


def approval_outcome_statement(direct: DirectStatements, rows: list[dict[str, Any]]
                               ) -> tuple[str, list[tuple[Any, ...]]]:
    statement = []
    for r in rows:
        again = r["status"] == "approved"
        statement.append((r["status"], None if again else direct.datetime_value(r["at"]),
                          None if again else r["decision_id"], r["id"], r["decision_id"]))
    return APPROVAL_OUTCOME, statement


class AuditWriter:
    def __init__(self, direct: DirectStatements, flush_interval_s: float, batch_size: int,
                 journal: Journal | None = None, checkpoint_key: str = "") -> None:
        self._direct = direct
        self._journal = journal
        self._checkpoint_key = checkpoint_key  # signs the chain's checkpoints (HMAC); kept outside the store
        self._next_checkpoint = 0.0
        self._interval = flush_interval_s
        self._batch_size = batch_size
        # One queue, in the order rows arrive: a call queues its settlement just before its
        # decision record, so a transaction that ends after a decision record holds both.
        # deque.append is atomic, so a span ended on another thread may add its row without a lock.
        self._pending: deque[Item] = deque()
        self._decisions = 0  # decision records in _pending (approximate while a flush runs)
        # Ids of stored responses queued and not yet written (gateway/stored_responses.py): an id
        # leaves this set only after its row was written or dropped.
        self._responses: set[str] = set()
        self._approvals: set[str] = set()  # likewise, approvals whose outcome is queued
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closing = False
        # The store did not take the last write (it is away): calls are refused, or on a route
        # that fails open, served and marked (gateway/pipeline.py). Cleared by the next write that
        # succeeds, or a ping that answers when nothing waits to be written.
        self._store_away = False
        self._journal_failed = False

    @property
    def available(self) -> bool:
        """The audit can be written: the store took the last write, and the journal the last rows."""
        return not (self._store_away or self._journal_failed)

    def add_decision(self, row: dict[str, Any]) -> None:
        for name, value in row.items():
            if isinstance(value, str) and "\x00" in value:
                # PostgreSQL text refuses NUL, and one row it refuses would hold back every
                # later one (and the settlements written with them).
                row[name] = value.replace("\x00", "\ufffd")
        self._queue("decision", row)
        self._decisions += 1
        if self._decisions >= self._batch_size:
            self._wake.set()
    def add_settlement(self, reservation: Reservation, used: Used | int) -> None:
        """Replace a reservation by what the call used, in the transaction that writes the call's
        record: the caller queues its decision record right after, with no await between."""
        rows = settlement(reservation, used)
        self._pending.extend(("settlement", row) for row in rows)
        if self._journal is not None:
            for row in rows:
                self._journal.append("settlement", row)

    def add_stored_response(self, row: StoredResponse) -> None:
        """Who made a response the provider keeps; queued before the call's decision record, so
        both land in one transaction."""
        self._responses.add(row.id)
        self._queue("response", row.model_dump())

    def holds_response(self, response_id: str) -> bool:
        """The row of this stored response is queued, not yet in the store."""
        return response_id in self._responses

    def add_approval_outcome(self, approval_id: str, decision_id: str, status: str, at: datetime) -> None:
        """What the call that ran an approval made of it (executed, failed, or approved again):
        queued before the call's decision record, so both land in one transaction."""
        self._approvals.add(approval_id)
        self._queue("approval", {"id": approval_id, "decision_id": decision_id, "status": status, "at": at})

    def holds_approval(self, approval_id: str) -> bool:
        """An outcome of this approval is queued, not yet in the store."""
        return approval_id in self._approvals

    def add_span(self, row: dict[str, Any]) -> None:
        self._queue("span", row)

    def _queue(self, kind: str, row: dict[str, Any]) -> None:
        if self._journal is not None:
            # Journaling encodes the row anyway: a row JSON cannot hold, or too large to keep
            # whole, is reduced here (gateway/audit/reduce.py), so the store is given what it holds.
            try:
                line = encode(kind, row)
                too_large = len(line) > MAX_ROW_BYTES
            except orjson.JSONEncodeError:
                line, too_large = b"", True
            if too_large and kind in REDUCERS:
                why = f"{len(line)} bytes as given (more than {MAX_ROW_BYTES})" if line \
                    else "it could not be encoded as JSON"
                row = REDUCERS[kind](row, why)
                line = encode(kind, row)
            self._journal.append_line(line)
        self._pending.append((kind, row))

    def durable(self) -> None:
        """Make every row queued so far survive this process (the journal's write): called before a
        call's answer ends. Raises AuditUnavailable if the journal cannot be written (fail closed)."""
        if self._journal is None:
            return
        try:
            self._journal.write_out()
            self._journal_failed = False
        except OSError as exc:
            self._journal_failed = True
            log.exception("the audit journal cannot be written")
            raise AuditUnavailable("The audit journal cannot be written, so this call's answer is withheld.") from exc

    async def replay(self, root: Path) -> int:
        """Write the journals of gateway processes that are gone into the store, then delete them:
        the records of calls they answered but had not written yet. The rows replayed."""
        replayed = 0
        for folder, lock in orphaned(root):
            try:
                items = [_revive(kind, row) for kind, row in read(folder)]
                self._pending.extendleft(reversed(items))
                await self.flush()
                replayed += len(items)
                shutil.rmtree(folder, ignore_errors=True)
                if items:
                    log.warning("replayed %d audit rows journaled by a gateway process that stopped before "
                                "writing them", len(items))
            finally:
                os.close(lock)
        return replayed

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lockgate-audit-writer")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_replay = loop.time() + REPLAY_EVERY_S
        while not self._closing:
            if self._journal is not None and loop.time() >= next_replay:
                # Another process sharing the journal folder may have died since we started.
                next_replay = loop.time() + REPLAY_EVERY_S
                try:
                    await self.replay(self._journal.root)
                except Exception:
                    log.exception("replaying the audit journal of a stopped process failed; trying again later")
            # Woken by a full batch, close, or the interval (a timer: asyncio.wait_for would cost a
            # task per wake-up).
            timer = loop.call_later(self._interval, self._wake.set)
            await self._wake.wait()
            timer.cancel()
            self._wake.clear()
            try:
                if self._store_away and not self._pending:
                    self._store_away = not await self._store_answers()
                await self.flush()
            except Exception:  # keep the rows; the next flush tries again
                if not self._store_away:
                    log.exception("audit write failed; %d rows kept for the next try", self.pending)
                self._store_away = True

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> None:
        async with self._lock:
            sealed = self._journal.seal() if self._journal is not None else None
            items = [self._pending.popleft() for _ in range(len(self._pending))]
            self._decisions = 0
            written = 0  # items[:written] are in the store, or were refused by it and dropped
            try:
                while written < len(items):
                    end = _transaction_end(items, written)
                    try:
                        await self._write(items[written:end])
                        written = end
                        continue
                    except Exception as exc:
                        if not refuses_value(exc) or not await self._store_answers():
                            raise
                        log.warning("the store refused a batch of %d audit rows (%s); writing them one at a time",
                                    end - written, type(exc).__name__)
                    for kind, row in items[written:end]:
                        await self._write_one(kind, row)
                        written += 1
            finally:
                if self._responses:
                    self._responses.difference_update(row["id"] for kind, row in items[:written] if kind == "response")
                if self._approvals:
                    self._approvals.difference_update(row["id"] for kind, row in items[:written] if kind == "approval")
                # The store is away, or the flush was cancelled: keep the rest for the next one.
                self._pending.extendleft(reversed(items[written:]))
                if written == len(items):
                    if items:
                        self._store_away = False
                    if sealed is not None and self._journal is not None:
                        self._journal.drop(sealed)  # every row sealed so far is in the store
                self._decisions += sum(1 for kind, _ in items[written:] if kind == "decision")

    async def _write_one(self, kind: str, row: dict[str, Any]) -> None:
        """Write one row the store refused in a batch. A decision record or span it refuses as
        given is written reduced, then as a skeleton (gateway/audit/reduce.py): never dropped.
        Raises when the store goes away meanwhile (the row is kept for the next flush)."""
        tries: list[dict[str, Any]] = [row]
        try:
            await self._write([(kind, row)])
            return
        except Exception as exc:
            if not refuses_value(exc) or not await self._store_answers():
                raise
            why = f"the store refused it as given ({type(exc).__name__})"
        if kind == "decision":
            tries = [reduce_decision(row, why), skeleton(row, why)]
        elif kind == "span":
            tries = [reduce_span(row, why)]
        else:
            tries = []
        for reduced in tries:
            try:
                await self._write([(kind, reduced)])
                log.warning("audit %s row %s was written reduced: %s", kind, row.get("id") or row.get("span_id"), why)
                return
            except Exception as exc:
                if not refuses_value(exc) or not await self._store_answers():
                    raise
        name = row.get("id") or row.get("span_id") or row.get("scope")
        log.error("the store refuses audit %s row %s even reduced; it is dropped", kind, name)

    async def _write(self, items: list[Item]) -> None:
        """One transaction; the settlements last, so PostgreSQL holds their ledger rows' locks
        (which reserving calls wait for) only for the end of it."""
        rows: dict[str, list[dict[str, Any]]] = {"decision": [], "span": [], "response": [], "settlement": [],
                                                 "approval": []}
        for kind, row in items:
            rows[kind].append(row)
        # Decision records go into the hash chain, first in the transaction (gateway/audit/chain.py).
        statements = [self._direct.insert(table, rows[kind]) for kind, table in _TABLES.items() if kind != "decision"]
        statements.append(approval_outcome_statement(self._direct, rows["approval"]))
        statements += settlement_statements(rows["settlement"], self._direct.postgres)
        checkpoint = None
        now = time.monotonic()
        if rows["decision"] and now >= self._next_checkpoint:
            checkpoint = ("cp_" + secrets.token_hex(8), self._checkpoint_key)
            self._next_checkpoint = now + CHECKPOINT_EVERY_S
        await self._direct.write_batch(statements, rows["decision"], checkpoint)

    async def _store_answers(self) -> bool:
        try:
            await self._direct.ping()
        except Exception:
            return False
        return True

    async def close(self) -> None:
        """Let a flush under way finish (cancelled inside its commit, it could not know whether
        its rows were written, and a retry could apply a settlement twice), then write the rest."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.flush()
        if not self._pending:
            try:  # sign where the chain ends, so verify sees a tail cut off after this
                await self._direct.write_batch([], (), ("cp_" + secrets.token_hex(8), self._checkpoint_key))
            except Exception:
                log.warning("could not write the audit chain's last checkpoint", exc_info=True)
        if self._journal is not None:
            self._journal.close(clean=not self._pending)


def _is_datetime(column: Any) -> bool:
    kind = column.type
    return isinstance(kind, DateTime) or isinstance(getattr(kind, "impl", None), DateTime)  # sqlmodel's UTCDateTime


_DATETIMES = {kind: {c.name for c in table.columns if _is_datetime(c)} for kind, table in _TABLES.items()}
_DATETIMES["approval"] = {"at"}


def _revive(kind: str, row: dict[str, Any]) -> Item:
    """A journaled row as the writer queued it: its datetimes, which JSON made strings, made again."""
    for name in _DATETIMES.get(kind, ()):
        if isinstance(row.get(name), str):
            row[name] = datetime.fromisoformat(row[name])
    return kind, row


def _transaction_end(items: list[Item], start: int) -> int:
    """The end of the transaction that starts at ``start``: just after its CALLS_PER_TRANSACTION-th
    decision record (so no call's settlement is parted from its record), or the end of the queue."""
    decisions = 0
    for index in range(start, len(items)):
        if items[index][0] == "decision":
            decisions += 1
            if decisions == CALLS_PER_TRANSACTION:
                return index + 1
    return len(items)
