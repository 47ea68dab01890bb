"""The OpenAI adapter against a fake OpenAI on a loopback port: what it sends, what it reads back,
how it re-frames streams, and which gateway error each provider failure becomes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from adapters.openai import OpenAIProvider
from gateway.endpoints.chat import MAX_TOKENS_REPORTED, ChatCompletions, ChatStreamReader, read_usage
from gateway.endpoints.checks import RequestLimits
from gateway.errors import (
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.types import CatalogModel, Deployment, ReplyFacts, UpstreamCall
from gateway.upstream import build_http_client
from tests.conftest import free_port
from tests.fakes.openai_upstream import (
    DONE,
    FakeOpenAI,
    Gate,
    Reply,
    delay,
    drop,
    error,
    raw,
    reply,
    tool_reply,
)

PROVIDER_KEY = "sk-fake-provider-key-0123456789"
LEAKED_KEY = "sk-fake-LEAKED-abcdef0123456789"
UPSTREAM_MODEL = "gpt-fake-primary"
BODY: dict[str, Any] = {"model": "primary", "messages": [{"role": "user", "content": "Say hello."}]}


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI.running() as fake:
        yield fake


@pytest.fixture
async def provider() -> AsyncIterator[OpenAIProvider]:
    client = build_http_client(timeout_s=10.0, connect_timeout_s=5.0, max_connections=8)
    try:
        yield OpenAIProvider(client)
    finally:
        await client.aclose()


def catalog_model(base_url: str, timeout_s: float | None = None) -> CatalogModel:
    deployment = Deployment(provider="openai", upstream_model=UPSTREAM_MODEL, base_url=base_url,
                            api_key_env="FAKE_OPENAI_KEY", timeout_s=timeout_s)
    return CatalogModel(name="primary", provider="openai", upstream_model=UPSTREAM_MODEL, base_url=base_url,
                        api_key_env="FAKE_OPENAI_KEY", timeout_s=timeout_s, deployments=(deployment,))


def call(upstream: FakeOpenAI, body: dict[str, Any] | None = None, *, timeout_s: float | None = None
         ) -> UpstreamCall:
    body = body or BODY
    model = catalog_model(upstream.url, timeout_s)
    return UpstreamCall(endpoint="chat.completions", model=model, deployment=model.deployments[0], body=body,
                        api_key=PROVIDER_KEY, stream=bool(body.get("stream")))


class Completion:
    """A reply as the pipeline sees it: the adapter's bytes, read by the chat endpoint spec."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        facts = ChatCompletions(RequestLimits()).read_reply(body)
        self.usage, self.response_model = facts.usage, facts.response_model
        self.finish_reasons, self.tool_calls = tuple(facts.finish_reasons), tuple(facts.tool_calls)


async def complete(provider: OpenAIProvider, upstream_call: UpstreamCall) -> Completion:
    return Completion((await provider.complete(upstream_call)).body)


async def collect(provider: OpenAIProvider, upstream_call: UpstreamCall, summary: ReplyFacts | None = None, *,
                  include_usage: bool = True) -> list[bytes]:
    """The events the client gets: the adapter's stream read by the chat spec's stream reader."""
    reader = ChatStreamReader(include_usage)
    if summary is not None:
        reader.facts = summary
    events = [event async for event in provider.stream(upstream_call)]
    return [out for event in events if (out := reader.observe(event)) is not None]


async def collect_until_error(provider: OpenAIProvider, upstream_call: UpstreamCall,
                              ) -> tuple[list[bytes], BaseException | None]:
    events: list[bytes] = []
    try:
        async for event in provider.stream(upstream_call):
            events.append(event)
    except Exception as exc:
        return events, exc
    return events, None


def is_whole_event(event: bytes) -> bool:
    """One SSE event: data lines ending in a blank line, whose data is [DONE] or a JSON object."""
    if not event.endswith(b"\n\n") or b"\n\n" in event[:-2]:
        return False
    data = b"\n".join(line[5:].lstrip() for line in event[:-2].split(b"\n") if line.startswith(b"data:"))
    if data == b"[DONE]":
        return True
    try:
        return isinstance(json.loads(data), dict)
    except ValueError:
        return False


