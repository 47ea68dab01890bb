"""End to end, Anthropic's Messages API: the official ``anthropic`` and ``openai`` SDKs against a
real gateway on a loopback port, in front of loopback fakes of Anthropic and OpenAI.

The catalog has ``claude`` (the anthropic adapter -> tests/fakes/anthropic_upstream.py),
``gpt`` (the openai adapter -> tests/fakes/openai_upstream.py), and ``claude-denied``, which the
policy does not let team research use. Every test reads back the decision record of its calls.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import Gateway, start_gateway, stop_gateway, write_policy
from tests.fakes.anthropic_upstream import FakeAnthropic, count, error, message, tool_message
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.openai_upstream import reply as chat_reply
from tests.fakes.openai_upstream import tool_reply as chat_tool_reply

ANTHROPIC_KEY = "sk-ant-fake-provider-key-0123456789"
OPENAI_KEY = "sk-fake-provider-key-anthropic-tests-0123"
CLAUDE_UP, GPT_UP = "claude-fake-sonnet", "gpt-fake-mini"
CLAUDE_PRICES, GPT_PRICES = (3.0, 15.0), (1.0, 2.0)  # USD per million input / output tokens
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]
SCHEMA = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
TOOL: dict[str, Any] = {"name": "search_web", "description": "Search the web.", "input_schema": SCHEMA}
WEB_SEARCH: dict[str, Any] = {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}
CHAT_TOOLS: list[Any] = [{"type": "function", "function": {"name": "search_web", "description": "Search the web.",
                                                           "parameters": SCHEMA}}]



@pytest.fixture
def claude_upstream() -> Iterator[FakeAnthropic]:
    with FakeAnthropic.running() as fake:
        yield fake


@pytest.fixture
def gpt_upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI.running() as fake:
        yield fake


POLICY_DATA: dict[str, Any] = {
    "aliases": {}, "fallbacks": {}, "approval_tools": {},
    "teams": {"research": {"models": ["claude", "gpt"], "monthly_budget_micro_usd": 100_000_000}},
}


def catalog(claude: FakeAnthropic, gpt: FakeOpenAI) -> str:
    on_claude = {"provider": "anthropic", "base_url": claude.url, "api_key_env": "FAKE_ANTHROPIC_KEY",
                 "upstream_model": CLAUDE_UP, "input_usd_per_mtok": CLAUDE_PRICES[0],
                 "output_usd_per_mtok": CLAUDE_PRICES[1]}
    return json.dumps([
        {"name": "claude", **on_claude},
        {"name": "claude-denied", **on_claude},
        {"name": "gpt", "provider": "openai", "base_url": gpt.url, "api_key_env": "FAKE_OPENAI_KEY",
         "upstream_model": GPT_UP, "input_usd_per_mtok": GPT_PRICES[0], "output_usd_per_mtok": GPT_PRICES[1]},
    ])


@pytest.fixture
def lockgate(store_url: str, tmp_path: Path, claude_upstream: FakeAnthropic, gpt_upstream: FakeOpenAI,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    """The gateway in front of both fakes (one retry on the same model, no fallbacks)."""
    monkeypatch.setenv("FAKE_ANTHROPIC_KEY", ANTHROPIC_KEY)  # start_gateway copies os.environ
    monkeypatch.setenv("FAKE_OPENAI_KEY", OPENAI_KEY)
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)  # the SDK must use only what a test gives it
    server = start_gateway(store_url, tmp_path, models=catalog(claude_upstream, gpt_upstream),
                           policy_dir=str(write_policy(tmp_path / "policy", POLICY_DATA)), upstream_retries="1")
    yield server
    stop_gateway(server)


def claude_sdk(gateway: Gateway, key: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.base_url, api_key=key or gateway.create_key(team="research"),
                               max_retries=0, timeout=30)


def openai_sdk(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=gateway.create_key(team="research"), max_retries=0, timeout=30)


def record_of(gateway: Gateway, headers: Any, spans: int = 3) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The one decision record of a call (found by its lockgate-trace-id header) and its spans."""
    decisions, found = gateway.trace(headers["lockgate-trace-id"], spans=spans)
    assert len(decisions) == 1, decisions
    return decisions[0], found


