"""The HTTP surface: routes, the lifespan that builds the Runtime, and the error handlers."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace import SpanProcessor
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin import ROUTES as APPROVAL_ROUTES
from gateway.console import Console
from gateway.endpoints import EndpointSpec
from gateway.endpoints.chat import ChatCompletions
from gateway.endpoints.checks import MAX_MODEL_CHARS, RequestLimits
from gateway.endpoints.embeddings import Embeddings
from gateway.endpoints.messages import CountTokens, Messages
from gateway.endpoints.responses import Responses
from gateway.errors import GatewayError, MethodNotAllowed, ModelNotFound, PolicyFailed, RouteNotFound, error_response
from gateway.pipeline import Call, GovernedEndpoint
from gateway.policy import build_input
from gateway.policy.embedded import PolicyEngineError
from gateway.runtime import Runtime, build_runtime
from gateway.settings import Settings
from gateway.store import rfc3339
from gateway.stored_responses import StoredResponseEndpoint
from gateway.types import CallFacts, Principal, RemotePolicyEngine

log = logging.getLogger("lockgate.app")
ALIASES = "data.lockgate.aliases"


def _runtime(request: Request) -> Runtime:
    return request.state.runtime  # type: ignore[no-any-return]


def _models_input(principal: Principal, model: str, now: str) -> dict[str, Any]:
    facts = CallFacts(endpoint="models.list", model=model, stream=False, max_tokens=None, tools=(),
                      message_count=0, metadata={}, input_tokens=0, output_tokens_max=0)
    return build_input(principal, facts, 0, {}, now)


async def _aliases(runtime: Runtime, principal: Principal, now: str) -> dict[str, str]:
    """The model aliases the policy offers (``data.lockgate.aliases``: alias -> catalog model), or none."""
    try:
        aliases = await runtime.policy.evaluate_async(ALIASES, _models_input(principal, "", now))
    except PolicyEngineError:
        log.exception("policy failed while reading %s; no aliases are listed", ALIASES)
        return {}
    if not isinstance(aliases, dict):
        return {}
    return {name: model for name, model in aliases.items() if isinstance(name, str) and isinstance(model, str)}


async def _model_entry(runtime: Runtime, principal: Principal, name: str, now: str) -> dict[str, Any] | None:
    """``name`` (a catalog model or an alias) as /v1/models shows it, if the policy lets this key
    use it and it routes to a model of the catalog. Asked as a call's decision is
    (``PolicyStage.decide``), so a listing the policy cannot tell from an earlier one reuses it."""
    try:
        policy, policy_input = runtime.policy, _models_input(principal, name, now)
        decision, _, _ = await policy.decide_async(policy_input) if policy.remote else policy.decide(policy_input)
    except PolicyFailed:
        log.exception("policy failed while listing models; %s is not listed", name)
        return None
    if not decision.allow:
        return None
    model = runtime.router.catalog.get(decision.route_model or name)
    if model is None:
        return None
    return {"id": name, "object": "model", "created": 0, "owned_by": model.provider}


async def list_models(request: Request, call: Call) -> Response:
    """The catalog models and aliases this caller's key may use, as the policy decides for each."""
    runtime, principal, now = _runtime(request), _caller(call), rfc3339(call.now)
    names = dict.fromkeys([*runtime.router.catalog, *await _aliases(runtime, principal, now)])
    data = [entry for name in names if (entry := await _model_entry(runtime, principal, name, now)) is not None]
    return JSONResponse({"object": "list", "data": data}, headers=call.headers())


async def retrieve_model(request: Request, call: Call) -> Response:
    """One model of ``list_models``; any other is a 404, whether it exists or this key may not use it."""
    runtime, principal, now = _runtime(request), _caller(call), rfc3339(call.now)
    name = request.path_params["model_id"]
    entry = None
    if name in runtime.router.catalog or name in await _aliases(runtime, principal, now):
        entry = await _model_entry(runtime, principal, name, now)
    if entry is None:
        shown = name[:MAX_MODEL_CHARS] if name.isprintable() else "(unprintable)"
        raise ModelNotFound(f"The model '{shown}' does not exist or you do not have access to it.", param="model")
    return JSONResponse(entry, headers=call.headers())