def usage_chunks(events: list[bytes]) -> list[dict[str, Any]]:
    chunks = [json.loads(e[len(b"data: "):]) for e in events if e != DONE]
    return [c for c in chunks if c.get("choices") == [] and c.get("usage")]


# --- what the adapter sends ---------------------------------------------------------------------

async def test_a_completion_request_carries_the_upstream_model_the_key_and_the_rest_of_the_body(
        upstream: FakeOpenAI, provider: OpenAIProvider) -> None:
    body = {**BODY, "temperature": 0.2, "x_vendor_option": {"keep": [1, 2]}, "metadata": {"run": "r1"},
            "tools": [{"type": "function", "function": {"name": "search_web", "description": "Search.",
                                                        "parameters": {"type": "object", "properties": {}}}}],
            "tool_choice": "auto"}
    upstream.script(reply())

    await complete(provider, call(upstream, body))

    [sent] = upstream.requests
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert sent.headers["content-type"] == "application/json"
    assert sent.body == {**body, "model": UPSTREAM_MODEL}  # unknown fields and tools pass through untouched
    assert "stream_options" not in sent.body


async def test_a_stream_request_asks_for_usage_and_keeps_the_clients_stream_options(
        upstream: FakeOpenAI, provider: OpenAIProvider) -> None:
    body = {**BODY, "stream": True, "stream_options": {"include_usage": False, "include_obfuscation": False}}
    upstream.script(reply())

    await collect(provider, call(upstream, body), include_usage=False)

    [sent] = upstream.requests
    assert sent.body["model"] == UPSTREAM_MODEL and sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True, "include_obfuscation": False}
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"


async def test_no_authorization_header_is_sent_without_a_key(upstream: FakeOpenAI, provider: OpenAIProvider) -> None:
    upstream.script(reply())
    model = catalog_model(upstream.url)
    keyless = UpstreamCall(endpoint="chat.completions", model=model, deployment=model.deployments[0], body=BODY,
                           api_key="")

    await complete(provider, keyless)

    assert "authorization" not in upstream.requests[0].headers


async def test_requests_name_the_gateway_and_streams_refuse_compression(
        upstream: FakeOpenAI, provider: OpenAIProvider) -> None:
    upstream.script(reply(), reply())

    await complete(provider, call(upstream))
    await collect(provider, call(upstream, {**BODY, "stream": True}))

    plain, stream = upstream.requests
    assert plain.headers["user-agent"].startswith("lockgate")
    assert plain.headers["accept-encoding"] == "gzip, deflate"  # a JSON reply may come compressed
    assert stream.headers["accept-encoding"] == "identity"  # events are relayed as they arrive


async def test_a_providers_cookies_are_never_sent_back(upstream: FakeOpenAI, provider: OpenAIProvider) -> None:
    # One pooled client serves every caller: a cookie kept from one tenant's call (a load
    # balancer's, say) must not ride along on the next caller's. "localhost", not 127.0.0.1,
    # because cookie jars ignore cookies set by bare IP addresses.
    upstream.script(error(503, headers=(("set-cookie", "lb=tenant-a; Path=/"),)), reply())
    model = catalog_model(upstream.url.replace("127.0.0.1", "localhost"))
    localhost = UpstreamCall(endpoint="chat.completions", model=model, deployment=model.deployments[0], body=BODY,
                             api_key=PROVIDER_KEY)

    with pytest.raises(UpstreamUnavailable):
        await complete(provider, localhost)
    await complete(provider, localhost)

    assert [("cookie" in r.headers) for r in upstream.requests] == [False, False]


# --- non-streaming replies ----------------------------------------------------------------------

