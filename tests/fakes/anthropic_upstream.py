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

It is a real HTTP/1.1 server (h11 over asyncio, in a thread with its own event loop) on a free
127.0.0.1 port: chunked bodies, keep-alive, connections dropped in the middle of a reply, and
SSE events split across TCP writes. When the script runs out it answers 500, so an unexpected
extra request shows up as a failure, never as a silent success.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h11

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
class Message:
    """A successful answer, as a Message or as its event stream, whichever the request asked for.

    Streaming knobs: ``split`` writes the SSE bytes in pieces of that many bytes;
    ``cut_after_events`` stops after that many events, then drops the connection (or, with
    ``cut_cleanly``, ends the body as if complete, without ``message_stop``);
    ``error_after_events`` sends that many events and then an ``event: error`` of
    ``error_type``, as Anthropic does when it breaks off a stream that had started.
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
    split: int | None = None
    pause_s: float = 0.001
    cut_after_events: int | None = None
    cut_cleanly: bool = False
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


@dataclass(frozen=True)
class Drop:
    """Close the connection without answering."""


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


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    raw_body: bytes
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        return self.body.get("model")

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True


class FakeAnthropic:
    """The fake provider. Use ``FakeAnthropic.running()``; ``url`` is its root (no ``/v1``), as
    the ``anthropic`` SDK and the gateway's ``anthropic`` deployments take it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._script: deque[Cassette] = deque()
        self._requests: list[RecordedRequest] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._shutdown: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._run, name="fake-anthropic", daemon=True)
        self.port = 0

    @classmethod
    @contextlib.contextmanager
    def running(cls) -> Iterator[FakeAnthropic]:
        fake = cls()
        fake.start()
        try:
            yield fake
        finally:
            fake.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *cassettes: Cassette) -> None:
        with self._lock:
            self._script.extend(cassettes)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._script)

    # --- the server thread --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake Anthropic server did not start")

    def stop(self) -> None:
        if self._shutdown is not None:
            self._loop.call_soon_threadsafe(self._shutdown.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._shutdown = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            await self._shutdown.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(conn, reader)
                if request is None:
                    return
                keep_alive = await self._answer(self._next(request), request, conn, writer)
                if not keep_alive or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.CancelledError):
            return
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader) -> RecordedRequest | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                try:
                    parsed = json.loads(body) if body else {}
                except ValueError:
                    parsed = {}
                request = RecordedRequest(
                    method=head.method.decode(), path=head.target.decode(),
                    headers={name.decode().lower(): value.decode() for name, value in head.headers},
                    raw_body=bytes(body), body=parsed if isinstance(parsed, dict) else {})
                with self._lock:
                    self._requests.append(request)
                return request
            else:
                return None

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
        with self._lock:
            if self._script:
                return self._script.popleft()
        return error(500, "fake upstream: no cassette was scripted for this request")

    async def _answer(self, cassette: Cassette, request: RecordedRequest, conn: h11.Connection,
                      writer: asyncio.StreamWriter) -> bool:
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

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, event: Any) -> None:
        data = conn.send(event)
        if data:
            writer.write(data)
            await writer.drain()

    async def _whole(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, body: bytes,
                     extra: tuple[tuple[str, str], ...] = ()) -> bool:
        headers = [("content-type", "application/json"), ("content-length", str(len(body))),
                   ("request-id", "req_fake"), ("anthropic-organization-id", "org-fake"), *extra]
        await self._send(conn, writer, h11.Response(status_code=status, headers=headers))
        await self._send(conn, writer, h11.Data(data=body))
        await self._send(conn, writer, h11.EndOfMessage())
        return True

    async def _stream(self, conn: h11.Connection, writer: asyncio.StreamWriter, cassette: Message,
                      events: list[bytes]) -> bool:
        headers = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache"),
                   ("request-id", "req_fake"), ("anthropic-organization-id", "org-fake")]
        await self._send(conn, writer, h11.Response(status_code=200, headers=headers))
        complete = True
        if cassette.cut_after_events is not None:
            events, complete = events[:cassette.cut_after_events], cassette.cut_cleanly
        data = b"".join(events)
        size = cassette.split or len(data) or 1
        for start in range(0, len(data), size):
            await self._send(conn, writer, h11.Data(data=data[start:start + size]))
            if cassette.split:
                await asyncio.sleep(cassette.pause_s)
        if not complete:
            return False  # close with the chunked body unfinished: a provider that died mid-reply
        await self._send(conn, writer, h11.EndOfMessage())
        return True
