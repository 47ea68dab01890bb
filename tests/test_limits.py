"""Budgets and rate limits under load, across gateway processes (docs/budgets.md): released
together, calls never pass a budget by more than one call's estimate error, never more than a
per-minute limit pass, a run stops at its step cap, and a stream stops where its reservation ends.
The provider is a fake OpenAI that counts its requests (each one a bill)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, _truncate_all, run, start_gateway, stop_gateway
from tests.fakes.commit_cutter import CommitCutter
from tests.fakes.openai_upstream import FakeOpenAI, delay, reply

PROVIDER_KEY = "sk-fake-limits-0123456789abcdef"
PRICES = {"input_usd_per_mtok": 1000.0, "output_usd_per_mtok": 1000.0}  # 1000 micro-dollars per token
HI = [{"role": "user", "content": "Say hello."}]
POLICY = """package lockgate

import rego.v1

decision := {
	"allow": true,
	"route": {"model": input.request.model},
	"budgets": data.lockgate.budgets,
	"limits": data.lockgate.limits,
}
"""

Serve = Callable[..., Gateway]


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    monkeypatch.setenv("FAKE_OPENAI_KEY", PROVIDER_KEY)
    with FakeOpenAI.running() as fake:
        yield fake


@pytest.fixture
def serve(tmp_path: Path, upstream: FakeOpenAI) -> Iterator[Callable[..., Gateway]]:
    """serve(store_url, budgets=[...], limits={...}, **settings): a gateway with that policy."""
    started: list[Gateway] = []

    def start(store_url: str, budgets: list[dict[str, Any]] | None = None, limits: dict[str, Any] | None = None,
              **settings: str) -> Gateway:
        folder = tmp_path / f"policy{len(started)}"
        folder.mkdir()
        (folder / "lockgate.rego").write_text(POLICY)
        (folder / "data.json").write_text(json.dumps({"lockgate": {"budgets": budgets or [], "limits": limits or {}}}))
        models = [{"name": "fake", "provider": "openai", "base_url": upstream.url, "api_key_env": "FAKE_OPENAI_KEY",
                   "upstream_model": "gpt-fake", **PRICES}]
        started.append(start_gateway(store_url, tmp_path, policy_dir=str(folder), models=json.dumps(models),
                                     upstream_retries="0", **settings))
        return started[-1]

    yield start
    for gateway in started:
        stop_gateway(gateway)


def client(gateway: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0, timeout=30)


def race(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls released together; each one's result or exception."""
    barrier = threading.Barrier(len(calls))

    def one(call: Callable[[], Any]) -> Any:
        barrier.wait()
        try:
            return call()
        except openai.APIError as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(one, calls))


