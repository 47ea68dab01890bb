"""The ``mock`` provider's answers on OpenAI's Responses API and embeddings (adapters/mock.py
answers chat), in their real wire formats, with exact usage.

A response echoes the last user text, or calls the first function tool offered (unless the last
input is already a tool's output, or ``tool_choice`` is "none"), and honours ``max_output_tokens``
by stopping there as an ``incomplete`` response. The newest responses are kept in memory, so
GET and DELETE /v1/responses/{id} work offline too. Embeddings are deterministic unit vectors of
``dimensions`` (default 16) numbers, derived from each input, as floats or base64.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterator, Mapping
from typing import Any

import orjson

from gateway.errors import UpstreamNotFound
from gateway.sse import sse_event
from gateway.types import UpstreamCall, UpstreamReply

EMBEDDING_DIMENSIONS = 16
KEPT_RESPONSES = 1000
MOCK_OPENAI_ENDPOINTS = frozenset({"responses", "responses.retrieve", "responses.delete", "embeddings"})


class MockOpenAIEndpoints:
    """What ``MockProvider`` answers on the endpoints of MOCK_OPENAI_ENDPOINTS."""

    def __init__(self) -> None:
        self._kept: OrderedDict[str, dict[str, Any]] = OrderedDict()  # the newest KEPT_RESPONSES, by id

    def _keep(self, response: dict[str, Any]) -> None:
        self._kept[response["id"]] = response
        while len(self._kept) > KEPT_RESPONSES:
            self._kept.popitem(last=False)

    def complete(self, call: UpstreamCall) -> UpstreamReply:
        if call.endpoint == "embeddings":
            return mock_embeddings(call)
        if call.endpoint == "responses":
            response = MockResponse(call).response(final=True)
            self._keep(response)
            return UpstreamReply(status=200, body=orjson.dumps(response))
        response_id = str(call.body.get("id"))
        if response_id not in self._kept:
            raise UpstreamNotFound()
        if call.endpoint == "responses.delete":
            del self._kept[response_id]
            return UpstreamReply(status=200, body=orjson.dumps({"id": response_id, "object": "response",
                                                                "deleted": True}))
        return UpstreamReply(status=200, body=orjson.dumps(self._kept[response_id]))

    async def stream(self, call: UpstreamCall, delay_s: float) -> AsyncGenerator[bytes, None]:
        reply = MockResponse(call)
        for event in reply.events():
            if delay_s and b".delta" in event[:64]:
                await asyncio.sleep(delay_s)
            yield event
        self._keep(reply.response(final=True))


def count_words(text: str) -> int:
    """The mock's token count: one a word, at least one."""
    return max(1, len(text.split()))


