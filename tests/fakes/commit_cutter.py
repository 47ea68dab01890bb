"""A loopback TCP proxy in front of PostgreSQL that loses a commit's acknowledgement on cue.

Armed, it lets the next client message holding ``COMMIT`` through to the server, and then closes
both connections before the server's answer reaches the client: the transaction is committed, but
the client cannot know it. This is the fault that made the skeleton apply settlements twice.
It speaks no protocol: it only looks for the bytes of the simple query asyncpg sends to commit.

``outage()`` makes the store unreachable through it (every connection closed, new ones closed at
once) until ``restore()``.
"""

from __future__ import annotations

import socket
import threading
from typing import Self


class CommitCutter:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed = 0
        self.cuts = 0
        self._closed = False
        self._down = False
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._listener.close()

    def outage(self) -> None:
        """Close every connection, and each new one at once, until ``restore``."""
        with self._lock:
            self._down = True
            doomed, self._open = self._open, set()
        for end in doomed:
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restore(self) -> None:
        with self._lock:
            self._down = False

    def arm(self, times: int = 1) -> None:
        with self._lock:
            self._armed += times

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                down = self._down
            if down:
                client.close()
                continue
            server = socket.create_connection(self._target)
            with self._lock:
                self._open.update((client, server))
            cut = threading.Event()
            threading.Thread(target=self._pump, args=(client, server, cut, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, cut, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, cut: threading.Event, upstream: bool) -> None:
        try:
            while data := source.recv(65536):
                if upstream and b"COMMIT" in data:
                    with self._lock:
                        if self._armed:
                            self._armed -= 1
                            self.cuts += 1
                            cut.set()  # before the COMMIT leaves: its answer must never get back
                elif not upstream and cut.is_set():
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)  # wakes the other direction's recv, and tells both peers
                except OSError:
                    pass
                end.close()
