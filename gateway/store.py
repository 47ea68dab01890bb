"""The one relational store: tables (SQLModel), and the two ways to reach them.

SQLite (the default, one gateway process) or PostgreSQL (several replicas). Every stage that
keeps state (keys, budget ledger, approvals, audit) owns its queries; this module only owns
the schema and the connections: SQLAlchemy's async engine for everything, and
``DirectStatements`` for the request path's budget reservation and the audit writer's batches.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from sqlalchemy import JSON, BigInteger, Column, DateTime, Table, event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlmodel import Field, SQLModel

from gateway.audit.chain import CHAIN_LOCK, GENESIS, checkpoint_mac, record_hash

_T = TypeVar("_T")
log = logging.getLogger("lockgate.store")
CHECKPOINT_EVERY_S = 1.0


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: str = Field(primary_key=True)
    key_hash: str = Field(index=True, unique=True)
    prefix: str
    user: str
    team: str
    org: str
    roles: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime
    revoked_at: datetime | None = None


class BudgetLedger(SQLModel, table=True):
    """Spend per scope and window period (gateway/budgets.py). A row counts one unit, named by the
    scope's suffix: none for money (micro-dollars), ``#tokens``, ``#calls`` or ``#concurrent``; the
    ``*_micro_usd`` columns hold that unit (their name is from when money was the only one)."""

    __tablename__ = "budget_ledger"

    scope: str = Field(primary_key=True)
    window: str = Field(primary_key=True)
    period: str = Field(primary_key=True)
    spent_micro_usd: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    reserved_micro_usd: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    limit_amount: int | None = Field(default=None, sa_column=Column(BigInteger))  # the last limit a call named


class LedgerReservation(SQLModel, table=True):
    """A call's reservation while it runs, keyed by its decision id: what the ledger rows hold for
    it, and until when (its lease). The settlement deletes it in the transaction that writes the
    call's record; one whose lease ended first (its process died, its settlement was lost) is
    released by any process, and kept a day for a late settlement (gateway/budgets.py)."""

    __tablename__ = "ledger_reservations"

    id: str = Field(primary_key=True)  # the call's decision id
    rows: list[list[str]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    amount_micro_usd: int = Field(sa_column=Column(BigInteger, nullable=False))
    lease_until: datetime
    state: str = "held"  # held -> released (its lease ended before its call settled); settled: deleted


class Approval(SQLModel, table=True):
    """A call held for a human decision (gateway/approvals.py, docs/approvals.md). Every change of
    ``status`` is one conditional UPDATE: pending -> approved | denied | expired, and
    approved -> executing -> executed | failed (or back to approved when the provider cannot have
    billed the failed attempt)."""

    __tablename__ = "approvals"

    id: str = Field(primary_key=True)
    status: str = Field(index=True)
    kind: str = "request"  # request: the call itself; reply: a tool call in the model's reply
    key_id: str
    user: str = Field(index=True)
    team: str
    org: str = Field(default="default", index=True)
    endpoint: str = ""
    model: str
    request_sha256: str = Field(index=True)  # of the key, the endpoint and the exact body
    summary: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    reason: str
    approvers: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    trace_id: str | None = None  # the trace of the call that asked: every transition is a span in it
    span_id: str | None = None
    created_at: datetime
    expires_at: datetime  # no decision after this: expired, whether or not a process was running
    decided_by: str | None = None  # the decider's user
    decided_by_key: str | None = None
    decided_at: datetime | None = None
    decision_note: str | None = None
    use_by: datetime | None = None  # an approved call must start before this
    executed_by: str | None = None  # the decision id of the call that ran (or runs) it
    executed_at: datetime | None = None


class DecisionRecord(SQLModel, table=True):
    """One row per call, whatever its outcome: what was asked, what was decided, what it cost."""

    __tablename__ = "decision_records"

    id: str = Field(primary_key=True)
    trace_id: str = Field(index=True)
    created_at: datetime = Field(index=True)
    outcome: str  # allowed | denied | held | failed
    status_code: int
    endpoint: str
    key_id: str | None = None
    user: str | None = None
    team: str | None = Field(default=None, index=True)
    org: str | None = None
    requested_model: str | None = None
    routed_model: str | None = None
    provider: str | None = None
    stream: bool = False
    reasons: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    error_type: str | None = None
    error_message: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micro_usd: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    # What was reserved before the call: cost minus this is the estimate's error (never above 0
    # but by what the estimate cannot see).
    reserved_micro_usd: int | None = Field(default=None, sa_column=Column(BigInteger))
    provider_cost_micro_usd: int | None = Field(default=None, sa_column=Column(BigInteger))  # what it said it cost
    duration_ms: float = 0.0
    policy_input: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    decision: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    policy_revision: str | None = None  # the policy that decided (gateway/policy/source.py)
    approval_id: str | None = Field(default=None, index=True)  # the approval this call asked for or ran under
    # The hash chain (gateway/audit/chain.py): position, the previous record's hash, this one's.
    seq: int | None = Field(default=None, sa_column=Column(BigInteger, unique=True))
    prev_hash: str | None = None
    record_hash: str | None = None
    approved_by: str | None = None
    approved_at: datetime | None = None
    # "audit": served while the audit store could not be written, on a route that fails open.
    failed_open: str | None = None
    # Prompt and reply as the policy's audit.content asked (hash, redacted or full); none by default.
    content: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # The shadow policy's decision (setting policy_shadow_dir): revision, allow, reasons, decision,
    # error. Recorded, never applied; `lockgate policy shadow-report` lists disagreements.
    shadow: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


DECISION_COLUMNS = tuple(c.name for c in DecisionRecord.__table__.columns)  # type: ignore[attr-defined]


class AuditCheckpoint(SQLModel, table=True):
    """A signed statement that the chain reached ``seq`` with ``record_hash`` (kind ``tip``), or
    that the records up to ``seq`` were pruned (kind ``prune``): gateway/audit/chain.py."""

    __tablename__ = "audit_checkpoints"

    id: str = Field(primary_key=True)
    kind: str
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    record_hash: str
    created_at: datetime
    mac: str | None = None  # HMAC-SHA256 under the key of audit_checkpoint_key_env; None without a key


class StoredResponse(SQLModel, table=True):
    """A response the provider keeps (Responses API): which key made it, on which deployment, so
    ``GET``/``DELETE /v1/responses/{id}`` and ``previous_response_id`` reach it for that key only.
    Written by the audit writer with the call's decision record (see gateway/stored_responses.py)."""

    __tablename__ = "stored_responses"
    # A provider that hands out an id again (a local server restarted) now holds the newer
    # response under it: its maker becomes the owner, rather than the row being refused and the
    # older owner reading the newer response.
    __table_args__ = {"info": {"replace_on_conflict": True}}

    id: str = Field(primary_key=True)  # the provider's response id
    key_id: str
    model: str  # the catalog model that made it
    deployment: str  # that model's Deployment.label (provider, URL, upstream model; never a key)
    created_at: datetime


