"""The Responses endpoint spec (what it reads from a request, a reply and a stream, and its error
event), and the offline mock answering the Responses API through a real gateway."""

from __future__ import annotations

import json
from typing import Any

import openai
import orjson
import pytest

from adapters.mock_openai import MockResponse
from gateway.endpoints.checks import RequestLimits
from gateway.endpoints.responses import Responses, ResponsesStreamReader
from gateway.errors import InvalidRequest, UpstreamError, UpstreamUnavailable
from gateway.sse import event_data, event_name
from gateway.types import CatalogModel, Deployment, UpstreamCall
from tests.conftest import Gateway
from tests.fakes.openai_responses import ResponseAnswer
from tests.fakes.openai_upstream import reply, tool_reply

SPEC = Responses(RequestLimits(max_output_tokens=1000, default_output_tokens=500))
TOOL = {"type": "function", "name": "search_web", "parameters": {"type": "object", "properties": {}}}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "fast", "input": "hello", **fields}


# --- describe --------------------------------------------------------------------------------------------------


def test_every_kind_of_tool_has_a_policy_visible_name() -> None:
    tools = [
        TOOL, {"type": "custom", "name": "run_sql"},
        {"type": "namespace", "name": "crm", "description": "CRM", "tools": [
            {"type": "function", "name": "find_customer"}, {"type": "custom", "name": "transfer_funds"}]},
        {"type": "mcp", "server_label": "deepwiki", "server_url": "https://mcp.deepwiki.com/mcp"},
        {"type": "web_search"}, {"type": "web_search_preview"}, {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "code_interpreter", "container": {"type": "auto"}}, {"type": "image_generation"},
        {"type": "computer_use_preview", "display_width": 1024, "display_height": 768, "environment": "browser"},
        {"type": "local_shell"}, {"type": "search_web_2030"},  # a tool type the API adds later: named by its type
    ]
    facts = SPEC.describe(body(tools=tools, tool_choice={"type": "mcp", "server_label": "github"}))

    assert facts.tools == ("search_web", "run_sql", "find_customer", "transfer_funds", "mcp:deepwiki", "web_search",
                           "web_search_preview", "file_search", "code_interpreter", "image_generation",
                           "computer_use_preview", "local_shell", "search_web_2030", "mcp:github")
    assert SPEC.describe(body(tool_choice={"type": "function", "name": "other"})).tools == ("other",)
    assert SPEC.describe(body(tool_choice={"type": "file_search"})).tools == ("file_search",)
    assert SPEC.describe(body(tools=[TOOL], tool_choice={"type": "allowed_tools", "mode": "auto",
                                                         "tools": [{"type": "function", "name": "x"}]})).tools == (
        "search_web",)


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function", "parameters": {}}]}, "tools[0].name"),
    ({"tools": [{"type": "function", "function": {"name": "chat_style"}}]}, "tools[0].name"),
    ({"tools": [TOOL, {"name": "no_type"}]}, "tools[1].type"),
    ({"tools": [{"type": "mcp", "server_url": "https://x"}]}, "tools[0].server_label"),
    ({"tools": [{"type": "namespace", "name": "crm", "tools": [{"type": "mcp"}]}]}, "tools[0].tools[0]"),
    ({"tools": [{"type": "namespace", "name": "crm", "tools": {}}]}, "tools[0].tools"),
    ({"tool_choice": {"type": "function"}}, "tool_choice.name"),
    ({"tool_choice": {"type": 5}}, "tool_choice.type"),
    ({"tool_choice": "always"}, "tool_choice"),
    ({"instructions": ["be", "brief"]}, "instructions"),
    ({"input": [{"content": "no role, no type"}]}, "input[0]"),
    ({"input": [{"role": 1, "content": "hi"}]}, "input[0].role"),
    ({"input": [{"type": "message", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]}, "input[0].output"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": None}]}]}, "input[0].content[0].text"),
    ({"max_output_tokens": 1001}, "max_output_tokens"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"background": True}, "background"),
    ({"background": "no"}, "background"),
    ({"conversation": "conv_123"}, "conversation"),
    ({"previous_response_id": 5}, "previous_response_id"),
    ({"previous_response_id": ""}, "previous_response_id"),
    ({"metadata": {"a": 1}}, "metadata"),
    ({"reasoning": "high"}, "reasoning"),
    ({"store": "yes"}, "store"),
])
def test_a_field_the_gateway_reads_is_checked(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        SPEC.describe(body(**fields))
    assert caught.value.param == param and caught.value.status == 400


def test_the_estimate_counts_input_instructions_tools_and_media() -> None:
    items = [
        {"role": "developer", "content": "d" * 40},
        {"role": "user", "content": [{"type": "input_text", "text": "u" * 80},
                                     {"type": "input_image", "image_url": "https://example.com/cat.png"}]},
        {"type": "function_call", "call_id": "c1", "name": "search_web", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "o" * 400},
    ]
    plain = SPEC.describe(body(input="x" * 400))
    full = SPEC.describe(body(input=items, instructions="i" * 200, tools=[TOOL], max_output_tokens=64,
                              previous_response_id="resp_1", metadata={"k": "v"}, stream=True))

    assert (plain.message_count, plain.input_tokens, plain.output_tokens_max) == (1, 134 + 4 + 3, 500)
    assert full.message_count == 4 and full.input_tokens > 2600 + (40 + 80 + 400 + 200) // 3
    assert (full.max_tokens, full.output_tokens_max, full.stream) == (64, 64, True)
    assert (full.previous_response_id, dict(full.metadata), full.endpoint) == ("resp_1", {"k": "v"}, "responses")
    assert SPEC.describe({"model": "fast", "previous_response_id": "resp_1"}).message_count == 0  # input optional


def test_limit_caps_max_output_tokens() -> None:
    assert SPEC.limit(body(max_output_tokens=900), 100)["max_output_tokens"] == 100
    assert SPEC.limit(body(max_output_tokens=50), 100)["max_output_tokens"] == 50
    assert SPEC.limit(body(), 100)["max_output_tokens"] == 100
    assert SPEC.limit(body(), None) == body()


# --- replies and streams ---------------------------------------------------------------------------------------


def test_a_whole_reply_gives_usage_finish_id_and_tool_calls() -> None:
    answer = ResponseAnswer(tool_reply("search_web", "lookup", content="Looking.", prompt_tokens=40,
                                       completion_tokens=9), body(), "resp_abc")
    cut = ResponseAnswer(reply("Part", finish_reason="length"), body(), "resp_def")

    facts = SPEC.read_reply(json.dumps(answer.response()).encode())
    short = SPEC.read_reply(json.dumps(cut.response()).encode())

    assert (facts.usage.input_tokens, facts.usage.output_tokens, facts.usage_reported) == (40, 9, True)
    assert (facts.response_id, facts.response_model, facts.finish_reasons) == ("resp_abc", "fast", ["completed"])
    assert facts.tool_calls == ["search_web", "lookup"]
    assert short.finish_reasons == ["max_output_tokens"]
    for junk in (b"[]", b"not json", b'"text"'):
        with pytest.raises(UpstreamError):
            SPEC.read_reply(junk)
    assert SPEC.read_reply(b'{"id": "resp_1", "output": 5, "usage": {"input_tokens": -3}}').usage.input_tokens == 0


def read_stream(events: list[bytes]) -> tuple[ResponsesStreamReader, list[bytes]]:
    reader = ResponsesStreamReader()
    relayed = [out for event in events if (out := reader.observe(event)) is not None]
    return reader, relayed


def test_the_stream_reader_reads_the_real_event_stream_and_relays_it_untouched() -> None:
    events = ResponseAnswer(tool_reply("search_web", content="one two three", prompt_tokens=15, completion_tokens=6),
                            body(), "resp_s").events()

    reader, relayed = read_stream(events)

    assert relayed == events
    assert reader.terminated and reader.facts.finish_reasons
    facts = reader.facts
    assert (facts.usage.input_tokens, facts.usage.output_tokens) == (15, 6)
    assert (facts.response_id, facts.tool_calls, facts.finish_reasons) == ("resp_s", ["search_web"], ["completed"])
    deltas = [e for e in events if event_name(e).endswith(b".delta")]  # type: ignore[union-attr]
    assert reader.events == len(deltas) > 3


def test_a_stream_without_its_terminating_event_is_not_terminated() -> None:
    events = ResponseAnswer(reply("one two three"), body(), "resp_t").events()

    reader, _ = read_stream(events[:-1])
    unnamed, _ = read_stream([b"data: " + event_data(e) + b"\n\n" for e in events])  # type: ignore[operator]

    assert not reader.terminated and not reader.facts.usage_reported and reader.events == 3
    assert unnamed.terminated and unnamed.events == 3  # events read by their data's type alone
    for kind in ("response.incomplete", "response.failed"):
        ended, _ = read_stream([f'event: {kind}\ndata: {{"type": "{kind}", "response": {{"status": "failed"}}}}\n\n'
                               .encode()])
        assert ended.terminated


def test_every_output_item_that_calls_a_tool_is_shown_to_the_response_policy() -> None:
    """The client's shell, computer and patch calls and the provider's own tool calls are tool
    calls too: named by their tool's type (the item's type without ``_call``); function, custom
    and MCP calls by their name. Read alike from a whole reply and from a stream."""
    items = [{"type": "message", "role": "assistant", "content": []}, {"type": "reasoning", "summary": []},
             {"type": "function_call", "name": "search_web", "arguments": "{}", "call_id": "c1"},
             {"type": "custom_tool_call", "name": "run_sql", "input": "DROP TABLE x", "call_id": "c2"},
             {"type": "mcp_call", "name": "delete_repo", "server_label": "github", "arguments": "{}"},
             {"type": "mcp_list_tools", "server_label": "github", "tools": []},
             {"type": "local_shell_call", "call_id": "c3", "action": {"type": "exec", "command": ["ls"]}},
             {"type": "shell_call", "call_id": "c4"}, {"type": "computer_call", "call_id": "c5"},
             {"type": "apply_patch_call", "call_id": "c6"}, {"type": "web_search_call", "status": "completed"},
             {"type": "code_interpreter_call", "code": "1"}, {"type": "function_call", "call_id": "c7"}, "junk"]
    expected = ["search_web", "run_sql", "delete_repo", "local_shell", "shell", "computer", "apply_patch",
                "web_search", "code_interpreter", ""]

    whole = SPEC.read_reply(orjson.dumps({"id": "resp_1", "status": "completed", "output": items}))
    reader, _ = read_stream([f"event: response.output_item.added\ndata: {orjson.dumps(payload).decode()}\n\n"
                             .encode() for payload in
                             ({"type": "response.output_item.added", "item": item} for item in items)])

    assert whole.tool_calls == reader.facts.tool_calls == expected


def test_an_error_in_a_stream_is_the_responses_error_event_with_the_error_the_sdks_raise_on() -> None:
    event = SPEC.error_event(UpstreamUnavailable("The provider went away."))

    assert event_name(event) == b"error" and event.endswith(b"\n\n")
    data = orjson.loads(event_data(event))  # type: ignore[arg-type]
    assert (data["type"], data["code"], data["message"]) == ("error", "upstream_unavailable", "The provider went away.")
    assert data["error"] == {"type": "upstream_error", "code": "upstream_unavailable",
                             "message": "The provider went away.", "param": None}


# --- the offline mock --------------------------------------------------------------------------------------------


def mock_call(**fields: Any) -> UpstreamCall:
    deployment = Deployment(provider="mock", upstream_model="mock-fast")
    model = CatalogModel(name="mock-fast", provider="mock", upstream_model="mock-fast", deployments=(deployment,))
    return UpstreamCall(endpoint="responses", model=model, deployment=deployment, body=body(**fields), api_key="")


def test_the_mocks_stream_and_whole_reply_agree_and_its_reader_sees_all() -> None:
    call = mock_call(input=[{"role": "user", "content": "one two"}])
    answer = MockResponse(call)

    reader, _ = read_stream(list(answer.events()))
    whole = SPEC.read_reply(orjson.dumps(answer.response(final=True)))

    assert reader.terminated and reader.facts.usage == whole.usage
    assert whole.usage.output_tokens == len("Mock reply from mock-fast: one two".split())
    assert reader.events == whole.usage.output_tokens  # one delta per word


def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=gateway.create_key(), max_retries=0, timeout=30)