def cost(prices: tuple[float, float], input_tokens: int, output_tokens: int) -> int:
    return round(input_tokens * prices[0] + output_tokens * prices[1])


# --- the anthropic SDK, natively to Anthropic ------------------------------------------------------

def test_messages_create_reaches_anthropic_as_the_upstream_model_with_the_provider_key(
        lockgate: Gateway, claude_upstream: FakeAnthropic) -> None:
    client = claude_sdk(lockgate)
    claude_upstream.script(message("Hello, Ana.", input_tokens=5, cache_creation_input_tokens=20,
                                   cache_read_input_tokens=100, output_tokens=9))

    raw = client.messages.with_raw_response.create(
        model="claude", max_tokens=300, system="Be brief.", messages=MESSAGES, metadata={"user_id": "ana"},
        extra_body={"temperature": 0.2}, extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    reply = raw.parse()

    [sent] = claude_upstream.requests
    assert (sent.method, sent.path) == ("POST", "/v1/messages")
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY and "authorization" not in sent.headers
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["anthropic-beta"] == "prompt-caching-2024-07-31"  # the client's opt-in, passed on
    assert client.api_key not in json.dumps(sent.headers)  # never the caller's Lockgate key
    assert sent.body == {"model": CLAUDE_UP, "max_tokens": 300, "system": "Be brief.", "messages": MESSAGES,
                         "metadata": {"user_id": "ana"}, "temperature": 0.2}
    assert reply.content[0].type == "text" and reply.content[0].text == "Hello, Ana."
    assert (reply.model, reply.stop_reason, reply.usage.cache_read_input_tokens) == (CLAUDE_UP, "end_turn", 100)
    record, found = record_of(lockgate, raw.headers)
    assert (record["endpoint"], record["outcome"], record["status_code"]) == ("messages", "allowed", 200)
    assert (record["requested_model"], record["routed_model"], record["provider"]) == ("claude", "claude", "anthropic")
    assert (record["input_tokens"], record["output_tokens"]) == (125, 9)  # cache writes and reads are input
    assert record["cost_micro_usd"] == cost(CLAUDE_PRICES, 125, 9) > 0
    root = next(s for s in found if s["parent_span_id"] is None)
    assert root["name"] == "chat claude" and root["attributes"]["lockgate.endpoint"] == "messages"
    leaked = json.dumps([record, found], default=str) + lockgate.log.read_text()
    assert ANTHROPIC_KEY not in leaked and client.api_key not in leaked


def test_messages_stream_relays_text_and_the_final_message(lockgate: Gateway, claude_upstream: FakeAnthropic) -> None:
    claude_upstream.script(message("one two three four", input_tokens=21, output_tokens=4, split=7))

    with claude_sdk(lockgate).messages.stream(model="claude", max_tokens=100, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        headers = stream.response.headers

    assert text == "one two three four"
    assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == ("end_turn", 21, 4)
    [sent] = claude_upstream.requests
    assert sent.stream and sent.body["max_tokens"] == 100
    record, _ = record_of(lockgate, headers)
    assert (record["endpoint"], record["stream"], record["outcome"]) == ("messages", True, "allowed")
    assert (record["input_tokens"], record["output_tokens"]) == (21, 4)
    assert record["cost_micro_usd"] == cost(CLAUDE_PRICES, 21, 4)


def test_tools_reach_claude_and_tool_use_comes_back(lockgate: Gateway, claude_upstream: FakeAnthropic) -> None:
    client = claude_sdk(lockgate)
    claude_upstream.script(tool_message("search_web", text="Let me search."), tool_message("search_web"))

    raw = client.messages.with_raw_response.create(model="claude", max_tokens=200, messages=MESSAGES,
                                                   tools=[TOOL, WEB_SEARCH], tool_choice={"type": "auto"})
    reply = raw.parse()
    with client.messages.stream(model="claude", max_tokens=200, messages=MESSAGES, tools=[TOOL]) as stream:
        final = stream.get_final_message()

    assert reply.stop_reason == "tool_use"
    assert [b.type for b in reply.content] == ["text", "tool_use"]
    used = reply.content[1]
    assert used.type == "tool_use" and (used.name, used.input) == ("search_web", {"query": "search_web 0"})
    assert claude_upstream.requests[0].body["tools"] == [TOOL, WEB_SEARCH]
    assert claude_upstream.requests[0].body["tool_choice"] == {"type": "auto"}
    streamed = final.content[0]
    assert streamed.type == "tool_use" and streamed.input == {"query": "search_web 0"}
    record, _ = record_of(lockgate, raw.headers)
    assert record["policy_input"]["request"]["tools"] == ["search_web", "web_search"]
    assert record["policy_input"]["request"]["endpoint"] == "messages"


def test_count_tokens_is_governed_and_charges_nothing(lockgate: Gateway, claude_upstream: FakeAnthropic) -> None:
    claude_upstream.script(count(42))

    raw = claude_sdk(lockgate).messages.with_raw_response.count_tokens(
        model="claude", system="Be brief.", messages=MESSAGES, tools=[TOOL])

    assert raw.parse().input_tokens == 42
    [sent] = claude_upstream.requests
    assert sent.path == "/v1/messages/count_tokens" and sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert sent.body == {"model": CLAUDE_UP, "system": "Be brief.", "messages": MESSAGES, "tools": [TOOL]}
    record, found = record_of(lockgate, raw.headers)
    assert (record["endpoint"], record["outcome"], record["provider"]) == ("messages.count_tokens", "allowed",
                                                                           "anthropic")
    assert (record["input_tokens"], record["output_tokens"], record["cost_micro_usd"]) == (0, 0, 0)
    assert next(s for s in found if s["parent_span_id"] is None)["name"] == "count_tokens claude"


def test_x_api_key_and_bearer_keys_both_work_and_a_bad_key_is_refused_in_anthropics_shape(
        lockgate: Gateway, claude_upstream: FakeAnthropic) -> None:
    key = lockgate.create_key(team="research", user="ana")
    claude_upstream.script(message("by api_key"), message("by auth_token"), message("raw x-api-key"),
                           message("raw bearer"))
    body = {"model": "claude", "max_tokens": 10, "messages": MESSAGES}

    by_header = anthropic.Anthropic(base_url=lockgate.base_url, api_key=key, max_retries=0)
    by_bearer = anthropic.Anthropic(base_url=lockgate.base_url, auth_token=key, max_retries=0)
    first = by_header.messages.with_raw_response.create(model="claude", max_tokens=10, messages=MESSAGES)
    second = by_bearer.messages.with_raw_response.create(model="claude", max_tokens=10, messages=MESSAGES)
    # The same two ways on the wire, each header alone, with the headers Anthropic's SDKs add.
    versions = {"anthropic-version": "2023-06-01", "anthropic-beta": "fine-grained-tool-streaming-2025-05-14"}
    third = httpx.post(lockgate.base_url + "/v1/messages", json=body, timeout=30,
                       headers={"x-api-key": key, **versions})
    fourth = httpx.post(lockgate.base_url + "/v1/messages", json=body, timeout=30,
                        headers={"authorization": f"Bearer {key}", **versions})

    assert [first.parse().content[0].text, second.parse().content[0].text] == ["by api_key", "by auth_token"]
    assert [third.json()["content"][0]["text"], fourth.json()["content"][0]["text"]] == ["raw x-api-key", "raw bearer"]
    for answered in (first, second, third, fourth):
        assert record_of(lockgate, answered.headers)[0]["user"] == "ana"

    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url=lockgate.base_url, api_key="lg-not-a-key", max_retries=0).messages.create(
            model="claude", max_tokens=10, messages=MESSAGES)
    assert caught.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                            "message": "Unknown or revoked API key."}}
    record, _ = record_of(lockgate, caught.value.response.headers, spans=1)
    assert (record["endpoint"], record["outcome"], record["status_code"]) == ("messages", "denied", 401)
    assert len(claude_upstream.requests) == 4


