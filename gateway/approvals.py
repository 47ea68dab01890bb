"""Stage 4, hold: calls the policy says need a human wait in a durable approval queue.

The design, its states and both modes are in docs/approvals.md. In short:

- A call whose decision carries ``approval.required`` opens an approval bound to its key, its
  endpoint and the SHA-256 of its exact body (``fingerprint``), or attaches to the pending or
  approved one the identical request opened before (the SDK's retry after the hold limit, a
  client that reconnects after a gateway restart). The pipeline then holds the call
  (``ApprovalQueue.wait``) until the approval is decided or expires, or the hold limit passes.
- States: pending -> approved | denied | expired; approved -> executing -> executed | failed, or
  back to approved when the attempt failed before the provider could have billed it. Every
  change is one conditional UPDATE, so of concurrent deciders or executors exactly one wins.
  Expiry needs no running process: a pending approval past ``expires_at`` is expired for every
  reader, and the first to see it writes it.
- A decider is a principal: a key with the ``approver`` or ``admin`` role, of the approval's org,
  never the requester (under any key), and one the policy's ``data.lockgate.may_approve`` allows.
- A held call wakes when its approval changes: at once when the decision is made in its own
  process or (PostgreSQL) announced by NOTIFY, otherwise at the next poll of the store.
- Every transition is a span in the trace of the call that asked (``lockgate.approval.*``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, Tracer, set_span_in_context
from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.errors import (
    ApprovalConflict,
    ApprovalNotFound,
    DecisionRefused,
    StoreUnavailable,
    TooManyApprovals,
)
from gateway.policy import PolicyStage
from gateway.store import Approval, utcnow
from gateway.types import ApprovalRequirement, CallFacts, Principal

log = logging.getLogger("lockgate.approvals")

APPROVAL_HEADER = "lockgate-approval"  # run (or wait on) this approval
MODE_HEADER = "lockgate-approval-mode"  # "async": answer 202 at once instead of holding the call
DECIDER_ROLES = frozenset({"approver", "admin"})
OPEN = ("pending", "approved")  # states a repeated request attaches to
NOTIFY_CHANNEL = "lockgate_approvals"
_approvals = Approval.__table__  # type: ignore[attr-defined]
_c = _approvals.c


def fingerprint(key_id: str, endpoint: str, raw_body: bytes) -> str:
    """What an approval is bound to: this key, this endpoint, these exact bytes."""
    digest = hashlib.sha256(key_id.encode() + b"\n" + endpoint.encode() + b"\n")
    digest.update(raw_body)
    return digest.hexdigest()


def summary(facts: CallFacts, estimate_micro_usd: int) -> dict[str, Any]:
    """What a decider sees of the request: never its content."""
    return {"model": facts.model, "stream": facts.stream, "tools": list(facts.tools),
            "messages": facts.message_count, "input_tokens": facts.input_tokens,
            "max_output_tokens": facts.output_tokens_max, "estimated_cost_usd": estimate_micro_usd / 1e6}


def public(approval: Approval) -> dict[str, Any]:
    """An approval as the admin API, the status URL and the CLI show it."""
    return {
        "id": approval.id, "object": "lockgate.approval", "status": approval.status, "kind": approval.kind,
        "requester": {"user": approval.user, "team": approval.team, "org": approval.org, "key_id": approval.key_id},
        "endpoint": approval.endpoint, "model": approval.model, "summary": approval.summary,
        "reason": approval.reason, "approvers": approval.approvers, "trace_id": approval.trace_id,
        "created_at": _iso(approval.created_at), "expires_at": _iso(approval.expires_at),
        "decided_by": approval.decided_by, "decided_at": _iso(approval.decided_at),
        "decision_note": approval.decision_note, "use_by": _iso(approval.use_by),
        "executed_by": approval.executed_by, "executed_at": _iso(approval.executed_at),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _aware(value: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; the store's are all UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=utcnow().tzinfo)


@dataclass(frozen=True)
class Opened:
    approval: Approval
    created: bool  # False: the identical request had opened it before


class ApprovalQueue:
    def __init__(self, engine: AsyncEngine, *, policy: PolicyStage, tracer: Tracer, poll_interval_s: float,
                 max_pending: int, use_s: float, webhook: Any = None) -> None:
        self._engine = engine
        self._policy = policy
        self._tracer = tracer
        self._poll_s = poll_interval_s
        self._max_pending = max_pending
        self._use_s = use_s
        self._webhook = webhook
        self._waiting: dict[str, asyncio.Event] = {}
        self._waiters: dict[str, int] = {}
        self._poller: asyncio.Task[None] | None = None
        self._listener: Any = None  # PostgreSQL: a connection LISTENing on NOTIFY_CHANNEL
        self._postgres = engine.dialect.name == "postgresql"

    # -- the requester's side ------------------------------------------------------------------

    async def open(self, principal: Principal, *, endpoint: str, model: str, print_: str,
                   summary: Mapping[str, Any], requirement: ApprovalRequirement, trace: tuple[str, str],
                   now: datetime, kind: str = "request") -> Opened:
        """The open approval of this exact request, or a new pending one."""
        try:
            if kind == "request":
                async with self._engine.connect() as connection:
                    row = (await connection.execute(
                        select(_approvals).where(_c.key_id == principal.key_id, _c.request_sha256 == print_,
                                                 _c.status.in_(OPEN), _c.kind == "request")
                        .order_by(_c.created_at.desc()).limit(1))).first()
                if row is not None:
                    known = await self._current(Approval.model_validate(row._mapping), now)
                    if known.status in OPEN:
                        return Opened(known, created=False)
            approval = Approval(
                id="apr_" + secrets.token_hex(12), status="pending", kind=kind, key_id=principal.key_id,
                user=principal.user, team=principal.team, org=principal.org, endpoint=endpoint, model=model,
                request_sha256=print_, summary=dict(summary), reason=requirement.reason,
                approvers=list(requirement.approvers), trace_id=trace[0], span_id=trace[1], created_at=now,
                expires_at=now + timedelta(seconds=requirement.timeout_s))
            async with self._engine.begin() as connection:
                # One statement decides both the limit and the insert, so a burst from one user
                # cannot all see room and all insert (on SQLite writers are serialized; on
                # PostgreSQL two concurrent inserts can each see the same count: at most N + 1).
                pending = (select(func.count()).select_from(_approvals)
                           .where(_c.user == principal.user, _c.org == principal.org, _c.status == "pending",
                                  _c.expires_at > now).scalar_subquery())
                values = approval.model_dump()
                source = select(*[_literal(values[column.name], column) for column in _approvals.columns]) \
                    .where(pending < self._max_pending)
                result = await connection.execute(_approvals.insert().from_select(list(_approvals.columns), source))
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc
        if not result.rowcount:
            raise TooManyApprovals(f"You already have {self._max_pending} calls waiting for approval; "
                                   "wait for a decision before sending more.")
        self._event(approval, "lockgate.approval.requested", {"lockgate.approval.reason": approval.reason})
        if self._webhook is not None:
            self._webhook.announce(approval)
        return Opened(approval, created=True)

    async def get(self, approval_id: str) -> Approval | None:
        """The approval as it stands now (a pending one past its deadline is expired)."""
        if not approval_id.startswith("apr_") or len(approval_id) > 64:
            return None
        try:
            async with self._engine.connect() as connection:
                row = (await connection.execute(select(_approvals).where(_c.id == approval_id))).first()
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc
        return None if row is None else await self._current(Approval.model_validate(row._mapping), utcnow())

    async def _current(self, approval: Approval, now: datetime) -> Approval:
        """A pending approval past its deadline, or an approved one not run within
        ``approval_use_s``, is expired for every reader; the first to see it writes it."""
        stale = (approval.status == "pending" and _aware(approval.expires_at) <= now) or (
            approval.status == "approved" and approval.use_by is not None and _aware(approval.use_by) <= now)
        if stale:
            await self._transition(approval, approval.status, {"status": "expired"}, "lockgate.approval.expired", now)
            approval.status = "expired"
        return approval

    async def wait(self, approval_id: str, timeout_s: float) -> Approval | None:
        """Wait up to ``timeout_s`` (and no longer than the approval's deadline) for the approval
        to leave ``pending``; the approval as it then stands."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        event = self._waiting.get(approval_id)
        if event is None:
            event = self._waiting[approval_id] = asyncio.Event()
        self._waiters[approval_id] = self._waiters.get(approval_id, 0) + 1
        await self._start_watching()
        try:
            while True:
                event.clear()  # before the read: a wake-up during it is not lost
                approval = await self.get(approval_id)
                if approval is None or approval.status != "pending":
                    return approval
                left = min(until - loop.time(), (_aware(approval.expires_at) - utcnow()).total_seconds())
                if until - loop.time() <= 0:
                    return approval
                try:
                    await asyncio.wait_for(event.wait(), timeout=max(0.0, min(left, self._poll_s)) + 0.001)
                except TimeoutError:
                    pass
        finally:
            self._waiters[approval_id] -= 1
            if not self._waiters[approval_id]:
                del self._waiters[approval_id]
                self._waiting.pop(approval_id, None)

    async def claim(self, approval: Approval, decision_id: str, now: datetime) -> bool:
        """approved -> executing, for this call only: False if another call claimed it first."""
        changed = await self._transition(
            approval, "approved", {"status": "executing", "executed_by": decision_id, "executed_at": now},
            "lockgate.approval.executing", now, extra=(_c.use_by > now,),
            attributes={"lockgate.decision_id": decision_id})
        if changed:
            approval.status, approval.executed_by = "executing", decision_id
        return changed

    async def release(self, approval: Approval) -> bool:
        """A held reply's approval: approved -> executed as the reply is let go."""
        now = utcnow()
        return await self._transition(approval, "approved", {"status": "executed", "executed_at": now},
                                      "lockgate.approval.executed", now)

    async def expire(self, approval: Approval) -> None:
        """pending -> expired before its deadline: the held reply it was for is gone."""
        now = utcnow()
        await self._transition(approval, "pending", {"status": "expired"}, "lockgate.approval.expired", now)

    # -- the decider's side --------------------------------------------------------------------

    async def decide(self, approval_id: str, decider: Principal, approve: bool, note: str | None,
                     now: datetime | None = None) -> Approval:
        """Approve or deny as ``decider``. Raises ApprovalNotFound (unknown, or another org's),
        DecisionRefused (no decider role, the requester herself, or may_approve says no), or
        ApprovalConflict (no longer pending: decided, expired, or another decider was first)."""
        now = now or utcnow()
        approval = await self.visible(approval_id, decider)
        if not DECIDER_ROLES.intersection(decider.roles):
            raise DecisionRefused("Deciding approvals needs a key with the approver or admin role.",
                                  code="approver_role_required")
        if decider.user == approval.user:
            raise DecisionRefused("You cannot decide an approval of your own call, under any of your keys.",
                                  code="self_approval")
        if approval.status != "pending":
            raise ApprovalConflict(f"Approval {approval.id} is {approval.status}; only a pending approval can be "
                                   "decided.")
        policy = self._policy
        if not (await policy.may_approve_async(public(approval), decider) if policy.remote
                else policy.may_approve(public(approval), decider)):
            raise DecisionRefused(f"The policy does not let {decider.user} (team {decider.team}) decide approval "
                                  f"{approval.id}; its approvers are {', '.join(approval.approvers) or 'not named'}.")
        values: dict[str, Any] = {"status": "approved" if approve else "denied", "decided_by": decider.user,
                                  "decided_by_key": decider.key_id, "decided_at": now, "decision_note": note}
        if approve:
            values["use_by"] = now + timedelta(seconds=self._use_s)
        changed = await self._transition(
            approval, "pending", values, f"lockgate.approval.{values['status']}", now, extra=(_c.expires_at > now,),
            attributes={"lockgate.approval.decided_by": decider.user, "lockgate.approval.decided_by_key":
                        decider.key_id, "lockgate.approval.note": note or ""})
        if not changed:
            current = await self.get(approval.id)
            raise ApprovalConflict(f"Approval {approval.id} was decided by someone else or expired first "
                                   f"(it is {current.status if current else 'gone'}).")
        for name, value in values.items():
            setattr(approval, name, value)
        return approval

    async def visible(self, approval_id: str, viewer: Principal) -> Approval:
        """The approval, if ``viewer`` may see it: her own org's only (any other is unknown)."""
        approval = await self.get(approval_id)
        if approval is None or approval.org != viewer.org:
            raise ApprovalNotFound(f"No approval with id '{approval_id[:64]}' was found.")
        return approval

    async def list(self, org: str | None, status: str | None = None, limit: int = 100,
                   newest_first: bool = False) -> list[Approval]:
        """Approvals, oldest first (or newest first); of one org (None: every org, for the CLI's operator)."""
        now = utcnow()
        query = select(_approvals).order_by(_c.created_at.desc() if newest_first else _c.created_at).limit(limit)
        if org is not None:
            query = query.where(_c.org == org)
        if status == "pending":
            query = query.where(_c.status == "pending", _c.expires_at > now)
        elif status == "expired":
            query = query.where((_c.status == "expired") | ((_c.status == "pending") & (_c.expires_at <= now)))
        elif status:
            query = query.where(_c.status == status)
        try:
            async with self._engine.connect() as connection:
                rows = (await connection.execute(query)).all()
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc
        return [await self._current(Approval.model_validate(row._mapping), now) for row in rows]

    # -- transitions, events and wake-ups ------------------------------------------------------

    async def _transition(self, approval: Approval, expected: str, values: Mapping[str, Any], event: str,
                          now: datetime, extra: Sequence[Any] = (), attributes: Mapping[str, Any] | None = None
                          ) -> bool:
        """One conditional UPDATE from ``expected``; True if this call made the change."""
        try:
            async with self._engine.begin() as connection:
                result = await connection.execute(
                    update(_approvals).where(_c.id == approval.id, _c.status == expected, *extra).values(**values))
                if result.rowcount and self._postgres:
                    await connection.exec_driver_sql(f"SELECT pg_notify('{NOTIFY_CHANNEL}', '{approval.id}')")
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc
        if not result.rowcount:
            return False
        self._wake(approval.id)
        self._event(approval, event, {"lockgate.approval.status": str(values.get("status", expected)),
                                      **(attributes or {})})
        return True

    def _event(self, approval: Approval, name: str, attributes: Mapping[str, Any]) -> None:
        """A span in the trace of the call that asked, so the trace tells the approval's story."""
        context = None
        if approval.trace_id and approval.span_id:
            parent = SpanContext(int(approval.trace_id, 16), int(approval.span_id, 16), is_remote=True,
                                 trace_flags=TraceFlags(TraceFlags.SAMPLED))
            context = set_span_in_context(NonRecordingSpan(parent))
        span = self._tracer.start_span(name, context=context, attributes={
            "lockgate.approval.id": approval.id, "lockgate.approval.kind": approval.kind, **attributes})
        span.end()

    def _wake(self, approval_id: str) -> None:
        event = self._waiting.get(approval_id)
        if event is not None:
            event.set()

    async def _start_watching(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="lockgate-approval-poller")
        if self._postgres and self._listener is None:
            await self._listen()

    async def _poll(self) -> None:
        """Wake every held call whose approval changed in another process (the fallback to NOTIFY)."""
        while self._waiting:
            await asyncio.sleep(self._poll_s)
            ids = list(self._waiting)
            try:
                async with self._engine.connect() as connection:
                    rows = (await connection.execute(
                        select(_c.id).where(_c.id.in_(ids), (_c.status != "pending") | (_c.expires_at <= utcnow()))
                    )).all()
            except Exception:
                log.warning("looking for approval decisions failed; trying again", exc_info=True)
                continue
            for (approval_id,) in rows:
                self._wake(approval_id)

    async def _listen(self) -> None:
        try:
            import asyncpg

            from gateway.store import asyncpg_dsn

            self._listener = await asyncpg.connect(asyncpg_dsn(self._engine.url))
            await self._listener.add_listener(NOTIFY_CHANNEL, lambda *args: self._wake(str(args[-1])))
        except Exception:
            self._listener = False  # polling still wakes every held call
            log.warning("LISTEN on PostgreSQL failed; held calls learn of decisions by polling", exc_info=True)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._listener:
            await self._listener.close()
        if self._webhook is not None:
            await self._webhook.close()


def _literal(value: Any, column: Any) -> Any:
    from sqlalchemy import literal

    return literal(value, type_=column.type)
