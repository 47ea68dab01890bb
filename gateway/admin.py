"""The admin API: approvals for deciders (and the status URL for requesters), budgets for admins
and reviewers.

``GET /admin/budgets`` shows spent, reserved and limit of the ledger rows of the caller's org
(docs/budgets.md), to keys with the admin or reviewer role.

``GET /admin/approvals``, ``GET /admin/approvals/{id}``, ``POST /admin/approvals/{id}/approve``
and ``.../deny`` act as the principal of the caller's key (approver or admin role, own org only;
``gateway/approvals.py`` enforces who may decide). ``GET /v1/approvals/{id}`` is the status URL of
an async-mode call: its own key sees its approval. Every one of these calls is authenticated,
traced and recorded by the pipeline like a model call; errors are in OpenAI's shape.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.approvals import DECIDER_ROLES, public
from gateway.audit.reader import list_decisions, read_trace
from gateway.endpoints import EndpointSpec
from gateway.errors import ApprovalNotFound, DecisionRefused, InvalidRequest, RequestTooLarge, TraceNotFound
from gateway.pipeline import Call, GovernedEndpoint, Pipeline
from gateway.types import Principal

MAX_NOTE_CHARS = 2000
MAX_BODY_BYTES = 16 * 1024
BUDGET_VIEWERS = frozenset({"admin", "reviewer"})
STATES = ("pending", "approved", "denied", "expired", "executing", "executed", "failed")


class ApprovalSpec(EndpointSpec):
    billable = False


class ListApprovals(ApprovalSpec):
    name = "approvals.list"
    operation = "list_approvals"
    path = "/admin/approvals"


class ShowApproval(ApprovalSpec):
    name = "approvals.retrieve"
    operation = "retrieve_approval"
    path = "/admin/approvals/{approval_id}"


class DecideApproval(ApprovalSpec):
    name = "approvals.decide"
    operation = "decide_approval"
    path = "/admin/approvals/{approval_id}/{verdict:str}"


class ShowBudgets(ApprovalSpec):
    name = "budgets.list"
    operation = "list_budgets"
    path = "/admin/budgets"


class ListTraces(ApprovalSpec):
    name = "traces.list"
    operation = "list_traces"
    path = "/admin/traces"


class ShowTrace(ApprovalSpec):
    name = "traces.retrieve"
    operation = "retrieve_trace"
    path = "/admin/traces/{trace_id}"


class ApprovalStatus(ApprovalSpec):
    name = "approvals.status"
    operation = "approval_status"
    path = "/v1/approvals/{approval_id}"


def _pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline = request.state.runtime.pipeline
    return pipeline


def _decider(call: Call) -> Principal:
    principal = call.principal
    assert principal is not None  # the pipeline authenticates before it serves
    if not DECIDER_ROLES.intersection(principal.roles):
        raise DecisionRefused("The approvals API needs a key with the approver or admin role.",
                              code="approver_role_required")
    return principal


async def list_approvals(request: Request, call: Call) -> Response:
    principal = _decider(call)
    status = request.query_params.get("status", "pending")
    if status not in (*STATES, "all"):
        raise InvalidRequest(f"'status' must be one of {', '.join(STATES)} or all.", param="status")
    limit = request.query_params.get("limit", "100")
    if not limit.isdigit() or not 1 <= int(limit) <= 1000:
        raise InvalidRequest("'limit' must be a whole number from 1 to 1000.", param="limit")
    rows = await _pipeline(request).approvals.list(principal.org, None if status == "all" else status, int(limit))
    return JSONResponse({"object": "list", "data": [public(a) for a in rows]}, headers=call.headers())


async def show_approval(request: Request, call: Call) -> Response:
    approval = await _pipeline(request).approvals.visible(request.path_params["approval_id"], _decider(call))
    return JSONResponse(public(approval), headers=call.headers())


async def decide_approval(request: Request, call: Call) -> Response:
    verdict = request.path_params["verdict"]
    if verdict not in ("approve", "deny"):
        raise ApprovalNotFound(f"No such endpoint: POST /admin/approvals/{{id}}/{verdict[:32]}.")
    principal = _decider(call)
    note = _note(await _small_body(request))
    approval = await _pipeline(request).approvals.decide(request.path_params["approval_id"], principal,
                                                         verdict == "approve", note)
    call.root.set_attribute("lockgate.approval.id", approval.id)
    return JSONResponse(public(approval), headers=call.headers())


async def approval_status(request: Request, call: Call) -> Response:
    """The requester's view of her own approval (the status URL of an async-mode call)."""
    assert call.principal is not None
    approval = await _pipeline(request).approvals.get(request.path_params["approval_id"])
    if approval is None or approval.key_id != call.principal.key_id:
        raise ApprovalNotFound(f"No approval with id '{request.path_params['approval_id'][:64]}' was found "
                               "for this key.")
    return JSONResponse(public(approval), headers=call.headers())


