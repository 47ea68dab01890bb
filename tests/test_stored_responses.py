"""Stored responses (gateway/stored_responses.py): who made each one is written with the call's
record, found at once (a lookup of an id still queued flushes the audit writer), and only for its key; a
reply the response policy withheld is not kept. In process, on the mock provider."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway.settings import load_settings
from gateway.store import StoredResponse
from tests.conftest import InProcessGateway, in_process, write_policy

REVIEW = """package lockgate

import rego.v1

response_decision := {"allow": false, "reasons": ["the model may not call delete_repo"]} if {
\t"delete_repo" in input.response.tool_calls
}

response_decision := {"allow": true} if { not "delete_repo" in input.response.tool_calls }
"""


@pytest.fixture
def gateway(store_url: str, tmp_path: Path) -> Iterator[InProcessGateway]:
    """Default policy plus a response review; the audit writer never flushes on its own."""
    policy = write_policy(tmp_path / "policy", review=REVIEW)
    settings = load_settings(environ={"LOCKGATE_DATABASE_URL": store_url, "LOCKGATE_POLICY_DIR": str(policy),
                                      "LOCKGATE_AUDIT_FLUSH_INTERVAL_S": "3600"})
    with in_process(settings) as gateway:
        yield gateway


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def stored(gateway: InProcessGateway) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        async with gateway.runtime.engine.connect() as connection:
            return [dict(r._mapping) for r in (await connection.execute(select(StoredResponse)))]

    return list(gateway.call(read))


def test_a_response_is_found_at_once_though_the_writer_has_not_flushed(gateway: InProcessGateway) -> None:
    key = gateway.create_key()
    created = gateway.client.post("/v1/responses", headers=auth(key), json={"model": "fast", "input": "hi"}).json()
    streamed = gateway.client.post("/v1/responses", headers=auth(key),
                                   json={"model": "fast", "input": "hi", "stream": True})
    streamed_id = streamed.text.split('"id":"', 1)[1].split('"', 1)[0]

    assert stored(gateway) == []  # still queued in the audit writer
    read = gateway.client.get(f"/v1/responses/{created['id']}", headers=auth(key))
    read_streamed = gateway.client.get(f"/v1/responses/{streamed_id}", headers=auth(key))

    assert read.status_code == read_streamed.status_code == 200
    assert read.json()["output"] == created["output"]
    rows = {row["id"]: row for row in stored(gateway)}
    assert set(rows) == {created["id"], streamed_id}
    [key_id] = {row["key_id"] for row in rows.values()}
    assert key_id.startswith("k_") and {row["model"] for row in rows.values()} == {"mock-fast"}
    assert {row["deployment"] for row in rows.values()} == {"mock:-:mock-fast"}  # Deployment.label, no key


def test_an_unknown_id_does_not_make_the_writer_flush(gateway: InProcessGateway) -> None:
    """Only an id whose row is queued flushes the audit writer; a client asking for ids that do not
    exist (or are not its own) cannot turn each request into a store transaction."""
    key, other = gateway.create_key(), gateway.create_key(user="bo")
    created = gateway.client.post("/v1/responses", headers=auth(key), json={"model": "fast", "input": "hi"}).json()

    misses = [gateway.client.get(f"/v1/responses/resp_unknown_{n}", headers=auth(other)) for n in range(3)]
    continued = gateway.client.post("/v1/responses", headers=auth(other),
                                    json={"model": "fast", "input": "hi", "previous_response_id": "resp_unknown"})

    assert [m.status_code for m in misses] == [404, 404, 404] and continued.status_code == 404
    assert stored(gateway) == []  # nothing was written: the writer still holds every row
    assert gateway.client.get(f"/v1/responses/{created['id']}", headers=auth(other)).status_code == 404
    assert [row["id"] for row in stored(gateway)] == [created["id"]]  # a queued id flushes, then is looked up
    assert gateway.client.get(f"/v1/responses/{created['id']}", headers=auth(key)).status_code == 200


@pytest.mark.parametrize("query", ["stream=true", "stream=True", "stream=1", "stream=true&stream=false",
                                   "stream=false&stream=yes"])
def test_any_stream_but_false_is_refused(gateway: InProcessGateway, query: str) -> None:
    key = gateway.create_key()
    created = gateway.client.post("/v1/responses", headers=auth(key), json={"model": "fast", "input": "hi"}).json()

    refused = gateway.client.get(f"/v1/responses/{created['id']}?{query}", headers=auth(key))
    plain = gateway.client.get(f"/v1/responses/{created['id']}?stream=false", headers=auth(key))

    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"
    assert plain.status_code == 200 and plain.json()["id"] == created["id"]


def test_an_id_the_provider_hands_out_again_belongs_to_its_newest_maker(gateway: InProcessGateway) -> None:
    """A provider that reuses an id (a local server restarted) holds the newer response under it:
    the older owner must not read it, the newer one must."""
    first, second = gateway.create_key(), gateway.create_key(user="bo")
    reused = gateway.client.post("/v1/responses", headers=auth(first), json={"model": "fast", "input": "a"}).json()
    gateway.client.post("/v1/responses", headers=auth(second), json={"model": "fast", "input": "b"})
    gateway.call(gateway.runtime.audit.flush)
    owners = {row["id"]: row["key_id"] for row in stored(gateway)}
    second_key = next(key_id for key_id in owners.values() if key_id != owners[reused["id"]])
    deployment = gateway.runtime.router.catalog["mock-fast"].deployments[0]

    gateway.call(gateway.runtime.pipeline.responses.keep, reused["id"], second_key, "mock-fast", deployment,
                 datetime.now(UTC))
    gateway.call(gateway.runtime.audit.flush)

    assert {row["id"]: row["key_id"] for row in stored(gateway)}[reused["id"]] == second_key
    assert gateway.client.get(f"/v1/responses/{reused['id']}", headers=auth(first)).status_code == 404
    assert gateway.client.get(f"/v1/responses/{reused['id']}", headers=auth(second)).status_code == 200


def test_a_withheld_reply_is_not_kept(gateway: InProcessGateway) -> None:
    key = gateway.create_key()
    tool = {"type": "function", "name": "delete_repo", "parameters": {"type": "object", "properties": {}}}

    refused = gateway.client.post("/v1/responses", headers=auth(key),
                                  json={"model": "fast", "input": "go", "tools": [tool]})
    streamed = gateway.client.post("/v1/responses", headers=auth(key),
                                   json={"model": "fast", "input": "go", "tools": [tool], "stream": True})

    assert refused.status_code == 403 and refused.json()["error"]["code"] == "policy_denied"
    events = [e for e in streamed.text.split("\n\n") if e]
    assert events[-1].startswith("event: error\n") and "policy_denied" in events[-1]
    assert not any('"function_call"' in e for e in events[:-1])  # the call was held back, then refused
    gateway.call(gateway.runtime.audit.flush)
    assert stored(gateway) == []


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH"])
def test_another_method_is_a_405_in_openais_shape_with_a_record(gateway: InProcessGateway, method: str) -> None:
    key = gateway.create_key()

    response = gateway.client.request(method, "/v1/responses/resp_1", headers=auth(key))

    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    [record] = [r for r in gateway.decisions() if r["id"] == response.headers["lockgate-decision-id"]]
    assert (record["endpoint"], record["status_code"], record["outcome"]) == ("responses.retrieve", 405, "failed")


def test_without_a_key_it_is_a_401_and_an_unknown_id_a_404(gateway: InProcessGateway) -> None:
    key = gateway.create_key()

    anonymous = gateway.client.get("/v1/responses/resp_1")
    unknown = gateway.client.delete("/v1/responses/resp_unknown", headers=auth(key))
    streaming = gateway.client.get("/v1/responses/resp_1?stream=true", headers=auth(key))
    created = gateway.client.post("/v1/responses", headers=auth(key), json={"model": "fast", "input": "hi"}).json()
    resumed = gateway.client.get(f"/v1/responses/{created['id']}?stream=true", headers=auth(key))

    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "response_not_found"
    assert streaming.status_code == 404  # not the caller's, so not even the query is looked at
    assert resumed.status_code == 400 and resumed.json()["error"]["param"] == "stream"
    records = {r["id"]: r for r in gateway.decisions()}
    assert records[anonymous.headers["lockgate-decision-id"]]["outcome"] == "denied"
    assert records[unknown.headers["lockgate-decision-id"]]["endpoint"] == "responses.delete"