def text_of(content: Any) -> str:
    """The text of a message's ``content``: a string, or the ``text`` of its parts, space-joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
    return ""


class MockResponse:
    """The mock's answer to one Responses request, computed once, as a whole or as events."""

    def __init__(self, call: UpstreamCall) -> None:
        body = call.body
        raw = body.get("input")
        items: list[Mapping[str, Any]] = (
            [{"role": "user", "content": raw}] if isinstance(raw, str)
            else [i for i in raw or [] if isinstance(i, Mapping)] if isinstance(raw, list) else [])
        self.body = body
        self.model = call.deployment.upstream_model
        self.id = "resp_mock" + secrets.token_hex(20)  # unique, as the provider's: the gateway keeps each one
        self.created = int(time.time())
        said = next((text_of(i.get("content")) for i in reversed(items) if i.get("role") == "user"), "")
        last = items[-1] if items else {}
        answered = last.get("type") == "function_call_output"
        functions = [t for t in body.get("tools") or [] if isinstance(t, Mapping) and t.get("type") == "function"]
        self.call: dict[str, Any] | None = None
        self.words: list[str] = []
        self.incomplete = False
        if functions and not answered and body.get("tool_choice") != "none":
            name = str(functions[0].get("name") or "tool")
            self.call = {"id": "fc_" + self.id[9:33], "type": "function_call", "status": "completed",
                         "call_id": "call_" + self.id[9:21], "name": name,
                         "arguments": orjson.dumps({"input": said}).decode()}
            output_tokens = count_words(name + " " + said)
        else:
            if answered:
                said = "tool result " + text_of(last.get("output"))
            self.words = f"Mock reply from {self.model}: {said}".split(" ")
            limit = body.get("max_output_tokens")
            if isinstance(limit, int) and 0 < limit < len(self.words):
                self.words, self.incomplete = self.words[:limit], True
            output_tokens = len(self.words)
        self.text = " ".join(self.words)
        self.input_tokens = sum(count_words(text_of(i.get("content") or i.get("output"))) + 3 for i in items)
        self.output_tokens = output_tokens
        self.message_id = "msg_" + self.id[9:33]

    def _message(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def response(self, *, final: bool) -> dict[str, Any]:
        """The Response object: as it ends when ``final``, else as it starts (in progress, no output)."""
        body = self.body
        status = "in_progress"
        output: list[dict[str, Any]] = []
        usage = None
        if final:
            status = "incomplete" if self.incomplete else "completed"
            output = [self.call] if self.call else [self._message(status, self.text)]
            usage = {"input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": self.input_tokens + self.output_tokens}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if final and self.incomplete else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "model": self.model, "output": output, "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True), "temperature": 1.0, "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [], "top_p": 1.0,
            "truncation": "disabled", "usage": usage, "user": None, "metadata": body.get("metadata") or {},
        }

    def events(self) -> Iterator[bytes]:
        """The stream, event by event, each with its ``sequence_number``."""
        sequence = 0

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal sequence
            payload = {"type": kind, "sequence_number": sequence, **fields}
            sequence += 1
            return sse_event(payload, kind)

        yield event("response.created", response=self.response(final=False))
        yield event("response.in_progress", response=self.response(final=False))
        if self.call:
            at = {"item_id": self.call["id"], "output_index": 0}
            yield event("response.output_item.added", output_index=0,
                        item={**self.call, "status": "in_progress", "arguments": ""})
            yield event("response.function_call_arguments.delta", **at, delta=self.call["arguments"])
            yield event("response.function_call_arguments.done", **at, arguments=self.call["arguments"])
            yield event("response.output_item.done", output_index=0, item=self.call)
        else:
            at = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
            yield event("response.output_item.added", output_index=0, item=self._message("in_progress", None))
            yield event("response.content_part.added", **at,
                        part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            for index, word in enumerate(self.words):
                yield event("response.output_text.delta", **at, delta=word if index == 0 else " " + word,
                            logprobs=[])
            yield event("response.output_text.done", **at, text=self.text, logprobs=[])
            yield event("response.content_part.done", **at,
                        part={"type": "output_text", "text": self.text, "annotations": [], "logprobs": []})
            final = "incomplete" if self.incomplete else "completed"
            yield event("response.output_item.done", output_index=0, item=self._message(final, self.text))
        yield event("response.incomplete" if self.incomplete else "response.completed",
                    response=self.response(final=True))


def _vector(model: str, item: Any, dimensions: int) -> list[float]:
    """A unit vector that depends only on the model and the input."""
    seed = hashlib.sha256(orjson.dumps([model, item])).digest()
    numbers: list[float] = []
    counter = 0
    while len(numbers) < dimensions:
        block = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        numbers += [b / 127.5 - 1.0 for b in block]
        counter += 1
    numbers = numbers[:dimensions]
    norm = math.sqrt(sum(n * n for n in numbers)) or 1.0
    return [n / norm for n in numbers]


def mock_embeddings(call: UpstreamCall) -> UpstreamReply:
    body = call.body
    raw = body.get("input")
    # One input per string or per array of token ids; a flat array of ids is one input.
    inputs: list[Any] = [raw] if isinstance(raw, str) or (isinstance(raw, list) and raw and
                                                         isinstance(raw[0], int)) else list(raw or [])
    dimensions = body.get("dimensions")
    if not isinstance(dimensions, int):
        dimensions = EMBEDDING_DIMENSIONS
    model = call.deployment.upstream_model
    data = []
    tokens = 0
    for index, item in enumerate(inputs):
        tokens += count_words(item) if isinstance(item, str) else len(item)
        vector = _vector(model, item, dimensions)
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    reply = {"object": "list", "data": data, "model": model,
             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return UpstreamReply(status=200, body=orjson.dumps(reply))
