"""Stages 5 and 8, reserve and settle: the budget ledger on a real store, alone and behind a gateway."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.budgets import BudgetLedgerStore, Reservation, period_of, settlement, settlement_statements
from gateway.endpoints.chat import ChatCompletions
from gateway.endpoints.checks import RequestLimits
from gateway.errors import BudgetExceeded, StoreUnavailable
from gateway.settings import DEFAULT_MODELS
from gateway.store import BudgetLedger, DirectStatements, create_store_engine, create_tables
from gateway.types import Budget, CatalogModel
from tests.conftest import Gateway, free_port, run, start_gateway, stop_gateway, write_policy

NOW = datetime(2026, 11, 25, 4, 0, tzinfo=UTC)
MONTH = "2026-11"

Row = tuple[str, str, str]



async def settle(direct: DirectStatements, reservation: Reservation, actual_micro_usd: int) -> None:
    """What the audit writer does with a call's settlement, alone in a transaction."""
    await direct.write_batch(settlement_statements(settlement(reservation, actual_micro_usd), direct.postgres))


async def ledger_rows(engine: AsyncEngine) -> dict[Row, tuple[int, int]]:
    """Every ledger row: (scope, window, period) -> (spent, reserved), in micro-dollars."""
    table = BudgetLedger.__table__  # type: ignore[attr-defined]
    async with engine.connect() as connection:
        rows = (await connection.execute(select(table))).all()
    return {(r.scope, r.window, r.period): (r.spent_micro_usd, r.reserved_micro_usd) for r in rows}


def month(scope: str, limit: int) -> Budget:
    return Budget(scope=scope, window="month", limit=limit)


# --- reserve ------------------------------------------------------------------------------------


async def test_reservations_within_the_limit_are_held_up_to_exactly_the_limit(
        engine: AsyncEngine, ledger: BudgetLedgerStore) -> None:

    first = await ledger.reserve([month("team:a", 1000)], 400, NOW)
    second = await ledger.reserve([month("team:a", 1000)], 600, NOW)  # spent + reserved + amount == limit

    assert first.rows == (("team:a", "month", MONTH, 400),) and first.amount_micro_usd == 400
    assert second.amount_micro_usd == 600
    assert await ledger_rows(engine) == {("team:a", "month", MONTH): (0, 1000)}


async def test_a_reservation_past_the_limit_is_refused_and_changes_no_row(
        engine: AsyncEngine, ledger: BudgetLedgerStore) -> None:
    await ledger.reserve([month("team:a", 1000)], 600, NOW)
    before = await ledger_rows(engine)

    with pytest.raises(BudgetExceeded) as caught:
        await ledger.reserve([month("team:a", 1000)], 401, NOW)

    assert "team:a" in caught.value.message and caught.value.code == "budget_exceeded"
    assert await ledger_rows(engine) == before == {("team:a", "month", MONTH): (0, 600)}


async def test_a_first_reservation_past_the_limit_leaves_no_row_behind(
        engine: AsyncEngine, ledger: BudgetLedgerStore) -> None:

    with pytest.raises(BudgetExceeded):
        await ledger.reserve([month("team:a", 1000)], 1001, NOW)

    assert await ledger_rows(engine) == {}
    # The refused first attempt must not make the store believe the row exists.
    await ledger.reserve([month("team:a", 1000)], 1000, NOW)
    assert await ledger_rows(engine) == {("team:a", "month", MONTH): (0, 1000)}


async def test_when_a_later_budget_refuses_the_earlier_reservations_are_rolled_back(
        engine: AsyncEngine, ledger: BudgetLedgerStore) -> None:
    budgets = [month("team:a", 10_000), Budget("user:b", "day", 500), month("org:c", 10_000)]
    await ledger.reserve(budgets, 100, NOW)
    before = await ledger_rows(engine)

    with pytest.raises(BudgetExceeded) as caught:
        await ledger.reserve(budgets, 450, NOW)  # team:a could cover it, user:b (day) cannot

    assert "user:b" in caught.value.message
    assert await ledger_rows(engine) == before == {
        ("team:a", "month", MONTH): (0, 100),
        ("user:b", "day", "2026-11-25"): (0, 100),
        ("org:c", "month", MONTH): (0, 100),
    }


