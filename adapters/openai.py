"""OpenAI's wire format, for any OpenAI-compatible server (OpenAI, vLLM, Ollama, LM Studio,
Together, Groq, Gemini's OpenAI endpoint...): chat completions, Responses (and reading or deleting
a stored response), embeddings, bytes in and bytes out.

The client's body goes upstream as it came, with ``model`` rewritten to the deployment's model;
the reply comes back untouched, so the endpoint spec reads usage and tool calls from it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from urllib.parse import quote

import httpx
import orjson

from adapters.anthropic_translate import MESSAGES_ENDPOINTS, complete_messages_over_chat, stream_messages_over_chat
from gateway.errors import UpstreamNotFound
from gateway.sse import iter_sse_events
from gateway.types import UpstreamCall, UpstreamReply
from gateway.upstream import UpstreamClient, map_upstream_errors, upstream_status_error

# Client endpoint -> path under the deployment's base URL; "{id}" is a stored response's id.
PATHS = {"chat.completions": "/chat/completions", "responses": "/responses", "embeddings": "/embeddings",
         "responses.retrieve": "/responses/{id}", "responses.delete": "/responses/{id}"}
# Reading and deleting a stored response: the call's body is {"id", "query"}, nothing is sent.
METHODS = {"responses.retrieve": "GET", "responses.delete": "DELETE"}  # every other endpoint is a POST


def resource_path(call: UpstreamCall) -> str:
    """The path of ``call.endpoint``, with a stored response's id (and the client's query) filled in."""
    path = PATHS[call.endpoint]
    if call.endpoint not in METHODS:
        return path
    path = path.replace("{id}", quote(str(call.body["id"]), safe=""))
    return f"{path}?{call.body['query']}" if call.body.get("query") else path


class OpenAIProvider:
    name = "openai"
    endpoints = frozenset(PATHS) | MESSAGES_ENDPOINTS  # Anthropic's Messages: translated to chat

    def __init__(self, client: UpstreamClient) -> None:
        self._client = client

    def _request(self, call: UpstreamCall) -> httpx.Request:
        method = METHODS.get(call.endpoint, "POST")
        headers = self._auth_headers(call)
        content = b""
        if method == "POST":
            body = dict(call.body)
            body["model"] = call.deployment.upstream_model
            if call.stream:
                body["stream"] = True
            if call.stream and call.endpoint == "chat.completions":
                # Always ask for usage so the call can be charged; the chat spec drops the extra
                # chunk again for clients that did not ask for it. (A Responses stream always
                # ends with its usage.)
                body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            headers["content-type"] = "application/json"
            content = orjson.dumps(body)
        if call.traceparent:
            headers["traceparent"] = call.traceparent  # the provider's own tracing joins the call's trace
        return self._client.request(self._url(call), content, headers, stream=call.stream, method=method,
                                    timeout_s=call.deployment.timeout_s or call.model.timeout_s)

    # -- what a provider speaking this format at another address changes (adapters/azure_openai.py)
    def _url(self, call: UpstreamCall) -> str:
        return call.deployment.base_url.rstrip("/") + resource_path(call)

    def _auth_headers(self, call: UpstreamCall) -> dict[str, str]:
        return {"authorization": f"Bearer {call.api_key}"} if call.api_key else {}

    async def complete(self, call: UpstreamCall) -> UpstreamReply:
        if call.endpoint in MESSAGES_ENDPOINTS:
            return await complete_messages_over_chat(self, call)
        with map_upstream_errors():
            response = await self._client.send(self._request(call))
            try:
                content = await response.aread()
            finally:
                await response.aclose()
        if response.status_code == 404 and call.endpoint in METHODS:
            raise UpstreamNotFound()  # a stored response the provider no longer has
        if response.status_code != 200:
            raise upstream_status_error(response.status_code, content, response.headers)
        return UpstreamReply(status=200, body=content)

    async def stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        if call.endpoint in MESSAGES_ENDPOINTS:
            async with aclosing(stream_messages_over_chat(self, call)) as translated:
                async for event in translated:
                    yield event
            return
        with map_upstream_errors():
            response = await self._client.send(self._request(call))
        try:
            if response.status_code != 200:
                with map_upstream_errors():
                    body = await response.aread()
                raise upstream_status_error(response.status_code, body, response.headers)
            with map_upstream_errors():
                async for event in iter_sse_events(response.aiter_raw()):
                    yield event
        finally:
            await response.aclose()
