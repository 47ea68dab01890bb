"""Reading the audit back: the queries behind ``lockgate traces list`` and ``traces show``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.store import DecisionRecord, SpanRecord

_decisions = DecisionRecord.__table__  # type: ignore[attr-defined]
_spans = SpanRecord.__table__  # type: ignore[attr-defined]


async def list_decisions(engine: AsyncEngine, *, limit: int = 20, team: str | None = None,
                         outcome: str | None = None) -> list[dict[str, Any]]:
    query = select(_decisions).order_by(_decisions.c.created_at.desc()).limit(limit)
    if team:
        query = query.where(_decisions.c.team == team)
    if outcome:
        query = query.where(_decisions.c.outcome == outcome)
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
