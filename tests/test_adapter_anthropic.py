"""The anthropic adapter against the fake Anthropic on a loopback port: the URL and headers it
sends, events relayed as they came, and which gateway error each provider failure becomes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from adapters.anthropic import AnthropicProvider
from gateway.endpoints.checks import RequestLimits
from gateway.endpoints.messages import Messages
from gateway.errors import (
    UpstreamAuthFailed,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.types import CatalogModel, Deployment, UpstreamCall
from gateway.upstream import build_http_client
from tests.fakes.anthropic_upstream import FakeAnthropic, count, drop, error, message

PROVIDER_KEY = "sk-ant-fake-adapter-key-0123456789"
UPSTREAM_MODEL = "claude-fake-haiku"
BODY: dict[str, Any] = {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi."}]}


@pytest.fixture
def upstream() -> Iterator[FakeAnthropic]:
    with FakeAnthropic.running() as fake:
        yield fake


@pytest.fixture
async def provider() -> AsyncIterator[AnthropicProvider]:
    client = build_http_client(timeout_s=10.0, connect_timeout_s=5.0, max_connections=8)
    try:
        yield AnthropicProvider(client, default_max_tokens=777)
    finally:
        await client.aclose()


def call(base_url: str, body: dict[str, Any] | None = None, *, endpoint: str = "messages",
         api_key: str = PROVIDER_KEY) -> UpstreamCall:
    body = body or BODY
    deployment = Deployment(provider="anthropic", upstream_model=UPSTREAM_MODEL, base_url=base_url)
    model = CatalogModel(name="claude", provider="anthropic", upstream_model=UPSTREAM_MODEL, base_url=base_url,
                         deployments=(deployment,))
    return UpstreamCall(endpoint=endpoint, model=model, deployment=deployment, body=body, api_key=api_key,
                        stream=bool(body.get("stream")))


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
async def test_a_message_goes_to_v1_messages_whatever_the_base_url_ends_in(
        provider: AnthropicProvider, upstream: FakeAnthropic, suffix: str) -> None:
    upstream.script(message("Hi back."))
    reply = await provider.complete(call(upstream.url + suffix))

    [sent] = upstream.requests
    assert (sent.method, sent.path) == ("POST", "/v1/messages")
    assert sent.headers["x-api-key"] == PROVIDER_KEY and sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["content-type"] == "application/json"
    assert sent.body == {**BODY, "model": UPSTREAM_MODEL}
    assert json.loads(reply.body)["content"] == [{"type": "text", "text": "Hi back."}]


async def test_a_stream_is_relayed_event_by_event_as_it_came(provider: AnthropicProvider,
                                                             upstream: FakeAnthropic) -> None:
    sent_events = message("one two three", split=5).events(UPSTREAM_MODEL)
    upstream.script(message("one two three", split=5))

    events = [event async for event in provider.stream(call(upstream.url, {**BODY, "stream": True}))]

    assert events == sent_events  # whole events, re-framed from 5-byte pieces, unchanged
    assert upstream.requests[0].stream


async def test_a_chat_request_is_translated_with_a_default_max_tokens(provider: AnthropicProvider,
                                                                     upstream: FakeAnthropic) -> None:
    upstream.script(message("Translated."))
    chat = {"model": "claude", "messages": [{"role": "user", "content": "Hi."}]}
    reply = await provider.complete(call(upstream.url, chat, endpoint="chat.completions"))

    assert upstream.requests[0].body == {"model": UPSTREAM_MODEL, "max_tokens": 777,
                                         "messages": [{"role": "user", "content": "Hi."}]}
    assert json.loads(reply.body)["choices"][0]["message"]["content"] == "Translated."


async def test_an_untranslatable_chat_request_never_leaves(provider: AnthropicProvider,
                                                           upstream: FakeAnthropic) -> None:
    chat = {"model": "claude", "n": 3, "messages": [{"role": "user", "content": "Hi."}]}
    with pytest.raises(UpstreamRejected):
        await provider.complete(call(upstream.url, chat, endpoint="chat.completions"))
    with pytest.raises(UpstreamRejected):
        async for _ in provider.stream(call(upstream.url, {**chat, "stream": True}, endpoint="chat.completions")):
            pass
    assert upstream.requests == []


async def test_count_tokens_goes_to_its_own_path(provider: AnthropicProvider, upstream: FakeAnthropic) -> None:
    upstream.script(count(17))
    counting = {"model": "claude", "messages": BODY["messages"]}
    reply = await provider.complete(call(upstream.url, counting, endpoint="messages.count_tokens"))
    assert json.loads(reply.body) == {"input_tokens": 17}
    assert upstream.requests[0].path == "/v1/messages/count_tokens"
    assert upstream.requests[0].body == {**counting, "model": UPSTREAM_MODEL}


@pytest.mark.parametrize(("cassette", "raised", "retry_after"), [
    (error(429, headers=(("retry-after", "7"),)), UpstreamRateLimited, 7.0),
    (error(529, headers=(("retry-after", "3"),)), UpstreamUnavailable, 3.0),
    (error(500), UpstreamUnavailable, None),
    (error(401), UpstreamAuthFailed, None),
    (error(400, "messages.0.content: Input should be a valid list"), UpstreamRejected, None),
])
async def test_each_provider_failure_becomes_its_gateway_error(
        provider: AnthropicProvider, upstream: FakeAnthropic, cassette: Any, raised: type[Exception],
        retry_after: float | None) -> None:
    upstream.script(cassette, cassette)
    with pytest.raises(raised) as whole:
        await provider.complete(call(upstream.url))
    with pytest.raises(raised) as streamed:
        async for _ in provider.stream(call(upstream.url, {**BODY, "stream": True})):
            pass
    for caught in (whole.value, streamed.value):
        assert getattr(caught, "retry_after_s", None) == retry_after
        assert PROVIDER_KEY not in str(caught)
    if raised is UpstreamRejected:
        assert "Input should be a valid list" in str(whole.value)


async def test_a_dropped_connection_is_unavailable(provider: AnthropicProvider, upstream: FakeAnthropic) -> None:
    upstream.script(drop())
    with pytest.raises(UpstreamUnavailable):
        await provider.complete(call(upstream.url))


async def test_without_a_key_anthropic_refuses_and_the_gateway_says_its_credentials_failed(
        provider: AnthropicProvider, upstream: FakeAnthropic) -> None:
    with pytest.raises(UpstreamAuthFailed):
        await provider.complete(call(upstream.url, api_key=""))
    assert "x-api-key" not in upstream.requests[0].headers


async def test_the_relayed_stream_reads_whole_for_the_messages_spec(provider: AnthropicProvider,
                                                                    upstream: FakeAnthropic) -> None:
    upstream.script(message("Cached.", input_tokens=3, cache_read_input_tokens=40, output_tokens=2, split=3))
    spec = Messages(RequestLimits())
    reader = spec.stream_reader(spec.describe({**BODY, "stream": True}))
    async for event in provider.stream(call(upstream.url, {**BODY, "stream": True})):
        reader.observe(event)
    assert reader.terminated and (reader.facts.usage.input_tokens, reader.facts.usage.output_tokens) == (43, 2)
