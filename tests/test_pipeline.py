"""The pipeline's promise: whatever happens to a call, one decision record and no held reservation."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.audit.reader import list_decisions
from gateway.endpoints.chat import ChatCompletions, ChatStreamReader
from gateway.endpoints.checks import RequestLimits
from gateway.pipeline import Call
from gateway.runtime import build_runtime
from gateway.settings import load_settings
from gateway.store import utcnow
from tests.conftest import in_process, write_policy
from tests.fakes.openai_upstream import FakeOpenAI, delay, reply


async def test_a_call_cancelled_mid_flight_is_recorded_and_releases_its_reservation(tmp_path: Path) -> None:
    policies = write_policy(tmp_path / "policies", {
        "aliases": {}, "fallbacks": {}, "approval_tools": {},
        "teams": {"research": {"models": ["slow"], "monthly_budget_micro_usd": 10_000_000}}})
    with FakeOpenAI.running() as upstream:
        upstream.script(delay(5, reply("too late")))
        models = [{"name": "slow", "provider": "openai", "base_url": upstream.url,
                   "input_usd_per_mtok": 1, "output_usd_per_mtok": 1}]
        settings = load_settings(environ={
            "LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db", "LOCKGATE_POLICY_DIR": str(policies),
            "LOCKGATE_MODELS": json.dumps(models)})
        runtime = await build_runtime(settings)
        try:
            key = (await runtime.keys.create(user="ana", team="research")).key
            body = json.dumps({"model": "slow", "messages": [{"role": "user", "content": "hi"}]}).encode()
            call = asyncio.create_task(runtime.pipeline.handle(_request(body, key), ChatCompletions(RequestLimits())))
            for _ in range(500):  # at most 5 s for the call to reach the provider
                if upstream.requests:
                    break
                await asyncio.sleep(0.01)
            async with runtime.engine.connect() as connection:
                held = (await connection.execute(text("SELECT reserved_micro_usd FROM budget_ledger"))).scalar_one()
            assert held > 0
            call.cancel()
            try:
                await call
            except asyncio.CancelledError:
                pass
            await runtime.audit.flush()
            [record] = await list_decisions(runtime.engine)
            async with runtime.engine.connect() as connection:
                held = (await connection.execute(text("SELECT reserved_micro_usd FROM budget_ledger"))).scalar_one()
        finally:
            await runtime.close()
    assert (record["outcome"], record["status_code"], record["error_type"]) == ("failed", 499, "client_closed")
    assert held == 0


async def test_a_stream_whose_provider_fails_to_close_is_still_recorded_with_its_usage(tmp_path: Path) -> None:
    """The relay awaits closing the provider's stream in its ``finally``; should that fail (or be
    cancelled), the call is still settled and recorded, with the usage read so far, rather than
    left to the response's fallback record, which knows no usage."""
    async def events() -> AsyncIterator[bytes]:
        try:
            for payload in ({"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]},
                            {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 12}}):
                yield b"data: " + json.dumps(payload).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        except GeneratorExit:
            raise RuntimeError("the connection could not be closed") from None

    settings = load_settings(environ={"LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db"})
    runtime = await build_runtime(settings)
    try:
        pipeline = runtime.pipeline
        call = Call(spec=ChatCompletions(RequestLimits()), decision_id="dec_close", started=time.perf_counter(),
                    now=utcnow(), root=pipeline.tracer.start_span("chat"))
        relay = pipeline._relay(events(), ChatStreamReader(include_usage=True), call)
        assert b"usage" in [await anext(relay), await anext(relay)][1]
        with pytest.raises(RuntimeError, match="could not be closed"):
            await relay.aclose()  # the client left before [DONE], as SSEResponse closes the relay
        await runtime.audit.flush()
        [record] = await list_decisions(runtime.engine)
    finally:
        await runtime.close()
    assert (record["id"], record["status_code"], record["error_type"]) == ("dec_close", 499, "client_closed")
    assert (record["input_tokens"], record["output_tokens"]) == (9, 12)


def test_a_policy_cap_on_max_tokens_is_reserved_for_every_choice(tmp_path: Path) -> None:
    """The policy's max_tokens caps each of n choices: the reservation holds n times the cap."""
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "lockgate.rego").write_text("""package lockgate

import rego.v1

decision := {"allow": true, "limits": {"max_tokens": 100},
\t"budgets": [{"scope": "team:research", "window": "month", "limit_usd": 0.5}]}
""")
    # 1000 USD per million output tokens: one choice of 100 tokens may cost $0.10, eight $0.80.
    models = [{"name": "capped", "provider": "mock", "input_usd_per_mtok": 0, "output_usd_per_mtok": 1000}]
    settings = load_settings(environ={"LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db",
                                      "LOCKGATE_POLICY_DIR": str(policy), "LOCKGATE_MODELS": json.dumps(models)})
    with in_process(settings) as gateway:
        headers = {"authorization": f"Bearer {gateway.create_key()}"}
        body = {"model": "capped", "max_tokens": 4000, "messages": [{"role": "user", "content": "hi"}]}
        one = gateway.client.post("/v1/chat/completions", json=body, headers=headers)
        eight = gateway.client.post("/v1/chat/completions", json={**body, "n": 8}, headers=headers)

    assert one.status_code == 200, one.text
    assert eight.status_code == 429 and eight.json()["error"]["code"] == "budget_exceeded"
    assert "$0.80" in eight.json()["error"]["message"]


def _request(body: bytes, key: str):  # type: ignore[no-untyped-def]
    from starlette.requests import Request

    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # a client that sent its body and waits
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [
        (b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode())], "query_string": b""}
    return Request(scope, receive)