async def test_no_budgets_reserves_nothing(engine: AsyncEngine, direct: DirectStatements,
        ledger: BudgetLedgerStore) -> None:

    reservation = await ledger.reserve([], 10**9, NOW)
    await settle(direct, reservation, 10**9)

    assert reservation.rows == ()
    assert await ledger_rows(engine) == {}


# --- settle -------------------------------------------------------------------------------------


async def test_settle_replaces_the_reservation_by_the_actual_cost(
        engine: AsyncEngine, direct: DirectStatements, ledger: BudgetLedgerStore) -> None:
    budgets = [month("team:a", 1000), Budget("org:c", "total", 5000)]
    held = await ledger.reserve(budgets, 700, NOW)
    other = await ledger.reserve(budgets, 300, NOW)

    await settle(direct, held, 120)

    assert await ledger_rows(engine) == {("team:a", "month", MONTH): (120, 300), ("org:c", "total", "all"): (120, 300)}
    await settle(direct, other, 0)  # a call that failed before any reply costs nothing
    assert await ledger_rows(engine) == {("team:a", "month", MONTH): (120, 0), ("org:c", "total", "all"): (120, 0)}
    # What was released is available again, and the settled spend counts against the limit.
    await ledger.reserve(budgets, 880, NOW)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve(budgets, 1, NOW)


async def test_settlements_of_one_row_in_one_batch_add_up(engine: AsyncEngine, direct: DirectStatements,
        ledger: BudgetLedgerStore) -> None:
    budgets = [month("team:a", 10_000)]
    held = [await ledger.reserve(budgets, 1000, NOW) for _ in range(3)]

    # One flush of the audit writer settles all three.
    await direct.write_batch(settlement_statements([s for r, cost in zip(held, (100, 0, 250), strict=True)
                                                    for s in settlement(r, cost)], direct.postgres))

    assert await ledger_rows(engine) == {("team:a", "month", MONTH): (350, 0)}


async def test_a_store_the_hot_path_cannot_reach_refuses_the_call(engine: AsyncEngine, direct: DirectStatements,
                                                                   ledger: BudgetLedgerStore) -> None:
    budgets = [month("team:a", 10_000)]
    await ledger.reserve(budgets, 1, NOW)  # the row exists now: the next reservation takes the direct path
    await direct.close()

    with pytest.raises(StoreUnavailable):
        await ledger.reserve(budgets, 1, NOW)

    assert await ledger_rows(engine) == {("team:a", "month", MONTH): (0, 1)}


# --- periods ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("window", "period"), [("day", "2026-11-25"), ("month", "2026-11"), ("total", "all")])
def test_period_of_each_window(window: str, period: str) -> None:
    assert period_of(window, NOW) == period


async def test_each_window_charges_its_own_period_row(engine: AsyncEngine, direct: DirectStatements,
        ledger: BudgetLedgerStore) -> None:
    budgets = [Budget("team:a", "day", 1000), Budget("team:a", "month", 1500), Budget("team:a", "total", 10_000)]
    await settle(direct, await ledger.reserve(budgets, 1000, NOW), 1000)

    # The day is spent; the next day has a fresh day row, while month and total carry on.
    with pytest.raises(BudgetExceeded):
        await ledger.reserve(budgets, 1, NOW)
    tomorrow = NOW + timedelta(days=1)
    await settle(direct, await ledger.reserve(budgets, 500, tomorrow), 500)
    # A new month opens fresh day and month rows; total still remembers everything.
    next_month = datetime(2026, 12, 1, tzinfo=UTC)
    await settle(direct, await ledger.reserve(budgets, 1000, next_month), 1000)

    assert await ledger_rows(engine) == {
        ("team:a", "day", "2026-11-25"): (1000, 0),
        ("team:a", "day", "2026-11-26"): (500, 0),
        ("team:a", "day", "2026-12-01"): (1000, 0),
        ("team:a", "month", "2026-11"): (1500, 0),
        ("team:a", "month", "2026-12"): (1000, 0),
        ("team:a", "total", "all"): (2500, 0),
    }