def _caller(call: Call) -> Principal:
    assert call.principal is not None  # the pipeline authenticates the caller before it serves
    return call.principal


class ModelsSpec(EndpointSpec):
    """``/v1/models`` and ``/v1/models/{id}``: no body, no provider, nothing charged; authenticated,
    traced and recorded by the pipeline like every other call under /v1."""

    billable = False


class ListModels(ModelsSpec):
    name = "models.list"
    operation = "list_models"
    path = "/v1/models"


class RetrieveModel(ModelsSpec):
    name = "models.retrieve"
    operation = "retrieve_model"
    path = "/v1/models/{model_id:path}"


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when the store answers on both paths (SQLAlchemy's engine and the hot path's own
    connection) and, with the OPA engine, OPA answers its health check; an embedded policy was
    compiled before the app started."""
    runtime = _runtime(request)
    try:
        async with runtime.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        await runtime.direct.ping()
    except Exception:
        log.exception("readiness check: the store does not answer")
        return JSONResponse({"status": "unavailable", "store": "unreachable"}, status_code=503)
    policy = runtime.policy
    if policy.remote and not await cast(RemotePolicyEngine, policy.engine).ready():
        log.error("readiness check: the OPA policy engine does not answer")
        return JSONResponse({"status": "unavailable", "policy": "unreachable"}, status_code=503)
    return JSONResponse({"status": "ready"})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        response = error_response(MethodNotAllowed())
        response.headers.update(exc.headers or {})  # Starlette's Allow: the methods the route takes
        return response
    if exc.status_code == 404:
        return error_response(RouteNotFound(f"No such endpoint: {request.method} {request.url.path}."))
    return error_response(GatewayError())


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(GatewayError())


def endpoint_specs(settings: Settings) -> tuple[EndpointSpec, ...]:
    """One spec per governed model endpoint (see gateway/endpoints/)."""
    limits = RequestLimits(max_depth=settings.max_request_depth, max_choices=settings.max_choices,
                           max_output_tokens=settings.max_output_tokens,
                           default_output_tokens=settings.default_output_tokens)
    return (
        ChatCompletions(limits),
        Responses(limits),
        Embeddings(limits),
        Messages(limits),
        CountTokens(limits),
    )


def create_app(settings: Settings, extra_span_processors: Sequence[SpanProcessor] = (),
               metric_readers: Sequence[MetricReader] = ()) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        runtime = await build_runtime(settings, extra_span_processors, metric_readers)
        # Everything built so far lives as long as the process: move it out of the collector's
        # sight, so a full collection scans only what requests create. Unfrozen, the full
        # collections of this heap paused the event loop for 90-130 ms every 1.5 s under load
        # (the chat c=8 p99 of the bench).
        gc.collect()
        gc.freeze()
        try:
            yield {"runtime": runtime}
        finally:
            await runtime.close()

    # Every model endpoint is the one pipeline with its endpoint spec; any method reaches it, so a
    # wrong one is answered in that API's error shape and recorded.
    governed = [Route(spec.path, GovernedEndpoint(spec)) for spec in endpoint_specs(settings)]
    return Starlette(
        routes=[
            *governed,
            Route("/v1/responses/{response_id}", StoredResponseEndpoint()),
            Route(ListModels.path, GovernedEndpoint(ListModels(), list_models), methods=["GET"]),
            Route(RetrieveModel.path, GovernedEndpoint(RetrieveModel(), retrieve_model), methods=["GET"]),
            *(Route(path, app, methods=methods) for path, app, methods in APPROVAL_ROUTES),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            *Console().routes(),  # the web console at /ui (gateway/console/): pages, not the pipeline
        ],
        exception_handlers={HTTPException: _http_error, GatewayError: _gateway_error, Exception: _unexpected_error},
        lifespan=lifespan,
    )
