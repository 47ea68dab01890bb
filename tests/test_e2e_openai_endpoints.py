"""End to end: the official openai SDK against a real gateway on a loopback port, through the
openai adapter to the fake OpenAI: the Responses API (plain, streamed, stored responses read and
deleted), embeddings, and the models list. Each call's decision record is read back."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import Gateway, start_gateway, stop_gateway, write_policy
from tests.fakes.openai_upstream import FakeOpenAI, Reply, reply, tool_reply

PROVIDER_KEY = "sk-fake-openai-endpoints-0123456789"
GPT_UP, EMBED_UP = "gpt-fake-4o", "text-embedding-fake-3"
GPT_PRICES, EMBED_PRICES = (2.5, 10.0), (130.0, 0.0)
TOOL = {"type": "function", "name": "search_web", "description": "Search the web",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI.running() as fake:
        yield fake


POLICY_DATA: dict[str, Any] = {
    "aliases": {"gpt": "gpt-main", "vectors": "embed", "premium": "gpt-premium"}, "fallbacks": {},
    "approval_tools": {},
    "teams": {"research": {"models": ["gpt-main", "embed"], "monthly_budget_micro_usd": 100_000_000},
              "support": {"models": ["gpt-main"], "monthly_budget_micro_usd": 100_000_000}},
}


@pytest.fixture
def lockgate(store_url: str, tmp_path: Path, upstream: FakeOpenAI,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    monkeypatch.setenv("FAKE_OPENAI_KEY", PROVIDER_KEY)  # start_gateway copies os.environ
    common = {"provider": "openai", "base_url": upstream.url, "api_key_env": "FAKE_OPENAI_KEY"}
    models = [
        {"name": "gpt-main", **common, "upstream_model": GPT_UP,
         "input_usd_per_mtok": GPT_PRICES[0], "output_usd_per_mtok": GPT_PRICES[1]},
        {"name": "gpt-premium", **common, "upstream_model": "gpt-fake-premium"},
        {"name": "embed", **common, "upstream_model": EMBED_UP,
         "input_usd_per_mtok": EMBED_PRICES[0], "output_usd_per_mtok": EMBED_PRICES[1]},
    ]
    server = start_gateway(store_url, tmp_path, models=json.dumps(models), upstream_retries="0",
                           policy_dir=str(write_policy(tmp_path / "policy", POLICY_DATA)))
    yield server
    stop_gateway(server)


def sdk(gateway: Gateway, team: str = "research", user: str = "ana") -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=gateway.create_key(team=team, user=user), max_retries=0,
                         timeout=30)


def record_of(gateway: Gateway, headers: Any, spans: int = 1) -> dict[str, Any]:
    """The one decision record of a call, found by its lockgate-trace-id header."""
    decisions, _ = gateway.trace(headers["lockgate-trace-id"], spans=spans)
    assert len(decisions) == 1, decisions
    assert decisions[0]["id"] == headers["lockgate-decision-id"]
    return decisions[0]


def cost(prices: tuple[float, float], input_tokens: int, output_tokens: int) -> int:
    return round(input_tokens * prices[0] + output_tokens * prices[1])


# --- the Responses API ---------------------------------------------------------------------------------------


def test_responses_create_reaches_the_provider_and_is_recorded(lockgate: Gateway, upstream: FakeOpenAI) -> None:
    client = sdk(lockgate)
    upstream.script(reply("Hello, Ana.", prompt_tokens=31, completion_tokens=4))

    raw = client.responses.with_raw_response.create(
        model="gpt", instructions="Be brief.", max_output_tokens=300, metadata={"ticket": "T-1"},
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}])
    response = raw.parse()

    assert response.output_text == "Hello, Ana."
    assert (response.status, response.model) == ("completed", GPT_UP)
    assert response.usage is not None and (response.usage.input_tokens, response.usage.output_tokens) == (31, 4)
    [sent] = upstream.requests
    assert (sent.method, sent.path) == ("POST", "/v1/responses")
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert sent.body["model"] == GPT_UP and sent.body["max_output_tokens"] == 300
    assert sent.body["instructions"] == "Be brief." and "stream" not in sent.body
    record = record_of(lockgate, raw.headers, spans=3)
    assert (record["endpoint"], record["outcome"], record["status_code"]) == ("responses", "allowed", 200)
    assert (record["requested_model"], record["routed_model"], record["provider"]) == ("gpt", "gpt-main", "openai")
    assert (record["input_tokens"], record["output_tokens"]) == (31, 4)
    assert record["cost_micro_usd"] == cost(GPT_PRICES, 31, 4) > 0
    assert record["policy_input"]["request"]["metadata"] == {"ticket": "T-1"}
    assert record["policy_input"]["request"]["max_tokens"] == 300
    leaked = json.dumps(record, default=str) + lockgate.log.read_text()
    assert PROVIDER_KEY not in leaked and client.api_key not in leaked


def test_responses_stream_relays_every_event_and_charges_the_completed_usage(
        lockgate: Gateway, upstream: FakeOpenAI) -> None:
    upstream.script(reply("one two three four", prompt_tokens=12, completion_tokens=4, split=11))

    raw = sdk(lockgate).responses.with_raw_response.create(model="gpt-main", input="Count to four.", stream=True)
    events = list(raw.parse())

    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))  # none lost, none added
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "one two three four"
    completed = events[-1]
    assert completed.type == "response.completed" and completed.response.usage is not None
    assert (completed.response.usage.input_tokens, completed.response.usage.output_tokens) == (12, 4)
    assert upstream.requests[0].body["stream"] is True
    record = record_of(lockgate, raw.headers, spans=3)
    assert (record["endpoint"], record["stream"], record["outcome"]) == ("responses", True, "allowed")
    assert (record["input_tokens"], record["output_tokens"]) == (12, 4)
    assert record["cost_micro_usd"] == cost(GPT_PRICES, 12, 4)


def test_function_calls_come_back_and_every_tool_kind_reaches_the_policy(
        lockgate: Gateway, upstream: FakeOpenAI) -> None:
    client = sdk(lockgate)
    upstream.script(tool_reply("search_web"), tool_reply("search_web"))
    tools: Any = [TOOL, {"type": "web_search_preview"}, {"type": "custom", "name": "run_sql"},
                  {"type": "mcp", "server_label": "deepwiki", "server_url": "https://mcp.deepwiki.com/mcp"}]

    raw = client.responses.with_raw_response.create(model="gpt", input="Find lockgate.", tools=tools)
    streamed = list(client.responses.create(model="gpt", input="Find lockgate.", tools=[TOOL], stream=True))

    [call] = raw.parse().output
    assert call.type == "function_call" and (call.name, json.loads(call.arguments)) == (
        "search_web", {"query": "search_web 0"})
    added = [e for e in streamed if e.type == "response.output_item.added"]
    assert added[0].item.type == "function_call" and added[0].item.name == "search_web"
    assert upstream.requests[0].body["tools"] == tools
    record = record_of(lockgate, raw.headers)
    assert record["policy_input"]["request"]["tools"] == ["search_web", "web_search_preview", "run_sql", "mcp:deepwiki"]


def test_a_stream_cut_off_by_the_provider_raises_in_the_sdk_and_is_recorded(
        lockgate: Gateway, upstream: FakeOpenAI) -> None:
    upstream.script(reply("one two three four five six", cut_after_events=5))

    raw = sdk(lockgate).responses.with_raw_response.create(model="gpt", input="Count.", stream=True)
    seen = []
    with pytest.raises(openai.APIError) as caught:
        for event in raw.parse():
            seen.append(event.type)

    assert seen[0] == "response.created" and "response.completed" not in seen
    assert caught.value.body is not None and caught.value.body["type"] == "upstream_error"  # type: ignore[index]
    record = record_of(lockgate, raw.headers)
    assert (record["outcome"], record["status_code"]) == ("failed", 502)


def test_a_stored_response_is_read_and_deleted_by_its_key_only(lockgate: Gateway, upstream: FakeOpenAI) -> None:
    owner, other = sdk(lockgate), sdk(lockgate, team="research", user="bo")
    upstream.script(reply("Kept for later."))
    created = owner.responses.create(model="gpt", input="Keep this.")

    raw = owner.responses.with_raw_response.retrieve(created.id)
    with pytest.raises(openai.NotFoundError) as not_theirs:
        other.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(created.id)
    asked_upstream = len(upstream.requests)
    deleted = owner.responses.with_raw_response.delete(created.id)
    with pytest.raises(openai.NotFoundError) as gone:
        owner.responses.retrieve(created.id)

    assert raw.parse().id == created.id and raw.parse().output_text == "Kept for later."
    assert deleted.parse() is None and deleted.http_response.status_code == 200
    assert not_theirs.value.body == gone.value.body == {  # another key's response looks like no response
        "message": f"Response with id '{created.id}' not found.", "type": "invalid_request_error",
        "param": None, "code": "response_not_found"}
    sent = [(r.method, r.path) for r in upstream.requests]
    assert sent == [("POST", "/v1/responses"), ("GET", f"/v1/responses/{created.id}"),
                    ("DELETE", f"/v1/responses/{created.id}")]  # the other key never reached the provider
    assert asked_upstream == 2
    assert upstream.requests[1].headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    read = record_of(lockgate, raw.headers)
    assert (read["endpoint"], read["outcome"], read["routed_model"], read["provider"]) == (
        "responses.retrieve", "allowed", "gpt-main", "openai")
    assert (read["input_tokens"], read["output_tokens"], read["cost_micro_usd"]) == (0, 0, 0)
    refused = record_of(lockgate, not_theirs.value.response.headers)
    assert (refused["endpoint"], refused["status_code"], refused["user"]) == ("responses.retrieve", 404, "bo")
    assert record_of(lockgate, deleted.headers)["endpoint"] == "responses.delete"


def test_previous_response_id_must_be_the_callers_own(lockgate: Gateway, upstream: FakeOpenAI) -> None:
    owner, other = sdk(lockgate), sdk(lockgate, user="bo")
    upstream.script(reply("First."), reply("Second."))
    first = owner.responses.create(model="gpt", input="One.")

    second = owner.responses.create(model="gpt", input="Two.", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError) as caught:
        other.responses.create(model="gpt", input="Tell me what they said.", previous_response_id=first.id)

    assert second.output_text == "Second."
    assert upstream.requests[1].body["previous_response_id"] == first.id
    assert len(upstream.requests) == 2
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
    record = record_of(lockgate, caught.value.response.headers)
    assert (record["outcome"], record["status_code"], record["cost_micro_usd"]) == ("failed", 404, 0)


def test_background_responses_are_refused(lockgate: Gateway, upstream: FakeOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(lockgate).responses.create(model="gpt", input="Later.", background=True)

    assert caught.value.body["param"] == "background"  # type: ignore[index]
    assert upstream.requests == []


# --- embeddings ---------------------------------------------------------------------------------------------


def test_embeddings_are_answered_charged_and_recorded(lockgate: Gateway, upstream: FakeOpenAI) -> None:
    upstream.script(Reply(prompt_tokens=1200), Reply(prompt_tokens=3))
    client = sdk(lockgate)

    raw = client.embeddings.with_raw_response.create(model="vectors", input=["first text", "second text"],
                                                     dimensions=6)
    result = raw.parse()
    as_floats = client.embeddings.create(model="embed", input=[[1, 2, 3]], encoding_format="float")

    assert [len(d.embedding) for d in result.data] == [6, 6]  # the SDK asked for base64 and decoded it
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (1200, 1200)
    sent = upstream.requests[0]
    assert (sent.path, sent.body["model"], sent.body["encoding_format"]) == ("/v1/embeddings", EMBED_UP, "base64")
    assert sent.body["input"] == ["first text", "second text"] and sent.body["dimensions"] == 6
    vector = base64.b64decode(json.loads(upstream.replies[0])["data"][0]["embedding"])
    assert list(struct.unpack("<6f", vector)) == pytest.approx(result.data[0].embedding)
    assert len(as_floats.data[0].embedding) == 8 and upstream.requests[1].body["input"] == [[1, 2, 3]]
    record = record_of(lockgate, raw.headers, spans=3)
    assert (record["endpoint"], record["outcome"], record["stream"]) == ("embeddings", "allowed", False)
    assert (record["requested_model"], record["routed_model"]) == ("vectors", "embed")
    assert (record["input_tokens"], record["output_tokens"]) == (1200, 0)
    assert record["cost_micro_usd"] == cost(EMBED_PRICES, 1200, 0) > 0


# --- models ---------------------------------------------------------------------------------------------------


def test_models_list_and_retrieve_show_what_the_key_may_use_with_the_policys_aliases(lockgate: Gateway) -> None:
    research, support = sdk(lockgate), sdk(lockgate, team="support", user="cy")

    listed = {m.id: m.owned_by for m in research.models.list()}
    support_listed = {m.id for m in support.models.list()}
    model = research.models.retrieve("gpt")
    with pytest.raises(openai.NotFoundError) as not_allowed:
        support.models.retrieve("embed")
    with pytest.raises(openai.NotFoundError) as unknown:
        research.models.retrieve("no-such-model")

    # "premium" is an alias, but of a model the team may not use.
    assert listed == {"gpt-main": "openai", "embed": "openai", "gpt": "openai", "vectors": "openai"}
    assert support_listed == {"gpt-main", "gpt"}
    assert (model.id, model.object, model.owned_by) == ("gpt", "model", "openai")
    for caught in (not_allowed, unknown):
        assert caught.value.status_code == 404
        assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
        assert set(caught.value.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]


# --- the async client -------------------------------------------------------------------------------------------


def test_the_async_client_streams_a_response_and_embeds(lockgate: Gateway, upstream: FakeOpenAI) -> None:
    upstream.script(reply("async works", prompt_tokens=5, completion_tokens=2), Reply(prompt_tokens=2))
    key = lockgate.create_key(team="research")

    async def main() -> tuple[str, int, Any]:
        async with openai.AsyncOpenAI(base_url=lockgate.v1, api_key=key, max_retries=0, timeout=30) as client:
            raw = await client.responses.with_raw_response.create(model="gpt", input="Hi.", stream=True)
            events = raw.parse()  # with_raw_response parses without waiting: the stream is read below
            text = "".join([e.delta async for e in events if e.type == "response.output_text.delta"])
            embedded = await client.embeddings.create(model="embed", input="hello")
            return text, embedded.usage.prompt_tokens, raw.headers

    text, tokens, headers = asyncio.run(main())

    assert (text, tokens) == ("async works", 2)
    record = record_of(lockgate, headers)
    assert (record["endpoint"], record["stream"], record["output_tokens"]) == ("responses", True, 2)