def test_a_model_the_policy_denies_is_a_permission_error_in_anthropics_shape(
        lockgate: Gateway, claude_upstream: FakeAnthropic) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        claude_sdk(lockgate).messages.create(model="claude-denied", max_tokens=10, messages=MESSAGES)

    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "permission_error"
    assert "team research may not use model claude-denied" in body["error"]["message"]
    assert claude_upstream.requests == []
    record, _ = record_of(lockgate, caught.value.response.headers, spans=2)
    assert (record["endpoint"], record["outcome"], record["status_code"]) == ("messages", "denied", 403)
    assert record["cost_micro_usd"] == 0


def test_a_bad_body_is_a_bad_request_in_anthropics_shape(lockgate: Gateway, claude_upstream: FakeAnthropic) -> None:
    client = claude_sdk(lockgate)
    with pytest.raises(anthropic.BadRequestError) as zero:
        client.messages.create(model="claude", max_tokens=0, messages=MESSAGES)
    with pytest.raises(anthropic.BadRequestError) as nameless:
        client.messages.create(model="claude", max_tokens=10, messages=MESSAGES,
                               tools=[{"type": "web_search_20250305"}])  # type: ignore[list-item]
    missing = httpx.post(lockgate.base_url + "/v1/messages", headers={"x-api-key": client.api_key or ""},
                         json={"model": "claude", "messages": MESSAGES}, timeout=30)

    assert zero.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                          "message": "'max_tokens' must be a positive integer."}}
    assert isinstance(nameless.value.body, dict) and "'tools[0].name'" in nameless.value.body["error"]["message"]
    assert missing.status_code == 400 and missing.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "'max_tokens' is required and must be a positive integer."}}
    assert missing.headers["x-should-retry"] == "false"
    assert claude_upstream.requests == []
    record, _ = record_of(lockgate, zero.value.response.headers, spans=1)
    assert (record["endpoint"], record["outcome"], record["status_code"]) == ("messages", "failed", 400)