async def show_budgets(request: Request, call: Call) -> Response:
    principal = call.principal
    assert principal is not None
    if not BUDGET_VIEWERS.intersection(principal.roles):
        raise DecisionRefused("The budgets API needs a key with the admin or reviewer role.",
                              code="reviewer_role_required")
    rows = await _pipeline(request).ledger.view(principal.org, call.now)
    return JSONResponse({"object": "list", "data": rows}, headers=call.headers())


def _reviewer(call: Call) -> Principal:
    principal = call.principal
    assert principal is not None
    if not BUDGET_VIEWERS.intersection(principal.roles):
        raise DecisionRefused("Reading the audit needs a key with the reviewer or admin role.",
                              code="reviewer_role_required")
    return principal


def _when(request: Request, name: str) -> datetime | None:
    value = request.query_params.get(name)
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an ISO 8601 date or time.", param=name) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _record(row: dict[str, Any]) -> dict[str, Any]:
    return {name: (_iso(value) if isinstance(value, datetime) else value) for name, value in row.items()}


def _iso(value: datetime) -> str:
    moment = value if value.tzinfo else value.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def list_traces(request: Request, call: Call) -> Response:
    """Decision records of the caller's org, newest first, filtered like ``lockgate traces list``;
    ``before`` (the ``next_before`` of a page) pages back."""
    principal = _reviewer(call)
    query = request.query_params
    limit = query.get("limit", "50")
    if not limit.isdigit() or not 1 <= int(limit) <= 500:
        raise InvalidRequest("'limit' must be a whole number from 1 to 500.", param="limit")
    filters = {name: query.get(name) for name in ("user", "team", "model", "outcome", "revision", "approval")}
    until = _when(request, "before") or _when(request, "until")
    rows = await list_decisions(request.state.runtime.engine, limit=int(limit) + 1, org=principal.org,
                                since=_when(request, "since"), until=until, **filters)
    page, more = rows[:int(limit)], len(rows) > int(limit)
    return JSONResponse({"object": "list", "data": [_record(r) for r in page], "has_more": more,
                         "next_before": _iso(page[-1]["created_at"]) if more and page else None},
                        headers=call.headers())


async def show_trace(request: Request, call: Call) -> Response:
    """One trace: its decision records (the caller's org's only) and spans; 404 for any other."""
    principal = _reviewer(call)
    trace_id = request.path_params["trace_id"]
    decisions, spans = await read_trace(request.state.runtime.engine, trace_id[:64])
    mine = [d for d in decisions if d.get("org") == principal.org]
    if not mine:
        raise TraceNotFound(f"No trace with id '{trace_id[:64]}' was found.")
    return JSONResponse({"trace_id": trace_id, "decisions": [_record(d) for d in mine],
                         "spans": [_record(s) for s in spans]}, headers=call.headers())


async def _small_body(request: Request) -> bytes:
    """A decision's body, read up to MAX_BODY_BYTES: a larger one is refused, never buffered."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestTooLarge(f"The body of a decision is at most {MAX_BODY_BYTES} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _note(raw: bytes) -> str | None:
    """The decision's optional ``{"reason": "..."}``."""
    if not raw.strip():
        return None
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The body must be a JSON object such as {\"reason\": \"...\"}.") from None
    if not isinstance(body, dict) or set(body) - {"reason"}:
        raise InvalidRequest("The body may hold only 'reason'.")
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_NOTE_CHARS
                               or not reason.isprintable()):
        raise InvalidRequest(f"'reason' must be printable text of at most {MAX_NOTE_CHARS} characters.",
                             param="reason")
    return reason


ROUTES = (
    (ListApprovals.path, GovernedEndpoint(ListApprovals(), list_approvals), ["GET"]),
    (ShowApproval.path, GovernedEndpoint(ShowApproval(), show_approval), ["GET"]),
    (DecideApproval.path, GovernedEndpoint(DecideApproval(), decide_approval), ["POST"]),
    (ApprovalStatus.path, GovernedEndpoint(ApprovalStatus(), approval_status), ["GET"]),
    (ShowBudgets.path, GovernedEndpoint(ShowBudgets(), show_budgets), ["GET"]),
    (ListTraces.path, GovernedEndpoint(ListTraces(), list_traces), ["GET"]),
    (ShowTrace.path, GovernedEndpoint(ShowTrace(), show_trace), ["GET"]),
)
