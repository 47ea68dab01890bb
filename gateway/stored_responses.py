"""Responses the provider keeps: who made each one and where, and the routes that reach them.

OpenAI's Responses API stores each response under an id, which a client can then read
(``GET /v1/responses/{id}``), delete (``DELETE``) or continue (``previous_response_id``). Through
the gateway every key shares the provider's account, so the gateway keeps the owner itself: a
response belongs to the key that made it, and any other key is answered 404, exactly as for an
unknown id (another key's ids cannot even be probed).

How the owner is written: when a Responses call ends well, the pipeline queues a
``StoredResponse`` row (response id, key, catalog model, deployment) in the audit writer, which
writes it in the same transaction as the call's decision record: no write on the request path,
and no response without its record. A lookup of an id whose row is still queued flushes the
writer first, so a client that reads a response right after creating it finds it; any other
lookup is one SELECT (an unknown id cannot make the writer flush). With several replicas on one
PostgreSQL, a response made on another replica is found once that replica's writer has flushed
(``audit_flush_interval_s``); until then it is a 404.

``GET`` and ``DELETE`` go through the pipeline (``Pipeline.handle`` with a ``serve`` function):
authenticated, traced, one decision record each. They ask no policy and reserve no budget:
reading or deleting what the key itself made costs nothing, and the policy allowed the call that
made it. They go to the very deployment that made the response, never a fallback.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.audit.writer import AuditWriter
from gateway.endpoints import EndpointSpec
from gateway.endpoints.checks import MAX_MODEL_CHARS, parse_json_reply
from gateway.errors import (
    InvalidRequest,
    MethodNotAllowed,
    ResponseNotFound,
    StoreUnavailable,
    UpstreamNotFound,
)
from gateway.routing import RouteResult
from gateway.store import StoredResponse
from gateway.types import CallFacts, CatalogModel, Deployment, Principal, ReplyFacts

if TYPE_CHECKING:
    from gateway.pipeline import Call, Pipeline

class StoredResponses:
    """The owners of stored responses: queued with decision records, looked up by id."""

    def __init__(self, engine: AsyncEngine, audit: AuditWriter) -> None:
        self._engine = engine
        self._audit = audit

    def keep(self, response_id: str, key_id: str, model: str, deployment: Deployment, now: datetime) -> None:
        self._audit.add_stored_response(StoredResponse(id=response_id, key_id=key_id, model=model,
                                                       deployment=deployment.label, created_at=now))

    async def find(self, response_id: str, principal: Principal, *, param: str | None = None) -> StoredResponse:
        """The caller's stored response with this id, or ResponseNotFound (also for another key's)."""
        what = "Previous response" if param == "previous_response_id" else "Response"
        missing = ResponseNotFound(f"{what} with id '{_shown(response_id)}' not found.", param=param)
        if not response_id or len(response_id) > MAX_MODEL_CHARS or not response_id.isprintable():
            raise missing
        if self._audit.holds_response(response_id):
            # The call that made it ended a moment ago: its row still waits in the audit writer's
            # queue. Asked before the lookup, since the id leaves the queue only once written; a
            # miss therefore costs one SELECT, never a flush a client could force again and again.
            try:
                await self._audit.flush()
            except Exception as exc:
                raise StoreUnavailable() from exc
        row = await self._get(response_id)
        if row is None or row.key_id != principal.key_id:
            raise missing
        return row

    async def forget(self, response_id: str) -> None:
        try:
            async with self._engine.begin() as connection:
                await connection.execute(delete(StoredResponse).where(
                    StoredResponse.id == response_id))  # type: ignore[arg-type]
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc

    async def _get(self, response_id: str) -> StoredResponse | None:
        try:
            async with self._engine.connect() as connection:
                row = (await connection.execute(select(StoredResponse).where(
                    StoredResponse.id == response_id))).first()  # type: ignore[arg-type]
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc
        return StoredResponse.model_validate(row._mapping) if row is not None else None


def _shown(response_id: str) -> str:
    """An id as an error message may quote it: printable and short."""
    return response_id[:MAX_MODEL_CHARS] if response_id.isprintable() else "(unprintable)"


class StoredResponseSpec(EndpointSpec):
    """Reading or deleting a stored response: no body, no tokens, nothing charged."""

    path = "/v1/responses/{response_id}"
    billable = False

    def read_reply(self, content: bytes) -> ReplyFacts:
        reply = parse_json_reply(content, "a JSON object")
        # Only what names the response: its tokens were counted and charged when it was made.
        return ReplyFacts(response_model=str(reply.get("model") or ""), response_id=str(reply.get("id") or ""))


class RetrieveResponse(StoredResponseSpec):
    name = "responses.retrieve"
    operation = "retrieve_response"


class DeleteResponse(StoredResponseSpec):
    name = "responses.delete"
    operation = "delete_response"


class StoredResponseEndpoint:
    """The ASGI app of ``/v1/responses/{id}``: GET reads, DELETE deletes; any other method gets a
    405 in OpenAI's shape, recorded like the rest."""

    def __init__(self) -> None:
        self._specs: dict[str, StoredResponseSpec] = {"GET": RetrieveResponse(), "DELETE": DeleteResponse()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        pipeline: Pipeline = request.state.runtime.pipeline
        spec = self._specs.get(request.method, self._specs["GET"])
        response = await pipeline.handle(request, spec, serve=self._serve)
        await response(scope, receive, send)

    async def _serve(self, request: Request, call: Call) -> Response:
        """After the pipeline authenticated the caller: find the response, ask its deployment."""
        pipeline: Pipeline = request.state.runtime.pipeline
        spec = call.spec
        if request.method not in self._specs:
            raise MethodNotAllowed(f"{request.method} is not allowed on /v1/responses/{{id}}; use GET or DELETE.")
        assert call.principal is not None  # the pipeline authenticated the caller before serving
        response_id = request.path_params["response_id"]
        stored = await pipeline.responses.find(response_id, call.principal)
        model, deployment = _where(pipeline.router.catalog, stored)
        call.facts = CallFacts(endpoint=spec.name, model=model.name, stream=False, max_tokens=None, tools=(),
                               message_count=0, metadata={}, input_tokens=0, output_tokens_max=0)
        call.root.update_name(f"{spec.operation} {model.name}")
        call.root.set_attribute("gen_ai.request.model", model.name)
        call.route = RouteResult(model=model)
        body = {"id": response_id, "query": _query(request)}
        # Only the deployment that made it has it: the model narrowed to that one deployment.
        pinned = dataclasses.replace(model, deployments=(deployment,))
        if not pipeline.router.serves(pinned, spec.name):
            raise InvalidRequest(f"The provider of this response ({deployment.provider}) cannot serve "
                                 f"{request.method} /v1/responses/{{id}}.")
        try:
            reply, call.reply = await pipeline.router.complete(spec.name, [pinned], body, call.root, call.route,
                                                               spec.read_reply)
        except UpstreamNotFound:
            await pipeline.responses.forget(response_id)  # the provider no longer has it
            raise
        if request.method == "DELETE":
            await pipeline.responses.forget(response_id)
        return Response(reply.body, media_type=reply.content_type, headers=call.headers())


def _where(catalog: dict[str, CatalogModel], stored: StoredResponse) -> tuple[CatalogModel, Deployment]:
    model = catalog.get(stored.model)
    deployment = next((d for d in model.deployments if d.label == stored.deployment), None) if model else None
    if model is None or deployment is None:
        raise ResponseNotFound(f"Response with id '{_shown(stored.id)}' was made by a deployment this gateway no "
                               "longer has.")
    return model, deployment


def _query(request: Request) -> str:
    """The query to pass on. ``stream=true`` replays a background response's events, and the
    gateway admits no background responses, so any ``stream`` but ``false`` is refused rather than
    answered in JSON. Every value counts, not the last only: the provider may read another one."""
    if any(value.lower() != "false" for value in request.query_params.getlist("stream")):
        raise InvalidRequest("Streaming a stored response is not supported by the gateway.", param="stream")
    return str(request.url.query)