def test_rate_limits_and_overload_are_retried_then_reported_in_anthropics_shape(
        lockgate: Gateway, claude_upstream: FakeAnthropic) -> None:
    client = claude_sdk(lockgate)
    claude_upstream.script(error(429), message("After the rate limit."), error(529), error(529))

    raw = client.messages.with_raw_response.create(model="claude", max_tokens=10, messages=MESSAGES)
    assert raw.parse().content[0].text == "After the rate limit."  # type: ignore[union-attr]
    assert len(claude_upstream.requests) == 2
    with pytest.raises(anthropic.InternalServerError) as caught:
        client.messages.create(model="claude", max_tokens=10, messages=MESSAGES)

    assert len(claude_upstream.requests) == 4  # one retry on the same model, then the gateway gives up
    assert caught.value.status_code == 502
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "api_error"
    assert "529" in body["error"]["message"] and "Overloaded" not in body["error"]["message"]
    _, found = record_of(lockgate, raw.headers, spans=4)
    assert [s["status"] for s in found if s["kind"] == "CLIENT"] == ["ERROR", "UNSET"]
    failed, _ = record_of(lockgate, caught.value.response.headers, spans=4)
    assert (failed["outcome"], failed["status_code"], failed["cost_micro_usd"]) == ("failed", 502, 0)


