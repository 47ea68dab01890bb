"""The Messages endpoint spec and the chat <-> Messages translation, as unit tests.

Streams are the fakes' own event lists (tests/fakes/), so what is translated here is the wire
format the end-to-end tests see from the loopback providers.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from adapters.anthropic_translate import (
    ChatToMessagesStream,
    MessagesToChatStream,
    chat_completion_to_message,
    chat_request_to_messages,
    message_to_chat_completion,
    messages_request_to_chat,
)
from gateway.endpoints.chat import MAX_TOKENS_REPORTED
from gateway.endpoints.checks import RequestLimits
from gateway.endpoints.messages import CountTokens, Messages
from gateway.errors import InvalidRequest, UpstreamError, UpstreamRejected, UpstreamUnavailable
from gateway.sse import event_data, event_name
from tests.fakes import anthropic_upstream as anthropic
from tests.fakes import openai_upstream as openai

SPEC = Messages(RequestLimits(max_output_tokens=8192))
TOOL_SCHEMA = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "claude", "max_tokens": 256, "messages": [{"role": "user", "content": "Hi"}], **fields}


def chunks(events: list[bytes]) -> list[Any]:
    """The JSON data of chat events, with [DONE] as the string it is."""
    out: list[Any] = []
    for event in events:
        data = event_data(event)
        assert data is not None
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def named_events(events: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of Anthropic events, checking that each name matches its data's type."""
    out = []
    for event in events:
        name, data = event_name(event), event_data(event)
        assert name is not None and data is not None
        payload = orjson.loads(data)
        assert payload["type"] == name.decode()
        out.append((name.decode(), payload))
    return out


# --- the Messages spec: describe ------------------------------------------------------------------

def test_describe_reads_model_limits_tools_and_an_estimate() -> None:
    facts = SPEC.describe(body(
        system=[{"type": "text", "text": "Be brief."}], stream=True, metadata={"user_id": "u-1"},
        tools=[{"name": "search_web", "input_schema": TOOL_SCHEMA},
               {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
        tool_choice={"type": "tool", "name": "lookup"}, thinking={"type": "enabled", "budget_tokens": 128},
        messages=[{"role": "user", "content": "Find lockgate."},
                  {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "search_web",
                                                     "input": {"query": "lockgate"}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "found"},
                                               {"type": "image", "source": {"type": "url", "url": "https://x"}}]}]))

    assert (facts.endpoint, facts.model, facts.stream, facts.max_tokens) == ("messages", "claude", True, 256)
    assert facts.tools == ("search_web", "web_search", "lookup")
    assert facts.message_count == 3 and facts.metadata == {"user_id": "u-1"}
    assert facts.output_tokens_max == 256
    assert facts.input_tokens > 1600  # the image is estimated as a media block


@pytest.mark.parametrize(("fields", "param"), [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 8193}, "max_tokens"),
    ({"max_tokens": "100"}, "max_tokens"),
    ({"model": ""}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": ["Hi"]}]}, "messages[0].content[0]"),
    ({"system": [{"type": "image"}]}, "system[0]"),
    ({"system": 3}, "system"),
    ({"stream": "yes"}, "stream"),
    ({"metadata": []}, "metadata"),
    ({"tools": {}}, "tools"),
    ({"tools": [{"type": "web_search_20250305"}]}, "tools[0].name"),
    ({"tools": [{"name": ""}]}, "tools[0].name"),
    ({"tools": [{"name": "search_web"}]}, "tools[0].input_schema"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({"thinking": {"type": "enabled", "budget_tokens": 0}}, "thinking.budget_tokens"),
])
def test_describe_refuses_each_field_it_cannot_read(fields: dict[str, Any], param: str) -> None:
    request = {k: v for k, v in body(**fields).items() if v is not None}
    with pytest.raises(InvalidRequest) as raised:
        SPEC.describe(request)
    assert raised.value.param == param
    assert param in raised.value.message