def test_the_mock_answers_responses_offline(gateway: Gateway) -> None:
    sdk = client(gateway)

    raw = sdk.responses.with_raw_response.create(model="fast", input="hello there")
    plain = raw.parse()
    events = list(sdk.responses.create(model="fast", input="hello there", stream=True))
    called = sdk.responses.create(model="fast", input="find lockgate", tools=[TOOL])  # type: ignore[list-item]
    answered = sdk.responses.create(model="fast", tools=[TOOL], input=[  # type: ignore[list-item]
        {"role": "user", "content": "find lockgate"},
        {"type": "function_call", "call_id": "c1", "name": "search_web", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "found it"}])
    capped = sdk.responses.create(model="fast", input="one two three four five six", max_output_tokens=3)

    assert plain.output_text == "Mock reply from mock-fast: hello there" and plain.usage is not None
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == plain.output_text and events[-1].type == "response.completed"
    assert events[-1].response.usage == plain.usage
    [call] = called.output
    assert call.type == "function_call" and call.name == "search_web"
    assert json.loads(call.arguments) == {"input": "find lockgate"}
    assert answered.output_text == "Mock reply from mock-fast: tool result found it"
    assert capped.status == "incomplete" and capped.output_text == "Mock reply from"
    assert capped.incomplete_details is not None and capped.incomplete_details.reason == "max_output_tokens"
    [record], _ = gateway.trace(raw.headers["lockgate-trace-id"], spans=3)
    assert (record["endpoint"], record["routed_model"], record["provider"]) == ("responses", "mock-fast", "mock")
    assert (record["input_tokens"], record["output_tokens"]) == (plain.usage.input_tokens, plain.usage.output_tokens)
    assert record["cost_micro_usd"] == round(plain.usage.input_tokens * 0.15 + plain.usage.output_tokens * 0.60)


def test_the_mock_keeps_its_responses_for_reading_and_deleting(gateway: Gateway) -> None:
    sdk = client(gateway)
    created = sdk.responses.create(model="fast", input="remember me")

    read = sdk.responses.retrieve(created.id)
    sdk.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(created.id)

    assert read.output_text == created.output_text == "Mock reply from mock-fast: remember me"
