"""Stage 4, hold: calls the policy says need a human wait in a durable approval queue.

A call that needs approval is stored as a pending approval and answered at once with a 403
``approval_required`` error that names the approval. Once someone approves it
(``lockgate approvals approve ID``), the caller repeats the same request with the header
``Lockgate-Approval: ID``; the approval is consumed by one atomic UPDATE, so it lets exactly
one identical request (same key, same body) through, on whichever replica receives it.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.errors import ApprovalRejected, ApprovalRequired, StoreUnavailable
from gateway.store import Approval, utcnow
from gateway.types import ApprovalRequirement, Principal

APPROVAL_HEADER = "lockgate-approval"
_approvals = Approval.__table__  # type: ignore[attr-defined]


def request_fingerprint(raw_body: bytes) -> str:
    return hashlib.sha256(raw_body).hexdigest()


class ApprovalQueue:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def hold(self, principal: Principal, model: str, raw_body: bytes,
                   requirement: ApprovalRequirement, approval_id: str | None, now: datetime) -> str:
        """Return the id of the approval this call consumed, or raise to hold the call."""
        fingerprint = request_fingerprint(raw_body)
        try:
            if approval_id:
                return await self._consume(principal, fingerprint, approval_id, now)
            approval_id = "apr_" + secrets.token_hex(8)
            async with self._engine.begin() as connection:
                await connection.execute(_approvals.insert().values(
                    id=approval_id, status="pending", key_id=principal.key_id, user=principal.user,
                    team=principal.team, model=model, request_sha256=fingerprint, reason=requirement.reason,
                    approvers=list(requirement.approvers), created_at=now,
                    expires_at=now + timedelta(seconds=requirement.timeout_s),
                ))
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc
        who = f" by {', '.join(requirement.approvers)}" if requirement.approvers else ""
        raise ApprovalRequired(
            f"This call needs approval{who}: {requirement.reason}. It is queued as {approval_id}; once it is "
            f"approved, send the same request again with the header 'Lockgate-Approval: {approval_id}'."
        )

    async def _consume(self, principal: Principal, fingerprint: str, approval_id: str, now: datetime) -> str:
        c = _approvals.c
        async with self._engine.begin() as connection:
            result = await connection.execute(
                update(_approvals)
                .where(c.id == approval_id, c.status == "approved", c.key_id == principal.key_id,
                       c.request_sha256 == fingerprint, c.expires_at > now)
                .values(status="used")
            )
            if result.rowcount == 1:
                return approval_id
            row = (await connection.execute(select(c.status).where(c.id == approval_id))).first()
        if row is not None and row.status == "pending":
            raise ApprovalRequired(f"Approval {approval_id} is still pending.")
        raise ApprovalRejected(
            f"Approval {approval_id} cannot be used for this call: it was denied, already used, "
            "has expired, or was given for another key or request body."
        )

    async def decide(self, approval_id: str, approve: bool, decided_by: str, now: datetime | None = None) -> bool:
        """Approve or deny a pending approval; False if it is not pending (decided, or expired)."""
        c = _approvals.c
        now = now or utcnow()
        async with self._engine.begin() as connection:
            result = await connection.execute(
                update(_approvals).where(c.id == approval_id, c.status == "pending", c.expires_at > now)
                .values(status="approved" if approve else "denied", decided_by=decided_by, decided_at=now)
            )
        return bool(result.rowcount)

    async def list(self, status: str | None = None) -> list[Approval]:
        query = select(_approvals).order_by(_approvals.c.created_at)
        if status:
            query = query.where(_approvals.c.status == status)
        async with self._engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [Approval.model_validate(row._mapping) for row in rows]
