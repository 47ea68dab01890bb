"""End to end: the official openai SDK against a real gateway on a loopback port."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import Gateway, start_gateway, stop_gateway


def client(gateway: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)


def test_non_streaming_chat_is_answered_and_audited(gateway: Gateway) -> None:
    key = gateway.create_key(team="research", user="ana")
    raw = client(gateway, key).chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "user", "content": "hello there"}])
    reply = raw.parse()

    assert reply.choices[0].message.content == "Mock reply from mock-fast: hello there"
    assert reply.model == "mock-fast"
    assert reply.usage is not None and reply.usage.completion_tokens == 6
    decisions, spans = gateway.trace(raw.headers["lockgate-trace-id"], spans=3)
    [record] = decisions
    assert record["id"] == raw.headers["lockgate-decision-id"]
    assert (record["outcome"], record["status_code"]) == ("allowed", 200)
    assert (record["user"], record["team"], record["org"]) == ("ana", "research", "acme")
    assert (record["requested_model"], record["routed_model"], record["provider"]) == ("fast", "mock-fast", "mock")
    assert (record["input_tokens"], record["output_tokens"]) == (reply.usage.prompt_tokens, 6)
    assert record["cost_micro_usd"] > 0
    assert record["reasons"] == ["team research may use mock-fast"]
    assert record["policy_input"]["principal"]["team"] == "research"
    root = next(s for s in spans if s["parent_span_id"] is None)
    assert root["name"] == "chat fast"
    assert root["attributes"]["gen_ai.response.model"] == "mock-fast"
    assert root["attributes"]["lockgate.decision_id"] == record["id"]
    assert {s["name"] for s in spans} == {"chat fast", "policy.decide", "chat mock-fast"}


def test_streaming_arrives_as_separate_chunks(gateway: Gateway) -> None:
    key = gateway.create_key()
    raw = client(gateway, key).chat.completions.with_raw_response.create(
        model="mock-smart", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "one two three four"}])
    chunks = list(raw.parse())

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Mock reply from mock-smart: one two three four"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == len(text.split(" "))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(text.split(" "))
    [record], spans = gateway.trace(raw.headers["lockgate-trace-id"], spans=3)
    assert record["stream"] and record["outcome"] == "allowed"
    assert record["output_tokens"] == len(text.split(" "))
    upstream = next(s for s in spans if s["kind"] == "CLIENT")
    assert upstream["name"] == "chat mock-smart"
    assert upstream["attributes"]["gen_ai.usage.output_tokens"] == len(text.split(" "))


def test_stream_is_relayed_event_by_event_not_buffered(store_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The mock pauses between words, so a relay that buffered would deliver everything in one read.
    server = start_gateway(store_url, tmp_path, mock_stream_delay_s="0.2")
    try:
        key = server.create_key()
        body = {"model": "fast", "stream": True, "messages": [{"role": "user", "content": "a b c d e f"}]}
        with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as response:
            reads = list(response.iter_raw())
        assert response.headers["content-type"].startswith("text/event-stream")
        assert b"[DONE]" not in reads[0] and b"[DONE]" in reads[-1]
        assert len(reads) >= 8
    finally:
        stop_gateway(server)


def test_stream_without_include_usage_gets_no_usage_chunk_but_is_still_charged(gateway: Gateway) -> None:
    key = gateway.create_key()
    raw = client(gateway, key).chat.completions.with_raw_response.create(
        model="fast", stream=True, messages=[{"role": "user", "content": "hi"}])
    chunks = list(raw.parse())

    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    [record], _ = gateway.trace(raw.headers["lockgate-trace-id"])
    assert record["output_tokens"] > 0 and record["cost_micro_usd"] > 0


def test_tools_and_tool_calls_pass_intact(gateway: Gateway) -> None:
    key = gateway.create_key()
    tools = [{"type": "function", "function": {
        "name": "search_web", "description": "Search", "parameters": {
            "type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}}]
    reply = client(gateway, key).chat.completions.create(
        model="fast", tools=tools, messages=[{"role": "user", "content": "find lockgate"}])

    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "search_web"
    assert json.loads(call.function.arguments) == {"input": "find lockgate"}

    streamed = list(client(gateway, key).chat.completions.create(
        model="fast", tools=tools, stream=True, messages=[{"role": "user", "content": "find lockgate"}]))
    deltas = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "search_web"
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_denied_model_raises_permission_denied_with_reasons(gateway: Gateway) -> None:
    key = gateway.create_key(team="support", user="bo")
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client(gateway, key).chat.completions.create(model="mock-smart", messages=[{"role": "user", "content": "x"}])

    error = caught.value
    assert error.status_code == 403
    assert "team support may not use model mock-smart (allowed: mock-fast)" in error.message
    assert error.body["code"] == "policy_denied"
    decisions, _ = gateway.trace(error.response.headers["lockgate-trace-id"])
    assert decisions[0]["outcome"] == "denied"
    assert decisions[0]["reasons"] == ["team support may not use model mock-smart (allowed: mock-fast)"]
    assert decisions[0]["routed_model"] is None and decisions[0]["cost_micro_usd"] == 0


@pytest.mark.parametrize("key", ["lg-not-a-real-key", ""])
def test_bad_key_is_401_and_audited_without_the_key(gateway: Gateway, key: str) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(gateway, key or "x").with_options(default_headers={"Authorization": key}).chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "x"}])

    assert caught.value.status_code == 401
    assert caught.value.body["code"] == "invalid_api_key"
    decisions, spans = gateway.trace(caught.value.response.headers["lockgate-trace-id"])
    assert decisions[0]["outcome"] == "denied" and decisions[0]["status_code"] == 401
    if key:
        assert key not in json.dumps(decisions, default=str) + json.dumps(spans, default=str)
        assert key not in gateway.log.read_text()


def test_revoked_key_is_refused(store_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = start_gateway(store_url, tmp_path, auth_cache_ttl_s="0")
    try:
        key = server.create_key()
        assert client(server, key).chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "x"}]).choices
        key_id = next(line.split()[0] for line in server.cli("keys", "list").stdout.splitlines() if "ana" in line)
        assert server.cli("keys", "revoke", key_id).returncode == 0
        with pytest.raises(openai.AuthenticationError):
            client(server, key).chat.completions.create(model="fast", messages=[{"role": "user", "content": "x"}])
    finally:
        stop_gateway(server)


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "'model' is required"),
    (b'{"model": "fast"}', "'messages' is required"),
    (b'{"model": "fast", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "'stream' must be"),
])
def test_malformed_bodies_get_400_and_an_audit_record(gateway: Gateway, body: bytes, message: str) -> None:
    key = gateway.create_key()
    raw = client(gateway, key)
    with pytest.raises(openai.BadRequestError) as caught:
        raw.post("/chat/completions", cast_to=object, content=body,
                 options={"headers": {"content-type": "application/json"}})

    assert caught.value.status_code == 400
    assert message in caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"
    decisions, _ = gateway.trace(caught.value.response.headers["lockgate-trace-id"])
    assert (decisions[0]["outcome"], decisions[0]["status_code"]) == ("failed", 400)
    assert decisions[0]["cost_micro_usd"] == 0


def test_models_lists_what_the_key_may_use(gateway: Gateway) -> None:
    research = client(gateway, gateway.create_key(team="research")).models.list()
    support = client(gateway, gateway.create_key(team="support", user="bo")).models.list()

    # The catalog models, then the default policy's aliases of those the team may use.
    assert [m.id for m in research.data] == ["mock-fast", "mock-smart", "fast", "smart"]
    assert [m.id for m in support.data] == ["mock-fast", "fast"]


def test_client_leaving_mid_stream_stops_the_call_and_is_recorded(store_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = start_gateway(store_url, tmp_path, mock_stream_delay_s="0.2")
    try:
        key = server.create_key()
        words = " ".join(f"w{i}" for i in range(50))  # ten seconds of stream if nobody left
        body = {"model": "fast", "stream": True, "messages": [{"role": "user", "content": words}]}
        with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as response:
            trace_id = response.headers["lockgate-trace-id"]
            next(response.iter_raw())
        [record], spans = server.trace(trace_id, spans=3)
        assert (record["outcome"], record["status_code"], record["error_type"]) == ("failed", 499, "client_closed")
        upstream = next(s for s in spans if s["kind"] == "CLIENT")
        assert upstream["status"] == "UNSET"  # closed by us, not failed by the provider
        # The mock reports usage only at the end it never reached: the gateway charges an estimate.
        assert 0 < record["output_tokens"] < 50 and record["cost_micro_usd"] > 0
        assert record["reasons"][-1] == "usage estimated: the stream ended before the provider reported it"
    finally:
        stop_gateway(server)


def test_a_nul_character_from_a_client_cannot_stall_the_audit(gateway: Gateway) -> None:
    # PostgreSQL refuses NUL in text columns. One decision record it cannot store would keep
    # every later record (and every budget settlement, written with them) from being written.
    key = gateway.create_key()
    sdk = client(gateway, key)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="fast\x00evil", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as unreadable_tool:  # a policy could not match its name
        sdk.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "look\x00up", "parameters": {"type": "object"}}}])
    assert unreadable_tool.value.body["param"] == "tools[0].function.name"  # type: ignore[index]
    odd = sdk.chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "user", "content": "nul \x00 inside"}], metadata={"note": "a\x00b"})
    assert odd.http_response.status_code == 200
    later = sdk.chat.completions.with_raw_response.create(model="fast", messages=[{"role": "user", "content": "hi"}])

    [record], _ = gateway.trace(later.headers["lockgate-trace-id"])
    assert record["outcome"] == "allowed"
    [refusal], _ = gateway.trace(refused.value.response.headers["lockgate-trace-id"], spans=0)
    assert (refusal["status_code"], refusal["error_type"]) == (400, "InvalidRequest")
    [kept], _ = gateway.trace(odd.headers["lockgate-trace-id"])
    assert kept["policy_input"]["request"]["metadata"] == {"note": "a\x00b"}