def test_limit_caps_max_tokens_and_a_thinking_budget_above_it() -> None:
    request = body(max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000})
    assert SPEC.limit(request, None) is request
    assert SPEC.limit(request, 5000) is request
    limited = SPEC.limit(request, 1500)
    assert limited["max_tokens"] == 1500 and limited["thinking"] == {"type": "enabled", "budget_tokens": 1499}
    assert request["max_tokens"] == 4000  # the client's body is left as it came


def test_count_tokens_needs_no_max_tokens_and_cannot_stream() -> None:
    spec = CountTokens(RequestLimits())
    facts = spec.describe({"model": "claude", "messages": [{"role": "user", "content": "Hi"}]})
    assert (facts.endpoint, facts.max_tokens, facts.output_tokens_max, spec.billable) == (
        "messages.count_tokens", None, 0, False)
    with pytest.raises(InvalidRequest) as raised:
        spec.describe({"model": "claude", "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
    assert raised.value.param == "stream"
    assert spec.read_reply(b'{"input_tokens": 42}').usage.input_tokens == 0  # counting consumes nothing
    with pytest.raises(UpstreamError):
        spec.read_reply(b'{"tokens": 42}')


# --- the Messages spec: replies and streams -------------------------------------------------------

def test_read_reply_counts_cache_tokens_as_input_and_names_tool_uses() -> None:
    reply = anthropic.tool_message("search_web", text="Searching.", input_tokens=5, cache_creation_input_tokens=20,
                                   cache_read_input_tokens=100, output_tokens=9)
    facts = SPEC.read_reply(json.dumps(reply.message("claude-up")).encode())
    assert (facts.usage.input_tokens, facts.usage.output_tokens, facts.usage_reported) == (125, 9, True)
    assert facts.tool_calls == ["search_web"] and facts.finish_reasons == ["tool_use"]
    assert (facts.response_model, facts.response_id) == ("claude-up", "msg_01FakeAnthropic")
    with pytest.raises(UpstreamError):
        SPEC.read_reply(b"[1, 2]")


def test_input_tokens_summed_over_the_cache_stay_within_what_the_audit_holds() -> None:
    huge = {"input_tokens": 2**31, "cache_creation_input_tokens": 2**31, "cache_read_input_tokens": 2**31}
    facts = SPEC.read_reply(json.dumps({"content": [], "usage": {**huge, "output_tokens": 1}}).encode())
    assert facts.usage.input_tokens == MAX_TOKENS_REPORTED


def test_stream_reader_reads_usage_tools_finish_and_the_terminator() -> None:
    events = anthropic.tool_message("search_web", text="On it.", thinking="Hmm.", input_tokens=7,
                                    cache_read_input_tokens=3, output_tokens=21).events("claude-up")
    reader = SPEC.stream_reader(SPEC.describe(body(stream=True)))
    relayed = []
    for number, event in enumerate(events):
        out = reader.observe(event)
        assert out == event  # every event is relayed as it came, ping included
        relayed.append(out)
        if event_name(event) == b"message_start":
            assert reader.facts.usage.input_tokens == 10 and not reader.facts.usage_reported
        if number < len(events) - 1:
            assert not reader.terminated
    assert reader.terminated and reader.facts.finish_reasons
    assert (reader.facts.usage.input_tokens, reader.facts.usage.output_tokens) == (10, 21)
    assert reader.facts.tool_calls == ["search_web"] and reader.facts.finish_reasons == ["tool_use"]
    assert reader.facts.response_model == "claude-up"
    assert b"event: ping\n" in b"".join(relayed)


def test_a_streamed_tool_use_counts_from_its_block_start_even_without_a_name() -> None:
    """As in a whole reply, a tool_use block with no name is a tool call (named ""): the pipeline
    holds the stream back from there for the response policy, rather than relay it unreviewed."""
    reader = SPEC.stream_reader(SPEC.describe(body(stream=True)))
    for block in ({"type": "text", "text": ""}, {"type": "tool_use", "id": "toolu_1", "input": {}},
                  {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}):
        reader.observe(b"event: content_block_start\ndata: "
                       + orjson.dumps({"type": "content_block_start", "index": 0, "content_block": block}) + b"\n\n")
    assert reader.facts.tool_calls == ["", "web_search"]


def test_a_providers_error_event_is_not_relayed_but_raised_and_rendered_in_anthropics_shape() -> None:
    events = anthropic.message(error_after_events=3, error_type="overloaded_error").events("claude-up")
    reader = SPEC.stream_reader(SPEC.describe(body(stream=True)))
    for event in events[:3]:
        reader.observe(event)
    with pytest.raises(UpstreamUnavailable) as raised:
        reader.observe(events[3])
    rendered = SPEC.error_event(raised.value)
    assert rendered.startswith(b"event: error\ndata: ")
    payload = orjson.loads(event_data(rendered) or b"")
    assert payload == {"type": "error", "error": {"type": "api_error", "message": raised.value.message}}
    assert not reader.terminated


def test_errors_are_written_in_anthropics_shape() -> None:
    body_ = orjson.loads(SPEC.error_body(InvalidRequest("bad", param="max_tokens")))
    assert body_ == {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}


# --- chat -> Messages -----------------------------------------------------------------------------

def test_a_chat_request_becomes_a_messages_request() -> None:
    request = chat_request_to_messages({
        "model": "claude", "temperature": 0.2, "stop": "END", "user": "ana", "seed": 7, "parallel_tool_calls": False,
        "tools": [{"type": "function", "function": {"name": "search_web", "description": "Search.",
                                                    "parameters": TOOL_SCHEMA}}],
        "tool_choice": "required",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [{"type": "text", "text": "Look at"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                                         {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "search_web", "arguments": '{"query":"a"}'}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "search_web", "arguments": '{"query":"b"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "result a"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "result b"}]},
            {"role": "user", "content": "Thanks."},
        ]}, "claude-up", 4096)

    assert request["model"] == "claude-up" and request["max_tokens"] == 4096  # the default: Anthropic requires it
    assert request["system"] == "Be brief.\n\nUse tools."
    assert request["stop_sequences"] == ["END"] and request["temperature"] == 0.2
    assert request["metadata"] == {"user_id": "ana"} and "seed" not in request
    assert request["tools"] == [{"name": "search_web", "description": "Search.", "input_schema": TOOL_SCHEMA}]
    assert request["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert request["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "Look at"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_1", "name": "search_web", "input": {"query": "a"}},
            {"type": "tool_use", "id": "call_2", "name": "search_web", "input": {"query": "b"}}]},
        {"role": "user", "content": [  # both tool results and the next words: one user turn
            {"type": "tool_result", "tool_use_id": "call_1", "content": "result a"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "result b"}]},
            {"type": "text", "text": "Thanks."}]},
    ]


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", {"type": "auto"}), ("none", {"type": "none"}),
    ({"type": "function", "function": {"name": "lookup"}}, {"type": "tool", "name": "lookup"}),
])
def test_tool_choice_maps_to_anthropics(choice: Any, expected: dict[str, Any]) -> None:
    request = chat_request_to_messages({"messages": [{"role": "user", "content": "x"}], "max_tokens": 9,
                                        "tool_choice": choice}, "m", 4096)
    assert request["tool_choice"] == expected and request["max_tokens"] == 9


