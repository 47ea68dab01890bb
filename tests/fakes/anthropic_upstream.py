"""A loopback stand-in for Anthropic's Messages API, speaking its real wire format.

Each test scripts what the fake answers, one cassette per request, in order::

    upstream.script(error(529), message("Hello"), message(tool_uses=(ToolUse("search_web"),)), count(42))

and reads what the gateway sent from ``upstream.requests`` (headers and JSON body). A message
answers in the mode the request asked for: a Message object (``"type": "message"``) or its
named server-sent events (``message_start``, ``ping``, ``content_block_start`` /
``content_block_delta`` / ``content_block_stop`` per block, ``message_delta`` with the stop
reason and cumulative usage, ``message_stop``). Errors come in Anthropic's shape,
``{"type": "error", "error": {"type", "message"}, "request_id"}``, with ``retry-after`` on 429
and 529, and a stream can break off with an ``event: error`` or without its last events.

Like Anthropic, the fake refuses a request without ``x-api-key`` (401) or ``anthropic-version``
(400), and a Messages request without ``max_tokens`` or ``messages`` (400): a translation that
forgets them fails here as it would in production.

It is a real HTTP/1.1 server on a free 127.0.0.1 port (tests/fakes/loopback.py): chunked bodies,
keep-alive, connections dropped in the middle of a reply, and SSE events split across TCP writes.
When the script runs out it answers 500, so an unexpected extra request shows up as a failure,
never as a silent success.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import h11

from tests.fakes.loopback import Drop, LoopbackServer, RecordedRequest, StreamKnobs

DEFAULT_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


@dataclass(frozen=True)
class ToolUse:
    name: str
    input: dict[str, Any] = field(default_factory=lambda: {"query": "lockgate"})
    id: str = ""


@dataclass(frozen=True)
class Message(StreamKnobs):
    """A successful answer, as a Message or as its event stream, whichever the request asked for.

    Streamed, it takes the knobs of ``StreamKnobs`` (split, hold, cut; a stream cut cleanly ends
    without ``message_stop``), and ``error_after_events`` sends that many events and then an
    ``event: error`` of ``error_type``, as Anthropic does when it breaks off a stream that had started.
    """

    text: str | None = "Hello from the fake Anthropic."
    tool_uses: tuple[ToolUse, ...] = ()
    thinking: str | None = None
    stop_reason: str | None = None
    input_tokens: int = 11
    output_tokens: int = 13
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    model: str | None = None
    id: str = "msg_01FakeAnthropic"
    error_after_events: int | None = None
    error_type: str = "overloaded_error"

    @property
    def stop(self) -> str:
        return self.stop_reason or ("tool_use" if self.tool_uses else "end_turn")

    def usage(self) -> dict[str, Any]:
        return {"input_tokens": self.input_tokens, "cache_creation_input_tokens": self.cache_creation_input_tokens,
                "cache_read_input_tokens": self.cache_read_input_tokens, "output_tokens": self.output_tokens,
                "service_tier": "standard"}

    def _tool_id(self, index: int, tool: ToolUse) -> str:
        return tool.id or f"toolu_fake{index}_{tool.name}"

    def blocks(self) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        if self.thinking:
            blocks.append({"type": "thinking", "thinking": self.thinking, "signature": "c2lnbmF0dXJl"})
        if self.text:
            blocks.append({"type": "text", "text": self.text})
        for index, tool in enumerate(self.tool_uses):
            blocks.append({"type": "tool_use", "id": self._tool_id(index, tool), "name": tool.name,
                           "input": tool.input})
        return blocks

    def message(self, model: str) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model or model,
                "content": self.blocks(), "stop_reason": self.stop, "stop_sequence": None, "usage": self.usage()}

    def events(self, model: str) -> list[bytes]:
        start = {**self.message(model), "content": [], "stop_reason": None,
                 "usage": {**self.usage(), "output_tokens": 1}}
        events = [named("message_start", {"type": "message_start", "message": start}), named("ping", {"type": "ping"})]
        for index, block in enumerate(self.blocks()):
            kind = block["type"]
            if kind == "text":
                opening: dict[str, Any] = {"type": "text", "text": ""}
                words = block["text"].split(" ")
                deltas = [{"type": "text_delta", "text": w if i == 0 else " " + w} for i, w in enumerate(words)]
            elif kind == "thinking":
                opening = {"type": "thinking", "thinking": "", "signature": ""}
                deltas = [{"type": "thinking_delta", "thinking": block["thinking"]},
                          {"type": "signature_delta", "signature": block["signature"]}]
            else:
                opening = {**block, "input": {}}
                arguments = json.dumps(block["input"])
                # Anthropic opens tool input with an empty partial_json, then sends pieces of it.
                deltas = [{"type": "input_json_delta", "partial_json": ""}] + [
                    {"type": "input_json_delta", "partial_json": arguments[i:i + 8]}
                    for i in range(0, len(arguments), 8)]
            events.append(named("content_block_start",
                                {"type": "content_block_start", "index": index, "content_block": opening}))
            events += [named("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
                       for d in deltas]
            events.append(named("content_block_stop", {"type": "content_block_stop", "index": index}))
        usage = {k: v for k, v in self.usage().items() if k != "service_tier"}  # cumulative, as Anthropic sends it
        events.append(named("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": self.stop, "stop_sequence": None}, "usage": usage}))
        events.append(named("message_stop", {"type": "message_stop"}))
        if self.error_after_events is not None:
            message = DEFAULT_ERRORS.get(529 if self.error_type == "overloaded_error" else 500)[1]
            events = [*events[:self.error_after_events], named("error", {
                "type": "error", "error": {"type": self.error_type, "message": message}})]
        return events


@dataclass(frozen=True)
class Count:
    """An answer to ``/v1/messages/count_tokens``."""

    input_tokens: int


@dataclass(frozen=True)
class Error:
    status: int
    type: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> bytes:
        return json.dumps({"type": "error", "error": {"type": self.type, "message": self.message},
                           "request_id": "req_fake"}).encode()


Cassette = Message | Count | Error | Drop


def message(text: str | None = "Hello from the fake Anthropic.", **options: Any) -> Message:
    return Message(text=text, **options)


def tool_message(*names: str, text: str | None = None, **options: Any) -> Message:
    return Message(text=text, tool_uses=tuple(ToolUse(n, {"query": f"{n} {i}"}, f"toolu_{i}_{n}")
                                              for i, n in enumerate(names)), **options)


def count(input_tokens: int) -> Count:
    return Count(input_tokens)


def error(status: int, message: str | None = None, *, type: str | None = None,
          headers: tuple[tuple[str, str], ...] | None = None) -> Error:
    default_type, default_message = DEFAULT_ERRORS.get(status, ("api_error", "Error."))
    if headers is None:
        headers = (("retry-after", "0"),) if status in (429, 529) else ()
    return Error(status, type or default_type, message or default_message, headers)


def drop() -> Drop:
    return Drop()


def named(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


class FakeAnthropic(LoopbackServer[Cassette, RecordedRequest]):
    """The fake provider. Use ``FakeAnthropic.running()``; ``url`` is its root (no ``/v1``), as
    the ``anthropic`` SDK and the gateway's ``anthropic`` deployments take it."""

    provider = "Anthropic"
    request_type = RecordedRequest
    headers = (("request-id", "req_fake"), ("anthropic-organization-id", "org-fake"))
    stream_headers = (("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache"), *headers)

    @property
    def url(self) -> str:
        return self.root

    def _next(self, request: RecordedRequest) -> Cassette:
        """What Anthropic would refuse before reading the request, then the next cassette."""
        endpoint = (request.method, request.path)
        if endpoint not in (("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens")):
            return error(404, f"Not found: {request.method} {request.path}")
        if not request.headers.get("x-api-key"):
            return error(401, "x-api-key header is required")
        if not request.headers.get("anthropic-version"):
            return error(400, "anthropic-version: header is required")
        if not isinstance(request.body.get("messages"), list):
            return error(400, "messages: Field required")
        if request.path == "/v1/messages" and not isinstance(request.body.get("max_tokens"), int):
            return error(400, "max_tokens: Field required")
        return self._scripted(error(500, "fake upstream: no cassette was scripted for this request"))

    async def _answer(self, cassette: Cassette, request: RecordedRequest, conn: h11.Connection,
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if isinstance(cassette, Drop):
            return False
        if isinstance(cassette, Error):
            return await self._whole(conn, writer, cassette.status, cassette.body(), cassette.headers)
        if isinstance(cassette, Count):
            return await self._whole(conn, writer, 200, json.dumps({"input_tokens": cassette.input_tokens}).encode())
        model = str(request.model or "")
        if not request.stream:
            return await self._whole(conn, writer, 200, json.dumps(cassette.message(model), indent=2).encode())
        return await self._stream(conn, writer, cassette, cassette.events(model))
