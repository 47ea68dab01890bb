"""Reviewing the audit as a principal: the org-scoped trace queries behind ``GET /admin/traces``
and the web console's trace pages (``gateway/console/``), so both read, filter, page and scope
the same way.

A reviewer sees the decision records of her own org only; a trace with none of them is unknown to
her (``TraceNotFound``, a 404), whether or not it exists. The queries are those of
``lockgate traces list|show`` (``gateway/audit/reader.py``); times are UTC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.reader import list_decisions, read_trace
from gateway.errors import InvalidRequest, StoreUnavailable, TraceNotFound
from gateway.types import Principal

REVIEWER_ROLES = frozenset({"admin", "reviewer"})  # may read the audit (and the budgets)
TRACE_FILTERS = ("user", "team", "model", "outcome", "revision", "approval")
OUTCOMES = ("allowed", "denied", "held", "failed")
MAX_PAGE = 500
MAX_TRACE_ID_CHARS = 64


def may_review(principal: Principal) -> bool:
    return bool(REVIEWER_ROLES.intersection(principal.roles))


def parse_when(value: str | None, name: str) -> datetime | None:
    """A ``since``/``until``/``before`` value: ISO 8601, UTC unless it names its zone."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an ISO 8601 date or time such as 2026-12-01 or "
                             "2026-12-01T12:00.", param=name) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def utc(value: datetime) -> datetime:
    """A stored time as an aware UTC datetime (SQLite hands them back without their zone)."""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)


def iso(value: datetime) -> str:
    return utc(value).isoformat().replace("+00:00", "Z")


def plain(row: Mapping[str, Any]) -> dict[str, Any]:
    """A record or a span with its datetimes as ISO 8601 UTC text (``...Z``)."""
    return {name: (iso(value) if isinstance(value, datetime) else value) for name, value in row.items()}


@dataclass(frozen=True)
class TracePage:
    records: list[dict[str, Any]]  # newest first, datetimes as stored
    has_more: bool
    next_before: str | None  # ``before`` for the next (older) page


def page_limit(value: str | None, default: int = 50) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or not 1 <= int(value) <= MAX_PAGE:
        raise InvalidRequest(f"'limit' must be a whole number from 1 to {MAX_PAGE}.", param="limit")
    return int(value)


async def trace_page(engine: AsyncEngine, org: str, query: Mapping[str, str], default_limit: int = 50) -> TracePage:
    """One page of the decision records of ``org``, newest first, filtered by ``query``: ``since``,
    ``until`` (UTC unless zoned), ``user``, ``team``, ``model`` (requested or routed), ``outcome``,
    ``revision``, ``approval``; ``limit`` (at most MAX_PAGE) and ``before`` (the ``next_before``
    of the previous page)."""
    limit = page_limit(query.get("limit"), default_limit)
    outcome = query.get("outcome") or None
    if outcome is not None and outcome not in OUTCOMES:
        raise InvalidRequest(f"'outcome' must be one of {', '.join(OUTCOMES)}.", param="outcome")
    filters = {name: (query.get(name) or "").strip() or None for name in TRACE_FILTERS}
    until = parse_when(query.get("before"), "before") or parse_when(query.get("until"), "until")
    try:
        rows = await list_decisions(engine, limit=limit + 1, org=org, since=parse_when(query.get("since"), "since"),
                                    until=until, **filters)
    except SQLAlchemyError as exc:
        raise StoreUnavailable() from exc
    page, more = rows[:limit], len(rows) > limit
    return TracePage(page, more, iso(page[-1]["created_at"]) if more and page else None)


async def org_trace(engine: AsyncEngine, org: str, trace_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One trace's decision records of ``org`` and its spans (in start order); TraceNotFound when
    ``org`` has no record in it (another org's trace is answered exactly like an unknown one)."""
    shown = trace_id[:MAX_TRACE_ID_CHARS]
    try:
        decisions, spans = await read_trace(engine, shown)
    except SQLAlchemyError as exc:
        raise StoreUnavailable() from exc
    mine = [d for d in decisions if d.get("org") == org]
    if not mine:
        raise TraceNotFound(f"No trace with id '{shown}' was found.")
    return mine, spans
