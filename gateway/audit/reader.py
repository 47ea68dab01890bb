"""Reading the audit back: the queries behind ``lockgate traces list|show`` and ``/admin/traces``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.store import DecisionRecord, SpanRecord

_decisions = DecisionRecord.__table__  # type: ignore[attr-defined]
_spans = SpanRecord.__table__  # type: ignore[attr-defined]


FILTERS = ("org", "user", "team", "model", "outcome", "revision", "approval")


async def list_decisions(engine: AsyncEngine, *, limit: int = 20, since: datetime | None = None,
                         until: datetime | None = None, **filters: str | None) -> list[dict[str, Any]]:
    """Decision records, newest first, made in [since, until) (UTC), matching every filter given:
    ``org``, ``user``, ``team``, ``model`` (requested or routed), ``outcome``, ``revision`` (the
    policy revision) and ``approval`` (the approval id)."""
    unknown = set(filters) - set(FILTERS)
    if unknown:
        raise TypeError(f"unknown filters {sorted(unknown)}")
    c = _decisions.c
    query = select(_decisions).order_by(c.created_at.desc(), c.id.desc()).limit(limit)
    columns = {"org": c.org, "user": c.user, "team": c.team, "outcome": c.outcome,
               "revision": c.policy_revision, "approval": c.approval_id}
    for name, value in filters.items():
        if value is None or value == "":
            continue
        if name == "model":
            query = query.where(or_(c.requested_model == value, c.routed_model == value))
        else:
            query = query.where(columns[name] == value)
    if since is not None:
        query = query.where(c.created_at >= since)
    if until is not None:
        query = query.where(c.created_at < until)
    async with engine.connect() as connection:
        return [dict(row._mapping) for row in (await connection.execute(query)).all()]


async def read_trace(engine: AsyncEngine, trace_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The decision records and the spans (in start order) of one trace."""
    async with engine.connect() as connection:
        decisions = (await connection.execute(select(_decisions).where(_decisions.c.trace_id == trace_id))).all()
        spans = (await connection.execute(
            select(_spans).where(_spans.c.trace_id == trace_id).order_by(_spans.c.start_ns))).all()
    return [dict(r._mapping) for r in decisions], [dict(r._mapping) for r in spans]


def span_tree(spans: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """Spans with their depth, each parent before its children."""
    children: dict[str | None, list[dict[str, Any]]] = {}
    ids = {s["span_id"] for s in spans}
    for span in spans:
        parent = span["parent_span_id"] if span["parent_span_id"] in ids else None
        children.setdefault(parent, []).append(span)
    ordered: list[tuple[int, dict[str, Any]]] = []

    def walk(parent: str | None, depth: int) -> None:
        for span in children.get(parent, []):
            ordered.append((depth, span))
            walk(span["span_id"], depth + 1)

    walk(None, 0)
    return ordered
