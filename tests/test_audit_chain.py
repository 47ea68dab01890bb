"""The audit is tamper-evident (gateway/audit/chain.py, docs/audit.md): the store refuses UPDATE
and DELETE on it; an edit, a deleted record or a cut-off tail made anyway (the triggers dropped, as
someone with the database's owner rights could) is named by ``lockgate audit verify``; prune
leaves a chain that still verifies; two processes appending at once keep one chain."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import openai
import pytest
from sqlalchemy import text

from gateway.store import create_store_engine
from tests.conftest import Gateway, _truncate_all, run, start_gateway, stop_gateway

AUDIT_KEY = "audit-key-kept-outside-the-database-0123"


def calls(gateway: Gateway, count: int, key: str | None = None) -> None:
    sdk = openai.OpenAI(base_url=gateway.v1, api_key=key or gateway.create_key(team="research"), max_retries=0)
    for i in range(count):
        sdk.chat.completions.create(model="fast", messages=[{"role": "user", "content": f"call {i}"}])


def sql(store_url: str, *statements: str) -> None:
    """Run statements as the database's owner would, outside the gateway."""
    async def execute() -> None:
        engine = create_store_engine(store_url)
        try:
            async with engine.begin() as connection:
                for statement in statements:
                    await connection.execute(text(statement))
        finally:
            await engine.dispose()

    run(execute())


def lift_triggers(store_url: str) -> list[str]:
    if store_url.startswith("sqlite"):
        return ["DROP TRIGGER decision_records_no_update", "DROP TRIGGER decision_records_no_delete"]
    return ["ALTER TABLE decision_records DISABLE TRIGGER decision_records_append_only"]


@pytest.fixture
def audited(store_url: str, tmp_path: Path) -> Iterator[Gateway]:
    """Ten calls answered and written by a gateway that has stopped (its last flush signed the tip)."""
    gateway = start_gateway(store_url, tmp_path, audit_key=AUDIT_KEY)
    calls(gateway, 10)
    stop_gateway(gateway)
    yield gateway


def verify(gateway: Gateway) -> tuple[int, str]:
    result = gateway.cli("audit", "verify")
    return result.returncode, result.stdout.strip() + result.stderr.strip()


def test_an_untouched_audit_verifies(audited: Gateway) -> None:
    assert verify(audited) == (0, "intact: records 1 to 10 (10 checked)")


def test_the_store_refuses_updates_and_deletes_of_the_audit(audited: Gateway, store_url: str) -> None:
    for statement in ("UPDATE decision_records SET cost_micro_usd = 0", "DELETE FROM decision_records",
                      "DELETE FROM spans", "UPDATE spans SET name = 'x'"):
        with pytest.raises(Exception, match="append-only"):
            sql(store_url, statement)
    assert verify(audited)[0] == 0


def test_an_edited_record_is_named(audited: Gateway, store_url: str) -> None:
    sql(store_url, *lift_triggers(store_url), "UPDATE decision_records SET cost_micro_usd = 1 WHERE seq = 4")
    code, output = verify(audited)
    assert code == 1 and output.startswith("BROKEN at record 4") and "was changed" in output


def test_a_deleted_record_is_named(audited: Gateway, store_url: str) -> None:
    sql(store_url, *lift_triggers(store_url), "DELETE FROM decision_records WHERE seq = 6")
    code, output = verify(audited)
    assert code == 1 and output.startswith("BROKEN at record 7") and "records are missing" in output


def test_a_cut_off_tail_is_named_by_the_signed_checkpoint(audited: Gateway, store_url: str) -> None:
    sql(store_url, *lift_triggers(store_url), "DELETE FROM decision_records WHERE seq > 7")
    code, output = verify(audited)
    assert code == 1 and "reached record 10, but it ends at 7: its tail was cut off" in output


def test_a_checkpoint_signed_with_another_key_is_refused(audited: Gateway) -> None:
    audited.env["LOCKGATE_AUDIT_KEY"] = "not-the-key"
    code, output = verify(audited)
    assert code == 1 and "signature is wrong" in output


def test_prune_keeps_the_rest_verifiable(store_url: str, tmp_path: Path) -> None:
    gateway = start_gateway(store_url, tmp_path, audit_key=AUDIT_KEY)
    key = gateway.create_key(team="research")
    calls(gateway, 5, key)
    time.sleep(1.1)
    cut = datetime.now(UTC).isoformat()
    time.sleep(0.1)
    calls(gateway, 5, key)
    stop_gateway(gateway)

    pruned = gateway.cli("audit", "prune", "--before", cut)
    assert pruned.returncode == 0 and "Pruned 5 records (the chain up to record 5)" in pruned.stdout
    assert verify(gateway) == (0, "intact: records 6 to 10 (5 checked)")
    assert len(gateway.decisions()) == 5


def test_two_processes_appending_at_once_keep_one_chain(postgres_url: str, tmp_path: Path) -> None:
    run(_truncate_all(postgres_url))
    gateways = [start_gateway(postgres_url, tmp_path, audit_key=AUDIT_KEY) for _ in range(2)]
    try:
        key = gateways[0].create_key(team="research")
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: calls(gateways[i % 2], 15, key), range(4)))
    finally:
        for gateway in gateways:
            stop_gateway(gateway)
    assert verify(gateways[0]) == (0, "intact: records 1 to 60 (60 checked)")