class SpanRecord(SQLModel, table=True):
    __tablename__ = "spans"

    trace_id: str = Field(primary_key=True)
    span_id: str = Field(primary_key=True)
    parent_span_id: str | None = None
    name: str
    kind: str
    start_ns: int = Field(sa_column=Column(BigInteger, nullable=False))
    end_ns: int = Field(sa_column=Column(BigInteger, nullable=False))
    status: str
    attributes: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    events: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))


def refuses_value(exc: BaseException) -> bool:
    """The store (or the encoding of a row for it) refused a value, as opposed to being away,
    busy or locked: writing the same row again can never succeed, a reduced one may."""
    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, sqlite3.ProgrammingError,
                        OverflowError, ValueError, TypeError, RecursionError)):
        return not isinstance(exc, (ConnectionError, TimeoutError))
    try:
        import asyncpg
    except ImportError:  # no PostgreSQL driver: nothing else can have refused it
        return False
    return isinstance(exc, (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, asyncpg.RaiseError,
                            asyncpg.exceptions.ProgramLimitExceededError))


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """UTC to the second, as policies compare it: 2026-11-25T04:00:00Z."""
    m = moment
    return f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}Z"


def async_url(url: str) -> str:
    """Pick the async driver for a plain ``sqlite://`` or ``postgresql://`` URL."""
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url[len("sqlite://"):]
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+asyncpg://" + url[len(plain):]
    return url


