"""The request path: one call through every stage, in the order of docs/architecture.md.

``Pipeline.handle`` serves every model endpoint; what differs per API lives in its
``EndpointSpec`` (``gateway/endpoints/``). ``_run`` reads top to bottom like the stage list:
authenticate, describe, decide, hold, reserve, route and call, inspect, settle, record.

Every call leaves through ``_end``, whatever happens (answered, streamed, cut off, refused,
cancelled): it settles the reservation and writes exactly one decision record, and a second
call of it does nothing. The response ``handle`` returns calls ``_end`` once it has been sent,
should nothing else have, so a served call without a record cannot happen.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from gateway.approvals import APPROVAL_HEADER, MODE_HEADER, ApprovalQueue, fingerprint, public, summary
from gateway.audit.content import MAX_REPLY_BYTES, captured
from gateway.audit.metrics import Metrics
from gateway.audit.writer import AuditWriter
from gateway.auth import KeyStore, bearer_token
from gateway.budgets import BudgetLedgerStore, Need, Reservation, Used
from gateway.endpoints import EndpointSpec, StreamReader
from gateway.endpoints.checks import CHARS_PER_TOKEN, parse_json_body
from gateway.errors import (
    ApprovalConflict,
    ApprovalNotFound,
    ApprovalPending,
    ApprovalRejected,
    AuditUnavailable,
    AuthenticationFailed,
    BudgetExceeded,
    ClientClosed,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    ModelUnpriced,
    PermissionDenied,
    PolicyDenied,
    PolicyFailed,
    RateLimited,
    RequestTooLarge,
    StoreUnavailable,
    TooManyApprovals,
    UpstreamError,
    UpstreamUnavailable,
)
from gateway.policy import DECISION, MAX_LIMIT_MICRO_USD, PolicyStage, build_input, rate_budgets
from gateway.routing import Router, RouteResult, semconv_provider
from gateway.sse import SSEResponse
from gateway.store import Approval, rfc3339, utcnow
from gateway.stored_responses import StoredResponses
from gateway.types import (
    ApprovalRequirement,
    Budget,
    CallFacts,
    CatalogModel,
    Decision,
    Principal,
    ReplyFacts,
    Usage,
)

log = logging.getLogger("lockgate.pipeline")
TRACE_CONTEXT = TraceContextTextMapPropagator()

MAX_MICRO_USD = 2**63 - 1  # what the ledger's BIGINT columns hold
# Errors that refuse a call (recorded as "denied"), as opposed to failures.
REFUSALS = (AuthenticationFailed, PermissionDenied, PolicyFailed, BudgetExceeded, RateLimited, ApprovalConflict,
            ApprovalNotFound, TooManyApprovals)
RUN_HEADER = "lockgate-run-id"
# On a call served although the audit could not be written or the policy not evaluated, on a route
# configured to fail open: what failed ("audit", "policy", or both).
FAILED_OPEN_HEADER = "lockgate-failed-open"
MAX_RUN_ID_CHARS = 128


def _unexpected(exc: Exception, call: Call) -> GatewayError:
    """A failure of our own: logged with its traceback for operators, a plain 500 for the caller
    (the exception's text may hold anything, so it never reaches the answer or the record)."""
    log.exception("unexpected error in decision %s", call.decision_id)
    error = GatewayError()
    error.__cause__ = exc
    return error


def run_id(header: str | None, metadata: Mapping[str, Any]) -> str | None:
    """The run a call is a step of: the Lockgate-Run-Id header, else ``metadata.run_id``."""
    value = header if header is not None else metadata.get("run_id")
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_RUN_ID_CHARS or not value.isprintable():
        raise InvalidRequest(f"A run id (the Lockgate-Run-Id header or metadata.run_id) must be 1 to "
                             f"{MAX_RUN_ID_CHARS} printable characters.", param="metadata.run_id")
    return value


def rate_headers(rates: tuple[tuple[str, int, int, float], ...]) -> dict[str, str]:
    """The x-ratelimit-* headers OpenAI clients read, for the tightest per-minute limit of each kind."""
    headers: dict[str, str] = {}
    for unit, limit, used, reset_s in sorted(rates, key=lambda r: r[1] - r[2], reverse=True):
        kind = "tokens" if unit == "tokens" else "requests"
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - used))
        headers[f"x-ratelimit-reset-{kind}"] = f"{max(0.0, reset_s):.0f}s"
    return headers


@dataclass
class Call:
    """One call as it passes the stages, and what the audit needs to know about it."""

    spec: EndpointSpec
    decision_id: str
    started: float
    now: datetime
    root: Span
    principal: Principal | None = None
    facts: CallFacts | None = None
    policy_input: dict[str, Any] | None = None
    raw_decision: Any = None
    reasons: tuple[str, ...] = ()
    route: RouteResult | None = None
    reply: ReplyFacts | None = None
    usage: Usage = field(default_factory=Usage)
    cost_micro_usd: int = 0
    reservation: Reservation | None = None
    approval: Approval | None = None  # the approval this call asked for, or runs under
    approval_claimed: bool = False  # this call moved its approval to executing: _end records the outcome
    outcome: str | None = None  # set only where the error does not tell it (a 202 is "held")
    run_id: str | None = None  # Lockgate-Run-Id, or metadata.run_id: the agent run this call is a step of
    reserved_micro_usd: int = 0  # the money reserved, kept for the record (its estimate error)
    stream_cap: int = 0  # output events a stream may relay before it passes what was reserved (0: no cap)
    rate_headers: dict[str, str] | None = None  # x-ratelimit-* of the policy's per-minute limits
    failed_open: str | None = None  # "audit", "policy" or "policy,audit": what it was served without
    policy_revision: str | None = None  # the policy that decided this call (a reload may come later)
    shadow: dict[str, Any] | None = None  # the shadow policy's decision (policy_shadow_dir), never applied
    capture: str | None = None  # the policy's audit.content (hash | redacted | full), None when off
    request_body: bytes = b""  # kept only while content is captured
    reply_chunks: list[bytes] | None = None  # the reply as the client got it, while content is captured
    reply_bytes: int = 0  # the size of the reply so far, while content is captured
    upstream_started: float = 0.0  # when routing began: the GenAI operation's duration starts here
    ended: bool = False

    @property
    def trace_id(self) -> str:
        return format(self.root.get_span_context().trace_id, "032x")

    def headers(self) -> dict[str, str]:
        headers = {"lockgate-decision-id": self.decision_id, "lockgate-trace-id": self.trace_id}
        if self.rate_headers:
            headers.update(self.rate_headers)
        if self.failed_open:
            headers[FAILED_OPEN_HEADER] = self.failed_open
        return headers


