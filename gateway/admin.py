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

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.approvals import DECIDER_ROLES, public
from gateway.endpoints import EndpointSpec
from gateway.errors import ApprovalNotFound, DecisionRefused, InvalidRequest, RequestTooLarge
from gateway.pipeline import Call, GovernedEndpoint, Pipeline
from gateway.review import REVIEWER_ROLES, may_review, org_trace, plain, trace_page
from gateway.types import Principal

MAX_NOTE_CHARS = 2000
MAX_BODY_BYTES = 16 * 1024
BUDGET_VIEWERS = REVIEWER_ROLES
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
    note = _note(await small_body(request))
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
    if not may_review(principal):
        raise DecisionRefused("Reading the audit needs a key with the reviewer or admin role.",
                              code="reviewer_role_required")
    return principal


async def list_traces(request: Request, call: Call) -> Response:
    """Decision records of the caller's org, newest first, filtered like ``lockgate traces list``;
    ``before`` (the ``next_before`` of a page) pages back (``gateway/review.py``)."""
    principal = _reviewer(call)
    page = await trace_page(request.state.runtime.engine, principal.org, request.query_params)
    return JSONResponse({"object": "list", "data": [plain(r) for r in page.records], "has_more": page.has_more,
                         "next_before": page.next_before}, headers=call.headers())


async def show_trace(request: Request, call: Call) -> Response:
    """One trace: its decision records (the caller's org's only) and spans; 404 for any other."""
    principal = _reviewer(call)
    trace_id = request.path_params["trace_id"]
    decisions, spans = await org_trace(request.state.runtime.engine, principal.org, trace_id)
    return JSONResponse({"trace_id": trace_id, "decisions": [plain(d) for d in decisions],
                         "spans": [plain(s) for s in spans]}, headers=call.headers())


async def small_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """A decision's body (the admin API's JSON, the console's form), read up to ``limit`` bytes: a
    larger one is refused, never buffered."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"The body of a decision is at most {limit} bytes.")
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
    return check_reason(body.get("reason"))


def check_reason(reason: Any) -> str | None:
    """A decider's optional reason (the API's ``reason``, the console's field): printable text of at
    most MAX_NOTE_CHARS characters, shown to the caller on a denial."""
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
