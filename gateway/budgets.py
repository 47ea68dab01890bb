"""Stages 5 and 8, reserve and settle: charging calls against budgets in the ledger.

See docs/budgets.md. Before a call, what it may use at worst is reserved against every budget
it is charged to (the policy's ``budgets``, its rate ``limits``, its run), by conditional UPDATEs
(``spent + reserved + amount <= limit``) in one transaction with the call's lease row, on the
driver itself (``DirectStatements``): concurrent calls on any number of replicas sharing the store
can never reserve past a limit. A budget counts one unit: money (integer micro-dollars), tokens,
calls, or calls running at once (``concurrent``, released at the end and never spent).

After the call, the reservation is replaced by what it used: the settlement is written by the
audit writer in the same transaction as the call's decision record, so the ledger and the audit
always agree, and it is applied once whatever retries it (it deletes the lease row, and applies
nothing where that row is gone). A reservation whose call never settled (its process died, the settlement was lost) is
released by any process once its lease ends (``LeaseReaper``), and the release is audited.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from opentelemetry.trace import Tracer
from sqlalchemy import and_, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.errors import BudgetExceeded, RateLimited, StoreUnavailable
from gateway.periodic import Periodic
from gateway.store import ApiKey, BudgetLedger, DirectStatements, LedgerReservation
from gateway.types import Budget

log = logging.getLogger("lockgate.budgets")

WINDOWS = ("minute", "day", "month", "total")
SPEND_WINDOWS = ("day", "month", "total")  # what the policy input shows
UNITS = ("usd", "tokens", "calls", "concurrent")
_ledger = BudgetLedger.__table__  # type: ignore[attr-defined]
_leases = LedgerReservation.__table__  # type: ignore[attr-defined]


def period_of(window: str, now: datetime) -> str:
    if window == "minute":
        return f"{now.year:04d}-{now.month:02d}-{now.day:02d}T{now.hour:02d}:{now.minute:02d}"
    if window == "day":
        return f"{now.year:04d}-{now.month:02d}-{now.day:02d}"
    if window == "month":
        return f"{now.year:04d}-{now.month:02d}"
    return "all"


def ledger_scope(scope: str, unit: str) -> str:
    """The ledger row's scope: money under the scope itself, other units under ``scope#unit``."""
    return scope if unit == "usd" else f"{scope}#{unit}"


def unit_of(ledger_scope_name: str) -> str:
    head, _, unit = ledger_scope_name.rpartition("#")
    return unit if head and unit in UNITS else "usd"


# Reserve on one ledger row: $1 amount, $2 scope, $3 window, $4 period, $5 limit.
RESERVE = (
    "UPDATE budget_ledger SET reserved_micro_usd = reserved_micro_usd + $1, limit_amount = $5 "
    "WHERE scope = $2 AND \"window\" = $3 AND period = $4 AND spent_micro_usd + reserved_micro_usd + $1 <= $5 "
    "RETURNING spent_micro_usd + reserved_micro_usd")
CREATE_ROW = ("INSERT INTO budget_ledger (scope, \"window\", period, spent_micro_usd, reserved_micro_usd) "
              "VALUES ($1, $2, $3, 0, 0) ON CONFLICT DO NOTHING")
# With the reservation, in the same transaction: its lease ($1 decision id, $2 rows as JSON,
# $3 the money held, $4 lease end).
INSERT_LEASE = ("INSERT INTO ledger_reservations (id, rows, amount_micro_usd, lease_until, state) "
                "VALUES ($1, $2, $3, $4, 'held')")
# A settlement, per call and ledger row, applied once whatever retries it: the lease row says
# whether the reservation is still held (released by the lease's end: only the use is added),
# and a lease that is gone was settled before (nothing changes). $1 decision id, $2 reserved
# amount, $3 actual use, $4 scope, $5 window, $6 period.
SETTLE = (
    "UPDATE budget_ledger SET "
    "reserved_micro_usd = reserved_micro_usd - CASE (SELECT state FROM ledger_reservations WHERE id = $1) "
    "WHEN 'held' THEN $2 ELSE 0 END, "
    "spent_micro_usd = spent_micro_usd + CASE WHEN EXISTS (SELECT 1 FROM ledger_reservations WHERE id = $1) "
    "THEN $3 ELSE 0 END "
    "WHERE scope = $4 AND \"window\" = $5 AND period = $6")
