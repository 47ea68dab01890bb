"""Anthropic's wire format, for Anthropic's API and servers compatible with it: the Messages API
natively, and chat completions by translation (adapters/anthropic_translate.py).

A deployment's ``base_url`` is the server's root, as the ``anthropic`` SDK takes it
(``https://api.anthropic.com``, the default when it is empty); a trailing ``/v1`` is tolerated,
so a URL copied from an OpenAI-style configuration works too. Requests go to
``{base_url}/v1/messages`` and ``{base_url}/v1/messages/count_tokens`` with ``x-api-key`` and
``anthropic-version: 2023-06-01``. The client's own ``anthropic-version`` is not passed on (the
gateway speaks one version to the provider); its ``anthropic-beta`` is, on Messages calls.

A ``messages`` call goes upstream as it came (``model`` rewritten) and its reply or events
come back untouched; the Messages endpoint spec reads usage from them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import orjson

from adapters.anthropic_translate import MessagesToChatStream, chat_request_to_messages, message_to_chat_completion
from gateway.errors import UpstreamError
from gateway.sse import iter_sse_events
from gateway.types import UpstreamCall, UpstreamReply
from gateway.upstream import UpstreamClient, map_upstream_errors, upstream_status_error

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
# Client endpoint -> path on the provider (chat completions are translated to Messages).
PATHS = {"messages": "/v1/messages", "messages.count_tokens": "/v1/messages/count_tokens",
         "chat.completions": "/v1/messages"}


class AnthropicProvider:
    name = "anthropic"
    endpoints = frozenset(PATHS)

    def __init__(self, client: UpstreamClient, default_max_tokens: int = 4096) -> None:
        self._client = client
        # A chat request may leave max_tokens out; Anthropic requires it. The gateway's
        # default_output_tokens is what the call's reservation assumed, so it is the fair value.
        self._default_max_tokens = default_max_tokens

    def _url(self, call: UpstreamCall) -> str:
        base = (call.deployment.base_url or DEFAULT_BASE_URL).rstrip("/")
        base = base.removesuffix("/v1")
        return base + PATHS[call.endpoint]

    def _request(self, call: UpstreamCall) -> httpx.Request:
        if call.endpoint == "chat.completions":
            body = chat_request_to_messages(call.body, call.deployment.upstream_model, self._default_max_tokens)
        else:
            body = {**call.body, "model": call.deployment.upstream_model}
        if call.stream:
            body["stream"] = True
        headers = {"content-type": "application/json", "anthropic-version": API_VERSION}
        if call.api_key:
            headers["x-api-key"] = call.api_key
        beta = call.headers.get("anthropic-beta")
        if beta and call.endpoint != "chat.completions":  # a client of the Messages API opted into a beta
            headers["anthropic-beta"] = beta
        if call.traceparent:
            headers["traceparent"] = call.traceparent
        return self._client.request(self._url(call), orjson.dumps(body), headers, stream=call.stream,
                                    timeout_s=call.deployment.timeout_s or call.model.timeout_s)

    async def complete(self, call: UpstreamCall) -> UpstreamReply:
        request = self._request(call)
        with map_upstream_errors():
            response = await self._client.send(request)
            try:
                content = await response.aread()
            finally:
                await response.aclose()
        if response.status_code != 200:
            raise upstream_status_error(response.status_code, content, response.headers)
        if call.endpoint != "chat.completions":
            return UpstreamReply(status=200, body=content)
        try:
            completion = message_to_chat_completion(orjson.loads(content), int(time.time()))
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            raise UpstreamError("The model provider sent a reply that is not a Messages API message.") from None
        return UpstreamReply(status=200, body=orjson.dumps(completion))

    async def stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        request = self._request(call)
        with map_upstream_errors():
            response = await self._client.send(request)
        try:
            if response.status_code != 200:
                with map_upstream_errors():
                    body = await response.aread()
                raise upstream_status_error(response.status_code, body, response.headers)
            translator = MessagesToChatStream() if call.endpoint == "chat.completions" else None
            with map_upstream_errors():
                async for event in iter_sse_events(response.aiter_raw()):
                    if translator is None:
                        yield event
                    else:
                        for chunk in translator.feed(event):
                            yield chunk
        finally:
            await response.aclose()
