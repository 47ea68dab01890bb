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

from gateway.errors import GatewayError, ModelNotFound, UpstreamError, UpstreamUnavailable
from gateway.types import CatalogModel, Completion, Provider, StreamSummary, UpstreamCall

RETRY_BACKOFF_S = 0.05


@dataclass
class RouteResult:
    model: CatalogModel
    attempts: list[str] = field(default_factory=list)


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

    def candidates(self, model: str, fallbacks: tuple[str, ...]) -> list[CatalogModel]:
        return [self.model(model)] + [self.catalog[f] for f in fallbacks if f in self.catalog and f != model]

    def _attempts(self, candidates: list[CatalogModel]) -> list[CatalogModel]:
        return [m for m in candidates for _ in range(1 + self._retries)]

    def _call(self, model: CatalogModel, body: Mapping[str, Any], include_usage: bool) -> UpstreamCall:
        return UpstreamCall(model=model, body=body, api_key=self._secret(model.api_key_env),
                            include_usage=include_usage)

    def _start_span(self, model: CatalogModel, parent: Span) -> Span:
        span = self._tracer.start_span(
            f"chat {model.upstream_model}", context=trace.set_span_in_context(parent), kind=SpanKind.CLIENT,
            attributes={"gen_ai.operation.name": "chat", "gen_ai.provider.name": model.provider,
                        "gen_ai.request.model": model.upstream_model, "lockgate.catalog_model": model.name},
        )
        return span

    @staticmethod
    def _end_span(span: Span, error: BaseException | None, summary: Completion | StreamSummary | None) -> None:
        if summary is not None:
            span.set_attributes({"gen_ai.response.model": summary.response_model,
                                 "gen_ai.usage.input_tokens": summary.usage.input_tokens,
                                 "gen_ai.usage.output_tokens": summary.usage.output_tokens,
                                 "gen_ai.response.finish_reasons": tuple(summary.finish_reasons)})
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()

    async def _backoff(self, index: int, attempts: list[CatalogModel]) -> None:
        if index + 1 < len(attempts) and attempts[index + 1] is attempts[index]:
            await asyncio.sleep(RETRY_BACKOFF_S * (2 ** (index % (1 + self._retries))))

    async def complete(self, candidates: list[CatalogModel], body: Mapping[str, Any], parent: Span,
                       route: RouteResult) -> Completion:
        attempts = self._attempts(candidates)
        for index, model in enumerate(attempts):
            route.model = model
            route.attempts.append(model.name)
            span = self._start_span(model, parent)
            try:
                completion = await self._providers[model.provider].complete(self._call(model, body, True))
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
            return completion
        raise UpstreamError()  # unreachable: the loop returns or raises

    async def stream(self, candidates: list[CatalogModel], body: Mapping[str, Any], include_usage: bool,
                     parent: Span, route: RouteResult, summary: StreamSummary) -> AsyncIterator[bytes]:
        """Open the stream and wait for its first event (retrying up to there); return the events."""
        attempts = self._attempts(candidates)
        for index, model in enumerate(attempts):
            route.model = model
            route.attempts.append(model.name)
            span = self._start_span(model, parent)
            events = self._providers[model.provider].stream(self._call(model, body, include_usage), summary)
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
                     summary: StreamSummary) -> AsyncIterator[bytes]:
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
