"""The embedded engine (gateway/policy/embedded.py): rules by path, data documents by query, and
nothing else: an entrypoint that is not a path into data is refused, never run as Rego."""

from __future__ import annotations

import pytest

from gateway.policy.embedded import EmbeddedEngine, PolicyEngineError
from gateway.policy.source import PolicySource

MODULE = """package lockgate
import rego.v1

decision := {"allow": input.user.team == "research"}
"""


def engine() -> EmbeddedEngine:
    return EmbeddedEngine(PolicySource(modules={"lockgate.rego": MODULE},
                                       data={"lockgate": {"aliases": {"fast": "mock-fast"}}}))


def test_rules_and_data_documents_are_evaluated_by_path() -> None:
    policy = engine()

    assert policy.evaluate("data.lockgate.decision", {"user": {"team": "research"}}) == {"allow": True}
    assert policy.evaluate("data.lockgate.aliases", {}) == {"fast": "mock-fast"}
    assert policy.evaluate("data.lockgate.undefined", {}) is None


@pytest.mark.parametrize("entrypoint", ["1 + 1", "data.lockgate.aliases; true", "x := data.lockgate",
                                        "data.lockgate.aliases[_]", "input", "data", "data.lockgate.aliases\n"])
def test_anything_but_a_path_into_data_is_refused(entrypoint: str) -> None:
    with pytest.raises(PolicyEngineError, match="not a path into data"):
        engine().evaluate(entrypoint, {})