def test_a_stream_cut_after_three_events_ends_with_an_error_event_the_sdk_raises(
        lockgate: Gateway, claude_upstream: FakeAnthropic) -> None:
    claude_upstream.script(message("one two three four", cut_after_events=3))

    with claude_sdk(lockgate).messages.stream(model="claude", max_tokens=100, messages=MESSAGES) as stream:
        headers = stream.response.headers
        with pytest.raises(anthropic.APIStatusError) as caught:
            for _ in stream:
                pass

    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "api_error"
    assert len(claude_upstream.requests) == 1  # a stream the client has seen is never retried
    record, _ = record_of(lockgate, headers)
    assert (record["endpoint"], record["outcome"], record["status_code"], record["stream"]) == (
        "messages", "failed", 502, True)
    assert record["error_type"] == "upstream_unavailable"
    # message_start, ping and content_block_start arrived: charged as estimated, not as nothing.
    assert record["output_tokens"] == 1 and record["cost_micro_usd"] > 0
    assert record["reasons"][-1] == "usage estimated: the stream ended before the provider reported it"


def test_a_providers_error_event_is_rewritten_by_the_gateway(lockgate: Gateway, claude_upstream: FakeAnthropic) -> None:
    claude_upstream.script(message("one two three", error_after_events=4, error_type="overloaded_error"))
    key = lockgate.create_key(team="research")

    with httpx.stream("POST", lockgate.base_url + "/v1/messages", headers={"x-api-key": key}, timeout=30,
                      json={"model": "claude", "max_tokens": 50, "stream": True, "messages": MESSAGES}) as response:
        events = [e for e in response.read().decode().split("\n\n") if e]
        headers = response.headers

    assert [e.split("\n")[0] for e in events] == [
        "event: message_start", "event: ping", "event: content_block_start", "event: content_block_delta",
        "event: error"]
    assert json.loads(events[-1].split("data: ", 1)[1]) == {"type": "error", "error": {
        "type": "api_error", "message": "The model provider is overloaded and broke off the stream."}}
    record, _ = record_of(lockgate, headers)
    assert (record["outcome"], record["status_code"], record["error_type"]) == ("failed", 502, "upstream_unavailable")


# --- the openai SDK reaching Claude: chat completions translated to Messages ------------------------

def test_the_openai_sdk_reaches_claude_through_translation(lockgate: Gateway, claude_upstream: FakeAnthropic) -> None:
    claude_upstream.script(message("Hi from Claude.", input_tokens=15, output_tokens=5))

    raw = openai_sdk(lockgate).chat.completions.with_raw_response.create(
        model="claude", stop=["END"], messages=[{"role": "system", "content": "Be brief."}, *MESSAGES],
        extra_headers={"anthropic-beta": "chat-clients-opt-into-nothing"})
    completion = raw.parse()

    [sent] = claude_upstream.requests
    assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert "anthropic-beta" not in sent.headers  # only a Messages client's own header is passed on
    assert sent.body == {"model": CLAUDE_UP, "max_tokens": 4096, "system": "Be brief.", "messages": MESSAGES,
                         "stop_sequences": ["END"]}  # max_tokens: the gateway's default_output_tokens
    assert completion.choices[0].message.content == "Hi from Claude."
    assert completion.choices[0].finish_reason == "stop" and completion.model == CLAUDE_UP
    usage = completion.usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (15, 5)
    record, _ = record_of(lockgate, raw.headers)
    assert (record["endpoint"], record["provider"], record["outcome"]) == ("chat.completions", "anthropic", "allowed")
    assert (record["input_tokens"], record["output_tokens"]) == (15, 5)
    assert record["cost_micro_usd"] == cost(CLAUDE_PRICES, 15, 5)


