"""A loopback stand-in for OpenAI's chat-completions API (and its Responses API and embeddings,
tests/fakes/openai_responses.py), speaking its real wire format.

Each test scripts what the fake answers, one cassette per request, in order::

    upstream.script(error(503), reply("Hello"), reply(tool_calls=(ToolCall("search_web"),)))

and reads what the gateway sent from ``upstream.requests`` (headers and JSON body). A reply
answers in the mode the request asked for: a ``chat.completion`` object (indented, as OpenAI
sends it) or ``chat.completion.chunk`` server-sent events ending in ``data: [DONE]``, with the
usage chunk (``choices: []``) only when ``stream_options.include_usage`` was set.

It is a real HTTP/1.1 server on a free 127.0.0.1 port (tests/fakes/loopback.py), so the gateway
reaches it over TCP exactly as it reaches a provider: chunked bodies, keep-alive, connections
dropped in the middle of a reply, and SSE events split across separate TCP writes at arbitrary
byte boundaries. When the script runs out it answers 500, so an unexpected extra request shows
up as a failure, never as a silent success.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Any

import h11

from tests.fakes import loopback
from tests.fakes.loopback import Drop, LoopbackServer, StreamKnobs
from tests.fakes.loopback import Gate as Gate  # tests hold a Reply's stream with it
from tests.fakes.openai_responses import ResponseAnswer, embeddings

CREATED = 1767225600  # a fixed clock: 2026-01-01T00:00:00Z

DEFAULT_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request.", "invalid_request_error", None),
    401: ("Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
          "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to sample from this model.", "invalid_request_error", "model_not_allowed"),
    404: ("The model does not exist or you do not have access to it.", "invalid_request_error", "model_not_found"),
    429: ("Rate limit reached for requests. Please try again in 20ms.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    502: ("Bad gateway.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str = '{"query": "lockgate"}'
    id: str = ""


@dataclass(frozen=True)
class Reply(StreamKnobs):
    """A successful answer, as a chat.completion or as a stream, whichever the request asked for.

    Streamed, it takes the knobs of ``StreamKnobs`` (split, hold, cut); a stream cut cleanly ends
    without ``[DONE]``.
    """

    content: str | None = "Hello from the fake provider."
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 9
    completion_tokens: int = 12
    model: str | None = None

    @property
    def finish(self) -> str:
        return self.finish_reason or ("tool_calls" if self.tool_calls else "stop")

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }

    def _tool_call_json(self, index: int, call: ToolCall) -> dict[str, Any]:
        return {"id": call.id or f"call_fake{index}", "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}

    def completion(self, model: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content, "refusal": None, "annotations": []}
        if self.tool_calls:
            message["tool_calls"] = [self._tool_call_json(i, c) for i, c in enumerate(self.tool_calls)]
        return {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": CREATED, "model": self.model or model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish}],
            "usage": self.usage(), "service_tier": "default", "system_fingerprint": "fp_fake",
        }

    def chunks(self, model: str, include_usage: bool) -> list[dict[str, Any]]:
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": CREATED,
                "model": self.model or model, "service_tier": "default", "system_fingerprint": "fp_fake"}

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            event = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish_reason}]}
            if include_usage:
                event["usage"] = None  # OpenAI sends usage: null on every chunk but the last
            return event

        first: dict[str, Any] = {"role": "assistant", "content": "" if self.content is not None else None,
                                 "refusal": None}
        chunks: list[dict[str, Any]] = []
        for index, call in enumerate(self.tool_calls):
            opening = {"index": index, **self._tool_call_json(index, call)}
            opening["function"] = {"name": call.name, "arguments": ""}
            if index == 0 and self.content is None:
                first["tool_calls"] = [opening]
            else:
                chunks.append(chunk({"tool_calls": [opening]}))
            for start in range(0, len(call.arguments), 8):
                piece = call.arguments[start:start + 8]
                chunks.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
        chunks.insert(0, chunk(first))
        if self.content:
            words = self.content.split(" ")
            chunks[1:1] = [chunk({"content": word if i == 0 else " " + word}) for i, word in enumerate(words)]
        chunks.append(chunk({}, self.finish))
        if include_usage:
            chunks.append({**base, "choices": [], "usage": self.usage()})
        return chunks

    def events(self, model: str, include_usage: bool) -> list[bytes]:
        return [sse(c) for c in self.chunks(model, include_usage)] + [DONE]


@dataclass(frozen=True)
class Error:
    """An OpenAI error body ``{"error": {"message", "type", "param", "code"}}`` with a status."""

    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    echo_header: str | None = None  # quote this request header in the message, as careless providers do

    def body(self, request: RecordedRequest | None = None) -> bytes:
        message = self.message
        if self.echo_header and request is not None:
            message += f" (received {self.echo_header}: {request.headers.get(self.echo_header, '')})"
        return json.dumps({"error": {"message": message, "type": self.type, "param": self.param,
                                     "code": self.code}}, indent=2).encode()


@dataclass(frozen=True)
class Delay:
    """Wait (until the client gives up, at most ``seconds``), then answer with ``then``."""

    seconds: float
    then: Reply | Error


@dataclass(frozen=True)
class Raw:
    """Any status and body, for answers that are not OpenAI's."""

    status: int
    body: bytes
    content_type: str = "application/json"