async def test_a_completion_is_passed_through_byte_for_byte_with_its_usage(
        upstream: FakeOpenAI, provider: OpenAIProvider) -> None:
    upstream.script(reply("Hello there.", model="gpt-fake-primary-2026-01-01", prompt_tokens=31,
                          completion_tokens=4))

    completion = await complete(provider, call(upstream))

    assert completion.body == upstream.replies[0]  # OpenAI's indented JSON, not re-serialised
    assert (completion.usage.input_tokens, completion.usage.output_tokens) == (31, 4)
    assert completion.response_model == "gpt-fake-primary-2026-01-01"
    assert completion.finish_reasons == ("stop",)
    assert completion.tool_calls == ()


async def test_a_completion_with_tool_calls_names_every_tool(upstream: FakeOpenAI, provider: OpenAIProvider) -> None:
    upstream.script(tool_reply("search_web", "transfer_funds"))

    completion = await complete(provider, call(upstream))

    assert completion.tool_calls == ("search_web", "transfer_funds")
    assert completion.finish_reasons == ("tool_calls",)
    message = json.loads(completion.body)["choices"][0]["message"]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["search_web", "transfer_funds"]


async def test_a_length_finish_is_reported(upstream: FakeOpenAI, provider: OpenAIProvider) -> None:
    upstream.script(reply("Truncat", finish_reason="length"))

    completion = await complete(provider, call(upstream))

    assert completion.finish_reasons == ("length",)


@pytest.mark.parametrize("body", [b"<html>Bad gateway</html>", b"[]", b'{"choices": ["not a choice"]}',
                                  b'{"choices": [{"index": 0, "message": "not a message"}]}'],
                         ids=["html", "array", "choice-not-object", "message-not-object"])
async def test_a_200_that_is_not_a_chat_completion_is_an_upstream_error(
        upstream: FakeOpenAI, provider: OpenAIProvider, body: bytes) -> None:
    """The Provider contract: failures are UpstreamError subclasses, never a bare Python error
    (which the pipeline would turn into a 500 'the gateway failed')."""
    upstream.script(raw(200, body))

    with pytest.raises(UpstreamError):
        await complete(provider, call(upstream))


# --- streaming replies --------------------------------------------------------------------------

@pytest.mark.parametrize(("split", "pause_s"), [(None, 0.0), (1, 0.0), (7, 0.001), (61, 0.001)],
                         ids=["whole-events", "every-byte", "7-bytes", "61-bytes"])
@pytest.mark.parametrize("include_usage", [True, False], ids=["with-usage", "without-usage"])
async def test_a_stream_is_reframed_into_the_providers_events(
        upstream: FakeOpenAI, provider: OpenAIProvider, split: int | None, pause_s: float,
        include_usage: bool) -> None:
    cassette = reply("One two three.", split=split, pause_s=pause_s)
    upstream.script(cassette)
    summary = ReplyFacts()

    events = await collect(provider, call(upstream, {**BODY, "stream": True}), summary, include_usage=include_usage)

    sent = cassette.events(UPSTREAM_MODEL, include_usage=True)  # the adapter always asks for usage
    assert b"".join(sent) == upstream.replies[0]
    expected = sent if include_usage else [e for e in sent if not usage_chunks([e])]
    assert events == expected
    assert all(is_whole_event(e) for e in events)
    assert len(usage_chunks(events)) == (1 if include_usage else 0)
    assert events[-1] == DONE
    assert (summary.usage.input_tokens, summary.usage.output_tokens) == (9, 12)  # read even when dropped
    assert summary.response_model == UPSTREAM_MODEL
    assert summary.finish_reasons == ["stop"]