# Settled, the lease is gone: the table holds only calls running now, and released leases.
SETTLED = "DELETE FROM ledger_reservations WHERE id = $1"
# PostgreSQL: a settling writer and a lease's release take the lease row first, so the one that
# comes second sees what the first did (SQLite runs one writer at a time).
LOCK_LEASE = "SELECT id FROM ledger_reservations WHERE id = $1 FOR UPDATE"
# A lease that ended: released once, by whichever process gets there first.
RELEASE_LEASE = ("UPDATE ledger_reservations SET state = 'released' "
                 "WHERE id = $1 AND state = 'held' AND lease_until < $2")
# $1 amount, $2 scope, $3 window, $4 period
RELEASE_ROW = ("UPDATE budget_ledger SET reserved_micro_usd = reserved_micro_usd - $1 "
               "WHERE scope = $2 AND \"window\" = $3 AND period = $4")
# Released leases are kept a day after their end, for a late settlement, then dropped.
PRUNE_LEASES = "DELETE FROM ledger_reservations WHERE state = 'released' AND lease_until < $1"


@dataclass(frozen=True, slots=True)
class Need:
    """What a call may use at worst, per unit."""

    micro_usd: int
    tokens: int
    calls: int = 1

    def of(self, unit: str) -> int:
        return {"usd": self.micro_usd, "tokens": self.tokens}.get(unit, self.calls)


@dataclass(frozen=True, slots=True)
class Used:
    """What a call used, per unit (``calls``: 1 once a provider was asked, else 0)."""

    micro_usd: int
    tokens: int
    calls: int

    def of(self, unit: str) -> int:
        if unit == "concurrent":
            return 0  # a running call, never spent: its reservation is simply given back
        return {"usd": self.micro_usd, "tokens": self.tokens}.get(unit, self.calls)


@dataclass(frozen=True)
class Reservation:
    rows: tuple[tuple[str, str, str, int], ...]  # (ledger scope, window, period, amount held)
    id: str = ""  # the call's decision id: its lease row, the key of its settlement
    # Rate limits: (unit, limit, used after this call, seconds to the window's end), for x-ratelimit-*.
    rates: tuple[tuple[str, int, int, float], ...] = ()

    @property
    def amount_micro_usd(self) -> int:
        return max((amount for scope, _, _, amount in self.rows if unit_of(scope) == "usd"), default=0)


def _refusal(budget: Budget, need: int, now: datetime) -> BudgetExceeded | RateLimited:
    if budget.window == "minute" or budget.unit == "concurrent":
        wait = 60.0 - now.second - now.microsecond / 1e6 if budget.window == "minute" else 1.0
        what = {"tokens": "tokens per minute", "calls": "requests per minute",
                "concurrent": "calls running at once"}.get(budget.unit, "per minute")
        return RateLimited(f"Rate limit of {budget.limit} {what} reached for {budget.scope}; try again in "
                           f"{max(1, round(wait))} s.", retry_after_s=wait, tokens=budget.unit == "tokens")
    if budget.unit == "usd":
        return BudgetExceeded(
            f"Budget {budget.scope} ({budget.window}) cannot cover this call: its limit is "
            f"${budget.limit / 1e6:.2f} and this call may cost up to ${need / 1e6:.4f}.")
    return BudgetExceeded(f"Budget {budget.scope} ({budget.window}) cannot cover this call: its limit is "
                          f"{budget.limit} {budget.unit} and this call may use up to {need}.")