# --- spend --------------------------------------------------------------------------------------


async def test_spend_reports_settled_spend_of_the_current_periods_only(
        engine: AsyncEngine, direct: DirectStatements, ledger: BudgetLedgerStore) -> None:
    budgets = [Budget("team:a", "day", 10_000), month("team:a", 10_000), Budget("org:c", "total", 10_000)]
    await settle(direct, await ledger.reserve(budgets, 900, NOW), 250)
    await ledger.reserve(budgets, 400, NOW)  # reserved, not spent: not reported
    await settle(direct, await ledger.reserve([month("team:a", 10_000)], 10, NOW - timedelta(days=31)), 10)

    spend = await ledger.spend(["team:a", "org:c", "team:unknown"], NOW)

    assert spend == {"team:a": {"day": 250, "day_reserved": 400, "month": 250, "month_reserved": 400},
                     "org:c": {"total": 250, "total_reserved": 400}}
    assert await ledger.spend(["team:a"], NOW + timedelta(days=1)) == {"team:a": {"month": 250, "month_reserved": 400}}


async def test_spend_is_cached_for_its_ttl(engine: AsyncEngine, direct: DirectStatements) -> None:
    cached = BudgetLedgerStore(engine, direct, 3600)
    fresh = BudgetLedgerStore(engine, direct, 0)
    budgets = [month("team:a", 10_000)]
    await settle(direct, await fresh.reserve(budgets, 100, NOW), 100)
    assert await cached.spend(["team:a"], NOW) == {"team:a": {"month": 100}}

    await settle(direct, await fresh.reserve(budgets, 100, NOW), 100)

    assert await cached.spend(["team:a"], NOW) == {"team:a": {"month": 100}}  # within its TTL: the cached value
    assert await fresh.spend(["team:a"], NOW) == {"team:a": {"month": 200}}  # TTL 0: read every time
    assert await cached.spend(["team:a", "org:c"], NOW) == {"team:a": {"month": 200}}  # other scopes: own entry


# --- concurrency --------------------------------------------------------------------------------


async def _reserve_outcomes(stores: list[BudgetLedgerStore], budgets: list[Budget], amount: int,
                            tasks: int) -> list[Reservation | None]:
    """Reserve ``amount`` from ``tasks`` concurrent tasks spread over ``stores``: the reservation
    where it was granted, None where the budget refused it."""
    results = await asyncio.gather(
        *(stores[i % len(stores)].reserve(budgets, amount, NOW) for i in range(tasks)), return_exceptions=True)
    unexpected = [r for r in results if isinstance(r, BaseException) and not isinstance(r, BudgetExceeded)]
    assert not unexpected, f"reservations failed for another reason than the budget: {unexpected!r}"
    return [None if isinstance(r, BaseException) else r for r in results]


async def test_concurrent_reservations_never_overspend(engine: AsyncEngine, ledger: BudgetLedgerStore) -> None:
    # Exactly 7 reservations of 1000 fit in the team budget; the org budget could take them all.
    budgets = [month("team:a", 7_999), month("org:c", 1_000_000)]

    granted = await _reserve_outcomes([ledger], budgets, 1000, 50)

    assert sum(r is not None for r in granted) == 7
    assert await ledger_rows(engine) == {("team:a", "month", MONTH): (0, 7000), ("org:c", "month", MONTH): (0, 7000)}