@dataclass(frozen=True)
class Trickle:
    """A stream that never ends: a chunk of content every ``interval_s``, each a valid event, until
    the client leaves (or ``limit_s`` passes, when it ends properly, so a gateway that lets it
    run shows up as a test that fails, never one that hangs)."""

    interval_s: float = 0.02
    limit_s: float = 20.0


Cassette = Reply | Error | Delay | Drop | Raw | Trickle


def reply(content: str | None = "Hello from the fake provider.", **options: Any) -> Reply:
    return Reply(content=content, **options)


def tool_reply(*names: str, content: str | None = None, **options: Any) -> Reply:
    calls = tuple(ToolCall(name, arguments=json.dumps({"query": f"{name} {i}"}), id=f"call_{i}_{name}")
                  for i, name in enumerate(names))
    return Reply(content=content, tool_calls=calls, **options)


def error(status: int, message: str | None = None, *, type: str | None = None, code: str | None = None,
          param: str | None = None, headers: tuple[tuple[str, str], ...] = (), echo_header: str | None = None) -> Error:
    default_message, default_type, default_code = DEFAULT_ERRORS.get(status, ("Error.", "server_error", None))
    return Error(status=status, message=message or default_message, type=type or default_type,
                 code=code if code is not None else default_code, param=param, headers=headers,
                 echo_header=echo_header)


def delay(seconds: float, then: Reply | Error | None = None) -> Delay:
    return Delay(seconds, then or Reply())


def drop() -> Drop:
    return Drop()


def trickle(interval_s: float = 0.02, limit_s: float = 20.0) -> Trickle:
    return Trickle(interval_s, limit_s)


def raw(status: int, body: bytes, content_type: str = "application/json") -> Raw:
    return Raw(status, body, content_type)


DONE = b"data: [DONE]\n\n"


def sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class RecordedRequest(loopback.RecordedRequest):
    @property
    def api(self) -> str:
        """The API called, by the end of the path: "chat", "responses", "embeddings", "response"
        (one stored response, by id), or "" for any other path."""
        path = self.path.split("?", 1)[0]
        for suffix, api in API_SUFFIXES:
            if path.endswith(suffix):
                return api
        before, _, last = path.rpartition("/")
        return "response" if before.endswith("/responses") and last else ""


API_SUFFIXES = (("/chat/completions", "chat"), ("/responses", "responses"), ("/embeddings", "embeddings"))
ROUTES = {("POST", "chat"), ("POST", "responses"), ("POST", "embeddings"), ("GET", "response"),
          ("DELETE", "response")}


