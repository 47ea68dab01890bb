"""Hot reload: a changed policy folder is loaded, vetted, compiled and swapped in between two calls.

Every ``policy_reload_interval_s`` the reloader looks at the folder's files (names, sizes, change
times; nothing is read while nothing changed). When they changed, it loads the folder, and if its
revision (the content hash of rules and data) differs from the one serving, it vets it exactly as
start-up does (the preflight evaluation in a child process, then compiling) and swaps the new
engine in with ``PolicyStage.swap``: no call is dropped, since a decision is taken without an
await, and each call records the revision that decided it. A folder that fails is rejected: the
previous policy keeps serving. Both events are audited as spans of their own trace
(``lockgate.policy.reloaded``, ``lockgate.policy.reload_rejected``) and logged. docs/policies.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from opentelemetry.trace import Status, StatusCode, Tracer

from gateway.periodic import Periodic
from gateway.policy import PolicyEngine, PolicyStage
from gateway.policy.source import PolicySource
from gateway.types import RemotePolicyEngine

log = logging.getLogger("lockgate.policy")

# Builds a vetted, compiled engine for a source (raises ValueError or RuntimeError with the reason);
# the loader reads a folder into a source (raises ValueError).
Compile = Callable[[PolicySource], PolicyEngine]
Vet = Callable[[PolicySource], None]
Load = Callable[[Path], PolicySource]


def fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when a file of the folder is added, removed, replaced or written."""
    try:
        return tuple(sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size)
                            for p in folder.rglob("*") if p.is_file()))
    except OSError:
        return ()


class PolicyReloader(Periodic):
    def __init__(self, stage: PolicyStage, folder: Path, load: Load, vet: Vet, compile_engine: Compile,
                 tracer: Tracer, interval_s: float, name: str = "live") -> None:
        self._stage = stage
        self._folder = folder
        self._load = load
        self._vet = vet
        self._compile = compile_engine
        self._tracer = tracer
        self._interval = interval_s
        self._name = name  # "live" or "shadow"
        self._seen = fingerprint(folder)

    async def tick(self) -> str | None:
        return await self.check()

    async def check(self) -> str | None:
        """Reload if the folder changed: the new revision if it was swapped in, else None."""
        seen = fingerprint(self._folder)
        if seen == self._seen:
            if self._stage.remote:
                await self._push_again_if_lost(cast(RemotePolicyEngine, self._stage.engine))
            return None
        self._seen = seen
        previous = self._stage.revision
        try:
            source = await asyncio.to_thread(self._load, self._folder)
            if source.revision == previous and self._stage.unusable is None:
                return None
            await asyncio.to_thread(self._vet, source)  # a child process: never blocks the loop
            engine = self._compile(source)  # here, on the loop's thread: the engine is used only from it
            if engine.remote:
                # OPA takes modules one at a time: decisions wait until the push and the swap are done.
                self._stage.settled.clear()
                try:
                    await self._push(cast(RemotePolicyEngine, engine))
                except BaseException:
                    self._stage.settled.set()
                    raise
        except (ValueError, RuntimeError) as exc:
            self._event("lockgate.policy.reload_rejected", previous, None, str(exc))
            log.error("the changed %s policy in %s was rejected; revision %s keeps serving: %s",
                      self._name, self._folder, previous, exc)
            return None
        old = self._stage.swap(engine, source.revision)
        self._stage.unusable = None
        self._stage.settled.set()
        old.close()
        if old.remote:  # once the queries still in flight on it have had their time
            await cast(RemotePolicyEngine, old).retire()
        self._event("lockgate.policy.reloaded", previous, source.revision, None)
        log.warning("%s policy reloaded from %s: revision %s replaces %s", self._name, self._folder,
                    source.revision, previous)
        return source.revision

    async def _push_again_if_lost(self, engine: RemotePolicyEngine) -> None:
        """OPA restarted and forgot the pushed policy (every decision undefined, so denied): push
        the serving one again, decisions waiting meanwhile."""
        if not await engine.lost_push():
            return
        log.warning("OPA no longer holds the %s policy (revision %s); pushing it again", self._name,
                    self._stage.revision)
        self._stage.settled.clear()
        try:
            await engine.start()
        except (ValueError, RuntimeError):
            log.exception("pushing the %s policy to OPA again failed; trying at the next look", self._name)
        finally:
            self._stage.settled.set()

    async def _push(self, engine: RemotePolicyEngine) -> None:
        """A remote engine in push mode uploads the new policy (OPA). Uploads are not atomic: should
        this one fail, the previous policy is pushed again, so OPA goes back to what serves."""
        try:
            await engine.start()
        except (ValueError, RuntimeError):
            await engine.aclose()
            previous = cast(RemotePolicyEngine, self._stage.engine)
            try:
                await previous.start()
            except (ValueError, RuntimeError) as exc:
                # OPA may hold part of each policy: refuse remote questions, and push again next time.
                self._stage.unusable = f"OPA may hold part of two policies after a failed push ({exc})"
                self._seen = ()
                log.exception("pushing the serving %s policy to OPA again failed; calls are refused until a "
                              "push succeeds", self._name)
            raise

    def _event(self, name: str, previous: str, revision: str | None, error: str | None) -> None:
        policy_event(self._tracer, name, {"lockgate.policy.folder": str(self._folder),
                                          "lockgate.policy.role": self._name}, previous, revision, error)


def policy_event(tracer: Tracer, name: str, attributes: dict[str, str], previous: str, revision: str | None,
                 error: str | None) -> None:
    """A reload (or its rejection) as a span of its own trace."""
    attributes = {**attributes, "lockgate.policy.previous_revision": previous}
    if revision is not None:
        attributes["lockgate.policy.revision"] = revision
    span = tracer.start_span(name, attributes=attributes)
    if error is not None:
        span.set_attribute("error.type", "PolicyRejected")
        span.set_status(Status(StatusCode.ERROR, error[:2000]))
    span.end()


class BundleWatcher(Periodic):
    """Bundle mode of the OPA engine: OPA loads the team's bundles itself, so instead of a folder,
    the bundles' revision OPA reports is read every ``interval_s``; a new one is recorded from the
    next call on (the ``lockgate.policy.reloaded`` span says when). A call decided between OPA's
    activation and the next look records the previous revision."""

    def __init__(self, stage: PolicyStage, tracer: Tracer, interval_s: float) -> None:
        self._stage = stage
        self._tracer = tracer
        self._interval = interval_s

    async def tick(self) -> str | None:
        return await self.check()

    async def check(self) -> str | None:
        """The new revision if OPA reports another one, else None."""
        previous = self._stage.revision
        revision: str = await cast(Any, self._stage.engine).refresh()
        if revision == previous:
            return None
        self._stage.revision = revision
        policy_event(self._tracer, "lockgate.policy.reloaded", {"lockgate.policy.role": "live"}, previous,
                     revision, None)
        log.warning("OPA serves bundle revision %s (was %s)", revision, previous)
        return revision
