"""Spend control end to end (docs/budgets.md): no model is free by omission, no reply is free for
lack of a usage block, attempts the provider may have billed are charged, and a reservation left
by a process killed with SIGKILL is released when its lease ends."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import select

from gateway.settings import load_settings
from gateway.store import BudgetLedger, SpanRecord, create_store_engine
from tests.conftest import InProcessGateway, in_process, run, start_gateway, stop_gateway
from tests.fakes.openai_upstream import FakeOpenAI, delay, error, raw, reply

PROVIDER_KEY = "sk-fake-spend-0123456789abcdef"
PRICES = {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0}
HI = [{"role": "user", "content": "Say hello."}]


def fake_model(upstream: FakeOpenAI, name: str = "mock-fast", **extra: Any) -> dict[str, Any]:
    return {"name": name, "provider": "openai", "base_url": upstream.url, "api_key_env": "FAKE_OPENAI_KEY",
            "upstream_model": "gpt-fake", **extra}


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    monkeypatch.setenv("FAKE_OPENAI_KEY", PROVIDER_KEY)
    with FakeOpenAI.running() as fake:
        yield fake


def gateway_with(tmp_path: Path, models: list[dict[str, Any]], **settings: str) -> Any:
    environ = {"LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db", "LOCKGATE_MODELS": json.dumps(models),
               "FAKE_OPENAI_KEY": PROVIDER_KEY, "LOCKGATE_UPSTREAM_RETRIES": "0",
               **{"LOCKGATE_" + k.upper(): v for k, v in settings.items()}}
    return in_process(load_settings(environ=environ))


def sdk(gateway: InProcessGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=gateway.create_key(team="research"),
                         http_client=gateway.client, max_retries=0)


def test_a_model_without_a_price_is_refused_unless_the_catalog_marks_it_free(tmp_path: Path,
                                                                              upstream: FakeOpenAI) -> None:
    models = [fake_model(upstream), fake_model(upstream, "mock-smart", free=True)]
    with gateway_with(tmp_path, models) as gateway:
        client = sdk(gateway)
        with pytest.raises(openai.PermissionDeniedError) as caught:
            client.chat.completions.create(model="mock-fast", messages=HI)
        assert caught.value.body["code"] == "model_unpriced"  # type: ignore[index]
        assert len(upstream.requests) == 0  # refused before any provider call

        upstream.script(reply("free"))
        assert client.chat.completions.create(model="mock-smart", messages=HI).choices[0].message.content == "free"
        [served, refused] = gateway.decisions()[:2]
        assert (served["outcome"], served["cost_micro_usd"]) == ("allowed", 0)
        assert (refused["outcome"], refused["error_type"]) == ("denied", "model_unpriced")


def test_a_catalog_that_says_free_must_say_it_with_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="free must be true or false"):
        load_settings(environ={"LOCKGATE_MODELS": json.dumps([{"name": "m", "provider": "mock", "free": "yes"}])})


def test_a_reply_without_usage_is_charged_from_our_own_count(tmp_path: Path, upstream: FakeOpenAI) -> None:
    body = {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "gpt-fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "word " * 200},
                         "finish_reason": "stop"}]}
    with gateway_with(tmp_path, [fake_model(upstream, **PRICES)]) as gateway:
        upstream.script(raw(200, json.dumps(body).encode()))
        sdk(gateway).chat.completions.create(model="mock-fast", messages=HI)
        [record] = gateway.decisions()[:1]
    assert record["output_tokens"] >= 250 and record["input_tokens"] > 0  # 1000 characters of text, and more
    assert record["cost_micro_usd"] > 0
    assert "usage estimated: the provider's reply did not report it" in record["reasons"]


def test_an_attempt_the_provider_may_have_billed_is_charged_for_its_input(tmp_path: Path,
                                                                           upstream: FakeOpenAI) -> None:
    with gateway_with(tmp_path, [fake_model(upstream, **PRICES)]) as gateway:
        upstream.script(error(500, "the provider failed after the work"))
        with pytest.raises(openai.InternalServerError):
            sdk(gateway).chat.completions.create(model="mock-fast", messages=[{"role": "user", "content": "x" * 4000}])
        [record] = gateway.decisions()[:1]
    assert record["outcome"] == "failed" and record["cost_micro_usd"] >= 1000  # 1000+ input tokens at $1/M
    assert any("failed provider attempts that may have been billed" in r for r in record["reasons"])


def test_a_refusal_before_any_work_is_not_charged(tmp_path: Path, upstream: FakeOpenAI) -> None:
    with gateway_with(tmp_path, [fake_model(upstream, **PRICES)]) as gateway:
        upstream.script(error(503, "overloaded"))
        with pytest.raises(openai.InternalServerError):
            sdk(gateway).chat.completions.create(model="mock-fast", messages=HI)
        [record] = gateway.decisions()[:1]
    assert record["cost_micro_usd"] == 0


def test_cached_input_is_priced_at_the_cached_price(tmp_path: Path, upstream: FakeOpenAI) -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 0, "total_tokens": 1000,
             "prompt_tokens_details": {"cached_tokens": 800}}
    body = {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "gpt-fake", "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]}
    model = fake_model(upstream, input_usd_per_mtok=10.0, cached_input_usd_per_mtok=1.0, output_usd_per_mtok=10.0)
    with gateway_with(tmp_path, [model]) as gateway:
        upstream.script(raw(200, json.dumps(body).encode()))
        sdk(gateway).chat.completions.create(model="mock-fast", messages=HI)
        [record] = gateway.decisions()[:1]
    assert record["cost_micro_usd"] == 200 * 10 + 800 * 1  # micro-dollars: $10/M fresh, $1/M cached


def test_images_are_estimated_at_what_the_largest_one_is_billed(tmp_path: Path) -> None:
    from gateway.endpoints.chat import ChatCompletions

    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png", "detail": "high"}}
    facts = ChatCompletions().describe({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}, image, image]}]})
    assert facts.input_tokens >= 2 * 2500  # OpenAI bills up to about 2,500 tokens for one image


def test_a_reservation_of_a_killed_process_is_released_after_its_lease(store_url: str, tmp_path: Path,
                                                                        upstream: FakeOpenAI) -> None:
    """SIGKILL while calls hold reservations; a new process releases them once their lease ends."""
    upstream.script(*(delay(3, reply("late")) for _ in range(4)))
    settings = {"models": json.dumps([fake_model(upstream, **PRICES)]), "reservation_lease_s": "2",
                "upstream_retries": "0"}
    first = start_gateway(store_url, tmp_path, **settings)
    client = openai.OpenAI(base_url=first.v1, api_key=first.create_key(team="research"), max_retries=0, timeout=5)
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(4)
    calls = [pool.submit(client.chat.completions.create, model="mock-fast", messages=HI) for _ in range(4)]
    deadline = time.monotonic() + 10
    while len(upstream.requests) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert reserved(store_url) > 0
    first.process.kill()
    first.process.wait()
    for call in calls:
        with pytest.raises(openai.APIConnectionError):
            call.result(timeout=10)
    second = start_gateway(store_url, tmp_path, **settings)
    try:
        deadline = time.monotonic() + 10
        while reserved(store_url) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reserved(store_url) == 0
        deadline = time.monotonic() + 5
        while len(released := lease_releases(store_url)) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)  # the releases' spans reach the store with the audit writer's next flush
        assert len(released) == 4 and all(s["attributes"]["lockgate.reservation.micro_usd"] > 0 for s in released)
    finally:
        stop_gateway(second)


def lease_releases(store_url: str) -> list[dict[str, Any]]:
    """The audit's spans of reservations released at the end of their lease."""
    async def read() -> list[dict[str, Any]]:
        engine = create_store_engine(store_url)
        try:
            async with engine.connect() as connection:
                rows = (await connection.execute(select(SpanRecord).where(  # type: ignore[call-overload]
                    SpanRecord.name == "lockgate.ledger.lease_released"))).all()
            return [dict(r._mapping) for r in rows]
        finally:
            await engine.dispose()

    return list(run(read()))


def reserved(store_url: str) -> int:
    async def read() -> int:
        engine = create_store_engine(store_url)
        try:
            async with engine.connect() as connection:
                rows = (await connection.execute(select(BudgetLedger.reserved_micro_usd))).all()  # type: ignore[call-overload]
            return sum(r[0] for r in rows)
        finally:
            await engine.dispose()

    return int(run(read()))


def test_a_cost_the_provider_reports_is_recorded_beside_ours_and_never_charged(tmp_path: Path,
                                                                              upstream: FakeOpenAI) -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150, "cost": 0.5}
    body = {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "gpt-fake", "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}
    with gateway_with(tmp_path, [fake_model(upstream, **PRICES)]) as gateway:
        upstream.script(raw(200, json.dumps(body).encode()))
        sdk(gateway).chat.completions.create(model="mock-fast", messages=HI)
        [record] = gateway.decisions()[:1]
    assert record["provider_cost_micro_usd"] == 500_000  # what it said: $0.50
    assert record["cost_micro_usd"] == 100 * 1 + 50 * 2  # ours: tokens x the catalog's prices
