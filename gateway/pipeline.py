"""The request path: one call through every stage, in the order of ARCHITECTURE.md.

``ChatPipeline.handle`` reads top to bottom like the stage list: authenticate, describe,
decide, hold, reserve, route and call, inspect, settle, record. Whatever happens, exactly one
decision record is written and the budget reservation is settled or released.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from starlette.requests import Request
from starlette.responses import Response

from gateway.approvals import APPROVAL_HEADER, ApprovalQueue
from gateway.audit.writer import AuditWriter
from gateway.auth import KeyStore, bearer_token
from gateway.budgets import BudgetLedgerStore, Reservation
from gateway.describe import describe_chat, parse_json_body
from gateway.errors import (
    AuthenticationFailed,
    BudgetExceeded,
    ClientClosed,
    GatewayError,
    PermissionDenied,
    PolicyDenied,
    RequestTooLarge,
    error_response,
    sse_error_event,
)
from gateway.policy import DECISION, PolicyStage, build_input
from gateway.routing import Router, RouteResult
from gateway.sse import SSEResponse
from gateway.store import rfc3339, utcnow
from gateway.types import CallFacts, CatalogModel, Completion, Decision, Principal, StreamSummary, Usage

log = logging.getLogger("lockgate.pipeline")


@dataclass
class CallRecord:
    """What the audit needs to know about one call, filled in stage by stage."""

    decision_id: str
    started: float
    now: datetime
    principal: Principal | None = None
    facts: CallFacts | None = None
    stream: bool = False
    policy_input: dict[str, Any] | None = None
    raw_decision: Any = None
    reasons: tuple[str, ...] = ()
    route: RouteResult | None = None
    usage: Usage = field(default_factory=Usage)
    cost_micro_usd: int = 0
    reservation: Reservation | None = None


class ChatPipeline:
    def __init__(self, *, keys: KeyStore, policy: PolicyStage, approvals: ApprovalQueue,
                 ledger: BudgetLedgerStore, router: Router, audit: AuditWriter, tracer: Tracer,
                 max_request_bytes: int) -> None:
        self.keys = keys
        self.policy = policy
        self.approvals = approvals
        self.ledger = ledger
        self.router = router
        self.audit = audit
        self.tracer = tracer
        self.max_request_bytes = max_request_bytes

    async def handle(self, request: Request) -> Response:
        # A decision id names a record; it is no secret, so the cheap generator OpenTelemetry
        # uses for span ids will do (an os.urandom call per request showed in the profile).
        record = CallRecord(decision_id=f"dec_{random.getrandbits(64):016x}", started=time.perf_counter(),
                            now=utcnow())
        root = self.tracer.start_span("chat", kind=SpanKind.SERVER, attributes={
            "gen_ai.operation.name": "chat", "lockgate.decision_id": record.decision_id})
        try:
            with trace.use_span(root, end_on_exit=False):
                response = await self._run(request, record, root)
        except GatewayError as exc:
            return self._refuse(record, root, exc)
        except asyncio.CancelledError:
            # The server is stopping or the caller is gone: still release the reservation and
            # write the record (both only queue for the audit writer, so nothing here can be cut off).
            self._refuse(record, root, ClientClosed())
            raise
        except Exception as exc:
            log.exception("unexpected error in decision %s", record.decision_id)
            wrapped = GatewayError()
            wrapped.__cause__ = exc
            return self._refuse(record, root, wrapped)
        return response

    async def _run(self, request: Request, record: CallRecord, root: Span) -> Response:
        headers = request.headers
        principal = await self.keys.authenticate(                                    # 1 authenticate
            bearer_token(headers.get("authorization"), headers.get("x-api-key")))
        record.principal = principal
        raw = await self._read_body(request)
        body = parse_json_body(raw)                                                  # 2 describe
        facts = describe_chat(body)
        record.facts, record.stream = facts, facts.stream
        root.update_name(f"chat {facts.model}")
        root.set_attribute("gen_ai.request.model", facts.model)
        decision = await self._decide(principal, facts, record, root)               # 3 decide
        models = self.router.candidates(decision.route_model or facts.model, decision.fallbacks)
        record.route = RouteResult(model=models[0])
        if decision.approval is not None:                                            # 4 hold
            await self.approvals.hold(principal, models[0].name, raw, decision.approval,
                                      headers.get(APPROVAL_HEADER), record.now)
        upstream_body = self._apply_limits(body, decision)
        output_max = min(facts.output_tokens_max, decision.max_tokens or facts.output_tokens_max)
        worst = max(m.cost_micro_usd(facts.input_tokens, output_max) for m in models)
        record.reservation = await self.ledger.reserve(decision.budgets, worst, record.now)  # 5 reserve
        if facts.stream:
            return await self._stream(upstream_body, models, record, root)
        completion = await self.router.complete(models, upstream_body, root, record.route)  # 6 route + call
        record.usage = completion.usage
        await self._inspect(completion.tool_calls, completion.finish_reasons, record)  # 7 inspect
        self._settle(record)                                                            # 8 settle
        self._record(record, root, status=200, completion=completion)                   # 9 record
        return Response(completion.body, media_type="application/json", headers=self._headers(record, root))

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

    async def _decide(self, principal: Principal, facts: CallFacts, record: CallRecord, root: Span) -> Decision:
        scopes = (f"key:{principal.key_id}", f"user:{principal.user}", f"team:{principal.team}", f"org:{principal.org}")
        spend = await self.ledger.spend(scopes, record.now)
        estimate = self._estimate(facts)
        record.policy_input = build_input(principal, facts, estimate, spend, rfc3339(record.now))
        span = self.tracer.start_span("policy.decide", attributes={"lockgate.policy.entrypoint": DECISION})
        try:
            decision, record.raw_decision, reused = self.policy.decide(record.policy_input)
        except GatewayError as exc:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, exc.message))
            raise
        else:
            span.set_attributes({"lockgate.decision.allow": decision.allow,
                                 "lockgate.decision.reasons": decision.reasons,
                                 "lockgate.policy.reused": reused})
        finally:
            span.end()
        record.reasons = decision.reasons
        root.set_attribute("lockgate.decision.allow", decision.allow)
        if not decision.allow:
            reasons = "; ".join(decision.reasons) or "no reason given"
            raise PolicyDenied(f"The policy denied this call: {reasons}")
        return decision

    def _estimate(self, facts: CallFacts) -> int:
        """Worst-case cost for the policy input: the requested model's prices, or the dearest model's
        when the name is an alias only the policy resolves."""
        model: CatalogModel | None = self.router.catalog.get(facts.model)
        candidates = [model] if model else list(self.router.catalog.values())
        return max((m.cost_micro_usd(facts.input_tokens, facts.output_tokens_max) for m in candidates), default=0)

    @staticmethod
    def _apply_limits(body: dict[str, Any], decision: Decision) -> dict[str, Any]:
        if decision.max_tokens is None:
            return body
        limited = dict(body)
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        current = body.get(key)
        limited[key] = min(current, decision.max_tokens) if isinstance(current, int) else decision.max_tokens
        return limited

    async def _inspect(self, tool_calls: tuple[str, ...] | list[str], finish_reasons: Any, record: CallRecord) -> None:
        if not tool_calls:
            return
        review = self.policy.review_response({**(record.policy_input or {}), "response": {
            "tool_calls": list(tool_calls), "finish_reasons": list(finish_reasons)}})
        if review is not None and not review.allow:
            record.reasons = review.reasons
            raise PolicyDenied("The policy withheld the reply: " + ("; ".join(review.reasons) or "no reason given"))

    async def _stream(self, body: dict[str, Any], models: list[CatalogModel], record: CallRecord,
                      root: Span) -> Response:
        summary = StreamSummary()
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        assert record.route is not None
        events = await self.router.stream(models, body, include_usage, root, record.route, summary)
        return SSEResponse(self._relay(events, summary, record, root),  # type: ignore[return-value]
                           headers=self._headers(record, root))

    async def _relay(self, events: AsyncIterator[bytes], summary: StreamSummary, record: CallRecord,
                     root: Span) -> AsyncIterator[bytes]:
        error: GatewayError | None = None
        status = 200
        relayed = 0
        try:
            async for event in events:
                relayed += 1
                yield event
        except GatewayError as exc:
            error, status = exc, exc.status
            yield sse_error_event(exc)
        except GeneratorExit:
            error, status = ClientClosed(), ClientClosed.status
            raise
        except Exception as exc:
            log.exception("stream failed in decision %s", record.decision_id)
            error, status = GatewayError(), 500
            error.__cause__ = exc
            yield sse_error_event(error)
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            record.usage = summary.usage
            if relayed and not (summary.usage.input_tokens or summary.usage.output_tokens):
                # The stream ended before the provider reported usage (the client left, or the
                # provider broke off), but the provider bills what it generated: estimate it
                # from the prompt and about one token per relayed event, rather than charge nothing.
                record.usage = Usage(input_tokens=record.facts.input_tokens if record.facts else 0,
                                     output_tokens=relayed)
                record.reasons = (*record.reasons, "usage estimated: the stream ended before the provider reported it")
            self._settle(record)
            self._record(record, root, status=status, error=error, summary=summary)

    def _settle(self, record: CallRecord) -> None:
        """Price the usage and hand the settlement to the audit writer, which writes it with the
        call's decision record; until then the reservation stays held."""
        if record.reservation is None:
            return
        usage = record.usage
        record.cost_micro_usd = record.route.model.cost_micro_usd(usage.input_tokens, usage.output_tokens) \
            if record.route else 0
        reservation, record.reservation = record.reservation, None
        self.audit.add_settlement(reservation, record.cost_micro_usd)

    def _headers(self, record: CallRecord, root: Span) -> dict[str, str]:
        return {"lockgate-decision-id": record.decision_id,
                "lockgate-trace-id": format(root.get_span_context().trace_id, "032x")}

    def _refuse(self, record: CallRecord, root: Span, exc: GatewayError) -> Response:
        response = error_response(exc)
        response.headers.update(self._headers(record, root))
        self._settle(record)  # releases the reservation of a call that failed
        self._record(record, root, status=exc.status, error=exc)
        return response

    def _record(self, record: CallRecord, root: Span, *, status: int, error: GatewayError | None = None,
                completion: Completion | None = None, summary: StreamSummary | None = None) -> None:
        reply = completion or summary
        route = record.route
        attributes: dict[str, Any] = {"http.response.status_code": status}
        if route is not None and route.attempts:
            attributes["gen_ai.provider.name"] = route.model.provider
        if reply is not None:
            attributes.update({
                "gen_ai.response.model": reply.response_model,
                "gen_ai.usage.input_tokens": reply.usage.input_tokens,
                "gen_ai.usage.output_tokens": reply.usage.output_tokens,
                "gen_ai.response.finish_reasons": tuple(reply.finish_reasons),
            })
        if error is not None:
            attributes["error.type"] = error.code or type(error).__name__
            root.set_status(Status(StatusCode.ERROR, error.message))
        root.set_attributes(attributes)  # one call: the SDK locks and checks per call, not per batch
        root.end()
        denied = isinstance(error, (AuthenticationFailed, PermissionDenied, BudgetExceeded))
        principal, facts = record.principal, record.facts
        self.audit.add_decision({
            "id": record.decision_id,
            "trace_id": format(root.get_span_context().trace_id, "032x"),
            "created_at": record.now,
            "outcome": "allowed" if error is None else ("denied" if denied else "failed"),
            "status_code": status,
            "endpoint": "chat.completions",
            "key_id": principal.key_id if principal else None,
            "user": principal.user if principal else None,
            "team": principal.team if principal else None,
            "org": principal.org if principal else None,
            "requested_model": facts.model if facts else None,
            "routed_model": route.model.name if route and route.attempts else None,
            "provider": route.model.provider if route and route.attempts else None,
            "stream": record.stream,
            "reasons": list(record.reasons),
            "error_type": (error.code or type(error).__name__) if error else None,
            "error_message": error.message if error else None,
            "input_tokens": record.usage.input_tokens,
            "output_tokens": record.usage.output_tokens,
            "cost_micro_usd": record.cost_micro_usd,
            "duration_ms": round((time.perf_counter() - record.started) * 1000, 3),
            "policy_input": record.policy_input,
            "decision": record.raw_decision if isinstance(record.raw_decision, dict) else None,
        })