class BudgetLedgerStore:
    def __init__(self, engine: AsyncEngine, direct: DirectStatements, spend_cache_ttl_s: float) -> None:
        self._engine = engine
        self._direct = direct
        self._known_rows: set[tuple[str, str, str]] = set()
        self._spend_ttl = spend_cache_ttl_s
        self._spend_cache: dict[tuple[str, ...], tuple[dict[str, dict[str, int]], float]] = {}

    async def spend(self, scopes: Sequence[str], now: datetime) -> dict[str, dict[str, int]]:
        """Per scope, spent and reserved per window and unit (``month``: money spent,
        ``month_reserved``, ``month_tokens``, ``month_calls``...), for the policy input; at most
        ``spend_cache_ttl_s`` old."""
        key = tuple(scopes)
        cached = self._spend_cache.get(key)
        clock = time.monotonic()
        if cached is not None and cached[1] > clock:
            return cached[0]
        periods = [(w, period_of(w, now)) for w in SPEND_WINDOWS]
        names = {ledger_scope(s, u): (s, u) for s in scopes for u in ("usd", "tokens", "calls")}
        query = select(_ledger.c.scope, _ledger.c.window, _ledger.c.spent_micro_usd, _ledger.c.reserved_micro_usd) \
            .where(_ledger.c.scope.in_(list(names)),
                   or_(*(and_(_ledger.c.window == w, _ledger.c.period == p) for w, p in periods)))
        try:
            async with self._engine.connect() as connection:
                rows = (await connection.execute(query)).all()
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc
        spend: dict[str, dict[str, int]] = {}
        for name, window, spent, reserved in rows:
            scope, unit = names[name]
            suffix = "" if unit == "usd" else f"_{unit}"
            spend.setdefault(scope, {})[window + suffix] = spent
            if reserved:
                spend[scope][f"{window}{suffix}_reserved"] = reserved
        if len(self._spend_cache) > 10_000:
            self._spend_cache.clear()
        self._spend_cache[key] = (spend, clock + self._spend_ttl)
        return spend

    async def reserve(self, budgets: Sequence[Budget], need: Need | int, now: datetime,
                      decision_id: str = "", lease_s: float = 900.0) -> Reservation:
        """Reserve what the call may use on every budget, or on none; with a lease that lets any
        process release it after ``lease_s`` should its settlement never come. Raises
        BudgetExceeded, or RateLimited for a per-minute or concurrency limit."""
        if not budgets:
            return Reservation(rows=())
        if isinstance(need, int):
            need = Need(micro_usd=need, tokens=0)
        for budget in budgets:
            if need.of(budget.unit) > budget.limit:
                # It can never fit, so the store need not be asked; asked, PostgreSQL's BIGINT
                # sum (spent + reserved + amount) could overflow for an amount near 2**63.
                raise _refusal(budget, need.of(budget.unit), now)
        # Rows are always locked in one order, so two calls naming the same budgets in another
        # order cannot deadlock on PostgreSQL.
        budgets = sorted(budgets, key=lambda b: (ledger_scope(b.scope, b.unit), b.window))
        keys = [(ledger_scope(b.scope, b.unit), b.window, period_of(b.window, now)) for b in budgets]
        rows = [(*key, need.of(b.unit), b.limit) for key, b in zip(keys, budgets, strict=True)]
        decision_id = decision_id or "res_" + secrets.token_hex(8)
        lease = (decision_id, orjson.dumps([[s, w, p, a] for s, w, p, a, _ in rows]).decode(), need.micro_usd,
                 self._direct.datetime_value(now + timedelta(seconds=lease_s)))
        known = [key in self._known_rows for key in keys]
        try:
            refused, used = await self._direct.reserve(RESERVE, CREATE_ROW, rows, known, INSERT_LEASE, lease)
            if refused >= 0 and known[refused]:
                # Refused, or the row is gone: try once more, creating every row first.
                refused, used = await self._direct.reserve(RESERVE, CREATE_ROW, rows, [False] * len(rows),
                                                           INSERT_LEASE, lease)
        except Exception as exc:  # the driver's own errors (sqlite3, asyncpg, OSError): fail closed
            raise StoreUnavailable() from exc
        if refused >= 0:
            self._known_rows.discard(keys[refused])
            raise _refusal(budgets[refused], rows[refused][3], now)
        if len(self._known_rows) > 100_000:
            self._known_rows.clear()
        self._known_rows.update(keys)
        rates = tuple((b.unit, b.limit, u, 60.0 - now.second - now.microsecond / 1e6)
                      for b, u in zip(budgets, used, strict=True) if b.window == "minute")
        return Reservation(rows=tuple((s, w, p, a) for s, w, p, a, _ in rows), id=decision_id, rates=rates)

    async def view(self, org: str | None, now: datetime) -> list[dict[str, Any]]:
        """Spent, reserved and limit of every ledger row in its current period, for
        ``GET /admin/budgets`` and ``lockgate budgets show``: of one org's scopes (the org, and the
        teams, users and keys of its keys), or of every scope (``org`` None, the operator's CLI)."""
        periods = [(w, period_of(w, now)) for w in WINDOWS]
        query = select(_ledger).where(or_(*(and_(_ledger.c.window == w, _ledger.c.period == p) for w, p in periods)))
        keys = ApiKey.__table__  # type: ignore[attr-defined]
        try:
            async with self._engine.connect() as connection:
                rows = (await connection.execute(query.order_by(_ledger.c.scope, _ledger.c.window))).all()
                members = (await connection.execute(select(keys.c.id, keys.c.user, keys.c.team)
                                                    .where(keys.c.org == org))).all() if org is not None else []
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc
        mine = {f"org:{org}"} | {f"key:{k}" for k, _, _ in members} | {f"user:{u}" for _, u, _ in members} \
            | {f"team:{t}" for _, _, t in members}
        shown = []
        for row in rows:
            scope, unit = row.scope.rpartition("#")[0] or row.scope, unit_of(row.scope)
            if org is not None and scope not in mine:
                continue
            shown.append({"scope": scope, "unit": unit, "window": row.window, "period": row.period,
                          "spent": row.spent_micro_usd, "reserved": row.reserved_micro_usd, "limit": row.limit_amount})
        return shown

    async def release_expired(self, now: datetime, limit: int = 200) -> list[Reservation]:
        """Release the reservations whose lease ended before ``now`` (their call never settled:
        its process died, or its settlement was lost); each once, whichever process gets there
        first. The ones this call released."""
        c = _leases.c
        try:
            async with self._engine.connect() as connection:
                found = (await connection.execute(
                    select(c.id, c.rows).where(c.state == "held", c.lease_until < now).order_by(c.id).limit(limit)
                )).all()
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc
        released = []
        stamp = self._direct.datetime_value(now)
        for lease_id, rows in found:
            held = tuple((str(s), str(w), str(p), int(a)) for s, w, p, a in rows)
            statements = [(RELEASE_ROW, [(a, s, w, p) for s, w, p, a in sorted(held)])]
            if await self._direct.update_then(RELEASE_LEASE, (lease_id, stamp), statements):
                released.append(Reservation(rows=held, id=lease_id))
        await self._direct.rowcount(PRUNE_LEASES, self._direct.datetime_value(now - timedelta(days=1)))
        return released