@dataclass(frozen=True)
class Holding:
    """How long calls wait for their approval (settings approval_hold_s, approval_keepalive_s), and
    how long their reservation is held at most."""

    hold_s: float
    keepalive_s: float
    lease_s: float = 900.0  # how long a reservation is held at most (setting reservation_lease_s)


# Serves a call that is no model call (reading a stored response) once the pipeline has
# authenticated its caller; the pipeline still traces and records it.
Serve = Callable[[Request, Call], Awaitable[Response]]


class Pipeline:
    def __init__(self, *, keys: KeyStore, policy: PolicyStage, approvals: ApprovalQueue,
                 ledger: BudgetLedgerStore, router: Router, audit: AuditWriter, tracer: Tracer,
                 max_request_bytes: int, max_request_depth: int, responses: StoredResponses,
                 holding: Holding, metrics: Metrics | None = None, shadow: PolicyStage | None = None) -> None:
        self.keys = keys
        self.policy = policy
        self.approvals = approvals
        self.ledger = ledger
        self.router = router
        self.audit = audit
        self.tracer = tracer
        self.max_request_bytes = max_request_bytes
        self.max_request_depth = max_request_depth
        self._decision_ids = random.Random()
        self.responses = responses
        self.holding = holding
        self.metrics = metrics  # None: no reader takes metrics, so none are recorded
        self.shadow = shadow  # a candidate policy evaluated beside the live one, never applied

    async def handle(self, request: Request, spec: EndpointSpec, serve: Serve | None = None) -> GovernedResponse:
        """Serve one call: through every stage, or, given ``serve``, authenticated and then served by
        it (the routes of stored responses), traced and recorded all the same."""
        # A decision id names a record; it is no secret, so a cheap generator will do (an
        # os.urandom call per request showed in the profile). Our own, seeded once from the OS:
        # whoever seeds the global one (a test framework, a library) must not make ids repeat,
        # since a record whose id is taken is refused by the store.
        decision_id = f"dec_{self._decision_ids.getrandbits(64):016x}"
        # A caller's W3C traceparent makes this call a span of the caller's trace.
        caller = request.headers.get("traceparent")
        parent = TRACE_CONTEXT.extract({"traceparent": caller}) if caller else None
        root = self.tracer.start_span(spec.operation, context=parent, kind=SpanKind.SERVER, attributes={
            "gen_ai.operation.name": spec.operation, "lockgate.decision_id": decision_id,
            "lockgate.endpoint": spec.name})
        call = Call(spec=spec, decision_id=decision_id, started=time.perf_counter(), now=utcnow(), root=root)
        response: Response | SSEResponse
        try:
            with trace.use_span(root, end_on_exit=False):
                response = await (self._run(request, call) if serve is None else self._serve(request, call, serve))
        except GatewayError as exc:
            response = self._refuse(call, exc)
        except asyncio.CancelledError:
            # The server is stopping or the caller is gone: still release the reservation and
            # write the record (both only queue for the audit writer, so nothing here can be cut off).
            self._end(call, status=ClientClosed.status, error=ClientClosed())
            raise
        except Exception as exc:
            response = self._refuse(call, _unexpected(exc, call))
        return GovernedResponse(response, self, call)

    async def _run(self, request: Request, call: Call) -> Response | SSEResponse:
        spec = call.spec
        if request.method != "POST":
            raise MethodNotAllowed(f"{request.method} is not allowed on {spec.path}; use POST.")
        headers = request.headers
        principal = await self.keys.authenticate(                                    # 1 authenticate
            bearer_token(headers.get("authorization"), headers.get("x-api-key")))
        call.principal = principal
        raw = await self._read_body(request)
        body = parse_json_body(raw, self.max_request_depth)                          # 2 describe
        facts = spec.describe(body)
        call.facts = facts
        call.run_id = run_id(headers.get(RUN_HEADER), facts.metadata)
        if facts.previous_response_id is not None:  # continues a stored response: only the caller's own
            await self.responses.find(facts.previous_response_id, principal, param="previous_response_id")
        call.root.update_name(f"{spec.operation} {facts.model}")
        call.root.set_attribute("gen_ai.request.model", facts.model)
        decision = await self._decide(principal, facts, call)                        # 3 decide
        models = self._priced(spec, self.router.candidates(spec.name, decision.route_model or facts.model,
                                                           decision.fallbacks))
        call.route = RouteResult(model=models[0])
        if decision.audit_content != "off":
            call.capture, call.request_body, call.reply_chunks = decision.audit_content, raw, []
        if not self.audit.available:
            self._audit_away(call)
        if decision.approval is not None:                                            # 4 hold
            self._worst_case(call, facts, decision, models)  # one that cannot be accounted for is not held
            return await self._hold(request, call, raw, body, decision)
        return await self._execute(call, body, decision, models, forwarded_headers(headers, spec))

    async def _execute(self, call: Call, body: dict[str, Any], decision: Decision, models: list[CatalogModel],
                       passed_on: Mapping[str, str], approval: Approval | None = None) -> Response | SSEResponse:
        """Stages 5 to 9, once the call may run (``approval``: the approval it runs under)."""
        spec, facts = call.spec, call.facts
        assert facts is not None and call.route is not None
        # A call without an output cap gets the policy's, or the gateway's default: what it may
        # produce is then what was reserved for it.
        cap = decision.max_tokens
        if cap is None and facts.max_tokens is None and spec.billable:
            cap = spec.limits.default_output_tokens
        upstream_body = spec.limit(body, cap)
        if spec.billable:  # counting tokens costs nothing, so it neither holds nor needs budget
            worst = self._worst_case(call, facts, decision, models)
            output_max = facts.output_tokens_max if decision.max_tokens is None \
                else min(facts.output_tokens_max, decision.max_tokens * facts.choices)
            budgets = self._budgets(call, decision)
            call.reservation = await self.ledger.reserve(                            # 5 reserve
                budgets, Need(micro_usd=worst, tokens=facts.input_tokens + output_max), call.now,
                call.decision_id, self.holding.lease_s)
            if budgets:
                call.reserved_micro_usd, call.stream_cap = worst, output_max
                call.root.set_attribute("lockgate.budget.scopes", tuple(dict.fromkeys(b.scope for b in budgets)))
                if call.reservation.rates:
                    call.rate_headers = rate_headers(call.reservation.rates)
        if approval is not None:
            # Consumed only with a reservation that lets the call run; _end gives it back if the
            # provider cannot have billed a failed attempt.
            if not await self.approvals.claim(approval, call.decision_id, call.now):
                raise ApprovalConflict(f"Approval {approval.id} is already being used by another call; an "
                                       "approved call runs once.")
            call.approval_claimed = True
        call.upstream_started = time.perf_counter()
        if facts.stream:
            events = await self.router.stream(spec.name, models, upstream_body,       # 6 route + call
                                              call.root, call.route, (reader := spec.stream_reader(facts)).facts,
                                              passed_on)
            return SSEResponse(self._relay(events, reader, call), headers=call.headers())
        reply, call.reply = await self.router.complete(spec.name, models, upstream_body, call.root, call.route,
                                                       spec.read_reply, passed_on)
        call.usage = call.reply.usage
        if call.reply_chunks is not None:
            call.reply_chunks.append(reply.body)
        if not call.reply.usage_reported and spec.billable:
            # A reply without usage is not free: our own count of its input, and of its output
            # from the reply's size (every 4 bytes a token: it counts the JSON around the text too).
            call.usage = Usage(input_tokens=facts.input_tokens, output_tokens=len(reply.body) // CHARS_PER_TOKEN)
            call.reasons = (*call.reasons, "usage estimated: the provider's reply did not report it")
        await self._inspect(call.reply, call)                                        # 7 inspect
        self._end(call, status=200)                                                  # 8 settle, 9 record
        return Response(reply.body, media_type=reply.content_type, headers=call.headers())

    async def _hold(self, request: Request, call: Call, raw: bytes, body: dict[str, Any],
                    decision: Decision) -> Response | SSEResponse:
        """Stage 4: open (or attach to) the call's approval and wait for it (docs/approvals.md)."""
        principal, facts, spec, headers = call.principal, call.facts, call.spec, request.headers
        assert principal is not None and facts is not None and decision.approval is not None and call.route
        print_ = fingerprint(principal.key_id, spec.name, raw)
        asked = headers.get(APPROVAL_HEADER)
        if asked:
            approval = await self.approvals.get(asked)
            if approval is None or approval.key_id != principal.key_id or approval.kind != "request":
                raise ApprovalNotFound(f"No approval with id '{asked[:64]}' was found for this key.")
            if approval.request_sha256 != print_:
                raise ApprovalRejected(f"Approval {approval.id} was given for a different request; send the exact "
                                       "request it was given for.", code="approval_mismatch")
        else:
            context = call.root.get_span_context()
            opened = await self.approvals.open(
                principal, endpoint=spec.name, model=call.route.model.name, print_=print_,
                summary=summary(facts, self._estimate(facts, spec)), requirement=decision.approval,
                trace=(call.trace_id, format(context.span_id, "016x")), now=call.now)
            approval = opened.approval
        call.approval = approval
        call.root.set_attribute("lockgate.approval.id", approval.id)
        passed_on = forwarded_headers(headers, spec)
        if approval.status == "pending":
            if headers.get(MODE_HEADER, "").lower() == "async":
                call.outcome = "held"
                response = JSONResponse({**public(approval), "status_url": f"/v1/approvals/{approval.id}"},
                                        status_code=202, headers=call.headers())
                response.headers["location"] = f"/v1/approvals/{approval.id}"
                self._end(call, status=202)
                return response
            if facts.stream:
                # Answer a quick decision as an ordinary response; past the first keep-alive,
                # start the stream and keep it open with comments until the approval is decided.
                approval = await self.approvals.wait(approval.id, min(self.holding.keepalive_s, self.holding.hold_s))
                if approval is not None and approval.status == "pending":
                    return SSEResponse(self._held_stream(call, body, approval, passed_on), headers=call.headers())
            else:
                approval = await self.approvals.wait(approval.id, self.holding.hold_s)
                if approval is not None and approval.status == "pending":
                    raise ApprovalPending(
                        f"This call is still waiting for approval {approval.id} ({approval.reason}). Send the same "
                        "request again to keep waiting: it attaches to the same approval.", retry_after_s=1.0)
        return await self._run_approved(call, body, approval, passed_on)

    async def _run_approved(self, call: Call, body: dict[str, Any], approval: Approval | None,
                            passed_on: Mapping[str, str]) -> Response | SSEResponse:
        """Run a call whose approval was decided: checked again, then executed once."""
        if approval is None:
            raise ApprovalNotFound("The approval of this call is gone.")
        if approval.status == "executing" and self.audit.holds_approval(approval.id):
            await self.audit.flush()  # its last call ended a moment ago: its outcome is still queued
            approval = await self.approvals.get(approval.id) or approval
        if approval.status == "denied":
            note = f": {approval.decision_note}" if approval.decision_note else ""
            raise ApprovalRejected(f"Approval {approval.id} was denied by {approval.decided_by}{note}.")
        if approval.status == "expired":
            when = "before anyone decided it" if approval.decided_at is None else "before the approved call ran"
            raise ApprovalRejected(f"Approval {approval.id} expired {when} ({approval.reason}).",
                                   code="approval_expired")
        if approval.status == "pending":  # the status URL's caller in async mode, asking too early
            raise ApprovalConflict(f"Approval {approval.id} is still pending.")
        if approval.status != "approved":
            raise ApprovalConflict(f"Approval {approval.id} was already used (it is {approval.status}); an approved "
                                   "call runs once.")
        call.approval = approval
        principal, facts = call.principal, call.facts
        assert principal is not None and facts is not None
        call.now = utcnow()  # at execution the policy and the budgets are checked again
        decision = await self._decide(principal, facts, call)
        models = self._priced(call.spec, self.router.candidates(call.spec.name, decision.route_model or facts.model,
                                                                decision.fallbacks))
        call.route = RouteResult(model=models[0])
        return await self._execute(call, body, decision, models, passed_on,
                                   approval if decision.approval is not None else None)

    async def _held_stream(self, call: Call, body: dict[str, Any], approval: Approval,
                           passed_on: Mapping[str, str]) -> AsyncIterator[bytes]:
        """A held streamed call: comments while it waits, then the call's own stream (or its error)."""
        inner: AsyncIterator[bytes] | None = None
        current: Approval | None = approval
        try:
            while current is not None and current.status == "pending":
                yield b": waiting for approval " + approval.id.encode() + b"\n\n"
                current = await self.approvals.wait(approval.id, self.holding.keepalive_s)
            with trace.use_span(call.root, end_on_exit=False):
                response = await self._run_approved(call, body, current, passed_on)
            assert isinstance(response, SSEResponse)
            inner = response.events
            async for event in inner:
                yield event
        except GatewayError as exc:
            yield self._stream_error(call, None, exc)
        except Exception as exc:
            yield self._stream_error(call, None, _unexpected(exc, call))
        finally:
            if inner is not None:
                await inner.aclose()  # type: ignore[attr-defined]

    async def _serve(self, request: Request, call: Call, serve: Serve) -> Response:
        headers = request.headers
        call.principal = await self.keys.authenticate(
            bearer_token(headers.get("authorization"), headers.get("x-api-key")))
        if not self.audit.available:
            self._audit_away(call)
        response = await serve(request, call)
        self._end(call, status=response.status_code)
        return response

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_request_bytes:
            raise RequestTooLarge(f"The request body is larger than {self.max_request_bytes} bytes.")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_request_bytes:
                raise RequestTooLarge(f"The request body is larger than {self.max_request_bytes} bytes.")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _decide(self, principal: Principal, facts: CallFacts, call: Call) -> Decision:
        scopes = (f"key:{principal.key_id}", f"user:{principal.user}", f"team:{principal.team}",
                  f"org:{principal.org}", f"model:{facts.model}", *((f"run:{call.run_id}",) if call.run_id else ()))
        spend = await self.ledger.spend(scopes, call.now)
        estimate = self._estimate(facts, call.spec)
        call.policy_input = build_input(principal, facts, estimate, spend, rfc3339(call.now), call.run_id)
        span = self.tracer.start_span("policy.decide", attributes={"lockgate.policy.entrypoint": DECISION})
        policy = self.policy
        if policy.remote:  # a push in progress: wait for it, so the revision recorded is the one deciding
            await policy.ready()
        call.policy_revision = policy.revision  # the one that decides: a reload may follow
        if self.shadow is not None:
            call.shadow = self._shadow(call.policy_input)
        try:
            if policy.remote:  # OPA: awaited; the embedded engine is asked with no coroutine on its path
                decision, call.raw_decision, reused = await policy.decide_async(call.policy_input)
            else:
                decision, call.raw_decision, reused = policy.decide(call.policy_input)
        except PolicyFailed as exc:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, exc.message))
            if not self._fails_open(call, self.router.catalog.get(facts.model), "policy"):
                raise
            # Opt-in, per route: served as asked, with no budget, limit or approval the policy
            # could have set; marked as such.
            decision, reused = Decision(allow=True, reasons=(f"served without a policy decision ({exc.message}); "
                                                             f"route {facts.model} fails open",)), False
        else:
            span.set_attributes({"lockgate.decision.allow": decision.allow,
                                 "lockgate.policy.revision": call.policy_revision,
                                 "lockgate.decision.reasons": decision.reasons,
                                 "lockgate.policy.reused": reused})
        finally:
            span.end()
        call.reasons = decision.reasons
        call.root.set_attributes({"lockgate.decision.allow": decision.allow,
                                  "lockgate.policy.revision": call.policy_revision})
        if not decision.allow:
            reasons = "; ".join(decision.reasons) or "no reason given"
            raise PolicyDenied(f"The policy denied this call: {reasons}")
        return decision

    @staticmethod
    def _budgets(call: Call, decision: Decision) -> tuple[Budget, ...]:
        """Every budget the call is charged to: the policy's, its rate limits on the caller, and,
        for a step of a run, the run's steps, tokens and cost (capped where the policy says)."""
        assert call.principal is not None
        budgets = decision.budgets
        if decision.rate_limits:
            budgets += rate_budgets(decision.rate_limits, call.principal)
        if call.run_id:
            run = f"run:{call.run_id}"
            budgets += (Budget(run, "total", decision.max_steps_per_run or MAX_LIMIT_MICRO_USD, "calls"),
                        Budget(run, "total", MAX_LIMIT_MICRO_USD, "tokens"),
                        Budget(run, "total", MAX_LIMIT_MICRO_USD if decision.max_run_micro_usd is None
                               else decision.max_run_micro_usd, "usd"))
        return budgets

    @staticmethod
    def _priced(spec: EndpointSpec, models: list[CatalogModel]) -> list[CatalogModel]:
        """The candidates whose calls can be charged: a model without a price is not free (unless
        the catalog says so), so it is refused, and skipped as a fallback."""
        if not spec.billable or all(m.priced for m in models):
            return models
        if not models[0].priced:
            raise ModelUnpriced(f"The model '{models[0].name}' has no price in the gateway's catalog, so its cost "
                                "cannot be controlled; an operator must give it input_usd_per_mtok and "
                                "output_usd_per_mtok, or mark it free.")
        return [m for m in models if m.priced]

    def _estimate(self, facts: CallFacts, spec: EndpointSpec) -> int:
        """Worst-case cost for the policy input: the requested model's prices, or the dearest model's
        when the name is an alias only the policy resolves."""
        if not spec.billable:
            return 0
        model: CatalogModel | None = self.router.catalog.get(facts.model)
        candidates = [model] if model else list(self.router.catalog.values())
        return min(MAX_MICRO_USD, max((m.cost_micro_usd(facts.input_tokens, facts.output_tokens_max)
                                       for m in candidates), default=0))

    @staticmethod
    def _worst_case(call: Call, facts: CallFacts, decision: Decision, models: list[CatalogModel]) -> int:
        """What the reservation holds: the dearest candidate at the most output the call may produce
        (the policy's max_tokens caps each choice, so n choices may produce n times the cap)."""
        if not call.spec.billable:
            return 0
        output_max = facts.output_tokens_max
        if decision.max_tokens is not None:
            output_max = min(output_max, decision.max_tokens * facts.choices)
        worst = max(m.cost_micro_usd(facts.input_tokens, output_max) for m in models)
        if worst > MAX_MICRO_USD:
            param = call.spec.output_param
            raise InvalidRequest(f"This call's worst-case cost is too large to account for; lower its {param}.",
                                 param=param)
        return worst

    def _review(self, reply: ReplyFacts, call: Call) -> ApprovalRequirement | None:
        """Stage 7: the reply's tool calls, when the policy reviews them (``response_decision``):
        raises if it withholds the reply; the approval the reply needs before release, if any."""
        if not reply.tool_calls:
            return None
        return self._reviewed(self.policy.review_response(self._review_input(reply, call)), call)

    async def _review_async(self, reply: ReplyFacts, call: Call) -> ApprovalRequirement | None:
        """``_review`` on a remote policy engine (OPA)."""
        if not reply.tool_calls:
            return None
        return self._reviewed(await self.policy.review_response_async(self._review_input(reply, call)), call)

    @staticmethod
    def _review_input(reply: ReplyFacts, call: Call) -> dict[str, Any]:
        return {**(call.policy_input or {}), "response": {
            "tool_calls": list(reply.tool_calls), "finish_reasons": list(reply.finish_reasons)}}

    @staticmethod
    def _reviewed(review: Decision | None, call: Call) -> ApprovalRequirement | None:
        if review is None:
            return None
        if not review.allow:
            call.reasons = review.reasons
            raise PolicyDenied("The policy withheld the reply: " + ("; ".join(review.reasons) or "no reason given"))
        return review.approval

    async def _inspect(self, reply: ReplyFacts, call: Call) -> None:
        """Stage 7 for a whole reply: reviewed, and held for its approval if it needs one."""
        requirement = await self._review_async(reply, call) if self.policy.remote else self._review(reply, call)
        if requirement is not None:
            approval = await self._open_reply_approval(call, reply, requirement)
            await self._release(call, reply, await self.approvals.wait(approval.id, self.holding.hold_s))

    async def _open_reply_approval(self, call: Call, reply: ReplyFacts, requirement: ApprovalRequirement
                                   ) -> Approval:
        """A reply's tool calls wait for a decider like a call does; bound to this call only."""
        assert call.principal is not None and call.facts is not None and call.route is not None
        context = call.root.get_span_context()
        opened = await self.approvals.open(
            call.principal, endpoint=call.spec.name, model=call.route.model.name,
            print_=fingerprint(call.principal.key_id, call.spec.name, call.decision_id.encode()),
            summary={**summary(call.facts, 0), "reply_tool_calls": list(reply.tool_calls)},
            requirement=requirement, trace=(call.trace_id, format(context.span_id, "016x")), now=utcnow(),
            kind="reply")
        call.root.set_attribute("lockgate.approval.reply_id", opened.approval.id)
        return opened.approval

    async def _release(self, call: Call, reply: ReplyFacts, approval: Approval | None) -> None:
        """Let a held reply go once its approval is approved (and mark it executed), or refuse it."""
        tools = ", ".join(dict.fromkeys(reply.tool_calls))
        if approval is not None and approval.status == "approved" and await self.approvals.release(approval):
            if call.approval is None:
                call.approval = approval
            return
        if approval is not None and approval.status == "pending":
            await self.approvals.expire(approval)  # not decided within the hold limit: too late for this reply
            raise ApprovalRejected(f"The reply calls {tools}, which needs approval {approval.id}; nobody decided "
                                   "within the hold limit.", code="approval_expired")
        if approval is not None and approval.status == "denied":
            note = f": {approval.decision_note}" if approval.decision_note else ""
            raise ApprovalRejected(f"The reply calls {tools}; approval {approval.id} was denied by "
                                   f"{approval.decided_by}{note}.")
        raise ApprovalRejected(f"The reply calls {tools}; its approval expired before anyone decided it.",
                               code="approval_expired")

    async def _relay(self, events: AsyncIterator[bytes], reader: StreamReader, call: Call) -> AsyncIterator[bytes]:
        """Relay a provider's stream event by event, reading it as it passes. When the policy
        reviews replies, events are held back from the first tool call on until the stream's
        terminating event, and released only once the policy has seen every tool call: until
        then another choice, output item or content block may still call a tool. The last event
        (the terminating one, or an error event) leaves only once the call's record is durable."""
        reviews = self.policy.reviews_responses
        reviewed = 0  # tool calls the response policy has allowed
        held: list[bytes] = []
        try:
            async for event in events:
                out = reader.observe(event)
                if call.stream_cap and reader.events > call.stream_cap:
                    # Past what its reservation covers: end it before its cost passes the budget.
                    raise BudgetExceeded("The reply passed the output its budget reserved, so the stream was ended; "
                                         "the call is charged for what was streamed.")
                if reviews and len(reader.facts.tool_calls) > reviewed:
                    if out is not None:
                        held.append(out)
                    if not reader.terminated:
                        continue
                    # Refused: the error event replaces what is held.
                    requirement = (await self._review_async(reader.facts, call) if self.policy.remote
                                   else self._review(reader.facts, call))
                    if requirement is not None:
                        approval: Approval | None = await self._open_reply_approval(call, reader.facts, requirement)
                        while approval is not None and approval.status == "pending":
                            yield b": waiting for approval " + approval.id.encode() + b"\n\n"
                            approval = await self.approvals.wait(approval.id, self.holding.keepalive_s)
                        await self._release(call, reader.facts, approval)
                    reviewed = len(reader.facts.tool_calls)
                    out = b"".join(held)
                    held.clear()
                if out:
                    if call.reply_chunks is not None and call.reply_bytes <= MAX_REPLY_BYTES:
                        call.reply_chunks.append(out)
                        call.reply_bytes += len(out)
                    if reader.terminated and not call.ended:
                        self._end_stream(call, reader, 200, None)
                        self._durable(call)
                    yield out
            if not reader.terminated:
                raise UpstreamUnavailable("The model provider's stream ended before its last event.")
        except GatewayError as exc:
            yield self._stream_error(call, reader, exc)
        except GeneratorExit:
            self._end_stream(call, reader, ClientClosed.status, ClientClosed())
            raise
        except Exception as exc:
            yield self._stream_error(call, reader, _unexpected(exc, call))
        finally:
            try:
                await events.aclose()  # type: ignore[attr-defined]
            finally:  # even when closing the provider's stream fails or is cancelled
                self._end_stream(call, reader, ClientClosed.status, ClientClosed())

    def _stream_error(self, call: Call, reader: StreamReader | None, error: GatewayError) -> bytes:
        """The error event that ends a stream, once the call's record is durable."""
        if reader is not None:
            self._end_stream(call, reader, error.status, error)
        else:
            self._end(call, status=error.status, error=error)
        try:
            self._durable(call)
        except StoreUnavailable:
            pass  # the error event goes out all the same: it is no answer to withhold
        return call.spec.error_event(error)

    def _end_stream(self, call: Call, reader: StreamReader, status: int, error: GatewayError | None) -> None:
        """End a streamed call with what its reader saw (once; later calls do nothing)."""
        if call.ended:
            return
        call.reply = reader.facts
        call.usage = reader.facts.usage
        if reader.events and not reader.facts.usage_reported:
            # The stream ended before the provider reported usage (the client left, or the
            # provider broke off), but the provider bills what it generated: estimate it
            # from the prompt and about one token per relayed event, rather than charge nothing.
            call.usage = Usage(input_tokens=call.facts.input_tokens if call.facts else 0, output_tokens=reader.events)
            call.reasons = (*call.reasons, "usage estimated: the stream ended before the provider reported it")
        self._end(call, status=status, error=error)

    def _durable(self, call: Call) -> None:
        """Make the call's record (queued by ``_end``) survive this process before its answer ends:
        the audit journal's write (gateway/audit/journal.py). Raises AuditUnavailable, unless the
        call's route fails open."""
        try:
            self.audit.durable()
        except AuditUnavailable:
            self._audit_away(call)

    def _shadow(self, policy_input: Mapping[str, Any]) -> dict[str, Any]:
        """The shadow policy's decision for this input, for the record (docs/policies.md)."""
        assert self.shadow is not None
        try:
            decision, raw, _ = self.shadow.decide(policy_input)
        except PolicyFailed as exc:
            return {"revision": self.shadow.revision, "allow": None, "reasons": [], "decision": None,
                    "error": exc.message}
        return {"revision": self.shadow.revision, "allow": decision.allow, "reasons": list(decision.reasons),
                "decision": raw if isinstance(raw, dict) else None, "error": None}

    def _audit_away(self, call: Call) -> None:
        """The audit cannot be written: refuse the call (fail closed), or, on a route configured to
        fail open for the audit, serve it marked (header, record field, span attribute, metric)."""
        route = call.route
        if route is None or not self._fails_open(call, route.model, "audit"):
            raise AuditUnavailable()

    @staticmethod
    def _fails_open(call: Call, model: CatalogModel | None, reason: str) -> bool:
        """Whether ``model``'s route serves through ``reason`` ("audit" or "policy"); if it does, the
        call is marked as served without it (docs/audit.md, docs/policies.md)."""
        if model is None or reason not in model.fail_open:
            return False
        if call.failed_open is None or reason not in call.failed_open.split(","):
            call.failed_open = reason if call.failed_open is None else f"{call.failed_open},{reason}"
            call.root.set_attribute("lockgate.failed_open", call.failed_open)
            log.warning("decision %s served without %s (route %s fails open)", call.decision_id,
                        "a policy decision" if reason == "policy" else "a writable audit store", model.name)
        return True

    def _refuse(self, call: Call, exc: GatewayError) -> Response:
        response = call.spec.error_response(exc)
        response.headers.update(call.headers())
        if isinstance(exc, MethodNotAllowed):
            response.headers["allow"] = "POST"  # a 405 must say what is allowed (RFC 9110, 15.5.6)
        self._end(call, status=exc.status, error=exc)
        return response

    def _end(self, call: Call, *, status: int, error: GatewayError | None = None) -> None:
        """The one way out of a call: settle its reservation, end its span, queue its record."""
        if call.ended:
            return
        call.ended = True
        self._settle(call, error)
        if call.approval_claimed and call.approval is not None:
            self.audit.add_approval_outcome(call.approval.id, call.decision_id, self._approval_outcome(call, error),
                                            utcnow())
        if error is None and call.spec.keeps_responses:
            self._keep_response(call)
        self._record(call, status=status, error=error)

    @staticmethod
    def _approval_outcome(call: Call, error: GatewayError | None) -> str:
        """What the call made of its approval: executed; usable again (approved) when it failed
        before the provider could have billed anything; otherwise failed, and spent."""
        if error is None:
            return "executed"
        attempted = call.route is not None and call.route.attempts
        if not attempted or (isinstance(error, UpstreamError) and not error.billable_risk):
            return "approved"
        return "failed"

    def _keep_response(self, call: Call) -> None:
        """Remember who made a response the provider keeps, and where (gateway/stored_responses.py);
        queued before the decision record, so both are written in one transaction."""
        reply, route, principal = call.reply, call.route, call.principal
        if reply and reply.response_id and route and route.deployment and principal:
            self.responses.keep(reply.response_id, principal.key_id, route.model.name, route.deployment, call.now)

    def _measure(self, call: Call, error_type: str | None) -> None:
        """The GenAI client metrics of a call that reached a provider, and the fail-open count."""
        assert self.metrics is not None
        route, reply, facts = call.route, call.reply, call.facts
        if route is not None and route.attempts and call.upstream_started:
            attributes = {"gen_ai.operation.name": call.spec.operation,
                          "gen_ai.provider.name": semconv_provider(route.provider),
                          "gen_ai.request.model": facts.model if facts else route.model.name}
            if reply is not None and reply.response_model:
                attributes["gen_ai.response.model"] = reply.response_model
            self.metrics.operation(attributes, call.usage.input_tokens, call.usage.output_tokens,
                                   time.perf_counter() - call.upstream_started, error_type)
        if call.failed_open and route is not None:
            for reason in call.failed_open.split(","):
                self.metrics.failed_open(route.model.name, reason)

    @staticmethod
    def _content(call: Call) -> dict[str, Any]:
        """What the policy's audit.content keeps of the prompt and reply (gateway/audit/content.py)."""
        assert call.capture is not None
        chunks = call.reply_chunks or []
        reply = b"".join(chunks) if chunks else None
        streamed = bool(call.facts and call.facts.stream)
        truncated = streamed and reply is not None and len(reply) > MAX_REPLY_BYTES
        if truncated:
            reply = reply[:MAX_REPLY_BYTES]  # type: ignore[index]
        return captured(call.capture, call.request_body, reply, streamed, truncated)

    def _settle(self, call: Call, error: GatewayError | None = None) -> None:
        """Price the usage and hand the settlement to the audit writer, which writes it with the
        call's decision record; until then the reservation stays held."""
        if call.reservation is None:
            return
        usage, route = call.usage, call.route
        cost = 0
        if route is not None and call.spec.billable:
            cost = route.model.cost_micro_usd(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens)
            # Attempts that failed after the provider may have done the work (a timeout, a 500, a
            # reply cut off) are charged for their input, which it read in any case; the last one
            # not again when the usage above already counts it (a stream cut off mid-way).
            failures = route.billable_failures - (1 if error is not None and usage.input_tokens else 0)
            if failures > 0 and call.facts is not None:
                cost += failures * route.model.cost_micro_usd(call.facts.input_tokens, 0)
                call.reasons = (*call.reasons, f"charged the input of {failures} failed provider attempts "
                                "that may have been billed")
        call.cost_micro_usd = min(MAX_MICRO_USD, cost)
        reservation, call.reservation = call.reservation, None
        attempted = route is not None and bool(route.attempts)
        self.audit.add_settlement(reservation, Used(micro_usd=call.cost_micro_usd, calls=int(attempted),
                                                    tokens=usage.input_tokens + usage.output_tokens))

    def _record(self, call: Call, *, status: int, error: GatewayError | None = None) -> None:
        root, route, reply = call.root, call.route, call.reply
        attributes: dict[str, Any] = {"http.response.status_code": status}
        attempted = route is not None and route.attempts
        if attempted:
            attributes["gen_ai.provider.name"] = semconv_provider(route.provider)  # type: ignore[union-attr]
            attributes["lockgate.cost_micro_usd"] = call.cost_micro_usd
        if reply is not None:
            attributes.update({
                "gen_ai.response.model": reply.response_model,
                "gen_ai.usage.input_tokens": call.usage.input_tokens,
                "gen_ai.usage.output_tokens": call.usage.output_tokens,
                "gen_ai.response.finish_reasons": tuple(reply.finish_reasons),
            })
        approval = call.approval
        if approval is not None and approval.decided_by and approval.status != "denied":
            attributes["lockgate.approval.approved_by"] = approval.decided_by
        error_type = (error.code or type(error).__name__) if error is not None else None
        if error is not None:
            attributes["error.type"] = error_type
            root.set_status(Status(StatusCode.ERROR, error.message))
        root.set_attributes(attributes)  # one call: the SDK locks and checks per call, not per batch
        root.end()
        if self.metrics is not None:
            self._measure(call, error_type)
        denied = isinstance(error, REFUSALS)
        principal, facts = call.principal, call.facts
        outcome = call.outcome or ("allowed" if error is None else "held" if isinstance(error, ApprovalPending)
                                   else "denied" if denied else "failed")
        self.audit.add_decision({
            "id": call.decision_id,
            "trace_id": call.trace_id,
            "created_at": call.now,
            "outcome": outcome,
            "status_code": status,
            "endpoint": call.spec.name,
            "key_id": principal.key_id if principal else None,
            "user": principal.user if principal else None,
            "team": principal.team if principal else None,
            "org": principal.org if principal else None,
            "requested_model": facts.model if facts else None,
            "routed_model": route.model.name if route and route.attempts else None,
            "provider": route.provider if route and route.attempts else None,
            "stream": facts.stream if facts else False,
            "reasons": list(call.reasons),
            "error_type": (error.code or type(error).__name__) if error else None,
            "error_message": error.message if error else None,
            "input_tokens": call.usage.input_tokens,
            "output_tokens": call.usage.output_tokens,
            "cost_micro_usd": call.cost_micro_usd,
            "reserved_micro_usd": call.reserved_micro_usd,
            "provider_cost_micro_usd": call.usage.provider_cost_micro_usd,
            "duration_ms": round((time.perf_counter() - call.started) * 1000, 3),
            "policy_input": call.policy_input,
            "decision": call.raw_decision if isinstance(call.raw_decision, dict) else None,
            "policy_revision": call.policy_revision,
            "approval_id": approval.id if approval else None,
            "approved_by": approval.decided_by if approval and approval.decided_at and approval.status != "denied"
            else None,
            "approved_at": approval.decided_at if approval and approval.status != "denied" else None,
            "failed_open": call.failed_open,
            "content": self._content(call) if call.capture else None,
            "shadow": call.shadow,
        })


