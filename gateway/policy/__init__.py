"""Stage 3, decide: one Rego evaluation of ``data.lockgate.decision`` per call.

This module builds the input document of the contract in docs/architecture.md and docs/policies.md and turns the
policy's answer into a ``Decision``. Any failure of the engine, or an answer of the wrong
shape, denies the call (fail closed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from gateway.errors import PolicyFailed
from gateway.policy.cache import DecisionCache
from gateway.policy.embedded import PolicyEngineError
from gateway.types import ApprovalRequirement, Budget, CallFacts, Decision, PolicyEngine, Principal

log = logging.getLogger("lockgate.policy")

DECISION = "data.lockgate.decision"
RESPONSE_DECISION = "data.lockgate.response_decision"
MAY_APPROVE = "data.lockgate.may_approve"

MICRO = 1_000_000
MAX_LIMIT_MICRO_USD = 2**62  # $4.6e12: any real budget, with room for spent + reserved + amount in 64 bits


def build_input(principal: Principal, facts: CallFacts, cost_micro_usd_max: int,
                spend: Mapping[str, Mapping[str, int]], now: str) -> dict[str, Any]:
    """The policy input. Money is given as float dollars and as exact integer micro-dollars."""
    return {
        "principal": principal.as_policy_input(),
        "request": {
            "endpoint": facts.endpoint,
            "model": facts.model,
            "stream": facts.stream,
            "max_tokens": facts.max_tokens,
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
        "spend": {
            scope: {**{w: v / MICRO for w, v in windows.items()},
                    **{f"{w}_micro_usd": v for w, v in windows.items()}}
            for scope, windows in spend.items()
        },
        "now": now,
    }


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
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
    entry = _object(entry, "decision.budgets[]")
    scope, window = entry.get("scope"), entry.get("window", "month")
    if not isinstance(scope, str) or window not in ("day", "month", "total"):
        raise PolicyEngineError("each budget needs a scope and a window of day, month or total")
    if isinstance(entry.get("limit_micro_usd"), int):
        limit = entry["limit_micro_usd"]
    elif isinstance(entry.get("limit_usd"), (int, float)) and math.isfinite(entry["limit_usd"]):
        limit = round(entry["limit_usd"] * MICRO)
    else:
        raise PolicyEngineError(f"budget {scope} needs limit_usd or limit_micro_usd")
    if not 0 <= limit <= MAX_LIMIT_MICRO_USD:
        # spent + reserved + amount must fit the ledger's BIGINT columns, whatever the policy says.
        raise PolicyEngineError(f"budget {scope}: its limit must be between 0 and {MAX_LIMIT_MICRO_USD} micro-dollars")
    return Budget(scope=scope, window=window, limit_micro_usd=limit)


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
    max_tokens = limits.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise PolicyEngineError("decision.limits.max_tokens must be a positive integer")
    audit = _object(raw.get("audit"), "decision.audit")
    return Decision(
        allow=raw["allow"],
        reasons=_strings(raw.get("reasons"), "decision.reasons"),
        route_model=model,
        fallbacks=_strings(route.get("fallbacks"), "decision.route.fallbacks"),
        approval=requirement,
        budgets=tuple(_budget(b) for b in budgets),
        max_tokens=max_tokens,
        audit_labels={str(k): str(v) for k, v in _object(audit.get("labels"), "decision.audit.labels").items()},
    )


class PolicyStage:
    def __init__(self, engine: PolicyEngine, cache_size: int = 0, revision: str = "") -> None:
        self.engine = engine
        self.revision = revision  # recorded on every decision record and root span
        reads = engine.input_reads
        self.cache = DecisionCache(reads, cache_size) if reads is not None and cache_size > 0 else None

    def decide(self, policy_input: Mapping[str, Any]) -> tuple[Decision, Any, bool]:
        """The decision, the raw answer (kept for the audit record), and whether it was reused
        from an earlier input that agrees with this one on every part the policy reads."""
        key = self.cache.key(policy_input) if self.cache is not None else None
        if key is not None:
            known = self.cache.get(key)  # type: ignore[union-attr]
            if known is not None:
                return known[0], known[1], True
        try:
            raw = self.engine.evaluate(DECISION, policy_input)
            decision = parse_decision(raw)
        except PolicyEngineError as exc:
            raise PolicyFailed(f"The policy could not be evaluated, so the call was denied: {exc}") from exc
        if key is not None:
            self.cache.put(key, (decision, raw))  # type: ignore[union-attr]
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

    def may_approve(self, approval: Mapping[str, Any], decider: Principal) -> bool:
        """``data.lockgate.may_approve`` for this approval and decider: only ``true`` lets her decide.
        Undefined, anything else, or an engine error is a no (fail closed)."""
        if not self.engine.defines(MAY_APPROVE):
            return False
        try:
            return self.engine.evaluate(MAY_APPROVE, {"approval": dict(approval),
                                                      "decider": decider.as_policy_input()}) is True
        except PolicyEngineError:
            log.exception("may_approve could not be evaluated; the decider is refused")
            return False