async def test_two_replicas_sharing_the_store_never_overspend(store_url: str) -> None:
    engines = [create_store_engine(store_url), create_store_engine(store_url)]
    await create_tables(engines[0])
    directs = [await DirectStatements.open(store_url) for _ in engines]
    try:
        replicas = [BudgetLedgerStore(e, d, 0) for e, d in zip(engines, directs, strict=True)]
        budgets = [month("team:a", 12_500), month("org:c", 1_000_000)]

        outcomes = await _reserve_outcomes(replicas, budgets, 1000, 50)
        granted = [r for r in outcomes if r is not None]

        assert len(granted) == 12
        assert await ledger_rows(engines[0]) == {
            ("team:a", "month", MONTH): (0, 12_000), ("org:c", "month", MONTH): (0, 12_000)}
        # Settling everything from both replicas at once leaves no reservation behind.
        await asyncio.gather(*(settle(directs[i % 2], reservation, 300) for i, reservation in enumerate(granted)))
        assert await ledger_rows(engines[1]) == {
            ("team:a", "month", MONTH): (3600, 0), ("org:c", "month", MONTH): (3600, 0)}
    finally:
        for d in directs:
            await d.close()
        for e in engines:
            await e.dispose()


async def test_concurrent_reservations_naming_budgets_in_different_orders_all_succeed(
        engine: AsyncEngine, ledger: BudgetLedgerStore) -> None:
    # A policy may list the same budgets in different orders for different calls (say, [user, team]
    # in one rule and [team, user] in another). Reservations must not deadlock on each other's row
    # locks: on PostgreSQL a deadlock aborts a transaction, and the caller gets a 503 for a call
    # its budgets could cover.
    team, user = month("team:a", 10**9), month("user:b", 10**9)
    await ledger.reserve([team, user], 1, NOW)  # both rows exist, so only the UPDATEs take locks

    results = await asyncio.gather(*(ledger.reserve([team, user] if i % 2 else [user, team], 1, NOW)
                                     for i in range(8)), return_exceptions=True)

    failures = [r for r in results if isinstance(r, BaseException)]
    causes = [repr(f.__cause__ or f) for f in failures]
    assert not failures, f"{len(failures)} of 8 reservations failed, first because of {causes[:1]}"
    assert await ledger_rows(engine) == {("team:a", "month", MONTH): (0, 9), ("user:b", "month", MONTH): (0, 9)}


# --- end to end ---------------------------------------------------------------------------------

