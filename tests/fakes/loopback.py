"""The loopback HTTP server under every fake provider (tests/fakes/openai_upstream.py,
tests/fakes/anthropic_upstream.py): all a fake needs apart from its provider's wire format.

A fake is a real HTTP/1.1 server (h11 over asyncio, in a thread with its own event loop) on a free
127.0.0.1 port, so the gateway reaches it over TCP exactly as it reaches a provider: chunked
bodies, keep-alive, connections dropped in the middle of a reply, and SSE events split across
separate TCP writes at arbitrary byte boundaries. A test scripts what it answers, one cassette
per request, in order (``script``), and reads what the gateway sent (``requests``) and the body
bytes the fake answered (``replies``).

A fake subclasses ``LoopbackServer`` and says what a request gets (``_next``: a refusal of its
own, or the next cassette from ``_scripted``) and how each cassette is answered (``_answer``,
built on ``_whole`` and ``_stream``); a streamed answer takes its knobs from ``StreamKnobs``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generic, Self, TypeVar

import h11

GATE_TIMEOUT_S = 10.0  # a held stream gives up waiting after this long, so no test can hang on it


class Gate:
    """Holds a streaming reply after some events until the test opens it (or GATE_TIMEOUT_S passes)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.timed_out = False  # set when the fake stopped waiting: the test never opened the gate

    def open(self) -> None:
        self._event.set()

    @property
    def is_open(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True, kw_only=True)
class StreamKnobs:
    """How a streamed answer goes over the wire (keyword-only, after the cassette's own fields).

    ``split`` writes the SSE bytes in pieces of that many bytes, each its own chunk and TCP write,
    ``pause_s`` apart; ``hold`` pauses after ``hold_after_events`` events until the gate opens;
    ``cut_after_events`` stops after that many whole events plus ``cut_partial_bytes`` bytes of
    the next, then either drops the connection (the chunked body never ends) or, with
    ``cut_cleanly``, ends the body as if it were complete (without the terminating event).
    """

    split: int | None = None
    pause_s: float = 0.001
    hold: Gate | None = None
    hold_after_events: int = 1
    cut_after_events: int | None = None
    cut_partial_bytes: int = 0
    cut_cleanly: bool = False


@dataclass(frozen=True)
class Drop:
    """Close the connection without answering."""


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    raw_body: bytes
    body: dict[str, Any] = field(default_factory=dict)
    connection: int = 0  # which TCP connection (numbered from 1) carried it: keep-alive is visible

    @property
    def model(self) -> Any:
        return self.body.get("model")

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True


CassetteT = TypeVar("CassetteT")
RequestT = TypeVar("RequestT", bound=RecordedRequest)


