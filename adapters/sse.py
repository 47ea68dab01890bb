"""Server-sent events framing, shared by the adapters that read or write SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def sse_event(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


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
    """The data of one event (joined data lines), or None for comments and other fields."""
    data = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(data) if data else None
