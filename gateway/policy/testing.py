"""``lockgate policy test``: run the ``test_`` rules of a policy folder's ``*_test.rego`` files.

Each test rule passes when it evaluates to true, as with ``opa test``. The tests run on the
embedded engine, the one that serves the gateway by default, in child processes after the
load-time guard (gateway/policy/preflight.py): a test that crashes the engine fails alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.policy.preflight import evaluate_in_child, vet_policy
from gateway.policy.source import PolicyLoadError, PolicySource


@dataclass(frozen=True)
class TestResult:
    rule: str  # data.lockgate_test.test_alias_resolves
    passed: bool
    detail: str  # why it failed


def run_policy_tests(source: PolicySource) -> list[TestResult]:
    """Every test rule's result, in rule order. Raises PolicyLoadError when the policy or its
    tests do not pass the guard or do not compile."""
    vetting = vet_policy(source, with_tests=True, sample=False)
    if vetting.errors:
        raise PolicyLoadError("; ".join(str(e) for e in vetting.errors))
    rules = sorted(r for r in vetting.rules if r.rsplit(".", 1)[-1].startswith("test_"))
    try:
        answers = list(evaluate_in_child(source, [(rule, {}) for rule in rules], with_tests=True))
    except ValueError as exc:
        raise PolicyLoadError(str(exc)) from None
    results = []
    for rule, answer in zip(rules, answers, strict=True):
        if answer.error is not None:
            results.append(TestResult(rule, False, answer.error))
        else:
            passed = answer.value is True
            results.append(TestResult(rule, passed, "" if passed else f"evaluated to {answer.value!r}"))
    return results
