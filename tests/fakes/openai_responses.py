"""The fake OpenAI's answers on the Responses API and on embeddings, in their real wire formats
(after the openai SDK's types, openai/types/responses/ and create_embedding_response.py).

A ``Reply`` cassette answers whichever API the request called (tests/fakes/openai_upstream.py
selects it by path): its ``content`` becomes an output message, its ``tool_calls`` become
``function_call`` items, ``prompt_tokens``/``completion_tokens`` become ``input_tokens``/
``output_tokens``, and ``finish_reason="length"`` makes the response ``incomplete``
(``max_output_tokens``). A stream is named events, each ``data`` with its ``type`` and
``sequence_number``, ending in ``response.completed`` (or ``response.incomplete``); no ``[DONE]``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fakes.openai_upstream import Reply

CREATED = 1767225600  # the fake's fixed clock, as in openai_upstream
EMBEDDING_DIMENSIONS = 8


def named_sse(payload: Mapping[str, Any]) -> bytes:
    """One Responses event: ``event: <type>`` and its JSON ``data``."""
    return (f"event: {payload['type']}\n".encode() + b"data: "
            + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


class ResponseAnswer:
    """One Reply cassette as a Responses API answer for one request, whole or as events."""

    def __init__(self, reply: Reply, request_body: Mapping[str, Any], response_id: str) -> None:
        self.reply = reply
        self.body = request_body
        self.id = response_id
        self.model = reply.model or str(request_body.get("model") or "")
        self.incomplete = reply.finish_reason == "length"
        self.message_id = "msg_" + response_id[5:]

    def _message(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}]
        return {"id": self.message_id, "type": "message", "status": status, "content": content, "role": "assistant"}

    def _calls(self) -> list[dict[str, Any]]:
        return [{"id": f"fc_{index}{self.id[5:]}", "type": "function_call", "status": "completed",
                 "arguments": call.arguments, "call_id": call.id or f"call_fake{index}", "name": call.name}
                for index, call in enumerate(self.reply.tool_calls)]

    def usage(self) -> dict[str, Any]:
        reply = self.reply
        return {"input_tokens": reply.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": reply.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": reply.prompt_tokens + reply.completion_tokens}

    @property
    def status(self) -> str:
        return "incomplete" if self.incomplete else "completed"

    def response(self, *, final: bool = True) -> dict[str, Any]:
        body = self.body
        output: list[dict[str, Any]] = []
        if final:
            if self.reply.content is not None:
                output.append(self._message(self.status, self.reply.content))
            output += self._calls()
        return {
            "id": self.id, "object": "response", "created_at": CREATED,
            "status": self.status if final else "in_progress", "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if final and self.incomplete else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None, "model": self.model, "output": output, "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"), "prompt_cache_key": None,
            "reasoning": {"effort": None, "summary": None}, "safety_identifier": None, "service_tier": "default",
            "store": body.get("store", True), "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [], "top_logprobs": 0,
            "top_p": 1.0, "truncation": "disabled", "usage": self.usage() if final else None, "user": None,
            "metadata": body.get("metadata") or {},
        }

    def events(self) -> list[bytes]:
        payloads: list[dict[str, Any]] = [
            {"type": "response.created", "response": self.response(final=False)},
            {"type": "response.in_progress", "response": self.response(final=False)},
        ]
        index = 0
        content = self.reply.content
        if content is not None:
            at = {"item_id": self.message_id, "output_index": index, "content_index": 0}
            payloads.append({"type": "response.output_item.added", "output_index": index,
                             "item": self._message("in_progress", None)})
            payloads.append({"type": "response.content_part.added", **at,
                             "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}})
            for number, word in enumerate(content.split(" ") if content else []):
                payloads.append({"type": "response.output_text.delta", **at,
                                 "delta": word if number == 0 else " " + word, "logprobs": [],
                                 "obfuscation": "x" * (number % 4)})
            payloads.append({"type": "response.output_text.done", **at, "text": content, "logprobs": []})
            payloads.append({"type": "response.content_part.done", **at,
                             "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": content}})
            payloads.append({"type": "response.output_item.done", "output_index": index,
                             "item": self._message(self.status, content)})
            index += 1
        for call in self._calls():
            at = {"item_id": call["id"], "output_index": index}
            payloads.append({"type": "response.output_item.added", "output_index": index,
                             "item": {**call, "status": "in_progress", "arguments": ""}})
            for start in range(0, len(call["arguments"]), 8):
                payloads.append({"type": "response.function_call_arguments.delta", **at,
                                 "delta": call["arguments"][start:start + 8], "obfuscation": ""})
            payloads.append({"type": "response.function_call_arguments.done", **at,
                             "arguments": call["arguments"]})
            payloads.append({"type": "response.output_item.done", "output_index": index, "item": call})
            index += 1
        payloads.append({"type": f"response.{self.status}", "response": self.response()})
        return [named_sse({**payload, "sequence_number": number}) for number, payload in enumerate(payloads)]


def _inputs(raw: Any) -> list[Any]:
    """Embeddings' inputs: one per string or per array of token ids; a flat array of ids is one."""
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        return [raw]
    return list(raw) if isinstance(raw, list) else []


def embeddings(reply: Reply, request_body: Mapping[str, Any]) -> dict[str, Any]:
    """A ``list`` of ``embedding`` objects (floats, or base64 of little-endian float32 when
    ``encoding_format`` is "base64", as the SDK asks by default), with the cassette's prompt tokens."""
    dimensions = request_body.get("dimensions")
    if not isinstance(dimensions, int):
        dimensions = EMBEDDING_DIMENSIONS
    data = []
    for index, item in enumerate(_inputs(request_body.get("input"))):
        digest = hashlib.sha256(json.dumps(item).encode()).digest() * (dimensions // 32 + 1)
        numbers = [b / 255 - 0.5 for b in digest[:dimensions]]
        norm = math.sqrt(sum(n * n for n in numbers)) or 1.0
        vector = [n / norm for n in numbers]
        embedding: Any = vector
        if request_body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {"object": "list", "data": data, "model": reply.model or str(request_body.get("model") or ""),
            "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}}