def asyncpg_dsn(url: URL) -> str:
    """The DSN asyncpg itself takes for a store URL (password included: never log it)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",  # the CLI and the hot path read and write while the gateway writes
    "PRAGMA synchronous=NORMAL",  # commits stay off fsync; WAL keeps the file consistent
    "PRAGMA busy_timeout=30000",
)


def create_store_engine(url: str) -> AsyncEngine:
    """The SQLAlchemy async engine: every query and write except the hot path's ``DirectStatements``."""
    url = async_url(url)
    options: dict[str, Any] = {"json_serializer": _json_dumps}
    if url.startswith("sqlite"):
        # SQLite has one writer at a time: a single pooled connection queues writers in the
        # gateway instead of in SQLite's sleeping busy handler (p99 fell from ~90 to ~10 ms).
        engine = create_async_engine(url, connect_args={"timeout": 30}, pool_size=1, max_overflow=0, **options)

        @event.listens_for(engine.sync_engine, "connect")
        def _tune_sqlite(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            for pragma in SQLITE_PRAGMAS:
                cursor.execute(pragma)
            cursor.close()

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True, **options)


class DirectStatements:
    """Statements run on the database driver itself: the request path's one budget reservation,
    and the audit writer's batches.

    Through SQLAlchemy's async engine one UPDATE costs a pool checkout, an execution context and
    a rollback on release: on SQLite four round trips to aiosqlite's thread, about 0.6 ms of CPU
    on the bench machine, against 0.14 ms for the same statement here (one round trip); an
    audit batch of 300 calls took 10 ms of the event loop's CPU through SQLAlchemy's executemany
    and 4 ms here. Write statements with ``$1``-style parameters, which become SQLite's ``?1``.

    On SQLite one connection on one thread runs both the reservations and the audit batches, each
    batch as one job (BEGIN IMMEDIATE ... COMMIT). A reservation therefore queues behind a batch
    for as long as the batch runs, instead of finding the file locked by a second connection and
    sleeping in SQLite's busy handler: that sleep was most of the gateway's p99 latency.
    """

    def __init__(self, backend: _SQLiteThread | _PostgresPool) -> None:
        self._backend = backend
        self._qmark = isinstance(backend, _SQLiteThread)
        self.postgres = not self._qmark
        self._sql: dict[str, str] = {}
        self._inserts: dict[str, tuple[str, Callable[[dict[str, Any]], tuple[Any, ...]]]] = {}

    @classmethod
    async def open(cls, url: str, max_connections: int = 10) -> DirectStatements:
        parsed = make_url(async_url(url))
        if parsed.get_backend_name() == "sqlite":
            path = parsed.database or ""
            if path in ("", ":memory:"):
                raise ValueError("an in-memory SQLite store cannot be shared by the gateway's connections; "
                                 "use a file (sqlite:///lockgate.db)")
            return cls(_SQLiteThread(path))
        import asyncpg  # the postgres extra

        return cls(_PostgresPool(await asyncpg.create_pool(asyncpg_dsn(parsed), min_size=1,
                                                           max_size=max_connections)))

    def _native(self, sql: str) -> str:
        if not self._qmark:
            return sql
        return self._sql.get(sql) or self._sql.setdefault(sql, sql.replace("$", "?"))

    async def rowcount(self, sql: str, *params: Any) -> int:
        """Run one statement in its own transaction; the number of rows it changed."""
        return await self._backend.rowcount(self._native(sql), params)

    async def update_then(self, update: str, params: tuple[Any, ...],
                          statements: Sequence[tuple[str, Sequence[tuple[Any, ...]]]]) -> bool:
        """One transaction: ``update``, then each (statement, rows) as an executemany, only if the
        update changed exactly one row. False (and nothing written) otherwise."""
        return await self._backend.update_then(self._native(update), params,
                                               [(self._native(sql), rows) for sql, rows in statements if rows])

    async def reserve(self, reserve: str, create: str, rows: Sequence[tuple[str, str, str, int, int]],
                      known: Sequence[bool], insert_lease: str, lease: tuple[Any, ...]) -> tuple[int, list[int]]:
        """One transaction (gateway/budgets.py): for each (scope, window, period, amount, limit),
        create the row unless ``known``, then ``reserve`` on it (which returns the row's use after
        it, or nothing when the limit refuses); then ``insert_lease``. Returns (-1, the uses), or
        (the index of the refusing row, []) with nothing written."""
        return await self._backend.reserve(self._native(reserve), self._native(create), rows, known,
                                           self._native(insert_lease), lease)

    def datetime_value(self, value: datetime) -> Any:
        """A datetime as a parameter of a statement here (as ``insert`` stores it)."""
        return _sqlite_datetime(value) if self._qmark else value

    def insert(self, table: Table, rows: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[Any, ...]]]:
        """An INSERT of ``rows`` (dicts keyed by column) for ``write_batch``, with values stored
        as SQLAlchemy stores them, so its readers see no difference: JSON as text, and on SQLite
        datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC). A row whose primary key is taken is
        skipped, or, in a table whose ``info`` says ``replace_on_conflict``, replaces the old one."""
        known = self._inserts.get(table.name)
        if known is None:
            known = self._inserts[table.name] = self._insert_for(table)
        sql, to_tuple = known
        return sql, [to_tuple(row) for row in rows]

    def _insert_for(self, table: Table) -> tuple[str, Callable[[dict[str, Any]], tuple[Any, ...]]]:
        columns = list(table.columns)
        names = ", ".join(f'"{c.name}"' for c in columns)
        sql = f"INSERT INTO {table.name} ({names}) VALUES ({', '.join(f'${i}' for i in range(1, len(columns) + 1))})"
        if table.info.get("replace_on_conflict"):
            keys = ", ".join(f'"{c.name}"' for c in table.primary_key.columns)
            others = ", ".join(f'"{c.name}" = excluded."{c.name}"' for c in columns if not c.primary_key)
            sql += f" ON CONFLICT ({keys}) DO UPDATE SET {others}"
        else:
            # A row already there (a batch whose commit was not acknowledged, a replayed journal)
            # is the same row: written once.
            sql += " ON CONFLICT DO NOTHING"
        convert: list[Callable[[Any], Any] | None] = []
        for column in columns:
            if isinstance(column.type, JSON):
                convert.append(_json_dumps)
            elif isinstance(column.type, DateTime) and self._qmark:
                convert.append(_sqlite_datetime)
            else:
                convert.append(None)
        pairs = [(c.name, f) for c, f in zip(columns, convert, strict=True)]

        def to_tuple(row: dict[str, Any]) -> tuple[Any, ...]:
            get = row.get
            return tuple(f(get(name)) if f is not None else get(name) for name, f in pairs)

        return sql, to_tuple

    async def write_batch(self, statements: Sequence[tuple[str, Sequence[tuple[Any, ...]]]],
                          decisions: Sequence[dict[str, Any]] = (), checkpoint: tuple[str, str] | None = None
                          ) -> None:
        """Run each (statement, rows) as an executemany, all in one transaction: all or nothing.
        ``decisions`` are decision records to append to the hash chain first, in the same
        transaction (gateway/audit/chain.py); ``checkpoint`` (id, key) signs where the chain ends."""
        chain = None
        if decisions or checkpoint:
            table = DecisionRecord.__table__  # type: ignore[attr-defined]
            sql, to_tuple = self._inserts.get(table.name) or self._inserts.setdefault(table.name,
                                                                                     self._insert_for(table))
            chain = Chain(self._native(sql), list(decisions), to_tuple, checkpoint,
                          self.datetime_value(datetime.now(UTC)))
        await self._backend.write_batch([(self._native(sql), rows) for sql, rows in statements if rows], chain)

    async def ping(self) -> None:
        """Raise if the store does not answer."""
        await self._backend.rowcount("SELECT 1", ())

    async def close(self) -> None:
        await self._backend.close()


