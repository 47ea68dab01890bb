"""Stage 6, route and call: the decided model (then its fallbacks), with retries and timeouts.

Where a call goes comes only from the catalog in configuration and the policy's decision; a
client names a model, never a URL. A retryable failure (timeout, connection, 429, 5xx) is tried
again on the same model ``upstream_retries`` times, then on each fallback. A stream can only be
retried before its first event reaches the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from gateway.errors import GatewayError, InvalidRequest, ModelNotFound, UpstreamError, UpstreamUnavailable
from gateway.types import CatalogModel, Deployment, Provider, ReplyFacts, UpstreamCall, UpstreamReply

RETRY_BACKOFF_S = 0.05
# gen_ai.operation.name per endpoint (OpenTelemetry GenAI semantic conventions).
_OPERATIONS = {"chat.completions": "chat", "responses": "chat", "messages": "chat", "embeddings": "embeddings",
               "messages.count_tokens": "count_tokens"}


@dataclass
class RouteResult:
    """Where a call went: the catalog model and deployment of its last attempt, and every attempt."""

    model: CatalogModel
    deployment: Deployment | None = None
    attempts: list[str] = field(default_factory=list)

    @property
    def provider(self) -> str:
        return self.deployment.provider if self.deployment else self.model.provider


class Router:
    def __init__(self, models: tuple[CatalogModel, ...], providers: Mapping[str, Provider],
                 secret: Callable[[str], str], tracer: Tracer, retries: int) -> None:
        unknown = sorted({m.provider for m in models} - set(providers))
        if unknown:
            raise ValueError(f"models name unknown providers: {', '.join(unknown)} (known: {', '.join(providers)})")
        self.catalog = {m.name: m for m in models}
        self._providers = providers
        self._secret = secret
        self._tracer = tracer
        self._retries = retries

    def model(self, name: str) -> CatalogModel:
        try:
            return self.catalog[name]
        except KeyError:
            raise ModelNotFound(f"The model '{name}' does not exist or you do not have access to it.",
                                param="model") from None

    def serves(self, model: CatalogModel, endpoint: str) -> bool:
        return any(endpoint in self._providers[d.provider].endpoints for d in model.deployments)

    def candidates(self, endpoint: str, model: str, fallbacks: tuple[str, ...]) -> list[CatalogModel]:
        """The decided model, then its fallbacks, each only if one of its deployments serves the endpoint."""
        first = self.model(model)
        if not self.serves(first, endpoint):
            raise InvalidRequest(f"The model '{first.name}' does not serve {endpoint}.", param="model")
        return [first] + [self.catalog[f] for f in fallbacks
                          if f in self.catalog and f != model and self.serves(self.catalog[f], endpoint)]

    def _attempts(self, endpoint: str, candidates: list[CatalogModel]) -> list[tuple[CatalogModel, Deployment]]:
        return [(m, d) for m in candidates for d in m.deployments
                if endpoint in self._providers[d.provider].endpoints for _ in range(1 + self._retries)]

    def _call(self, endpoint: str, model: CatalogModel, deployment: Deployment, body: Mapping[str, Any],
              stream: bool) -> UpstreamCall:
        return UpstreamCall(endpoint=endpoint, model=model, deployment=deployment, body=body,
                            api_key=self._secret(deployment.api_key_env), stream=stream)

    def _start_span(self, endpoint: str, model: CatalogModel, deployment: Deployment, parent: Span) -> Span:
        operation = _OPERATIONS.get(endpoint, "chat")
        span = self._tracer.start_span(
            f"{operation} {deployment.upstream_model}", context=trace.set_span_in_context(parent),
            kind=SpanKind.CLIENT,
            attributes={"gen_ai.operation.name": operation, "gen_ai.provider.name": deployment.provider,
                        "gen_ai.request.model": deployment.upstream_model, "lockgate.catalog_model": model.name},
        )
        return span

    @staticmethod
    def _end_span(span: Span, error: BaseException | None, summary: ReplyFacts | None) -> None:
        if summary is not None:
            span.set_attributes({"gen_ai.response.model": summary.response_model,
                                 "gen_ai.usage.input_tokens": summary.usage.input_tokens,
                                 "gen_ai.usage.output_tokens": summary.usage.output_tokens,
                                 "gen_ai.response.finish_reasons": tuple(summary.finish_reasons)})
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()

    async def _backoff(self, index: int, attempts: list[tuple[CatalogModel, Deployment]]) -> None:
        if index + 1 < len(attempts) and attempts[index + 1] is attempts[index]:
            await asyncio.sleep(RETRY_BACKOFF_S * (2 ** (index % (1 + self._retries))))

    async def complete(self, endpoint: str, candidates: list[CatalogModel], body: Mapping[str, Any], parent: Span,
                       route: RouteResult, read: Callable[[bytes], ReplyFacts]) -> tuple[UpstreamReply, ReplyFacts]:
        """The first answer of the attempts, and what ``read`` (the endpoint spec) finds in it."""
        attempts = self._attempts(endpoint, candidates)
        for index, (model, deployment) in enumerate(attempts):
            route.model, route.deployment = model, deployment
            route.attempts.append(model.name)
            span = self._start_span(endpoint, model, deployment, parent)
            try:
                reply = await self._providers[deployment.provider].complete(
                    self._call(endpoint, model, deployment, body, False))
                completion = read(reply.body)
            except UpstreamError as exc:
                self._end_span(span, exc, None)
                if not exc.retryable or index + 1 == len(attempts):
                    raise
                await self._backoff(index, attempts)
                continue
            except BaseException as exc:
                self._end_span(span, exc, None)
                raise
            self._end_span(span, None, completion)
            return reply, completion
        raise UpstreamError()  # unreachable: the loop returns or raises

    async def stream(self, endpoint: str, candidates: list[CatalogModel], body: Mapping[str, Any],
                     parent: Span, route: RouteResult, summary: ReplyFacts) -> AsyncIterator[bytes]:
        """Open the stream and wait for its first event (retrying up to there); return the events.
        ``summary`` is what the endpoint's stream reader fills in; the span reports it at the end."""
        attempts = self._attempts(endpoint, candidates)
        for index, (model, deployment) in enumerate(attempts):
            route.model, route.deployment = model, deployment
            route.attempts.append(model.name)
            span = self._start_span(endpoint, model, deployment, parent)
            events = self._providers[deployment.provider].stream(self._call(endpoint, model, deployment, body, True))
            try:
                try:
                    first = await anext(events)
                except StopAsyncIteration:
                    raise UpstreamUnavailable("The model provider ended the stream without an event.") from None
            except UpstreamError as exc:
                self._end_span(span, exc, None)
                await events.aclose()  # type: ignore[attr-defined]
                if not exc.retryable or index + 1 == len(attempts):
                    raise
                await self._backoff(index, attempts)
                continue
            except BaseException as exc:
                self._end_span(span, exc, None)
                await events.aclose()  # type: ignore[attr-defined]
                raise
            return self._relay(first, events, span, summary)
        raise UpstreamError()  # unreachable

    async def _relay(self, first: bytes, events: AsyncIterator[bytes], span: Span,
                     summary: ReplyFacts) -> AsyncIterator[bytes]:
        error: BaseException | None = None
        try:
            yield first
            async for event in events:
                yield event
        except BaseException as exc:
            error = exc if isinstance(exc, (GatewayError, Exception)) else None
            raise
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            self._end_span(span, error, summary)
