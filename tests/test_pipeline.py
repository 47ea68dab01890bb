"""The pipeline's promise: whatever happens to a call, one decision record and no held reservation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from sqlalchemy import text

from gateway.audit.reader import list_decisions
from gateway.endpoints.chat import ChatCompletions
from gateway.endpoints.checks import RequestLimits
from gateway.runtime import build_runtime
from gateway.settings import load_settings
from tests.conftest import write_policy
from tests.fakes.openai_upstream import FakeOpenAI, delay, reply


async def test_a_call_cancelled_mid_flight_is_recorded_and_releases_its_reservation(tmp_path: Path) -> None:
    policies = write_policy(tmp_path / "policies", {
        "aliases": {}, "fallbacks": {}, "approval_tools": {},
        "teams": {"research": {"models": ["slow"], "monthly_budget_usd": 10}}})
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