class _SQLiteThread:
    """One sqlite3 connection (autocommit), used only on one worker thread, job after job; it is
    opened by the first job, and by the next one again if opening failed. (A queue and a thread
    of our own: concurrent.futures' executor cost ~30 us more per job.)

    This connection never checkpoints the WAL itself: a checkpoint copies pages into the database
    file and syncs it, 5-15 ms during which every reservation queued behind it would wait. A
    second thread checkpoints from a connection of its own every CHECKPOINT_EVERY_S instead,
    beside the writes (SQLite's PASSIVE mode takes no lock writers need).
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._jobs: queue.SimpleQueue[tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="lockgate-store", daemon=True)
        self._thread.start()
        self._stop_checkpoints = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint, name="lockgate-checkpoint", daemon=True)
        self._checkpointer.start()

    def _checkpoint(self) -> None:
        db: sqlite3.Connection | None = None
        try:
            while not self._stop_checkpoints.wait(CHECKPOINT_EVERY_S):
                try:
                    db = db or _sqlite_connect(self._path)
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    log.warning("checkpointing the SQLite WAL failed; trying again in %s s", CHECKPOINT_EVERY_S,
                                exc_info=True)
        finally:
            if db is not None:
                db.close()

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            future, job, args = item
            result, error = None, None
            try:
                result = job(*args)
            except BaseException as exc:
                error = exc
            try:
                future.get_loop().call_soon_threadsafe(_settle_future, future, result, error)
            except RuntimeError:  # the event loop is closed: nobody waits any more, keep serving the queue
                pass

    async def _run(self, job: Callable[..., _T], *args: Any) -> _T:
        if self._closed:
            raise sqlite3.ProgrammingError("the store connection is closed")
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._jobs.put((future, job, args))
        return await future

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            db = _sqlite_connect(self._path)
            try:
                for pragma in SQLITE_PRAGMAS:
                    db.execute(pragma)
                db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpoint thread does it
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    async def rowcount(self, sql: str, params: tuple[Any, ...]) -> int:
        return await self._run(self._rowcount, sql, params)

    async def update_then(self, update: str, params: tuple[Any, ...],
                          statements: list[tuple[str, Sequence[tuple[Any, ...]]]]) -> bool:
        return await self._run(self._update_then, update, params, statements)

    async def reserve(self, reserve: str, create: str, rows: Sequence[tuple[str, str, str, int, int]],
                      known: Sequence[bool], insert_lease: str, lease: tuple[Any, ...]) -> tuple[int, list[int]]:
        return await self._run(self._reserve, reserve, create, rows, known, insert_lease, lease)

    def _reserve(self, reserve: str, create: str, rows: Sequence[tuple[str, str, str, int, int]],
                 known: Sequence[bool], insert_lease: str, lease: tuple[Any, ...]) -> tuple[int, list[int]]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            used = []
            for index, ((scope, window, period, amount, limit), is_known) in enumerate(zip(rows, known, strict=True)):
                if not is_known:
                    db.execute(create, (scope, window, period))
                row = db.execute(reserve, (amount, scope, window, period, limit)).fetchone()
                if row is None:
                    db.execute("ROLLBACK")
                    return index, []
                used.append(int(row[0]))
            db.execute(insert_lease, lease)
            db.execute("COMMIT")
            return -1, used
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _update_then(self, update: str, params: tuple[Any, ...],
                     statements: list[tuple[str, Sequence[tuple[Any, ...]]]]) -> bool:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute(update, params).rowcount != 1:
                db.execute("ROLLBACK")
                return False
            for sql, rows in statements:
                if len(rows) == 1:
                    db.execute(sql, rows[0])
                else:
                    db.executemany(sql, rows)
            db.execute("COMMIT")
            return True
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _rowcount(self, sql: str, params: tuple[Any, ...]) -> int:
        return self._connection().execute(sql, params).rowcount

    async def write_batch(self, statements: list[tuple[str, Sequence[tuple[Any, ...]]]],
                          chain: Chain | None = None) -> None:
        if statements or chain:
            await self._run(self._write_batch, statements, chain)

    def _write_batch(self, statements: list[tuple[str, Sequence[tuple[Any, ...]]]], chain: Chain | None) -> None:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")  # one writer at a time: the chain's lock on SQLite
        try:
            if chain is not None:
                ids = [row["id"] for row in chain.rows]
                marks = ", ".join("?" * len(ids))
                existing = {r[0] for r in db.execute(f"SELECT id FROM decision_records WHERE id IN ({marks})",
                                                     ids)} if ids else set()
                tip = db.execute(CHAIN_TIP).fetchone() or db.execute(PRUNED_TIP).fetchone()
                linked, checkpoint = chain.link(existing, tip)
                if linked:
                    db.executemany(chain.insert, linked)
                if checkpoint:
                    db.execute(INSERT_CHECKPOINT.replace("$", "?"), checkpoint)
            for sql, rows in statements:
                db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        if self._closed:
            return
        try:
            await self._run(close)
        finally:
            self._closed = True
            self._jobs.put(None)
            self._stop_checkpoints.set()


CHAIN_TIP = "SELECT seq, record_hash FROM decision_records WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1"
PRUNED_TIP = "SELECT seq, record_hash FROM audit_checkpoints WHERE kind = 'prune' ORDER BY seq DESC LIMIT 1"
INSERT_CHECKPOINT = ("INSERT INTO audit_checkpoints (id, kind, seq, record_hash, created_at, mac) "
                     "VALUES ($1, 'tip', $2, $3, $4, $5)")


@dataclass
class Chain:
    """Decision records to append to the hash chain, inside a write transaction."""

    insert: str
    rows: list[dict[str, Any]]
    to_tuple: Callable[[dict[str, Any]], tuple[Any, ...]]
    checkpoint: tuple[str, str] | None  # (checkpoint id, HMAC key): sign the new tip
    stamp: Any  # now, as the store takes datetimes

    def link(self, existing: set[str], tip: tuple[Any, ...] | None
             ) -> tuple[list[tuple[Any, ...]], tuple[Any, ...] | None]:
        """The rows to insert, each chained after ``tip`` (seq, hash), skipping records already
        stored (a batch written again); and the checkpoint row to insert, if one is due."""
        seq, prev = (int(tip[0]), str(tip[1])) if tip else (0, GENESIS)
        rows = []
        for row in self.rows:
            if row["id"] in existing:
                continue
            full = {name: row.get(name) for name in DECISION_COLUMNS}
            seq += 1
            full["seq"], full["prev_hash"] = seq, prev
            full["record_hash"] = prev = record_hash(prev, full)
            row.update(seq=seq, prev_hash=full["prev_hash"], record_hash=prev)
            rows.append(self.to_tuple(full))
        checkpoint = None
        if self.checkpoint is not None and (rows or tip):
            checkpoint_id, key = self.checkpoint
            checkpoint = (checkpoint_id, seq, prev, self.stamp, checkpoint_mac(key, seq, prev, "tip") if key else None)
        return rows, checkpoint


class _NotChanged(Exception):
    pass


class _PostgresPool:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def rowcount(self, sql: str, params: tuple[Any, ...]) -> int:
        status = await self._pool.execute(sql, *params)  # a command tag such as "UPDATE 1"
        count = status.rsplit(" ", 1)[-1]
        return int(count) if count.isdigit() else -1

    async def update_then(self, update: str, params: tuple[Any, ...],
                          statements: list[tuple[str, Sequence[tuple[Any, ...]]]]) -> bool:
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                status = await connection.execute(update, *params)
                if status.rsplit(" ", 1)[-1] != "1":
                    raise _NotChanged()  # rolls the transaction back
                for sql, rows in statements:
                    if len(rows) == 1:
                        await connection.execute(sql, *rows[0])
                    else:
                        await connection.executemany(sql, rows)
        except _NotChanged:
            return False
        return True

    async def reserve(self, reserve: str, create: str, rows: Sequence[tuple[str, str, str, int, int]],
                      known: Sequence[bool], insert_lease: str, lease: tuple[Any, ...]) -> tuple[int, list[int]]:
        refused = -1
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                used = []
                for index, ((scope, window, period, amount, limit), is_known) in enumerate(
                        zip(rows, known, strict=True)):
                    if not is_known:
                        await connection.execute(create, scope, window, period)
                    value = await connection.fetchval(reserve, amount, scope, window, period, limit)
                    if value is None:
                        refused = index
                        raise _NotChanged()  # rolls the transaction back
                    used.append(int(value))
                await connection.execute(insert_lease, *lease)
        except _NotChanged:
            return refused, []
        return -1, used

    async def write_batch(self, statements: list[tuple[str, Sequence[tuple[Any, ...]]]],
                          chain: Chain | None = None) -> None:
        if not statements and chain is None:
            return
        async with self._pool.acquire() as connection, connection.transaction():
            if chain is not None:
                # One writer of the chain at a time, across every process sharing the store.
                await connection.execute("SELECT pg_advisory_xact_lock($1)", CHAIN_LOCK)
                existing = {r["id"] for r in await connection.fetch(
                    "SELECT id FROM decision_records WHERE id = ANY($1::text[])", [row["id"] for row in chain.rows])}
                tip = await connection.fetchrow(CHAIN_TIP) or await connection.fetchrow(PRUNED_TIP)
                linked, checkpoint = chain.link(existing, tuple(tip) if tip else None)
                if linked:
                    await connection.executemany(chain.insert, linked)
                if checkpoint:
                    await connection.execute(INSERT_CHECKPOINT, *checkpoint)
            for sql, rows in statements:
                await connection.executemany(sql, rows)

    async def close(self) -> None:
        await self._pool.close()


def _sqlite_connect(path: str) -> sqlite3.Connection:
    """Autocommit (we write BEGIN and COMMIT ourselves), usable from the thread that opened it."""
    return sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)


def _settle_future(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return  # the caller stopped waiting; the job itself ran to its end all the same
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _sqlite_datetime(value: datetime | None) -> str | None:
    """As SQLAlchemy's SQLite DATETIME stores it (the store's datetimes are all UTC)."""
    if value is None:
        return None
    v = value
    return (f"{v.year:04d}-{v.month:02d}-{v.day:02d} {v.hour:02d}:{v.minute:02d}:{v.second:02d}"
            f".{v.microsecond:06d}")


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def create_tables(engine: AsyncEngine) -> None:
    """Create missing tables, and add the columns a newer Lockgate defines to a store an older one
    made (nullable, so the rows already there stay valid). Nothing is ever dropped or changed."""
    async with engine.begin() as connection:
        await connection.run_sync(SQLModel.metadata.create_all)
        await connection.run_sync(_add_missing_columns)
        await connection.run_sync(_append_only)


APPEND_ONLY = ("decision_records", "spans", "audit_checkpoints")


def _append_only(connection: Any) -> None:
    """Triggers that make the store refuse UPDATE and DELETE on the audit's tables (``lockgate audit
    prune`` alone lifts them, inside its own transaction)."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION lockgate_append_only() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'lockgate: % on % is refused: the audit is append-only', TG_OP, TG_TABLE_NAME; "
            "END $$ LANGUAGE plpgsql")
        for table in APPEND_ONLY:
            connection.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            connection.exec_driver_sql(f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                                       "FOR EACH ROW EXECUTE FUNCTION lockgate_append_only()")
        return
    for table in APPEND_ONLY:
        for action in ("UPDATE", "DELETE"):
            connection.exec_driver_sql(
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_{action.lower()} BEFORE {action} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'lockgate: {action} on {table} is refused: the audit is append-only'); END")


def _add_missing_columns(connection: Any) -> None:
    inspector = sa_inspect(connection)
    for table in SQLModel.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=connection.dialect)
                log.warning("adding column %s.%s to the store", table.name, column.name)
                connection.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