@pytest.mark.parametrize("extra", [
    {"n": 2}, {"response_format": {"type": "json_object"}}, {"functions": [{"name": "f"}]},
    {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
    {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}]},
])
def test_what_messages_cannot_express_is_refused_not_changed(extra: dict[str, Any]) -> None:
    with pytest.raises(UpstreamRejected) as raised:
        chat_request_to_messages({"messages": [{"role": "user", "content": "x"}], **extra}, "m", 4096)
    assert raised.value.status == 400


@pytest.mark.parametrize(("stop_reason", "finish_reason"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), (None, "stop"),
])
def test_a_message_becomes_a_chat_completion(stop_reason: str | None, finish_reason: str) -> None:
    message = anthropic.tool_message("search_web", text="Let me look.", thinking="private", input_tokens=5,
                                     cache_read_input_tokens=100, output_tokens=9).message("claude-up")
    message["stop_reason"] = stop_reason
    completion = message_to_chat_completion(message, created=1)
    choice = completion["choices"][0]
    assert choice["finish_reason"] == finish_reason
    assert choice["message"]["content"] == "Let me look."  # thinking is not shown
    assert choice["message"]["tool_calls"] == [{"id": "toolu_0_search_web", "type": "function", "function": {
        "name": "search_web", "arguments": '{"query":"search_web 0"}'}}]
    assert completion["usage"] == {"prompt_tokens": 105, "completion_tokens": 9, "total_tokens": 114,
                                   "prompt_tokens_details": {"cached_tokens": 100}}
    assert (completion["id"], completion["model"], completion["object"]) == (
        "msg_01FakeAnthropic", "claude-up", "chat.completion")


