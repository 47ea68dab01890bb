"""What a candidate policy would have decided differently: ``lockgate policy replay`` and
``lockgate policy shadow-report``.

Every decision record keeps the policy input and the raw decision that decided the call
(gateway/store.py ``DecisionRecord``). Replay evaluates a candidate policy on those inputs, in
child processes after the load-time guard (gateway/policy/preflight.py), and compares its answers
with the recorded ones; the shadow report compares the shadow policy's answer recorded beside the
live one (``DecisionRecord.shadow``, written by ``Pipeline._shadow``). Both compare what governs a
call: allow or deny, the route, the budgets, the approval, the limits and the audit content; the
wording of the reasons is not a change. A decision the gateway could not use (an engine error or
the wrong shape) counts as a deny, as the gateway fails closed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.policy import DECISION, parse_decision
from gateway.policy.embedded import PolicyEngineError
from gateway.policy.preflight import evaluate_in_child
from gateway.policy.source import PolicySource
from gateway.types import Decision

CHANGES = ("allow→deny", "deny→allow", "route", "budgets", "approval", "limits", "audit", "error")
_BATCH = 500  # records per child process: progress is reported between batches


def _usable(raw: Any, error: str | None = None) -> Decision | str:
    """The decision the gateway would act on, or why it would fail closed."""
    if error is not None:
        return error
    try:
        return parse_decision(raw)
    except PolicyEngineError as exc:
        return str(exc)


def decision_changes(before: Decision | str, after: Decision | str) -> list[str]:
    """What differs between two decisions, by the names of ``CHANGES``; [] when they govern a call alike."""
    changes = []
    if isinstance(after, str) and not isinstance(before, str):
        changes.append("error")
    old = before if isinstance(before, Decision) else Decision(allow=False, reasons=())
    new = after if isinstance(after, Decision) else Decision(allow=False, reasons=())
    if old.allow != new.allow:
        changes.append("allow→deny" if old.allow else "deny→allow")
    if not (old.allow and new.allow):
        return changes  # a denied call has no route, budget or approval to compare
    if (old.route_model, old.fallbacks) != (new.route_model, new.fallbacks):
        changes.append("route")
    if old.budgets != new.budgets:
        changes.append("budgets")
    if old.approval != new.approval:
        changes.append("approval")
    if (old.max_tokens, old.max_steps_per_run, old.max_run_micro_usd, old.rate_limits) != (
            new.max_tokens, new.max_steps_per_run, new.max_run_micro_usd, new.rate_limits):
        changes.append("limits")
    if (old.audit_content, old.audit_labels) != (new.audit_content, new.audit_labels):
        changes.append("audit")
    return changes


def describe(decision: Decision | str) -> str:
    """A decision in a few words, for a table cell."""
    if isinstance(decision, str):
        return f"error ({decision[:60]})"
    if not decision.allow:
        return "deny"
    route = f" {decision.route_model}" if decision.route_model else ""
    held = " +approval" if decision.approval else ""
    return f"allow{route}{held}"


@dataclass
class Difference:
    record: dict[str, Any]
    before: Decision | str
    after: Decision | str
    changes: list[str]


@dataclass
class Tally:
    """How many records were compared, skipped (no policy input), and changed, by kind of change."""

    compared: int = 0
    skipped: int = 0
    changed: int = 0
    kinds: Counter[str] = field(default_factory=Counter)

    def add(self, changes: list[str]) -> None:
        self.compared += 1
        if changes:
            self.changed += 1
            self.kinds.update(changes)

    def summary(self) -> str:
        kinds = ", ".join(f"{kind} {self.kinds[kind]}" for kind in CHANGES if self.kinds[kind])
        return (f"{self.compared} decisions compared, {self.changed} would change"
                + (f" ({kinds})" if kinds else "") + (f"; {self.skipped} records without a policy input skipped"
                                                     if self.skipped else ""))


def replay(source: PolicySource, records: Sequence[dict[str, Any]], tally: Tally,
           progress: Callable[[int, int], None] = lambda done, total: None) -> Iterator[Difference]:
    """Each record whose decision the candidate ``source`` would change, oldest first."""
    usable = [r for r in records if isinstance(r.get("policy_input"), dict)]
    tally.skipped += len(records) - len(usable)
    for start in range(0, len(usable), _BATCH):
        batch = usable[start:start + _BATCH]
        answers = evaluate_in_child(source, [(DECISION, r["policy_input"]) for r in batch])
        for record, answer in zip(batch, answers, strict=True):
            before = _usable(record.get("decision"), None if record.get("decision") is not None
                             else record.get("error_message") or "no decision was recorded")
            after = _usable(answer.value, answer.error)
            changes = decision_changes(before, after)
            tally.add(changes)
            if changes:
                yield Difference(record, before, after, changes)
        progress(min(start + _BATCH, len(usable)), len(usable))


def shadow_disagreements(records: Sequence[dict[str, Any]], tally: Tally) -> Iterator[Difference]:
    """Each record whose shadow decision disagrees with the live one."""
    for record in records:
        shadow = record.get("shadow")
        if not isinstance(shadow, dict):
            tally.skipped += 1
            continue
        before = _usable(record.get("decision"), None if record.get("decision") is not None
                         else record.get("error_message") or "no decision was recorded")
        if shadow.get("error"):
            after: Decision | str = str(shadow["error"])
        elif isinstance(shadow.get("decision"), dict):
            after = _usable(shadow["decision"])
        else:
            after = Decision(allow=bool(shadow.get("allow")), reasons=tuple(shadow.get("reasons") or ()))
        changes = decision_changes(before, after)
        tally.add(changes)
        if changes:
            yield Difference(record, before, after, changes)