def admin_budgets(gateway: Gateway, key: str) -> dict[tuple[str, str], dict[str, Any]]:
    answer = httpx.get(gateway.base_url + "/admin/budgets", headers={"authorization": f"Bearer {key}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    return {(row["scope"], row["window"]): row for row in answer.json()["data"]}


def settled(gateway: Gateway, key: str, scope: str, window: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The budget row once nothing is reserved on it any more (every settlement written)."""
    deadline = time.monotonic() + timeout_s
    while True:
        row = admin_budgets(gateway, key).get((scope, window), {})
        if row.get("reserved") == 0 or time.monotonic() > deadline:
            return row
        time.sleep(0.05)


def test_fifty_calls_released_together_never_pass_a_budget_of_ten_calls(
        serve: Serve, upstream: FakeOpenAI, store_url: str) -> None:
    fifty_against_ten(serve, upstream, store_url, processes=1)


def test_fifty_calls_on_two_processes_never_pass_a_budget_of_ten_calls(
        serve: Serve, upstream: FakeOpenAI, postgres_url: str) -> None:
    run(_truncate_all(postgres_url))
    fifty_against_ten(serve, upstream, postgres_url, processes=2)


def fifty_against_ten(serve: Serve, upstream: FakeOpenAI, store_url: str, processes: int) -> None:
    # One call: 11 input tokens (our estimate: 4 for the text, 4 for the message, 3 for the reply)
    # and at most 12 output tokens reserved, at 1000 micro-dollars a token; the fake bills 9 + 12.
    per_call = (11 + 12) * 1000
    budgets = [{"scope": "team:research", "window": "month", "limit_micro_usd": 10 * per_call}]
    upstream.script(*(reply("hi") for _ in range(50)))
    gateways = [serve(store_url, budgets) for _ in range(processes)]
    key = gateways[0].create_key(team="research", roles=("admin",))
    clients = [client(g, key) for g in gateways]

    results = race([lambda i=i: clients[i % processes].chat.completions.create(
        model="fake", messages=HI, max_tokens=12) for i in range(50)])

    served = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert all(isinstance(r, openai.RateLimitError) and r.body["code"] == "budget_exceeded"  # type: ignore[index]
               and "team:research (month)" in r.message for r in refused), refused
    assert 10 <= len(served) < 50 and len(upstream.requests) == len(served)  # no provider call for a refusal
    views = [settled(g, key, "team:research", "month") for g in gateways]
    assert all(v == views[0] for v in views)  # every process reports the same spend
    bill = (9 + 12) * 1000
    assert views[0]["spent"] == len(served) * bill <= 10 * per_call
    assert views[0]["limit"] == 10 * per_call


def test_a_requests_per_minute_limit_holds_across_two_processes(
        serve: Serve, upstream: FakeOpenAI, postgres_url: str) -> None:
    run(_truncate_all(postgres_url))
    while datetime.now(UTC).second > 45:  # the whole race inside one minute
        time.sleep(1)
    upstream.script(*(reply("hi") for _ in range(20)))
    gateways = [serve(postgres_url, limits={"requests_per_minute": {"key": 5}}) for _ in range(2)]
    key = gateways[0].create_key(team="research")
    clients = [client(g, key) for g in gateways]

    results = race([lambda i=i: clients[i % 2].chat.completions.with_raw_response.create(
        model="fake", messages=HI, max_tokens=5) for i in range(20)])

    served = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(served) == 5 and len(upstream.requests) == 5
    for error in refused:
        assert isinstance(error, openai.RateLimitError) and error.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
        assert error.body["type"] == "requests"  # type: ignore[index]
        assert 1 <= int(error.response.headers["retry-after"]) <= 60
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in served)
    assert remaining == [0, 1, 2, 3, 4] and {r.headers["x-ratelimit-limit-requests"] for r in served} == {"5"}


def test_a_run_capped_at_three_steps_refuses_the_fourth(serve: Serve, upstream: FakeOpenAI, store_url: str) -> None:
    upstream.script(*(reply("step") for _ in range(6)))
    gateway = serve(store_url, limits={"max_steps_per_run": 3})
    agent = client(gateway, gateway.create_key(team="research"))
    run_header = {"Lockgate-Run-Id": "run-42"}
    for _ in range(3):
        agent.chat.completions.create(model="fake", messages=HI, max_tokens=5, extra_headers=run_header)
    with pytest.raises(openai.RateLimitError) as caught:
        agent.chat.completions.create(model="fake", messages=HI, max_tokens=5, extra_headers=run_header)
    assert "run:run-42" in caught.value.message and "3 calls" in caught.value.message
    # Another run, named in the metadata as the Agents SDK does, starts from zero.
    agent.chat.completions.create(model="fake", messages=HI, max_tokens=5, metadata={"run_id": "run-43"}, store=True)
    assert len(upstream.requests) == 4
    deadline = time.monotonic() + 5
    while len(records := gateway.decisions()) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    runs = [d["policy_input"]["run"] for d in records]
    # input.run names the run; its counts may be up to spend_cache_ttl_s old (the reservation enforces).
    assert sorted(r["id"] for r in runs) == ["run-42"] * 4 + ["run-43"]
    assert all(set(r) == {"id", "steps", "tokens", "cost_usd", "cost_micro_usd"} for r in runs)


def test_a_run_capped_in_micro_dollars_refuses_a_step_it_cannot_cover(serve: Serve, upstream: FakeOpenAI,
                                                                       store_url: str) -> None:
    """limits.max_cost_micro_usd_per_run: a step whose worst case passes the run's cost cap is
    refused before the provider sees it; a call outside the run is not capped."""
    upstream.script(reply("step"), reply("alone"))
    gateway = serve(store_url, limits={"max_cost_micro_usd_per_run": 30_000})  # 30 tokens at 1000 each
    agent = client(gateway, gateway.create_key(team="research"))
    run_header = {"Lockgate-Run-Id": "run-cost"}
    agent.chat.completions.create(model="fake", messages=HI, max_tokens=5, extra_headers=run_header)
    with pytest.raises(openai.RateLimitError) as caught:
        # Its worst case alone (30 output tokens and the prompt) passes the cap.
        agent.chat.completions.create(model="fake", messages=HI, max_tokens=30, extra_headers=run_header)
    assert "run:run-cost" in caught.value.message and caught.value.body["code"] == "budget_exceeded"  # type: ignore[index]
    assert agent.chat.completions.create(model="fake", messages=HI, max_tokens=30).choices[0].message.content == "alone"
    assert len(upstream.requests) == 2


def test_a_concurrency_limit_refuses_the_call_past_it(serve: Serve, upstream: FakeOpenAI, store_url: str) -> None:
    upstream.script(delay(1.0, reply("slow")), reply("after"))
    gateway = serve(store_url, limits={"concurrent": {"user": 1}})
    user = client(gateway, gateway.create_key(team="research"))
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(user.chat.completions.create, model="fake", messages=HI, max_tokens=5)
        deadline = time.monotonic() + 5
        while not upstream.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError, match="1 calls running at once"):
            user.chat.completions.create(model="fake", messages=HI, max_tokens=5)
        assert slow.result(timeout=10).choices[0].message.content == "slow"
    # Once the first call ended (and its settlement was written), the next one runs.
    deadline = time.monotonic() + 5
    while True:
        try:
            assert user.chat.completions.create(model="fake", messages=HI, max_tokens=5).choices[0].message.content \
                == "after"
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_token_budget_refuses_what_it_cannot_cover(serve: Serve, upstream: FakeOpenAI, store_url: str) -> None:
    upstream.script(reply("hi"), reply("hi"))
    gateway = serve(store_url, [{"scope": "team:research", "window": "day", "limit_tokens": 40}])
    user = client(gateway, gateway.create_key(team="research"))
    user.chat.completions.create(model="fake", messages=HI, max_tokens=12)  # bills 21 tokens
    deadline = time.monotonic() + 5
    while True:  # once the first call's 21 tokens are settled, 19 reserved tokens no longer fit
        try:
            user.chat.completions.create(model="fake", messages=HI, max_tokens=12)
        except openai.RateLimitError as exc:
            assert "40 tokens" in exc.message and exc.body["code"] == "budget_exceeded"  # type: ignore[index]
            break
        assert time.monotonic() < deadline
    assert len(upstream.requests) <= 2


def test_a_stream_past_its_reservation_is_ended_and_charged_for_what_streamed(
        serve: Serve, upstream: FakeOpenAI, store_url: str) -> None:
    upstream.script(reply(" ".join(f"w{i}" for i in range(60))))  # ignores max_tokens, as a provider may not
    gateway = serve(store_url, [{"scope": "team:research", "window": "month", "limit_usd": 100}])
    user = client(gateway, gateway.create_key(team="research"))
    words = []
    with pytest.raises(openai.APIError, match="passed the output its budget reserved"):
        for chunk in user.chat.completions.create(model="fake", messages=HI, max_tokens=5, stream=True):
            words += [chunk.choices[0].delta.content or ""] if chunk.choices else []
    assert 0 < len([w for w in words if w]) <= 6
    deadline = time.monotonic() + 5
    while not (records := gateway.decisions()) and time.monotonic() < deadline:
        time.sleep(0.05)
    [record] = records
    assert record["error_type"] == "budget_exceeded" and record["cost_micro_usd"] > 0


def test_streamed_and_whole_identical_calls_are_charged_the_same(serve: Serve, upstream: FakeOpenAI,
                                                                 store_url: str) -> None:
    upstream.script(reply("same answer"), reply("same answer"))
    gateway = serve(store_url, [{"scope": "team:research", "window": "month", "limit_usd": 100}])
    user = client(gateway, gateway.create_key(team="research"))
    user.chat.completions.create(model="fake", messages=HI, max_tokens=20)
    list(user.chat.completions.create(model="fake", messages=HI, max_tokens=20, stream=True,
                                      stream_options={"include_usage": True}))
    deadline = time.monotonic() + 5
    while len(records := gateway.decisions()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r["cost_micro_usd"] for r in records] == [21_000, 21_000]


def test_a_scope_without_a_budget_is_never_refused(serve: Serve, upstream: FakeOpenAI, store_url: str) -> None:
    upstream.script(*(reply("hi") for _ in range(20)))
    gateway = serve(store_url)
    user = client(gateway, gateway.create_key(team="research"))
    results = race([lambda: user.chat.completions.create(model="fake", messages=HI) for _ in range(20)])
    assert not [r for r in results if isinstance(r, Exception)]


def test_commits_whose_acknowledgement_is_lost_leave_spend_equal_to_the_audit(
        serve: Serve, upstream: FakeOpenAI, postgres_url: str) -> None:
    """A TCP proxy between the gateway and PostgreSQL cuts connections right after COMMITs went
    through (reservations' and the audit writer's alike). Once leases have ended, the ledger's
    spend equals the audited cost and nothing is reserved."""
    run(_truncate_all(postgres_url))
    port = int(postgres_url.rsplit(":", 1)[1].split("/")[0]) if postgres_url.count(":") > 2 else 5432
    with CommitCutter(port) as cutter:
        proxied = postgres_url.replace(f":{port}/", f":{cutter.port}/")
        upstream.script(*(reply("hi") for _ in range(40)))
        gateway = serve(proxied, [{"scope": "team:research", "window": "month", "limit_usd": 1000}],
                        reservation_lease_s="2")
        key = gateway.create_key(team="research", roles=("admin",))
        user = client(gateway, key)
        outcomes = []
        for index in range(40):
            if index % 5 == 2:
                cutter.arm()
            try:
                user.chat.completions.create(model="fake", messages=HI, max_tokens=12)
                outcomes.append("served")
            except openai.APIStatusError as exc:
                outcomes.append(str(exc.status_code))
            time.sleep(0.02)
        assert cutter.cuts >= 5 and outcomes.count("served") >= 20, outcomes
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ledger = admin_budgets(gateway, key).get(("team:research", "month"), {})
            audited = sum(d["cost_micro_usd"] for d in gateway.decisions(limit=1000))
            if ledger.get("reserved") == 0 and ledger.get("spent") == audited:
                break
            time.sleep(0.2)
        assert (ledger["spent"], ledger["reserved"]) == (audited, 0)
        assert audited == outcomes.count("served") * (9 + 12) * 1000
