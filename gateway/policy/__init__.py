"""Stage 3, decide: one Rego evaluation of ``data.lockgate.decision`` per call.

This module builds the input document of the contract in docs/architecture.md and docs/policies.md and turns the
policy's answer into a ``Decision``. Any failure of the engine, or an answer of the wrong
shape, denies the call (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from typing import Any, cast

from gateway.audit.content import MODES as CONTENT_MODES
from gateway.errors import PolicyFailed
from gateway.policy.cache import DecisionCache
from gateway.policy.embedded import PolicyEngineError
from gateway.types import (
    ApprovalRequirement,
    Budget,
    CallFacts,
    Decision,
    PolicyEngine,
    Principal,
    RemotePolicyEngine,
)

log = logging.getLogger("lockgate.policy")

DECISION = "data.lockgate.decision"
RESPONSE_DECISION = "data.lockgate.response_decision"
MAY_APPROVE = "data.lockgate.may_approve"

MICRO = 1_000_000
SETTLE_WAIT_S = 60.0  # the longest a remote decision waits for a push to settle (two 30 s pushes)
MAX_LIMIT_MICRO_USD = 2**62  # $4.6e12: any real budget, with room for spent + reserved + amount in 64 bits


def build_input(principal: Principal, facts: CallFacts, cost_micro_usd_max: int,
                spend: Mapping[str, Mapping[str, int]], now: str, run_id: str | None = None) -> dict[str, Any]:
    """The policy input. Money is given as float dollars and as exact integer micro-dollars."""
    run = None
    if run_id is not None:
        used = spend.get(f"run:{run_id}", {})
        # Steps running now count too: an agent's parallel tool calls are steps of the run.
        run = {"id": run_id, "steps": used.get("total_calls", 0) + used.get("total_calls_reserved", 0),
               "tokens": used.get("total_tokens", 0), "cost_usd": used.get("total", 0) / MICRO,
               "cost_micro_usd": used.get("total", 0)}
    return {
        "principal": principal.as_policy_input(),
        "request": {
            "endpoint": facts.endpoint,
            "model": facts.model,
            "stream": facts.stream,
            "max_tokens": facts.max_tokens,
            "choices": facts.choices,
            "tools": list(facts.tools),
            "message_count": facts.message_count,
            "metadata": dict(facts.metadata),
        },
        "estimate": {
            "input_tokens": facts.input_tokens,
            "output_tokens_max": facts.output_tokens_max,
            "cost_usd_max": cost_micro_usd_max / MICRO,
            "cost_micro_usd_max": cost_micro_usd_max,
        },
        "spend": {scope: _spend(windows) for scope, windows in spend.items()},
        "run": run,
        "now": now,
    }


def _spend(windows: Mapping[str, int]) -> dict[str, Any]:
    """One scope's spend: money per window as dollars (``month``) and micro-dollars
    (``month_micro_usd``, ``month_reserved_micro_usd``); tokens and calls as they are
    (``month_tokens``, ``month_calls``, and their ``_reserved``)."""
    shown: dict[str, Any] = {}
    for name, value in windows.items():
        window, _, rest = name.partition("_")
        if rest in ("", "reserved"):  # money
            shown[f"{window}_reserved_micro_usd" if rest else f"{window}_micro_usd"] = value
            if not rest:
                shown[window] = value / MICRO
        else:
            shown[name] = value
    return shown


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (set, frozenset)) and all(isinstance(v, str) for v in value):
        value = sorted(value)  # regorus gives a Rego set as a set; OPA, in JSON, as a sorted array
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyEngineError(f"{what} must be an array of strings")
    return tuple(value)


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PolicyEngineError(f"{what} must be an object")
    return value


def _budget(entry: Any) -> Budget:
    """One of the decision's ``budgets``: a scope, a window, and one limit (``limit_usd`` or
    ``limit_micro_usd`` for money, ``limit_tokens``, ``limit_calls``)."""
    entry = _object(entry, "decision.budgets[]")
    scope, window = entry.get("scope"), entry.get("window", "month")
    if not isinstance(scope, str) or not scope or "#" in scope or window not in ("day", "month", "total"):
        raise PolicyEngineError("each budget needs a scope (without '#') and a window of day, month or total")
    if isinstance(entry.get("limit_micro_usd"), int):
        limit, unit = entry["limit_micro_usd"], "usd"
    elif isinstance(entry.get("limit_usd"), (int, float)) and math.isfinite(entry["limit_usd"]):
        limit, unit = round(entry["limit_usd"] * MICRO), "usd"
    elif isinstance(entry.get("limit_tokens"), int):
        limit, unit = entry["limit_tokens"], "tokens"
    elif isinstance(entry.get("limit_calls"), int):
        limit, unit = entry["limit_calls"], "calls"
    else:
        raise PolicyEngineError(f"budget {scope} needs limit_usd, limit_micro_usd, limit_tokens or limit_calls")
    return Budget(scope=scope, window=window, limit=_limit(limit, f"budget {scope}"), unit=unit)


def _limit(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT_MICRO_USD:
        # spent + reserved + amount must fit the ledger's BIGINT columns, whatever the policy says.
        raise PolicyEngineError(f"{what}: its limit must be a whole number between 0 and {MAX_LIMIT_MICRO_USD}")
    return value


# The policy's rate limits: ``limits.<name>: {"key": N, "user": N, "team": N}``.
RATE_LIMITS = {"requests_per_minute": ("calls", "minute"), "tokens_per_minute": ("tokens", "minute"),
               "concurrent": ("concurrent", "total")}


def rate_budgets(limits: Mapping[str, Any], principal: Principal) -> tuple[Budget, ...]:
    """The decision's rate limits as budgets on the caller's key, user or team."""
    budgets = []
    for name, (unit, window) in RATE_LIMITS.items():
        per = _object(limits.get(name), f"decision.limits.{name}")
        for level, limit in per.items():
            if level not in ("key", "user", "team"):
                raise PolicyEngineError(f"decision.limits.{name} may name key, user or team, not {level!r}")
            scope = {"key": f"key:{principal.key_id}", "user": f"user:{principal.user}",
                     "team": f"team:{principal.team}"}[level]
            budgets.append(Budget(scope=scope, window=window, limit=_limit(limit, f"limits.{name}.{level}"),
                                  unit=unit))
    return tuple(budgets)


def _positive_int(value: Any, what: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise PolicyEngineError(f"{what} must be a positive integer")
    return value


def _run_cost_cap(limits: Mapping[str, Any]) -> int | None:
    """What one run may cost, in micro-dollars: ``limits.max_cost_micro_usd_per_run`` (a whole
    number) or ``limits.max_cost_usd_per_run`` (dollars); with both, the lower."""
    caps = []
    dollars = limits.get("max_cost_usd_per_run")
    if dollars is not None:
        if not (isinstance(dollars, (int, float)) and not isinstance(dollars, bool) and math.isfinite(dollars)
                and dollars >= 0):
            raise PolicyEngineError("decision.limits.max_cost_usd_per_run must be a number of dollars")
        caps.append(_limit(round(dollars * MICRO), "max_cost_usd_per_run"))
    micro = limits.get("max_cost_micro_usd_per_run")
    if micro is not None:
        caps.append(_limit(micro, "decision.limits.max_cost_micro_usd_per_run"))
    return min(caps) if caps else None


def parse_decision(raw: Any) -> Decision:
    """Check the shape of the policy's answer; anything unexpected is an engine error."""
    raw = _object(raw, "decision")
    if not isinstance(raw.get("allow"), bool):
        raise PolicyEngineError("decision.allow is missing or not a boolean")
    route = _object(raw.get("route"), "decision.route")
    model = route.get("model")
    if model is not None and not isinstance(model, str):
        raise PolicyEngineError("decision.route.model must be a string")
    approval = _object(raw.get("approval"), "decision.approval")
    requirement = None
    if approval.get("required") is True:
        timeout = approval.get("timeout_s", 900)
        if not isinstance(timeout, int) or timeout <= 0:
            raise PolicyEngineError("decision.approval.timeout_s must be a positive integer")
        requirement = ApprovalRequirement(
            reason=str(approval.get("reason") or "this call needs approval"),
            approvers=_strings(approval.get("approvers"), "decision.approval.approvers"),
            timeout_s=timeout,
        )
    budgets = raw.get("budgets") or []
    if not isinstance(budgets, list):
        raise PolicyEngineError("decision.budgets must be an array")
    limits = _object(raw.get("limits"), "decision.limits")
    max_tokens = _positive_int(limits.get("max_tokens"), "decision.limits.max_tokens")
    max_steps = _positive_int(limits.get("max_steps_per_run"), "decision.limits.max_steps_per_run")
    max_run_micro_usd = _run_cost_cap(limits)
    for name in RATE_LIMITS:
        _object(limits.get(name), f"decision.limits.{name}")
    audit = _object(raw.get("audit"), "decision.audit")
    content = audit.get("content", "off")
    if content not in CONTENT_MODES:
        raise PolicyEngineError(f"decision.audit.content must be one of {', '.join(CONTENT_MODES)}")
    return Decision(
        allow=raw["allow"],
        reasons=_strings(raw.get("reasons"), "decision.reasons"),
        route_model=model,
        fallbacks=_strings(route.get("fallbacks"), "decision.route.fallbacks"),
        approval=requirement,
        budgets=tuple(_budget(b) for b in budgets),
        max_tokens=max_tokens,
        max_steps_per_run=max_steps,
        max_run_micro_usd=max_run_micro_usd,
        rate_limits={name: dict(limits[name]) for name in RATE_LIMITS if limits.get(name)},
        audit_labels={str(k): str(v) for k, v in _object(audit.get("labels"), "decision.audit.labels").items()},
        audit_content=content,
    )


