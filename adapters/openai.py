"""OpenAI's wire format, for any OpenAI-compatible server (OpenAI, vLLM, Ollama, LM Studio,
Together, Groq...): chat completions, bytes in and bytes out.

The client's body goes upstream as it came, with ``model`` rewritten to the deployment's model;
the reply comes back untouched, so the endpoint spec reads usage and tool calls from it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import orjson

from gateway.sse import iter_sse_events
from gateway.types import UpstreamCall, UpstreamReply
from gateway.upstream import UpstreamClient, map_upstream_errors, upstream_status_error

# Client endpoint -> path under the deployment's base URL.
PATHS = {"chat.completions": "/chat/completions"}


class OpenAIProvider:
    name = "openai"
    endpoints = frozenset(PATHS)

    def __init__(self, client: UpstreamClient) -> None:
        self._client = client

    def _request(self, call: UpstreamCall) -> httpx.Request:
        body = dict(call.body)
        body["model"] = call.deployment.upstream_model
        if call.stream and call.endpoint == "chat.completions":
            body["stream"] = True
            # Always ask for usage so the call can be charged; the chat spec drops the extra
            # chunk again for clients that did not ask for it.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        headers = {"content-type": "application/json"}
        if call.api_key:
            headers["authorization"] = f"Bearer {call.api_key}"
        url = call.deployment.base_url.rstrip("/") + PATHS[call.endpoint]
        return self._client.request(url, orjson.dumps(body), headers, stream=call.stream,
                                    timeout_s=call.deployment.timeout_s or call.model.timeout_s)

    async def complete(self, call: UpstreamCall) -> UpstreamReply:
        with map_upstream_errors():
            response = await self._client.send(self._request(call))
            try:
                content = await response.aread()
            finally:
                await response.aclose()
        if response.status_code != 200:
            raise upstream_status_error(response.status_code, content)
        return UpstreamReply(status=200, body=content)

    async def stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        with map_upstream_errors():
            response = await self._client.send(self._request(call))
        try:
            if response.status_code != 200:
                with map_upstream_errors():
                    body = await response.aread()
                raise upstream_status_error(response.status_code, body)
            with map_upstream_errors():
                async for event in iter_sse_events(response.aiter_raw()):
                    yield event
        finally:
            await response.aclose()
