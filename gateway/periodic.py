"""A background task that does one piece of work every ``interval_s`` until closed.

The lease reaper (gateway/budgets.py) and the policy reloaders (gateway/policy/reload.py) are
such tasks: a failed round is logged and the next one tried, so the task never dies.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("lockgate")


class Periodic:
    """Subclasses set ``_interval`` (seconds; 0 runs nothing) and define ``tick``."""

    _interval: float
    _task: asyncio.Task[None] | None = None

    async def tick(self) -> object:
        raise NotImplementedError

    def start(self) -> None:
        if self._interval > 0:
            self._task = asyncio.create_task(self._run(), name=f"lockgate-{type(self).__name__}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.tick()
            except Exception:  # never let the task die: the next round may succeed
                log.exception("%s: a round failed; trying again in %ss", type(self).__name__, self._interval)