def test_anthropic_events_become_chat_chunks_ending_in_usage_and_done() -> None:
    events = anthropic.tool_message("search_web", "lookup", text="Two tools.", thinking="Hmm.", input_tokens=30,
                                    cache_creation_input_tokens=4, output_tokens=17).events("claude-up")
    translator = MessagesToChatStream(created=1)
    out = chunks([chunk for event in events for chunk in translator.feed(event)])

    assert out[-1] == "[DONE]"
    usage_chunk = out[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["prompt_tokens"] == 34
    assert usage_chunk["usage"]["completion_tokens"] == 17
    choices = [c["choices"][0] for c in out[:-2]]
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["delta"].get("content") or "" for c in choices) == "Two tools."
    calls: dict[int, dict[str, str]] = {}
    for choice in choices:
        for call in choice["delta"].get("tool_calls") or ():
            entry = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.get("id") or ""
            entry["name"] += call.get("function", {}).get("name") or ""
            entry["arguments"] += call.get("function", {}).get("arguments") or ""
    assert calls == {0: {"id": "toolu_0_search_web", "name": "search_web", "arguments": '{"query": "search_web 0"}'},
                     1: {"id": "toolu_1_lookup", "name": "lookup", "arguments": '{"query": "lookup 1"}'}}
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["tool_calls"]
    assert choices[-1]["finish_reason"] == "tool_calls"
    assert {c["id"] for c in out[:-1]} == {"msg_01FakeAnthropic"} and {c["model"] for c in out[:-1]} == {"claude-up"}


def test_a_cut_anthropic_stream_gives_no_done_and_an_error_event_raises() -> None:
    events = anthropic.message().events("claude-up")
    translator = MessagesToChatStream()
    out = [chunk for event in events[:-1] for chunk in translator.feed(event)]
    assert b"data: [DONE]\n\n" not in out
    failing = anthropic.message(error_after_events=2, error_type="rate_limit_error").events("m")
    with pytest.raises(UpstreamError) as raised:
        for event in failing:
            translator.feed(event)
    assert raised.value.status == 429


# --- Messages -> chat -----------------------------------------------------------------------------

