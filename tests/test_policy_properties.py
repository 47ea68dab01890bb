"""Property: whatever a policy input holds — random values, missing or mistyped fields, strings
with emoji, NUL, newlines, deep nesting in metadata — the shipped policy yields a decision of the
contract's shape or a fail-closed PolicyFailed, never a crash; and an input whose caller or model
is malformed is never allowed. Through the gateway, a random body is answered in OpenAI's error
shape or served, never with a 500."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import PolicyFailed
from gateway.policy import PolicyStage
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.source import default_policy_dir, load_policy_source
from gateway.settings import load_settings
from gateway.types import Decision
from tests.conftest import InProcessGateway, in_process

MODELS = load_settings(environ={}).models
VALID = {
    "principal": {"key_id": "k_1", "user": "ana", "team": "research", "org": "acme", "roles": [], "labels": {}},
    "request": {"endpoint": "chat.completions", "model": "mock-fast", "stream": False, "max_tokens": 16,
                "tools": [], "message_count": 1, "metadata": {}},
    "estimate": {"input_tokens": 1, "output_tokens_max": 16, "cost_usd_max": 0.0, "cost_micro_usd_max": 0},
    "spend": {}, "run": None, "now": "2026-12-06T00:00:00Z",
}
text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["research", "mock-fast", "🙂🙂", "٣٤٥", "a\nb", "\"quoted\"", "x\x00y", "", "fast", "transfer_funds"])
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text
json_values = st.recursive(scalars,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                           max_leaves=20)
PATHS = [("principal",), ("principal", "team"), ("principal", "user"), ("principal", "roles"), ("request",),
         ("request", "model"), ("request", "tools"), ("request", "metadata"), ("request", "stream"),
         ("estimate",), ("estimate", "cost_micro_usd_max"), ("spend",), ("run",), ("now",)]


@pytest.fixture(scope="module")
def stage() -> Iterator[PolicyStage]:
    source = load_policy_source(default_policy_dir(), MODELS)
    yield PolicyStage(EmbeddedEngine(source), 0, source.revision)


def mutate(changes: list[tuple[tuple[str, ...], Any, bool]]) -> dict[str, Any]:
    policy_input = copy.deepcopy(VALID)
    for path, value, delete in changes:
        parent: Any = policy_input
        for part in path[:-1]:
            if not isinstance(parent, dict) or part not in parent:
                break
            parent = parent[part]
        else:
            if isinstance(parent, dict):
                if delete:
                    parent.pop(path[-1], None)
                else:
                    parent[path[-1]] = value
    return policy_input


def malformed(policy_input: dict[str, Any]) -> bool:
    principal, request = policy_input.get("principal"), policy_input.get("request")
    return not (isinstance(principal, dict) and isinstance(principal.get("team"), str)
                and isinstance(request, dict) and isinstance(request.get("model"), str))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(PATHS), json_values, st.booleans()), min_size=1, max_size=4))
def test_any_input_yields_a_decision_or_a_fail_closed_error_never_an_allow_when_malformed(
        stage: PolicyStage, changes: list[tuple[tuple[str, ...], Any, bool]]) -> None:
    policy_input = mutate(changes)
    try:
        decision, _, _ = stage.decide(policy_input)
    except PolicyFailed:
        return  # denied, fail closed
    assert isinstance(decision, Decision)
    if malformed(policy_input):
        assert decision.allow is False, policy_input


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InProcessGateway, str]]:
    folder: Path = tmp_path_factory.mktemp("properties")
    configured = load_settings(environ={"LOCKGATE_DATABASE_URL": f"sqlite:///{folder}/lockgate.db"})
    with in_process(configured) as served:
        yield served, served.create_key()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=text | json_values, metadata=json_values, tools=json_values)
def test_a_random_body_is_answered_in_openais_shape_never_a_500(
        gateway: tuple[InProcessGateway, str], model: Any, metadata: Any, tools: Any) -> None:
    served, key = gateway
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "metadata": metadata, "tools": tools}
    reply = served.client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert reply.status_code < 500 or reply.json()["error"]["code"] in ("policy_error", "store_unavailable")
    if reply.status_code != 200:
        error = reply.json()["error"]
        assert set(error) >= {"message", "type", "code"} and error["message"]