class PolicyStage:
    def __init__(self, engine: PolicyEngine, cache_size: int = 0, revision: str = "") -> None:
        self.engine = engine
        # The engine answers over the network (OPA): the pipeline then awaits ``decide_async``,
        # ``review_response_async`` and ``may_approve_async``; the embedded engine is asked
        # synchronously, with no coroutine on its path. An attribute: read on every call.
        self.remote = engine.remote
        self.revision = revision  # recorded on every decision record and root span
        self._cache_size = cache_size
        reads = engine.input_reads
        self.cache = DecisionCache(reads, cache_size) if reads is not None and cache_size > 0 else None
        # Cleared while a new policy is pushed to OPA and swapped in: remote decisions wait for it,
        # so none is taken on a half-pushed policy (gateway/policy/reload.py).
        self.settled = asyncio.Event()
        self.settled.set()
        # Set when a failed push could not put the serving policy back: OPA holds part of two
        # policies, so every remote question is refused (503) until a push succeeds.
        self.unusable: str | None = None

    def swap(self, engine: PolicyEngine, revision: str) -> PolicyEngine:
        """Serve ``engine`` (policy ``revision``) from the next decision on, with an empty decision
        cache; the engine it replaces is returned, for the caller to close (gateway/policy/reload.py).
        An embedded decision is taken without an await, and a remote one keeps the engine and cache
        it started with, so no call sees half of a swap."""
        old = self.engine
        reads = engine.input_reads
        cache = DecisionCache(reads, self._cache_size) if reads is not None and self._cache_size > 0 else None
        self.engine, self.revision, self.cache, self.remote = engine, revision, cache, engine.remote
        return old

    def decide(self, policy_input: Mapping[str, Any]) -> tuple[Decision, Any, bool]:
        """The decision, the raw answer (kept for the audit record), and whether it was reused
        from an earlier input that agrees with this one on every part the policy reads."""
        key, known = self._reused(policy_input)
        if known is not None:
            return known
        try:
            raw = self.engine.evaluate(DECISION, policy_input)
        except PolicyEngineError as exc:
            raise PolicyFailed(f"The policy could not be evaluated, so the call was denied: {exc}") from exc
        return self._decided(key, raw, self.cache)

    async def ready(self) -> None:
        """Remote engines: wait while a policy is pushed and swapped in (at most SETTLE_WAIT_S),
        and refuse while OPA may hold half of one; every remote question asks this first."""
        if not self.settled.is_set():
            try:
                await asyncio.wait_for(self.settled.wait(), SETTLE_WAIT_S)
            except TimeoutError:
                raise PolicyFailed("The policy is being replaced and did not settle in time, so the call "
                                   "was denied.") from None
        if self.unusable is not None:
            raise PolicyFailed(f"The policy cannot be evaluated, so the call was denied: {self.unusable}")

    async def decide_async(self, policy_input: Mapping[str, Any]) -> tuple[Decision, Any, bool]:
        """``decide`` on a remote engine: the same cache, shape checks and failures."""
        # The engine and cache of this moment: a swap during the await must not put the previous
        # policy's answer into the new policy's cache.
        await self.ready()
        engine, cache = self._remote, self.cache
        key, known = self._reused(policy_input)
        if known is not None:
            return known
        try:
            raw = await engine.evaluate_async(DECISION, policy_input)
        except PolicyEngineError as exc:
            raise PolicyFailed(f"The policy could not be evaluated, so the call was denied: {exc}") from exc
        return self._decided(key, raw, cache)

    @property
    def _remote(self) -> RemotePolicyEngine:
        return cast(RemotePolicyEngine, self.engine)

    def _reused(self, policy_input: Mapping[str, Any]) -> tuple[bytes | None, tuple[Decision, Any, bool] | None]:
        key = self.cache.key(policy_input) if self.cache is not None else None
        if key is not None:
            known = self.cache.get(key)  # type: ignore[union-attr]
            if known is not None:
                return key, (known[0], known[1], True)
        return key, None

    @staticmethod
    def _decided(key: bytes | None, raw: Any, cache: DecisionCache | None) -> tuple[Decision, Any, bool]:
        try:
            decision = parse_decision(raw)
        except PolicyEngineError as exc:
            raise PolicyFailed(f"The policy could not be evaluated, so the call was denied: {exc}") from exc
        if key is not None and cache is not None:
            cache.put(key, (decision, raw))
        return decision, raw, False

    @property
    def reviews_responses(self) -> bool:
        """The policy defines ``response_decision``: replies with tool calls are shown to it."""
        return self.engine.defines(RESPONSE_DECISION)

    def review_response(self, policy_input: Mapping[str, Any]) -> Decision | None:
        """Stage 7: the reply's tool calls, when the policy defines ``response_decision``."""
        if not self.engine.defines(RESPONSE_DECISION):
            return None
        try:
            return parse_decision(self.engine.evaluate(RESPONSE_DECISION, policy_input))
        except PolicyEngineError as exc:
            raise PolicyFailed(f"The response policy could not be evaluated, so the reply was withheld: {exc}") from exc

    async def review_response_async(self, policy_input: Mapping[str, Any]) -> Decision | None:
        """``review_response`` on a remote engine."""
        await self.ready()
        if not self.engine.defines(RESPONSE_DECISION):
            return None
        try:
            return parse_decision(await self._remote.evaluate_async(RESPONSE_DECISION, policy_input))
        except PolicyEngineError as exc:
            raise PolicyFailed(f"The response policy could not be evaluated, so the reply was withheld: {exc}") from exc

    def may_approve(self, approval: Mapping[str, Any], decider: Principal) -> bool:
        """``data.lockgate.may_approve`` for this approval and decider: only ``true`` lets her decide.
        Undefined, anything else, or an engine error is a no (fail closed)."""
        if not self.engine.defines(MAY_APPROVE):
            return False
        try:
            return self.engine.evaluate(MAY_APPROVE, _approver_input(approval, decider)) is True
        except PolicyEngineError:
            log.exception("may_approve could not be evaluated; the decider is refused")
            return False

    async def may_approve_async(self, approval: Mapping[str, Any], decider: Principal) -> bool:
        """``may_approve`` on a remote engine."""
        await self.ready()
        if not self.engine.defines(MAY_APPROVE):
            return False
        try:
            return await self._remote.evaluate_async(MAY_APPROVE, _approver_input(approval, decider)) is True
        except PolicyEngineError:
            log.exception("may_approve could not be evaluated; the decider is refused")
            return False

    async def evaluate_async(self, entrypoint: str, policy_input: Mapping[str, Any]) -> Any:
        """Any entrypoint (``data.lockgate.aliases``), on whichever engine: not for the hot path."""
        if self.remote:
            await self.ready()
            return await self._remote.evaluate_async(entrypoint, policy_input)
        return self.engine.evaluate(entrypoint, policy_input)


def _approver_input(approval: Mapping[str, Any], decider: Principal) -> dict[str, Any]:
    return {"approval": dict(approval), "decider": decider.as_policy_input()}