def test_a_messages_request_becomes_a_chat_request() -> None:
    request = messages_request_to_chat(body(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        stop_sequences=["END"], temperature=0.5, top_k=5, metadata={"user_id": "ana"}, stream=True,
        tools=[{"name": "search_web", "description": "Search.", "input_schema": TOOL_SCHEMA}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Find it."},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                                                      "data": "/9j/"}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                                              {"type": "text", "text": "Searching."},
                                              {"type": "tool_use", "id": "toolu_1", "name": "search_web",
                                               "input": {"query": "it"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": [{"type": "text", "text": "found"}]},
                                         {"type": "text", "text": "And now?"}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                                          "content": "timeout"}]},
        ]))

    assert request["messages"] == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": [{"type": "text", "text": "Find it."},
                                     {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}}]},
        {"role": "assistant", "content": "Searching.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "search_web", "arguments": '{"query":"it"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "found"},  # right after the tool call
        {"role": "user", "content": "And now?"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: timeout"},
    ]
    assert request["max_tokens"] == 256 and request["stop"] == ["END"] and request["temperature"] == 0.5
    assert "top_k" not in request and request["user"] == "ana"
    assert request["tools"] == [{"type": "function", "function": {"name": "search_web", "parameters": TOOL_SCHEMA,
                                                                  "description": "Search."}}]
    assert request["tool_choice"] == "required" and request["parallel_tool_calls"] is False
    assert request["stream"] is True and request["stream_options"] == {"include_usage": True}


def test_a_server_tool_cannot_go_to_a_chat_provider() -> None:
    with pytest.raises(UpstreamRejected) as raised:
        messages_request_to_chat(body(tools=[{"type": "web_search_20250305", "name": "web_search"}]))
    assert "web_search_20250305" in raised.value.message


@pytest.mark.parametrize(("finish_reason", "stop_reason"), [
    ("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal"),
])
def test_a_chat_completion_becomes_a_message(finish_reason: str, stop_reason: str) -> None:
    completion = openai.tool_reply("search_web", content="Looking.", finish_reason=finish_reason,
                                   prompt_tokens=40, completion_tokens=7).completion("gpt-up")
    completion["usage"]["prompt_tokens_details"]["cached_tokens"] = 30
    message = chat_completion_to_message(completion)
    assert message["stop_reason"] == stop_reason
    assert message["content"] == [{"type": "text", "text": "Looking."},
                                  {"type": "tool_use", "id": "call_0_search_web", "name": "search_web",
                                   "input": {"query": "search_web 0"}}]
    assert message["usage"] == {"input_tokens": 10, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 30, "output_tokens": 7}
    assert (message["type"], message["role"], message["model"]) == ("message", "assistant", "gpt-up")


def test_chat_chunks_become_anthropics_named_events() -> None:
    events = openai.tool_reply("search_web", "lookup", content="Two tools.", prompt_tokens=40,
                               completion_tokens=7).events("gpt-up", include_usage=True)
    translator = ChatToMessagesStream("gpt-up")
    out = named_events([e for event in events for e in translator.feed(event)])

    names = [name for name, _ in out]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == 3
    deltas = [p for n, p in out if n == "content_block_delta"]
    assert "".join(p["delta"]["text"] for p in deltas if p["delta"]["type"] == "text_delta") == "Two tools."
    starts = [p for n, p in out if n == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["text", "tool_use", "tool_use"]
    assert [s["index"] for s in starts] == [0, 1, 2]
    assert [s["content_block"].get("name") for s in starts[1:]] == ["search_web", "lookup"]
    arguments = {i: "".join(p["delta"]["partial_json"] for p in deltas
                            if p["index"] == i and p["delta"]["type"] == "input_json_delta") for i in (1, 2)}
    assert {i: json.loads(a) for i, a in arguments.items()} == {1: {"query": "search_web 0"}, 2: {"query": "lookup 1"}}
    delta = out[-2][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"]["input_tokens"] == 40 and delta["usage"]["output_tokens"] == 7
    # Blocks never overlap: each one stops before the next starts.
    open_blocks = 0
    for name, _ in out:
        open_blocks += {"content_block_start": 1, "content_block_stop": -1}.get(name, 0)
        assert open_blocks in (0, 1)


def test_the_translated_stream_reads_as_a_whole_stream_for_the_messages_spec() -> None:
    events = openai.reply("Hi there.", prompt_tokens=12, completion_tokens=3).events("gpt-up", include_usage=True)
    translator = ChatToMessagesStream("gpt-up")
    reader = SPEC.stream_reader(SPEC.describe(body(stream=True)))
    for event in events:
        for out in translator.feed(event):
            reader.observe(out)
    assert reader.terminated and reader.facts.finish_reasons
    assert (reader.facts.usage.input_tokens, reader.facts.usage.output_tokens) == (12, 3)
    cut = ChatToMessagesStream("gpt-up")
    cut_reader = SPEC.stream_reader(SPEC.describe(body(stream=True)))
    for event in events[:-1]:  # no [DONE]
        for out in cut.feed(event):
            cut_reader.observe(out)
    assert not cut_reader.terminated
