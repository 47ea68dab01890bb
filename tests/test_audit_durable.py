"""Records are durable before the answer ends (gateway/audit/journal.py): a gateway killed with
SIGKILL right after answering loses none of the records of the calls it answered, whole or
streamed; the next process writes them, and the ledger still equals the audit."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from tests.conftest import start_gateway, stop_gateway


def test_a_gateway_killed_right_after_answering_loses_no_record(store_url: str, tmp_path: Path) -> None:
    # The writer would wait a minute before writing: only the journal can keep these records.
    first = start_gateway(store_url, tmp_path, audit_flush_interval_s="60", audit_batch_size="100000")
    key = first.create_key(team="research")
    sdk = openai.OpenAI(base_url=first.v1, api_key=key, max_retries=0)

    def whole(i: int) -> str:
        return first_header(sdk.chat.completions.with_raw_response.create(
            model="fast", messages=[{"role": "user", "content": f"call {i}"}]).headers)

    def streamed(i: int) -> str:
        raw = sdk.chat.completions.with_raw_response.create(
            model="fast", messages=[{"role": "user", "content": f"stream {i}"}], stream=True)
        for _ in raw.parse():
            pass
        return first_header(raw.headers)

    with ThreadPoolExecutor(8) as pool:
        answered = set(pool.map(whole, range(150))) | set(pool.map(streamed, range(50)))
    assert len(answered) == 200
    assert first.decisions(limit=1000) == []  # none written yet
    first.process.kill()  # SIGKILL: no shutdown, no flush
    first.process.wait()

    second = start_gateway(store_url, tmp_path)
    try:
        deadline = time.monotonic() + 10
        while len(records := second.decisions(limit=1000)) < 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert {r["id"] for r in records} == answered
        assert all(r["outcome"] == "allowed" and r["cost_micro_usd"] > 0 for r in records)
    finally:
        stop_gateway(second)


def first_header(headers: object) -> str:
    return str(headers["lockgate-decision-id"])  # type: ignore[index]