_NOTHING: dict[str, str] = {}


def forwarded_headers(headers: Mapping[str, str], spec: EndpointSpec) -> Mapping[str, str]:
    """The client's headers the endpoint passes on, each a short printable value or a 400."""
    if not spec.forwarded_headers:
        return _NOTHING
    passed: dict[str, str] = {}
    for name in spec.forwarded_headers:
        value = headers.get(name)
        if value is None:
            continue
        if len(value) > 1024 or not value.isprintable():
            raise InvalidRequest(f"The header '{name}' must be printable and at most 1024 characters.", param=name)
        passed[name] = value
    return passed


class GovernedResponse:
    """Sends a response, then ends its call should nothing have ended it yet: a stream that never
    started (the client left before the first byte) leaves no record otherwise, since closing an
    async generator that never ran does not run its ``finally``."""

    def __init__(self, response: Response | SSEResponse, pipeline: Pipeline, call: Call) -> None:
        self.response = response
        self._pipeline = pipeline
        self._call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if not isinstance(self.response, SSEResponse):
                # Durable before the answer: the call's record is in the store before the client
                # gets the last byte (a stream: before its last event, in the relay).
                try:
                    self._pipeline._durable(self._call)
                    if self._call.failed_open:
                        self.response.headers[FAILED_OPEN_HEADER] = self._call.failed_open
                except StoreUnavailable as exc:
                    self.response = self._call.spec.error_response(exc)
                    self.response.headers.update(self._call.headers())
            await self.response(scope, receive, send)
        finally:
            self._pipeline._end(self._call, status=ClientClosed.status, error=ClientClosed())


class GovernedEndpoint:
    """The ASGI app of one endpoint. A model endpoint: every method reaches the pipeline, so even a
    wrong method is answered in the endpoint's error shape and recorded. Given ``serve`` (a route
    that is no model call: /v1/models, stored responses, approvals): the pipeline authenticates,
    traces and records the call, and ``serve`` answers it."""

    def __init__(self, spec: EndpointSpec, serve: Serve | None = None) -> None:
        self.spec = spec
        self.serve = serve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        pipeline: Pipeline = request.state.runtime.pipeline
        response = await pipeline.handle(request, self.spec, serve=self.serve)
        await response(scope, receive, send)
