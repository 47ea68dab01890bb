"""OpenAI's chat-completions wire format, for any OpenAI-compatible server
(OpenAI, vLLM, Ollama, LM Studio, Together, Groq...)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import orjson

from adapters.sse import DONE, event_data, iter_sse_events
from gateway.errors import UpstreamError
from gateway.types import Completion, StreamSummary, UpstreamCall, Usage
from gateway.upstream import UpstreamClient, map_upstream_errors, upstream_status_error

MAX_TOKENS_REPORTED = 2**31 - 1  # what the audit's token columns hold; no real call comes near it


def _token_count(value: Any) -> int:
    """A provider's token count, as a sane integer: a bogus value must not break charging or the audit."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return min(max(int(value), 0), MAX_TOKENS_REPORTED)


def read_usage(usage: Mapping[str, Any] | None) -> Usage:
    if not isinstance(usage, Mapping):
        return Usage()
    return Usage(input_tokens=_token_count(usage.get("prompt_tokens")),
                 output_tokens=_token_count(usage.get("completion_tokens")))


def _tool_names(message: Mapping[str, Any]) -> list[str]:
    return [str((call.get("function") or {}).get("name") or "")
            for call in message.get("tool_calls") or () if isinstance(call, Mapping)]


class OpenAIProvider:
    name = "openai"

    def __init__(self, client: UpstreamClient) -> None:
        self._client = client

    def _request(self, call: UpstreamCall, stream: bool) -> httpx.Request:
        body = dict(call.body)
        body["model"] = call.model.upstream_model
        if stream:
            body["stream"] = True
            # Always ask for usage so the call can be charged; the extra chunk is dropped again
            # for clients that did not ask for it.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        headers = {"content-type": "application/json"}
        if call.api_key:
            headers["authorization"] = f"Bearer {call.api_key}"
        return self._client.request(call.model.base_url.rstrip("/") + "/chat/completions", orjson.dumps(body),
                                    headers, stream=stream, timeout_s=call.model.timeout_s)

    async def complete(self, call: UpstreamCall) -> Completion:
        with map_upstream_errors():
            response = await self._client.send(self._request(call, stream=False))
            try:
                content = await response.aread()
            finally:
                await response.aclose()
        if response.status_code != 200:
            raise upstream_status_error(response.status_code, content)
        try:
            reply = orjson.loads(content)
            choices = reply.get("choices") or []
            messages = [c.get("message") or {} for c in choices]
            return Completion(
                body=content,
                usage=read_usage(reply.get("usage")),
                response_model=str(reply.get("model") or call.model.upstream_model),
                finish_reasons=tuple(str(c.get("finish_reason")) for c in choices if c.get("finish_reason")),
                tool_calls=tuple(name for m in messages for name in _tool_names(m)),
            )
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            raise UpstreamError("The model provider sent a reply that is not chat-completion JSON.") from None

    async def stream(self, call: UpstreamCall, summary: StreamSummary) -> AsyncIterator[bytes]:
        with map_upstream_errors():
            response = await self._client.send(self._request(call, stream=True))
        try:
            if response.status_code != 200:
                with map_upstream_errors():
                    body = await response.aread()
                raise upstream_status_error(response.status_code, body)
            with map_upstream_errors():
                async for event in iter_sse_events(response.aiter_raw()):
                    if self._observe(event, summary, call.include_usage):
                        yield event
        finally:
            await response.aclose()

    @staticmethod
    def _observe(event: bytes, summary: StreamSummary, include_usage: bool) -> bool:
        """Note what the event says about usage and finish; False to drop it."""
        data = event_data(event)
        if data is None or event == DONE or data == b"[DONE]":
            return True
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(chunk, dict):
            return True
        if chunk.get("model"):
            summary.response_model = str(chunk["model"])
        choices = chunk.get("choices") or []
        for choice in choices:
            if choice.get("finish_reason"):
                summary.finish_reasons.append(str(choice["finish_reason"]))
            for tool_call in (choice.get("delta") or {}).get("tool_calls") or ():
                name = (tool_call.get("function") or {}).get("name")
                if name:
                    summary.tool_calls.append(str(name))
        if chunk.get("usage"):
            summary.usage = read_usage(chunk["usage"])
            return include_usage or bool(choices)
        return True