def settlement(reservation: Reservation, used: Used | int) -> list[dict[str, Any]]:
    """The ledger changes that replace a reservation by what the call used (nothing when it
    failed before a provider was asked), for ``settlement_statements``."""
    if isinstance(used, int):
        used = Used(micro_usd=used, tokens=0, calls=0)
    return [{"id": reservation.id, "scope": scope, "window": window, "period": period, "reserved": amount,
             "actual": used.of(unit_of(scope))}
            for scope, window, period, amount in reservation.rows]


def settlement_statements(settlements: Sequence[dict[str, Any]], postgres: bool
                          ) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """Settlements for ``DirectStatements.write_batch``, inside the caller's transaction, each
    applied once whatever retries the batch (see SETTLE): the leases locked first (PostgreSQL),
    the ledger rows in the order reservations lock them (no deadlock with reserving calls), then
    the leases deleted."""
    if not settlements:
        return []
    ids = sorted({entry["id"] for entry in settlements})
    rows = sorted(((e["id"], e["reserved"], e["actual"], e["scope"], e["window"], e["period"]) for e in settlements),
                  key=lambda r: (r[3], r[4], r[5], r[0]))
    statements = [(LOCK_LEASE, [(i,) for i in ids])] if postgres else []
    return [*statements, (SETTLE, rows), (SETTLED, [(i,) for i in ids])]


class LeaseReaper(Periodic):
    """Every ``interval_s``, release the reservations whose lease ended (``release_expired``), and
    audit each release as a span of its own (``lockgate.ledger.lease_released``)."""

    def __init__(self, ledger: BudgetLedgerStore, tracer: Tracer, interval_s: float) -> None:
        self._ledger = ledger
        self._tracer = tracer
        self._interval = interval_s

    async def tick(self) -> int:
        return await self.reap()

    async def reap(self) -> int:
        released = await self._ledger.release_expired(datetime.now(UTC))
        for reservation in released:
            log.warning("released the reservation of %s (%d micro-USD): its lease ended before its call settled",
                        reservation.id, reservation.amount_micro_usd)
            scopes = [f"{scope}/{window}/{period}" for scope, window, period, _ in reservation.rows]
            span = self._tracer.start_span("lockgate.ledger.lease_released", attributes={
                "lockgate.decision_id": reservation.id, "lockgate.reservation.micro_usd": reservation.amount_micro_usd,
                "lockgate.budget.scopes": scopes})
            span.end()
        return len(released)

