"""Server-sent events: the framing every wire format shares, and the response that relays them.

``SSEResponse`` is a pure-ASGI response that relays SSE events as they come, and always closes its source.

Starlette's StreamingResponse leaves the iterator unclosed when the client goes away, and
uvicorn silently drops writes to a closed connection; a provider stream would then run on,
and bill, for nobody. This response watches for the disconnect, stops reading the provider,
and closes the event iterator in ``finally`` so the pipeline can settle and record the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def sse_event(payload: Any, name: str | None = None) -> bytes:
    """One event: ``data:`` JSON, with an ``event:`` name line when the wire format names events."""
    data = b"data: " + orjson.dumps(payload) + b"\n\n"
    return b"event: " + name.encode() + b"\n" + data if name else data


async def iter_sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Re-frame a byte stream into whole events, each ending in a blank line."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            event, buffer = buffer[: end + 2], buffer[end + 2:]
            yield event
    # A last event cut off inside a line is incomplete and dropped, as the SSE spec says; whole
    # lines missing only the closing blank line are still an event.
    if buffer.strip() and buffer.endswith(b"\n"):
        yield buffer.rstrip(b"\n") + b"\n\n"


def event_data(event: bytes) -> bytes | None:
    """The data of one event (joined data lines), or None for comments and other fields. The fast
    path is the one ``data:`` line most providers send."""
    if event.startswith(b"data: ") and event.count(b"\n") == 2:
        return event[6:-2]
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def event_name(event: bytes) -> bytes | None:
    """The ``event:`` field of one event, or None."""
    if not event.startswith(b"event:"):
        return None
    return event[6:event.index(b"\n")].strip()

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell proxies in front of us not to buffer
]


class SSEResponse:
    def __init__(self, events: AsyncIterator[bytes], headers: Mapping[str, str] | None = None) -> None:
        self._events = events
        self._headers = SSE_HEADERS + [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        self.client_disconnected = False

    @property
    def events(self) -> AsyncIterator[bytes]:
        return self._events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.create_task(self._watch(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self._headers})
            async for event in self._events:
                if self.client_disconnected:
                    break
                await send({"type": "http.response.body", "body": event, "more_body": True})
            if not self.client_disconnected:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            await self._events.aclose()  # type: ignore[attr-defined]

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.client_disconnected = True
                return
