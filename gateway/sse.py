"""A pure-ASGI response that relays SSE events as they come, and always closes its source.

Starlette's StreamingResponse leaves the iterator unclosed when the client goes away, and
uvicorn silently drops writes to a closed connection; a provider stream would then run on,
and bill, for nobody. This response watches for the disconnect, stops reading the provider,
and closes the event iterator in ``finally`` so the pipeline can settle and record the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from starlette.types import Receive, Scope, Send

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