def test_the_openai_sdk_streams_claudes_tool_calls_and_sends_the_results_back(
        lockgate: Gateway, claude_upstream: FakeAnthropic) -> None:
    client = openai_sdk(lockgate)
    claude_upstream.script(tool_message("search_web", text="Looking.", input_tokens=30, output_tokens=8),
                           message("Found it."))

    raw = client.chat.completions.with_raw_response.create(
        model="claude", messages=MESSAGES, tools=CHAT_TOOLS, stream=True, stream_options={"include_usage": True})
    chunks = list(raw.parse())
    calls = [c for chunk in chunks if chunk.choices for c in chunk.choices[0].delta.tool_calls or ()]
    arguments = "".join(c.function.arguments or "" for c in calls if c.function)
    call_id = calls[0].id
    followed = client.chat.completions.create(model="claude", tools=CHAT_TOOLS, messages=[
        *MESSAGES,
        {"role": "assistant", "content": "Looking.", "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "search_web", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "lockgate found"}])

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Looking."
    assert (call_id, calls[0].function and calls[0].function.name) == ("toolu_0_search_web", "search_web")
    assert json.loads(arguments) == {"query": "search_web 0"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (30, 8)
    assert followed.choices[0].message.content == "Found it."
    first, second = claude_upstream.requests
    assert first.stream and first.body["tools"] == [TOOL]
    assert second.body["messages"] == [*MESSAGES, {"role": "assistant", "content": [
        {"type": "text", "text": "Looking."},
        {"type": "tool_use", "id": call_id, "name": "search_web", "input": {"query": "search_web 0"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": "lockgate found"}]}]
    record, _ = record_of(lockgate, raw.headers)
    assert (record["endpoint"], record["stream"], record["input_tokens"], record["output_tokens"]) == (
        "chat.completions", True, 30, 8)
    assert record["cost_micro_usd"] == cost(CLAUDE_PRICES, 30, 8)


# --- the anthropic SDK reaching an OpenAI-compatible model: Messages translated to chat -------------

def test_the_anthropic_sdk_reaches_an_openai_compatible_model(lockgate: Gateway, gpt_upstream: FakeOpenAI) -> None:
    client = claude_sdk(lockgate)
    gpt_upstream.script(chat_reply("Hello from GPT.", prompt_tokens=20, completion_tokens=4),
                        chat_tool_reply("search_web", content=None, prompt_tokens=40, completion_tokens=7),
                        chat_reply("one two three", prompt_tokens=9, completion_tokens=3))

    raw = client.messages.with_raw_response.create(model="gpt", max_tokens=50, system="Be brief.", messages=MESSAGES)
    reply = raw.parse()
    tooled = client.messages.create(model="gpt", max_tokens=50, messages=MESSAGES, tools=[TOOL],
                                    tool_choice={"type": "tool", "name": "search_web"})
    with client.messages.stream(model="gpt", max_tokens=50, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        stream_headers = stream.response.headers
    counted = client.messages.count_tokens(model="gpt", messages=MESSAGES)

    assert reply.content[0].type == "text" and reply.content[0].text == "Hello from GPT."
    assert (reply.stop_reason, reply.usage.input_tokens, reply.usage.output_tokens) == ("end_turn", 20, 4)
    first, second, third = gpt_upstream.requests  # count_tokens never reached it: the gateway estimates
    assert first.path == "/v1/chat/completions" and first.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert first.body == {"model": GPT_UP, "max_tokens": 50,
                          "messages": [{"role": "system", "content": "Be brief."}, *MESSAGES]}
    assert second.body["tools"] == CHAT_TOOLS
    assert second.body["tool_choice"] == {"type": "function", "function": {"name": "search_web"}}
    used = tooled.content[0]
    assert tooled.stop_reason == "tool_use"
    assert used.type == "tool_use" and (used.name, used.input) == ("search_web", {"query": "search_web 0"})
    assert third.stream and third.body["stream_options"] == {"include_usage": True}
    assert text == "one two three"
    assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == ("end_turn", 9, 3)
    assert 0 < counted.input_tokens < 50
    record, _ = record_of(lockgate, raw.headers)
    assert (record["endpoint"], record["provider"], record["input_tokens"], record["output_tokens"]) == (
        "messages", "openai", 20, 4)
    assert record["cost_micro_usd"] == cost(GPT_PRICES, 20, 4)
    streamed, _ = record_of(lockgate, stream_headers)
    assert (streamed["stream"], streamed["input_tokens"], streamed["output_tokens"]) == (True, 9, 3)
    assert streamed["cost_micro_usd"] == cost(GPT_PRICES, 9, 3)


# --- the offline mock ----------------------------------------------------------------------------------

def test_the_mock_answers_messages_offline(gateway: Gateway) -> None:
    client = anthropic.Anthropic(base_url=gateway.base_url, api_key=gateway.create_key(team="research"),
                                 max_retries=0, timeout=30)
    said = [{"role": "user", "content": "hello there"}]

    raw = client.messages.with_raw_response.create(model="fast", max_tokens=100, messages=said)
    reply = raw.parse()
    with client.messages.stream(model="fast", max_tokens=100, messages=said) as stream:
        text = "".join(stream.text_stream)
    tooled = client.messages.create(model="fast", max_tokens=100, messages=said, tools=[TOOL])
    counted = client.messages.count_tokens(model="fast", messages=said)

    assert reply.content[0].type == "text" and reply.content[0].text == "Mock reply from mock-fast: hello there"
    assert text == "Mock reply from mock-fast: hello there"
    assert (reply.model, reply.stop_reason, reply.usage.output_tokens) == ("mock-fast", "end_turn", 6)
    assert tooled.stop_reason == "tool_use" and tooled.content[0].type == "tool_use"
    assert (tooled.content[0].name, tooled.content[0].input) == ("search_web", {"input": "hello there"})
    assert counted.input_tokens == reply.usage.input_tokens  # the mock counts as it charges
    record, _ = record_of(gateway, raw.headers)
    assert (record["endpoint"], record["provider"], record["routed_model"]) == ("messages", "mock", "mock-fast")
    assert (record["input_tokens"], record["output_tokens"]) == (reply.usage.input_tokens, 6)
    assert record["cost_micro_usd"] > 0


REVIEW = """package lockgate

import rego.v1

response_decision := {"allow": false, "reasons": ["the model may not call delete_repo"]} if {
\t"delete_repo" in input.response.tool_calls
}

response_decision := {"allow": true} if { not "delete_repo" in input.response.tool_calls }
"""


def test_a_streamed_tool_use_the_response_policy_refuses_never_reaches_the_client(tmp_path: Path) -> None:
    """Held from its content_block_start until the policy has seen it, then replaced by an error
    event in Anthropic's shape (the mock, SQLite)."""
    policy = write_policy(tmp_path / "policy", review=REVIEW)
    server = start_gateway(f"sqlite:///{tmp_path}/lockgate.db", tmp_path, policy_dir=str(policy))
    try:
        client = anthropic.Anthropic(base_url=server.base_url, api_key=server.create_key(), max_retries=0, timeout=30)
        tools: Any = [{"name": "delete_repo", "input_schema": {"type": "object", "properties": {}}}]
        with client.messages.stream(model="fast", max_tokens=50, messages=MESSAGES, tools=tools) as stream:
            headers = stream.response.headers
            seen: list[str] = []
            with pytest.raises(anthropic.APIStatusError) as caught:  # mid-stream: the SDK raises by body, not status
                for event in stream:
                    seen.append(event.type)
        assert "content_block_start" not in seen and seen[:1] == ["message_start"]
        assert caught.value.body == {"type": "error", "error": {
            "type": "permission_error", "message": "The policy withheld the reply: the model may not call delete_repo"}}
        [record], _ = server.trace(headers["lockgate-trace-id"])
        assert (record["endpoint"], record["outcome"], record["status_code"]) == ("messages", "denied", 403)
    finally:
        stop_gateway(server)