async def test_a_streamed_tool_call_is_named_once_per_tool(upstream: FakeOpenAI, provider: OpenAIProvider) -> None:
    cassette = tool_reply("search_web", "transfer_funds", split=13)
    upstream.script(cassette)
    summary = ReplyFacts()

    events = await collect(provider, call(upstream, {**BODY, "stream": True}), summary)

    assert summary.tool_calls == ["search_web", "transfer_funds"]
    assert summary.finish_reasons == ["tool_calls"]
    arguments: dict[int, str] = {}
    for event in events[:-1]:
        for choice in json.loads(event[len(b"data: "):])["choices"]:
            for delta in choice["delta"].get("tool_calls") or ():
                arguments[delta["index"]] = arguments.get(delta["index"], "") + delta["function"]["arguments"]
    assert arguments == {i: c.arguments for i, c in enumerate(cassette.tool_calls)}


async def test_a_stream_cut_mid_event_fails_after_the_whole_events(
        upstream: FakeOpenAI, provider: OpenAIProvider) -> None:
    upstream.script(reply("One two three.", cut_after_events=2, cut_partial_bytes=17, split=5))

    events, failure = await collect_until_error(provider, call(upstream, {**BODY, "stream": True}))

    assert isinstance(failure, UpstreamUnavailable)
    assert len(events) == 2 and all(is_whole_event(e) for e in events)


async def test_a_stream_that_ends_inside_an_event_never_relays_the_partial_event(
        upstream: FakeOpenAI, provider: OpenAIProvider) -> None:
    """The body ends cleanly (the chunked encoding is terminated) but in the middle of an event.
    The SSE spec says an incomplete event at the end of the stream is discarded, not dispatched;
    relaying it hands the client a truncated JSON document."""
    upstream.script(reply("One two three.", cut_after_events=2, cut_partial_bytes=17, cut_cleanly=True))

    events, _ = await collect_until_error(provider, call(upstream, {**BODY, "stream": True}))

    assert events[:2] == reply("One two three.").events(UPSTREAM_MODEL, include_usage=True)[:2]
    assert all(is_whole_event(e) for e in events), events[2:]


# --- provider errors ----------------------------------------------------------------------------

STATUS_ERRORS: list[tuple[int, type[UpstreamError]]] = [
    (400, UpstreamRejected), (404, UpstreamRejected), (422, UpstreamRejected),
    (401, UpstreamError), (403, UpstreamError),
    (408, UpstreamUnavailable), (409, UpstreamUnavailable), (429, UpstreamRateLimited),
    (500, UpstreamUnavailable), (502, UpstreamUnavailable), (503, UpstreamUnavailable), (504, UpstreamUnavailable),
]


async def failure_of(provider: OpenAIProvider, upstream_call: UpstreamCall, stream: bool) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        if stream:
            await collect(provider, upstream_call)
        else:
            await complete(provider, upstream_call)
    return caught.value


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize(("status", "expected"), STATUS_ERRORS, ids=[str(s) for s, _ in STATUS_ERRORS])
async def test_each_provider_status_becomes_its_gateway_error(
        upstream: FakeOpenAI, provider: OpenAIProvider, status: int, expected: type[UpstreamError],
        stream: bool) -> None:
    upstream.script(error(status))

    failure = await failure_of(provider, call(upstream, {**BODY, "stream": stream}), stream)

    if expected is UpstreamError:  # credentials: a plain 502 (or a subclass no other row names)
        assert not isinstance(failure, tuple(e for _, e in STATUS_ERRORS if e is not UpstreamError))
    else:
        assert type(failure) is expected
    assert failure.status == expected.status


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_a_rejected_request_relays_the_providers_message(
        upstream: FakeOpenAI, provider: OpenAIProvider, stream: bool) -> None:
    message = "Invalid value for 'temperature': expected a number between 0 and 2."
    upstream.script(error(400, message, param="temperature", code="invalid_value"))

    failure = await failure_of(provider, call(upstream, {**BODY, "stream": stream}), stream)

    assert type(failure) is UpstreamRejected
    assert message in failure.message
    assert not failure.retryable


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("status", [401, 403])
async def test_a_credentials_failure_never_repeats_the_providers_message(
        upstream: FakeOpenAI, provider: OpenAIProvider, status: int, stream: bool) -> None:
    message = f"Incorrect API key provided: {LEAKED_KEY}. You can find your API key at https://platform.openai.com."
    upstream.script(error(status, message))

    failure = await failure_of(provider, call(upstream, {**BODY, "stream": stream}), stream)

    assert isinstance(failure, UpstreamError) and (failure.status, failure.type) == (502, "upstream_error")
    assert LEAKED_KEY not in failure.message and "Incorrect API key" not in failure.message
    assert PROVIDER_KEY not in failure.message


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_a_provider_that_does_not_answer_in_time_is_a_timeout(
        upstream: FakeOpenAI, provider: OpenAIProvider, stream: bool) -> None:
    upstream.script(delay(5.0))

    failure = await failure_of(provider, call(upstream, {**BODY, "stream": stream}, timeout_s=0.3), stream)

    assert type(failure) is UpstreamTimeout


