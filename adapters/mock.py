"""The offline ``mock`` provider: deterministic OpenAI-format replies, no network, no key.

The reply names the model and echoes the last user message. When the request offers tools
(and the last message is not already a tool result) it calls the first tool instead, as a
model would. Usage counts are exact for the reply it gives.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

import orjson

from adapters.anthropic_translate import MESSAGES_ENDPOINTS, complete_messages_over_chat, stream_messages_over_chat
from adapters.mock_openai import MOCK_OPENAI_ENDPOINTS, MockOpenAIEndpoints, count_words, text_of
from gateway.sse import DONE, sse_event
from gateway.types import UpstreamCall, UpstreamReply, Usage


def _last_user_text(messages: list[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


class _Reply:
    """Everything about the mock's answer to one request, computed once."""

    def __init__(self, call: UpstreamCall) -> None:
        body = call.body
        messages = [m for m in body.get("messages") or [] if isinstance(m, Mapping)]
        self.model = call.deployment.upstream_model
        self.id = "chatcmpl-mock-" + hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:24]
        self.created = int(time.time())
        tools = [t for t in body.get("tools") or [] if isinstance(t, Mapping)]
        answered_tool = bool(messages) and messages[-1].get("role") == "tool"
        said = _last_user_text(messages)
        self.tool_call: dict[str, Any] | None = None
        if tools and not answered_tool and body.get("tool_choice") != "none":
            name = str((tools[0].get("function") or {}).get("name") or "tool")
            self.tool_call = {"id": "call_" + self.id[-12:], "type": "function",
                              "function": {"name": name, "arguments": orjson.dumps({"input": said}).decode()}}
            self.content = None
            self.words: list[str] = []
            output_tokens = count_words(name + " " + said)
        else:
            if answered_tool:
                said = "tool result " + text_of(messages[-1].get("content"))
            self.content = f"Mock reply from {self.model}: {said}"
            self.words = self.content.split(" ")
            output_tokens = count_words(self.content)
        self.finish_reason = "tool_calls" if self.tool_call else "stop"
        input_tokens = sum(count_words(text_of(m.get("content"))) + 3 for m in messages)
        self.usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)

    def usage_json(self) -> dict[str, int]:
        u = self.usage
        return {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
                "total_tokens": u.input_tokens + u.output_tokens}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


class MockProvider:
    name = "mock"
    endpoints = frozenset({"chat.completions"}) | MESSAGES_ENDPOINTS  # Messages: answered as chat, translated
    endpoints |= MOCK_OPENAI_ENDPOINTS  # Responses and embeddings: adapters/mock_openai.py

    def __init__(self, stream_delay_s: float = 0.0) -> None:
        self._delay = stream_delay_s
        self._openai = MockOpenAIEndpoints()

    async def complete(self, call: UpstreamCall) -> UpstreamReply:
        if call.endpoint in MOCK_OPENAI_ENDPOINTS:
            return self._openai.complete(call)
        if call.endpoint in MESSAGES_ENDPOINTS:
            return await complete_messages_over_chat(self, call, count=lambda chat: _Reply(chat).usage.input_tokens)
        reply = _Reply(call)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
        if reply.tool_call:
            message["tool_calls"] = [reply.tool_call]
        body = {
            "id": reply.id, "object": "chat.completion", "created": reply.created, "model": reply.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}],
            "usage": reply.usage_json(),
        }
        return UpstreamReply(status=200, body=orjson.dumps(body))

    async def stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        if call.endpoint in MOCK_OPENAI_ENDPOINTS:
            async with aclosing(self._openai.stream(call, self._delay)) as events:
                async for event in events:
                    yield event
            return
        if call.endpoint in MESSAGES_ENDPOINTS:
            async with aclosing(stream_messages_over_chat(self, call)) as translated:
                async for event in translated:
                    yield event
            return
        reply = _Reply(call)
        yield sse_event(reply.chunk({"role": "assistant", "content": "" if reply.content is not None else None}))
        if reply.tool_call:
            yield sse_event(reply.chunk({"tool_calls": [{"index": 0, **reply.tool_call}]}))
        for index, word in enumerate(reply.words):
            if self._delay:
                await asyncio.sleep(self._delay)
            yield sse_event(reply.chunk({"content": word if index == 0 else " " + word}))
        yield sse_event(reply.chunk({}, reply.finish_reason))
        # Like the openai adapter, always report usage; the chat spec drops it if the client did not ask.
        yield sse_event({"id": reply.id, "object": "chat.completion.chunk", "created": reply.created,
                         "model": reply.model, "choices": [], "usage": reply.usage_json()})
        yield DONE