# mock-smart's prices; "broken" is an OpenAI-compatible model on a loopback port nobody listens on.
SMART = CatalogModel(**DEFAULT_MODELS[1])
LIMIT_MICRO_USD = 1150  # a little more than one worst-case call (below) plus a few actual ones
BODY: dict[str, Any] = {"model": "mock-smart", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


def _worst_case(body: dict[str, Any]) -> int:
    facts = ChatCompletions(RequestLimits()).describe(body)
    return SMART.cost_micro_usd(facts.input_tokens, facts.output_tokens_max)


def _start_tiny_budget_gateway(store_url: str, tmp_path: Path, **settings: str) -> Gateway:
    policy = write_policy(tmp_path / "policy", {
        "aliases": {}, "fallbacks": {}, "approval_tools": {},
        "teams": {"tiny": {"models": ["mock-smart", "broken"], "monthly_budget_micro_usd": LIMIT_MICRO_USD}},
    })
    broken = {**DEFAULT_MODELS[1], "name": "broken", "provider": "openai", "upstream_model": "gpt-broken",
              "base_url": f"http://127.0.0.1:{free_port()}/v1"}
    return start_gateway(store_url, tmp_path, policy_dir=str(policy), models=json.dumps([*DEFAULT_MODELS, broken]),
                         upstream_retries="0", spend_cache_ttl_s="0", **settings)


async def _team_row(url: str) -> tuple[int, int]:
    engine = create_store_engine(url)
    try:
        return (await ledger_rows(engine)).get(("team:tiny", "month", datetime.now(UTC).strftime("%Y-%m")), (0, 0))
    finally:
        await engine.dispose()


def team_row(gateway: Gateway) -> tuple[int, int]:
    """(spent, reserved) of team tiny's ledger row for this month, read with SQL."""
    return tuple(run(_team_row(gateway.store_url)))  # type: ignore[return-value]


def decision(gateway: Gateway, headers: Mapping[str, str]) -> dict[str, Any]:
    decisions, _ = gateway.trace(headers["lockgate-trace-id"])
    [record] = decisions
    return record


def test_calls_are_refused_with_429_once_the_team_budget_is_spent(store_url: str, tmp_path: Path) -> None:
    server = _start_tiny_budget_gateway(store_url, tmp_path)
    try:
        client = openai.OpenAI(base_url=server.v1, api_key=server.create_key(team="tiny", user="ana"), max_retries=0)
        worst, limit = _worst_case(BODY), LIMIT_MICRO_USD
        assert worst <= limit < 2 * worst  # so only the actual costs decide how many calls fit

        # A call whose provider fails releases its reservation and costs nothing.
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(**{**BODY, "model": "broken"})
        assert failed.value.status_code == 502
        record = decision(server, failed.value.response.headers)
        assert (record["outcome"], record["cost_micro_usd"]) == ("failed", 0)
        assert team_row(server) == (0, 0)

        costs: list[int] = []
        refused: openai.RateLimitError | None = None
        for _ in range(20):
            try:
                raw = client.chat.completions.with_raw_response.create(**BODY)
            except openai.RateLimitError as exc:
                refused = exc
                break
            record = decision(server, raw.headers)
            assert record["outcome"] == "allowed" and record["cost_micro_usd"] > 0
            costs.append(record["cost_micro_usd"])
            assert team_row(server) == (sum(costs), 0)
        assert refused is not None, "the budget was never exhausted"

        assert len(costs) >= 2
        assert sum(costs[:-1]) + worst <= limit < sum(costs) + worst  # each answer was the right one
        assert refused.status_code == 429
        assert refused.body["code"] == "budget_exceeded"  # type: ignore[index]
        assert refused.response.headers["x-should-retry"] == "false"
        record = decision(server, refused.response.headers)
        assert (record["outcome"], record["status_code"], record["cost_micro_usd"]) == ("denied", 429, 0)
        assert record["error_type"] == "budget_exceeded" and record["routed_model"] is None
        # The refusal is stable, and a refused call changes nothing in the ledger.
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(**BODY)
        assert team_row(server) == (sum(costs), 0)
        allowed = [d for d in server.decisions() if d["outcome"] == "allowed"]
        assert sum(d["cost_micro_usd"] for d in allowed) == sum(costs)
    finally:
        stop_gateway(server)


def test_a_stream_the_client_abandons_releases_its_reservation(store_url: str, tmp_path: Path) -> None:
    server = _start_tiny_budget_gateway(store_url, tmp_path, mock_stream_delay_s="0.2")
    try:
        key = server.create_key(team="tiny", user="ana")
        body = {**BODY, "stream": True, "messages": [{"role": "user", "content": "one two three four five six"}]}
        with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status_code == 200
            next(response.iter_raw())  # the first event, then hang up while the mock is still "typing"
            headers = response.headers
            assert team_row(server)[1] > 0  # held while the stream runs

        deadline = time.monotonic() + 15
        while team_row(server)[1] != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        record = decision(server, headers)
        assert (record["outcome"], record["status_code"]) == ("failed", 499)
        assert team_row(server) == (record["cost_micro_usd"], 0)
    finally:
        stop_gateway(server)


def test_a_stream_abandoned_after_its_answer_began_is_still_charged(store_url: str, tmp_path: Path) -> None:
    # The provider has read the whole prompt and generated words before the client hangs up, and it
    # bills for them; a ledger that records nothing here lets a client spend without limit by never
    # reading a stream to its end (the usage chunk only comes last).
    server = _start_tiny_budget_gateway(store_url, tmp_path, mock_stream_delay_s="0.2")
    try:
        key = server.create_key(team="tiny", user="ana")
        body = {**BODY, "stream": True, "messages": [{"role": "user", "content": "one two three four five six"}]}
        with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as response:
            received = b""
            for chunk in response.iter_raw():
                received += chunk
                if received.count(b'"content":"') >= 3:  # the role chunk and two words
                    break
            headers = response.headers

        deadline = time.monotonic() + 15
        while team_row(server)[1] != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        record = decision(server, headers)
        assert record["status_code"] == 499
        assert record["cost_micro_usd"] > 0, "an abandoned stream was charged nothing"
        assert team_row(server) == (record["cost_micro_usd"], 0)
    finally:
        stop_gateway(server)


async def test_a_known_row_that_disappeared_is_recreated_not_taken_for_a_spent_budget(
        engine: AsyncEngine, ledger: BudgetLedgerStore) -> None:
    budgets = [month("team:a", 10_000)]
    await ledger.reserve(budgets, 100, NOW)  # the store now knows the row and takes the direct path
    async with engine.begin() as connection:
        await connection.execute(BudgetLedger.__table__.delete())  # type: ignore[attr-defined]

    await ledger.reserve(budgets, 100, NOW)

    assert await ledger_rows(engine) == {("team:a", "month", MONTH): (0, 100)}


# --- settlements applied once, leases -----------------------------------------------------------


async def test_a_settlement_written_twice_is_applied_once(engine: AsyncEngine, direct: DirectStatements,
                                                          ledger: BudgetLedgerStore) -> None:
    # The audit writer retries a batch whose commit's acknowledgement was lost: the same
    # settlement reaches the store twice.
    reservation = await ledger.reserve([month("team:a", 10_000)], 1000, NOW, "dec_twice")
    await settle(direct, reservation, 300)
    await settle(direct, reservation, 300)

    assert await ledger_rows(engine) == {("team:a", "month", MONTH): (300, 0)}


async def test_a_reservation_whose_lease_ended_is_released_once_and_a_late_settlement_still_charges(
        engine: AsyncEngine, direct: DirectStatements, ledger: BudgetLedgerStore) -> None:
    lost = await ledger.reserve([month("team:a", 10_000), month("org:c", 50_000)], 1000, NOW, "dec_lost", 60)
    running = await ledger.reserve([month("team:a", 10_000)], 2000, NOW, "dec_running", 600)

    assert await ledger.release_expired(NOW + timedelta(seconds=30)) == []  # no lease has ended yet
    [released] = await ledger.release_expired(NOW + timedelta(seconds=61))
    assert (released.id, released.amount_micro_usd) == ("dec_lost", 1000)
    assert await ledger_rows(engine) == {("team:a", "month", MONTH): (0, 2000), ("org:c", "month", MONTH): (0, 0)}
    assert await ledger.release_expired(NOW + timedelta(seconds=62)) == []  # released once

    # The call was not dead after all (its settlement was only late): its cost is still spent,
    # and the reservation is not released a second time.
    await settle(direct, lost, 400)
    await settle(direct, running, 500)
    assert await ledger_rows(engine) == {("team:a", "month", MONTH): (900, 0), ("org:c", "month", MONTH): (400, 0)}


async def test_a_release_racing_a_settlement_takes_the_reservation_off_once(store_url: str) -> None:
    engines = [create_store_engine(store_url), create_store_engine(store_url)]
    await create_tables(engines[0])
    directs = [await DirectStatements.open(store_url) for _ in engines]
    try:
        ledgers = [BudgetLedgerStore(e, d, 0) for e, d in zip(engines, directs, strict=True)]
        held = [await ledgers[0].reserve([month("team:a", 1_000_000)], 1000, NOW, f"dec_{i}", 1) for i in range(20)]
        later = NOW + timedelta(seconds=5)
        await asyncio.gather(ledgers[1].release_expired(later),
                             *(settle(directs[i % 2], r, 100) for i, r in enumerate(held)))
        await ledgers[0].release_expired(later)
        assert await ledger_rows(engines[0]) == {("team:a", "month", MONTH): (2000, 0)}
    finally:
        for d in directs:
            await d.close()
        for e in engines:
            await e.dispose()
