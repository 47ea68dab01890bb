"""``GET /v1/models`` and ``/v1/models/{id}`` (gateway/app.py), in process on the default policy:
what each key may use, asked of the policy as a call's decision is (so reused), and each call
authenticated, traced and recorded through the pipeline like every other call under /v1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.policy import DECISION
from gateway.settings import load_settings
from tests.conftest import InProcessGateway, in_process


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[InProcessGateway]:
    with in_process(load_settings(environ={"LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db"})) as gateway:
        yield gateway


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def record(gateway: InProcessGateway, response: Any) -> dict[str, Any]:
    [found] = [r for r in gateway.decisions() if r["id"] == response.headers["lockgate-decision-id"]]
    return found


def test_every_models_call_leaves_one_record_like_any_other_call(gateway: InProcessGateway) -> None:
    key = gateway.create_key(team="support", user="bo")

    listed = gateway.client.get("/v1/models", headers=auth(key))
    one = gateway.client.get("/v1/models/fast", headers=auth(key))
    not_allowed = gateway.client.get("/v1/models/mock-smart", headers=auth(key))
    anonymous = gateway.client.get("/v1/models")
    wrong_key = gateway.client.get("/v1/models/fast", headers=auth("lg-not-a-key"))

    assert [m["id"] for m in listed.json()["data"]] == ["mock-fast", "fast"]
    assert one.json() == {"id": "fast", "object": "model", "created": 0, "owned_by": "mock"}
    assert not_allowed.status_code == 404 and not_allowed.json()["error"]["code"] == "model_not_found"
    assert anonymous.status_code == wrong_key.status_code == 401
    outcomes = [(r["endpoint"], r["outcome"], r["status_code"], r["user"]) for r in
                (record(gateway, response) for response in (listed, one, not_allowed, anonymous, wrong_key))]
    assert outcomes == [("models.list", "allowed", 200, "bo"), ("models.retrieve", "allowed", 200, "bo"),
                        ("models.retrieve", "failed", 404, "bo"), ("models.list", "denied", 401, None),
                        ("models.retrieve", "denied", 401, None)]
    assert listed.headers["lockgate-trace-id"] != one.headers["lockgate-trace-id"]


def test_a_second_listing_reuses_the_policys_decisions(gateway: InProcessGateway) -> None:
    """The policy is asked once per catalog model and alias; a listing it cannot tell from an
    earlier one (same user, team and org, for the default policy, whose budgets name the user)
    asks it nothing more, whichever key asks."""
    key = gateway.create_key(team="research")
    engine = gateway.runtime.policy.engine
    asked: list[str] = []
    evaluate = engine.evaluate

    def counting(entrypoint: str, policy_input: Any) -> Any:
        asked.append(entrypoint)
        return evaluate(entrypoint, policy_input)

    engine.evaluate = counting  # type: ignore[method-assign]
    first = gateway.client.get("/v1/models", headers=auth(key)).json()
    decisions = asked.count(DECISION)
    second = gateway.client.get("/v1/models", headers=auth(gateway.create_key(team="research", user="ana"))).json()

    assert first == second and {m["id"] for m in first["data"]} == {"mock-fast", "mock-smart", "fast", "smart"}
    assert decisions == 4 and asked.count(DECISION) == decisions


def test_a_wrong_method_is_a_405_that_says_what_is_allowed(gateway: InProcessGateway) -> None:
    for path in ("/v1/models", "/v1/models/fast", "/healthz"):
        response = gateway.client.post(path, headers=auth(gateway.create_key()))
        assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
        assert sorted(response.headers["allow"].split(", ")) == ["GET", "HEAD"]