class LoopbackServer(Generic[CassetteT, RequestT]):
    """The server of one fake. Use ``Fake.running()`` in a ``with`` block: started on entry,
    stopped on exit. A subclass sets ``provider`` (for names and messages), ``request_type``, the
    headers of its answers, and implements ``_next`` and ``_answer``."""

    provider = "upstream"
    request_type: type[RequestT]
    headers: tuple[tuple[str, str], ...] = ()  # on every answer, whole or streamed
    stream_headers: tuple[tuple[str, str], ...] = (("content-type", "text/event-stream; charset=utf-8"),)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._script: deque[CassetteT] = deque()
        self._requests: list[RequestT] = []
        self._replies: list[bytearray] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._shutdown: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections = 0
        self._thread = threading.Thread(target=self._run, name=f"fake-{self.provider.lower()}", daemon=True)
        self.port = 0

    # --- what tests use ------------------------------------------------------------------------

    @classmethod
    def running(cls) -> Self:
        return cls()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def root(self) -> str:
        """The server's address, without any path."""
        return f"http://127.0.0.1:{self.port}"

    def script(self, *cassettes: CassetteT) -> None:
        with self._lock:
            self._script.extend(cassettes)

    @property
    def requests(self) -> list[RequestT]:
        with self._lock:
            return list(self._requests)

    @property
    def replies(self) -> list[bytes]:
        """The body bytes of each answer, as far as they were sent."""
        with self._lock:
            return [bytes(body) for body in self._replies]

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._script)

    # --- what a fake implements ---------------------------------------------------------------

    def _next(self, request: RequestT) -> CassetteT:
        """The answer to ``request``: a refusal of the fake's own, or ``_scripted(...)``."""
        raise NotImplementedError

    async def _answer(self, cassette: CassetteT, request: RequestT, conn: h11.Connection,
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Send ``cassette``; False closes the connection afterwards."""
        raise NotImplementedError

    def _scripted(self, otherwise: CassetteT) -> CassetteT:
        """The next scripted cassette, or ``otherwise`` when the script has run out (an error, so
        an unexpected extra request shows up as a failure, never as a silent success)."""
        with self._lock:
            if self._script:
                return self._script.popleft()
        return otherwise

    # --- the server thread --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"the fake {self.provider} server did not start")

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
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each write its own segment
        conn = h11.Connection(h11.SERVER)
        with self._lock:
            self._connections += 1
            number = self._connections
        try:
            while True:
                request = await self._read_request(conn, reader, number)
                if request is None:
                    return
                keep_alive = await self._answer(self._next(request), request, conn, reader, writer)
                if not keep_alive or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            return
        except asyncio.CancelledError:
            return  # the fake is stopping; end the connection quietly (asyncio logs a cancelled handler)
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader,
                            number: int) -> RequestT | None:
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
                return self._record(head, bytes(body), number)
            else:  # ConnectionClosed or PAUSED: the client is done with this connection
                return None

    def _record(self, head: h11.Request, body: bytes, number: int) -> RequestT:
        try:
            parsed = json.loads(body) if body else {}
        except ValueError:
            parsed = {}
        request = self.request_type(
            method=head.method.decode(), path=head.target.decode(),
            headers={name.decode().lower(): value.decode() for name, value in head.headers},
            raw_body=body, body=parsed if isinstance(parsed, dict) else {}, connection=number,
        )
        with self._lock:
            self._requests.append(request)
        return request

    # --- answers ------------------------------------------------------------------------------

    async def _wait_unless_disconnected(self, conn: h11.Connection, reader: asyncio.StreamReader,
                                        seconds: float) -> bool:
        """False when the client closes the connection before ``seconds`` have passed."""
        try:
            data = await asyncio.wait_for(reader.read(65536), timeout=seconds)
        except TimeoutError:
            return True
        if not data:
            return False
        conn.receive_data(data)  # an early byte of the next request: keep it for h11
        return True

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, event: Any) -> None:
        data = conn.send(event)
        if data:
            writer.write(data)
            await writer.drain()

    async def _whole(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, body: bytes,
                     extra: tuple[tuple[str, str], ...] = (), content_type: str = "application/json") -> bool:
        headers = [("content-type", content_type), ("content-length", str(len(body))), *self.headers, *extra]
        self._sending(bytearray(body))  # before the client can see it, so a test never races the record
        await self._send(conn, writer, h11.Response(status_code=status, headers=headers))
        await self._send(conn, writer, h11.Data(data=body))
        await self._send(conn, writer, h11.EndOfMessage())
        return True

    def _sending(self, body: bytearray) -> bytearray:
        with self._lock:
            self._replies.append(body)
        return body

    async def _stream(self, conn: h11.Connection, writer: asyncio.StreamWriter, knobs: StreamKnobs,
                      events: list[bytes]) -> bool:
        await self._send(conn, writer, h11.Response(status_code=200, headers=list(self.stream_headers)))
        complete = True
        if knobs.cut_after_events is not None:
            following = events[knobs.cut_after_events] if knobs.cut_after_events < len(events) else b""
            events = [*events[:knobs.cut_after_events], following[:knobs.cut_partial_bytes]]
            complete = knobs.cut_cleanly
        # Split the whole byte stream (not each event), so pieces straddle event boundaries too;
        # a held stream is cut at the hold, so the client has exactly the events before it.
        hold_at = len(b"".join(events[:knobs.hold_after_events])) if knobs.hold else -1
        stream = b"".join(events)
        segments = [stream[:hold_at], stream[hold_at:]] if hold_at >= 0 else [stream]
        sent = self._sending(bytearray())
        for number, segment in enumerate(segments):
            if number == 1 and knobs.hold is not None:
                await self._wait_for_gate(knobs.hold)
            for piece in _pieces(segment, knobs.split):
                with self._lock:
                    sent += piece  # recorded before it is written, so a test never races the record
                await self._send(conn, writer, h11.Data(data=piece))
                if knobs.split:
                    await asyncio.sleep(knobs.pause_s)  # let each piece leave as its own segment
        if not complete:
            return False  # close with the chunked body unfinished: a provider that died mid-reply
        await self._send(conn, writer, h11.EndOfMessage())
        return True

    async def _wait_for_gate(self, gate: Gate) -> None:
        for _ in range(int(GATE_TIMEOUT_S / 0.005)):
            if gate.is_open:
                return
            await asyncio.sleep(0.005)
        gate.timed_out = True


def _pieces(data: bytes, size: int | None) -> list[bytes]:
    if not data:
        return []
    if not size:
        return [data]
    return [data[start:start + size] for start in range(0, len(data), size)]