async def test_a_stream_that_stalls_after_its_first_event_is_a_timeout(
        upstream: FakeOpenAI, provider: OpenAIProvider) -> None:
    gate = Gate()  # never opened: the provider goes quiet after one event
    upstream.script(reply(hold=gate, hold_after_events=1))

    events, failure = await collect_until_error(provider, call(upstream, {**BODY, "stream": True}, timeout_s=0.3))

    assert type(failure) is UpstreamTimeout
    assert len(events) == 1 and is_whole_event(events[0])


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_a_refused_connection_is_unavailable(provider: OpenAIProvider, stream: bool) -> None:
    model = catalog_model(f"http://127.0.0.1:{free_port()}/v1")
    nobody = UpstreamCall(endpoint="chat.completions", model=model, deployment=model.deployments[0],
                          body={**BODY, "stream": stream}, api_key=PROVIDER_KEY, stream=stream)

    failure = await failure_of(provider, nobody, stream)

    assert type(failure) is UpstreamUnavailable


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_a_connection_closed_without_an_answer_is_unavailable(
        upstream: FakeOpenAI, provider: OpenAIProvider, stream: bool) -> None:
    upstream.script(drop())

    failure = await failure_of(provider, call(upstream, {**BODY, "stream": stream}), stream)

    assert type(failure) is UpstreamUnavailable


async def test_the_connection_is_reused_after_errors(upstream: FakeOpenAI, provider: OpenAIProvider) -> None:
    """A 5xx answer leaves the pooled connection usable; the next call succeeds on it."""
    upstream.script(error(503), reply("after"))

    with pytest.raises(UpstreamUnavailable):
        await complete(provider, call(upstream))
    completion: Completion = await complete(provider, call(upstream))

    assert json.loads(completion.body)["choices"][0]["message"]["content"] == "after"
    assert upstream.pending == 0
    assert upstream.requests[0].connection == upstream.requests[1].connection


def test_reply_renders_both_wire_formats() -> None:
    """The fake itself: a reply's stream carries the same text and tool calls as its completion."""
    cassette: Reply = tool_reply("search_web", content="Let me look.")
    completion = cassette.completion("m")
    chunks = cassette.chunks("m", include_usage=True)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == completion["choices"][0]["message"]["content"] == "Let me look."
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == completion["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


@pytest.mark.parametrize(("reported", "counted"), [
    ({"prompt_tokens": 12, "completion_tokens": 3}, (12, 3)),
    ({"prompt_tokens": 3 * 10**9, "completion_tokens": -5}, (MAX_TOKENS_REPORTED, 0)),
    ({"prompt_tokens": "12", "completion_tokens": None}, (0, 0)),
    ({"prompt_tokens": True, "completion_tokens": 7.0}, (0, 7)),
    (None, (0, 0)),
])
def test_usage_from_a_misbehaving_provider_is_kept_within_bounds(reported: Any, counted: tuple[int, int]) -> None:
    # The audit's token columns are 32-bit on PostgreSQL: a value past them would make the
    # call's record one the store refuses.
    usage = read_usage(reported)
    assert (usage.input_tokens, usage.output_tokens) == counted
