"""The audit journal: what makes a call's record durable before its answer, at the cost of one
``write`` to a local file rather than a database commit per call.

Every row the audit writer queues (decision records, spans, settlements, approval outcomes,
stored-response owners) is appended to this process's journal, and ``write_out`` puts what is
buffered into the file before a call's answer ends. A file written is in the kernel's page cache:
it survives the process being killed (SIGKILL, a crash), which is what an answered call's record
must survive; like SQLite with ``synchronous=NORMAL``, it does not survive losing the machine's
power. The writer still batches the rows into the store; each flush first seals the current
segment, and a segment whose rows are all in the store is deleted.

Each process keeps its journal in ``<dir>/<instance>/`` and holds an exclusive ``flock`` on its
``lock`` file while it lives. At start-up, a process replays the journal of every instance whose
lock it can take (its owner is gone), then deletes it: every write of a replayed row is idempotent
(inserts ignore rows already there, settlements apply once, approval outcomes are conditional).
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("lockgate.audit")

Item = tuple[str, dict[str, Any]]


class Journal:
    def __init__(self, folder: Path) -> None:
        self.root = folder
        self.folder = folder / f"{os.getpid()}-{secrets.token_hex(4)}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.folder / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._segment = 0
        self._fd = self._open(0)
        self._buffer: list[bytes] = []

    def _open(self, segment: int) -> int:
        return os.open(self.folder / f"{segment:012d}.jsonl", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)

    def append(self, kind: str, row: dict[str, Any]) -> None:
        """Buffer one row; it is in the file after the next ``write_out``."""
        self._buffer.append(encode(kind, row))

    def append_line(self, line: bytes) -> None:
        """Buffer one row ``encode`` made."""
        self._buffer.append(line)

    def write_out(self) -> None:
        """Put every buffered row into the file (one write): from here they survive the process."""
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def seal(self) -> int:
        """Write out, and start a new segment: the rows queued so far are all in segments up to
        the one returned."""
        self.write_out()
        sealed = self._segment
        os.close(self._fd)
        self._segment += 1
        self._fd = self._open(self._segment)
        return sealed

    def drop(self, sealed: int) -> None:
        """Delete the segments up to ``sealed``: their rows are in the store."""
        for path in self.folder.glob("*.jsonl"):
            if int(path.stem) <= sealed:
                path.unlink(missing_ok=True)

    def close(self, clean: bool) -> None:
        """Stop journaling; ``clean`` (every row is in the store) removes the journal."""
        os.close(self._fd)
        if clean:
            shutil.rmtree(self.folder, ignore_errors=True)
        os.close(self._lock)


def encode(kind: str, row: dict[str, Any]) -> bytes:
    """One journal line. Raises orjson.JSONEncodeError for a row JSON cannot hold (nested too deep)."""
    return orjson.dumps([kind, row], default=str, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)


def orphaned(root: Path) -> Iterator[tuple[Path, int]]:
    """The journals of instances that are gone (their lock can be taken), each with the lock held."""
    if not root.is_dir():
        return
    for folder in sorted(root.iterdir()):
        lock_path = folder / "lock"
        if not lock_path.exists():
            continue
        lock = os.open(lock_path, os.O_RDWR)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)  # its process lives
            continue
        yield folder, lock


def read(folder: Path) -> list[Item]:
    """Every row of a journal, in the order it was written; a last line cut off mid-write (the
    process died inside ``write``) is skipped, since its call never got its answer."""
    items: list[Item] = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            try:
                kind, row = orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("skipping a cut-off line of %s", path)
                continue
            items.append((kind, row))
    return items
