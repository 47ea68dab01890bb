"""Stages 5 and 8, reserve and settle: charging calls against budgets in the ledger.

Before a call, its worst-case cost is reserved against every budget the policy names by
conditional UPDATEs (``spent + reserved + amount <= limit``), one transaction for all of them,
so concurrent calls on any number of replicas sharing the store can never reserve past a limit.
The common case, one budget on a row that exists, is a single statement on the driver itself
(``DirectStatements``). After the call, the reservation is replaced by the actual cost: the
settlement is written by the audit writer in the same transaction as the call's decision record,
so the ledger and the audit always agree, and the request path never waits for it. Until then
the reservation stays held, which can only over-count. Money is integer micro-dollars.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from opentelemetry.trace import Tracer
from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.errors import BudgetExceeded, StoreUnavailable
from gateway.store import BudgetLedger, DirectStatements, LedgerReservation
from gateway.types import Budget

log = logging.getLogger("lockgate.budgets")

WINDOWS = ("day", "month", "total")
_ledger = BudgetLedger.__table__  # type: ignore[attr-defined]
_leases = LedgerReservation.__table__  # type: ignore[attr-defined]


def period_of(window: str, now: datetime) -> str:
    if window == "day":
        return f"{now.year:04d}-{now.month:02d}-{now.day:02d}"
    if window == "month":
        return f"{now.year:04d}-{now.month:02d}"
    return "all"


# The hot path's one statement: $1 amount, $2 scope, $3 window, $4 period, $5 limit.
RESERVE_ONE = (
    "UPDATE budget_ledger SET reserved_micro_usd = reserved_micro_usd + $1 "
    "WHERE scope = $2 AND \"window\" = $3 AND period = $4 AND spent_micro_usd + reserved_micro_usd + $1 <= $5")
# With the reservation, in the same transaction: its lease ($1 decision id, $2 rows as JSON,
# $3 amount, $4 lease end).
INSERT_LEASE = ("INSERT INTO ledger_reservations (id, rows, amount_micro_usd, lease_until, state) "
                "VALUES ($1, $2, $3, $4, 'held')")
# A settlement, per call and ledger row, applied once whatever retries it: the lease's state says
# whether the reservation is still held (released by the lease's end: only spend is added) and
# whether this call was settled before (nothing changes). $1 decision id, $2 reserved amount,
# $3 actual cost, $4 scope, $5 window, $6 period.
SETTLE = (
    "UPDATE budget_ledger SET "
    "reserved_micro_usd = reserved_micro_usd - CASE (SELECT state FROM ledger_reservations WHERE id = $1) "
    "WHEN 'held' THEN $2 ELSE 0 END, "
    "spent_micro_usd = spent_micro_usd + CASE (SELECT state FROM ledger_reservations WHERE id = $1) "
    "WHEN 'settled' THEN 0 ELSE $3 END "
    "WHERE scope = $4 AND \"window\" = $5 AND period = $6")
SETTLED = "UPDATE ledger_reservations SET state = 'settled' WHERE id = $1 AND state <> 'settled'"
# PostgreSQL: a settling writer and a lease's release take the lease row first, so the one that
# comes second sees what the first did (SQLite runs one writer at a time).
LOCK_LEASE = "SELECT id FROM ledger_reservations WHERE id = $1 FOR UPDATE"
# A lease that ended: released once, by whichever process gets there first.
RELEASE_LEASE = ("UPDATE ledger_reservations SET state = 'released' "
                 "WHERE id = $1 AND state = 'held' AND lease_until < $2")
# $1 amount, $2 scope, $3 window, $4 period
RELEASE_ROW = ("UPDATE budget_ledger SET reserved_micro_usd = reserved_micro_usd - $1 "
               "WHERE scope = $2 AND \"window\" = $3 AND period = $4")
# Settled and released leases are kept a day after their end, for late settlements, then dropped.
PRUNE_LEASES = "DELETE FROM ledger_reservations WHERE state <> 'held' AND lease_until < $1"


def _exceeded(budget: Budget, amount_micro_usd: int) -> BudgetExceeded:
    return BudgetExceeded(
        f"Budget {budget.scope} ({budget.window}) cannot cover this call: its limit is "
        f"${budget.limit_micro_usd / 1e6:.2f} and this call may cost up to ${amount_micro_usd / 1e6:.4f}.")


@dataclass(frozen=True)
class Reservation:
    rows: tuple[tuple[str, str, str], ...]  # (scope, window, period)
    amount_micro_usd: int
    id: str = ""  # the call's decision id: its lease row, the key of its settlement


class BudgetLedgerStore:
    def __init__(self, engine: AsyncEngine, direct: DirectStatements, spend_cache_ttl_s: float) -> None:
        self._engine = engine
        self._direct = direct
        self._insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
        self._known_rows: set[tuple[str, str, str]] = set()
        self._spend_ttl = spend_cache_ttl_s
        self._spend_cache: dict[tuple[str, ...], tuple[dict[str, dict[str, int]], float]] = {}

    async def spend(self, scopes: Sequence[str], now: datetime) -> dict[str, dict[str, int]]:
        """Settled spend per scope and window, for the policy input; at most ``spend_cache_ttl_s`` old."""
        key = tuple(scopes)
        cached = self._spend_cache.get(key)
        clock = time.monotonic()
        if cached is not None and cached[1] > clock:
            return cached[0]
        periods = [(w, period_of(w, now)) for w in WINDOWS]
        query = select(_ledger.c.scope, _ledger.c.window, _ledger.c.spent_micro_usd).where(
            _ledger.c.scope.in_(scopes),
            or_(*(and_(_ledger.c.window == w, _ledger.c.period == p) for w, p in periods)),
        )
        try:
            async with self._engine.connect() as connection:
                rows = (await connection.execute(query)).all()
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc
        spend: dict[str, dict[str, int]] = {}
        for scope, window, spent in rows:
            spend.setdefault(scope, {})[window] = spent
        if len(self._spend_cache) > 10_000:
            self._spend_cache.clear()
        self._spend_cache[key] = (spend, clock + self._spend_ttl)
        return spend

    async def reserve(self, budgets: Sequence[Budget], amount_micro_usd: int, now: datetime,
                      decision_id: str = "", lease_s: float = 900.0) -> Reservation:
        """Reserve ``amount_micro_usd`` on every budget, or none; with a lease that lets any
        process release it after ``lease_s`` should its settlement never come."""
        if not budgets:
            return Reservation(rows=(), amount_micro_usd=0)
        decision_id = decision_id or "res_" + secrets.token_hex(8)
        lease_until = now + timedelta(seconds=lease_s)
        for budget in budgets:
            if amount_micro_usd > budget.limit_micro_usd:
                # It can never fit, so the store need not be asked; asked, PostgreSQL's BIGINT
                # sum (spent + reserved + amount) could overflow for an amount near 2**63.
                raise _exceeded(budget, amount_micro_usd)
        # Rows are always locked in one order, so two calls naming the same budgets in another
        # order cannot deadlock on PostgreSQL.
        budgets = sorted(budgets, key=lambda b: (b.scope, b.window))
        rows = tuple((b.scope, b.window, period_of(b.window, now)) for b in budgets)
        reservation = Reservation(rows=rows, amount_micro_usd=amount_micro_usd, id=decision_id)
        if len(rows) == 1 and rows[0] in self._known_rows:
            if await self._reserve_one(budgets[0], reservation, lease_until):
                return reservation
            # Refused, or the row is gone: the full path below decides, and says which.
            self._known_rows.discard(rows[0])
        try:
            async with self._engine.begin() as connection:
                missing = [row for row in rows if row not in self._known_rows]
                if missing:
                    await connection.execute(
                        self._insert(_ledger).values(
                            [{"scope": s, "window": w, "period": p, "spent_micro_usd": 0, "reserved_micro_usd": 0}
                             for s, w, p in missing]
                        ).on_conflict_do_nothing()
                    )
                for budget, (scope, window, period) in zip(budgets, rows, strict=True):
                    c = _ledger.c
                    result = await connection.execute(
                        update(_ledger)
                        .where(c.scope == scope, c.window == window, c.period == period,
                               c.spent_micro_usd + c.reserved_micro_usd + amount_micro_usd <= budget.limit_micro_usd)
                        .values(reserved_micro_usd=c.reserved_micro_usd + amount_micro_usd)
                    )
                    if result.rowcount != 1:
                        # Leaving the block by exception rolls back the reservations made so far.
                        raise _exceeded(budget, amount_micro_usd)
                await connection.execute(_leases.insert().values(
                    id=decision_id, rows=[list(row) for row in rows], amount_micro_usd=amount_micro_usd,
                    lease_until=lease_until, state="held"))
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc
        self._known_rows.update(rows)
        return reservation

    async def _reserve_one(self, budget: Budget, reservation: Reservation, lease_until: datetime) -> bool:
        """The common case, one budget on a known row: the reservation and its lease, one
        transaction on the driver itself."""
        (scope, window, period), amount = reservation.rows[0], reservation.amount_micro_usd
        try:
            return await self._direct.update_then(
                RESERVE_ONE, (amount, scope, window, period, budget.limit_micro_usd),
                [(INSERT_LEASE, [(reservation.id, orjson.dumps([[scope, window, period]]).decode(), amount,
                                  self._direct.datetime_value(lease_until))])])
        except Exception as exc:  # the driver's own errors (sqlite3, asyncpg, OSError): fail closed
            raise StoreUnavailable() from exc

    async def release_expired(self, now: datetime, limit: int = 200) -> list[Reservation]:
        """Release the reservations whose lease ended before ``now`` (their call never settled:
        its process died, or its settlement was lost); each once, whichever process gets there
        first. The ones this call released."""
        c = _leases.c
        try:
            async with self._engine.connect() as connection:
                found = (await connection.execute(
                    select(c.id, c.rows, c.amount_micro_usd).where(c.state == "held", c.lease_until < now)
                    .order_by(c.id).limit(limit))).all()
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc
        released = []
        stamp = self._direct.datetime_value(now)
        for lease_id, rows, amount in found:
            rows = tuple(tuple(row) for row in rows)
            statements = [(RELEASE_ROW, [(amount, *row) for row in sorted(rows)])]
            if await self._direct.update_then(RELEASE_LEASE, (lease_id, stamp), statements):
                released.append(Reservation(rows=rows, amount_micro_usd=amount, id=lease_id))
        await self._direct.rowcount(PRUNE_LEASES, self._direct.datetime_value(now - timedelta(days=1)))
        return released


def settlement(reservation: Reservation, actual_micro_usd: int) -> list[dict[str, Any]]:
    """The ledger changes that replace a reservation by the actual cost (0 when the call failed
    before a reply), for ``settlement_statements``."""
    return [{"id": reservation.id, "scope": scope, "window": window, "period": period,
             "reserved": reservation.amount_micro_usd, "actual": actual_micro_usd}
            for scope, window, period in reservation.rows]


def settlement_statements(settlements: Sequence[dict[str, Any]], postgres: bool
                          ) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """Settlements for ``DirectStatements.write_batch``, inside the caller's transaction, each
    applied once whatever retries the batch (see SETTLE): the leases locked first (PostgreSQL),
    the ledger rows in the order reservations lock them (no deadlock with reserving calls), then
    the leases marked settled."""
    if not settlements:
        return []
    ids = sorted({entry["id"] for entry in settlements})
    rows = sorted(((e["id"], e["reserved"], e["actual"], e["scope"], e["window"], e["period"]) for e in settlements),
                  key=lambda r: (r[3], r[4], r[5], r[0]))
    statements = [(LOCK_LEASE, [(i,) for i in ids])] if postgres else []
    return [*statements, (SETTLE, rows), (SETTLED, [(i,) for i in ids])]


class LeaseReaper:
    """Every ``interval_s``, release the reservations whose lease ended (``release_expired``), and
    audit each release as a span of its own (``lockgate.ledger.lease_released``)."""

    def __init__(self, ledger: BudgetLedgerStore, tracer: Tracer, interval_s: float) -> None:
        self._ledger = ledger
        self._tracer = tracer
        self._interval = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lockgate-lease-reaper")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.reap()
            except Exception:
                log.warning("releasing reservations whose lease ended failed; trying again", exc_info=True)

    async def reap(self) -> int:
        released = await self._ledger.release_expired(datetime.now(UTC))
        for reservation in released:
            log.warning("released the reservation of %s (%d micro-USD): its lease ended before its call settled",
                        reservation.id, reservation.amount_micro_usd)
            span = self._tracer.start_span("lockgate.ledger.lease_released", attributes={
                "lockgate.decision_id": reservation.id, "lockgate.reservation.micro_usd": reservation.amount_micro_usd,
                "lockgate.budget.scopes": [f"{scope}/{window}/{period}" for scope, window, period in reservation.rows]})
            span.end()
        return len(released)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