class FakeOpenAI(LoopbackServer[Cassette, RecordedRequest]):
    """The fake provider. Use ``FakeOpenAI.running()``; ``url`` is the base URL (``.../v1``).

    It answers chat completions, the Responses API (tests/fakes/openai_responses.py) and
    embeddings at any path under ``prefix`` that ends like OpenAI's (so Azure's
    ``/openai/deployments/{name}/chat/completions`` and Gemini's ``/v1beta/openai/...`` work with
    the matching prefix), and GET/DELETE ``.../responses/{id}`` from the responses it made.
    """

    provider = "OpenAI"
    request_type = RecordedRequest
    headers = (("x-request-id", "req_fake"), ("openai-processing-ms", "7"))
    stream_headers = (("content-type", "text/event-stream; charset=utf-8"), *headers)

    def __init__(self, prefix: str = "/v1") -> None:
        super().__init__()
        self.prefix = prefix
        self._stored: dict[str, dict[str, Any]] = {}  # the responses it made, by id, unless store=false

    @classmethod
    def running(cls, prefix: str = "/v1") -> FakeOpenAI:
        return cls(prefix)

    @property
    def url(self) -> str:
        return f"{self.root}{self.prefix}"

    def _next(self, request: RecordedRequest) -> Cassette:
        if not request.path.startswith(self.prefix + "/") or (request.method, request.api) not in ROUTES:
            return Error(404, f"Invalid URL ({request.method} {request.path})", "invalid_request_error")
        if request.api == "response":
            return self._stored_response(request)
        return self._scripted(Error(500, "fake upstream: no cassette was scripted for this request", "server_error"))

    def _stored_response(self, request: RecordedRequest) -> Cassette:
        """GET or DELETE of a response this fake made, as OpenAI answers them."""
        response_id = request.path.split("?", 1)[0].rpartition("/")[2]
        with self._lock:
            stored = self._stored.get(response_id)
            if stored is not None and request.method == "DELETE":
                del self._stored[response_id]
        if stored is None:
            return Error(404, f"Response with id '{response_id}' not found.", "invalid_request_error")
        if request.method == "DELETE":
            return Raw(200, json.dumps({"id": response_id, "object": "response", "deleted": True}).encode())
        return Raw(200, json.dumps(stored, indent=2).encode())

    # --- answers ------------------------------------------------------------------------------

    async def _answer(self, cassette: Cassette, request: RecordedRequest, conn: h11.Connection,
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if isinstance(cassette, Delay):
            if not await self._wait_unless_disconnected(conn, reader, cassette.seconds):
                return False
            cassette = cassette.then
        if isinstance(cassette, Drop):
            return False
        if isinstance(cassette, Raw):
            return await self._whole(conn, writer, cassette.status, cassette.body, content_type=cassette.content_type)
        if isinstance(cassette, Error):
            return await self._whole(conn, writer, cassette.status, cassette.body(request), cassette.headers)
        model = str(request.model or "")
        if isinstance(cassette, Trickle):
            return await self._trickle(conn, reader, writer, cassette, model)
        if request.api == "embeddings":
            body = json.dumps(embeddings(cassette, request.body), indent=2).encode()
            return await self._whole(conn, writer, 200, body)
        if request.api == "responses":
            answer = ResponseAnswer(cassette, request.body, "resp_" + uuid.uuid4().hex + uuid.uuid4().hex[:16])
            if request.body.get("store") is not False:
                with self._lock:
                    self._stored[answer.id] = answer.response()
            if not request.stream:
                return await self._whole(conn, writer, 200, json.dumps(answer.response(), indent=2).encode())
            return await self._stream(conn, writer, cassette, answer.events())
        if not request.stream:
            body = json.dumps(cassette.completion(model), indent=2).encode()
            return await self._whole(conn, writer, 200, body)
        include_usage = bool((request.body.get("stream_options") or {}).get("include_usage"))
        return await self._stream(conn, writer, cassette, cassette.events(model, include_usage))

    async def _trickle(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       cassette: Trickle, model: str) -> bool:
        events = Reply("tick").events(model, include_usage=False)
        opening, tick, ending = events[0], events[1], events[-2:]
        await self._send(conn, writer, h11.Response(status_code=200, headers=[
            ("content-type", "text/event-stream; charset=utf-8"), ("x-request-id", "req_fake")]))
        sent = self._sending(bytearray())
        loop = asyncio.get_running_loop()
        until = loop.time() + cassette.limit_s
        piece = opening
        while loop.time() < until:
            if reader.at_eof():  # the client left
                return False
            with self._lock:
                sent += piece
            await self._send(conn, writer, h11.Data(data=piece))
            piece = tick
            await asyncio.sleep(cassette.interval_s)
        for piece in ending:
            with self._lock:
                sent += piece
            await self._send(conn, writer, h11.Data(data=piece))
        await self._send(conn, writer, h11.EndOfMessage())
        return True
