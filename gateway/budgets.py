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

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.errors import BudgetExceeded, StoreUnavailable
from gateway.store import BudgetLedger, DirectStatements
from gateway.types import Budget

WINDOWS = ("day", "month", "total")
_ledger = BudgetLedger.__table__  # type: ignore[attr-defined]


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
# $1 reserved amount to release, $2 actual cost, $3 scope, $4 window, $5 period.
SETTLE = (
    "UPDATE budget_ledger SET reserved_micro_usd = reserved_micro_usd - $1, spent_micro_usd = spent_micro_usd + $2 "
    "WHERE scope = $3 AND \"window\" = $4 AND period = $5")


def _exceeded(budget: Budget, amount_micro_usd: int) -> BudgetExceeded:
    return BudgetExceeded(
        f"Budget {budget.scope} ({budget.window}) cannot cover this call: its limit is "
        f"${budget.limit_micro_usd / 1e6:.2f} and this call may cost up to ${amount_micro_usd / 1e6:.4f}.")


@dataclass(frozen=True)
class Reservation:
    rows: tuple[tuple[str, str, str], ...]  # (scope, window, period)
    amount_micro_usd: int


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

    async def reserve(self, budgets: Sequence[Budget], amount_micro_usd: int, now: datetime) -> Reservation:
        if not budgets:
            return Reservation(rows=(), amount_micro_usd=0)
        for budget in budgets:
            if amount_micro_usd > budget.limit_micro_usd:
                # It can never fit, so the store need not be asked; asked, PostgreSQL's BIGINT
                # sum (spent + reserved + amount) could overflow for an amount near 2**63.
                raise _exceeded(budget, amount_micro_usd)
        # Rows are always locked in one order, so two calls naming the same budgets in another
        # order cannot deadlock on PostgreSQL.
        budgets = sorted(budgets, key=lambda b: (b.scope, b.window))
        rows = tuple((b.scope, b.window, period_of(b.window, now)) for b in budgets)
        if len(rows) == 1 and rows[0] in self._known_rows:
            if await self._reserve_one(budgets[0], rows[0], amount_micro_usd):
                return Reservation(rows=rows, amount_micro_usd=amount_micro_usd)
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
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc
        self._known_rows.update(rows)
        return Reservation(rows=rows, amount_micro_usd=amount_micro_usd)

    async def _reserve_one(self, budget: Budget, row: tuple[str, str, str], amount_micro_usd: int) -> bool:
        """The common case, one budget on a known row: one statement, atomic on its own."""
        scope, window, period = row
        try:
            changed = await self._direct.rowcount(RESERVE_ONE, amount_micro_usd, scope, window, period,
                                                  budget.limit_micro_usd)
        except Exception as exc:  # the driver's own errors (sqlite3, asyncpg, OSError): fail closed
            raise StoreUnavailable() from exc
        return changed == 1


def settlement(reservation: Reservation, actual_micro_usd: int) -> list[dict[str, Any]]:
    """The ledger changes that replace a reservation by the actual cost (0 when the call failed
    before a reply), for ``settlement_statement``."""
    return [{"scope": scope, "window": window, "period": period,
             "reserved": reservation.amount_micro_usd, "actual": actual_micro_usd}
            for scope, window, period in reservation.rows]


def settlement_statement(settlements: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[Any, ...]]]:
    """Settlements as one statement for ``DirectStatements.write_batch``, to run inside the
    caller's transaction: one UPDATE per ledger row, in the same row order reservations lock
    them, so a settling writer and reserving calls cannot deadlock."""
    totals: dict[tuple[str, str, str], list[int]] = {}
    for entry in settlements:
        total = totals.setdefault((entry["scope"], entry["window"], entry["period"]), [0, 0])
        total[0] += entry["reserved"]
        total[1] += entry["actual"]
    return SETTLE, [(reserved, actual, scope, window, period)
                    for (scope, window, period), (reserved, actual) in sorted(totals.items())]
