"""Stage 6, route and call, end to end: the openai SDK -> a real gateway -> a fake OpenAI.

The catalog has two models on the fake provider, ``primary`` and ``backup`` (each with its own
upstream model name), and the policy lets team research use both, with ``backup`` as the
fallback of ``primary``. Every test reads the decision record the call left in the audit.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import ROOT, Gateway, start_gateway, stop_gateway
from tests.fakes.openai_upstream import FakeOpenAI, Gate, delay, error, reply, tool_reply

PROVIDER_KEY = "sk-fake-provider-key-routing-0123456789"
LEAKED_KEY = "sk-fake-LEAKED-routing-abcdef0123456789"
PRIMARY, BACKUP = "gpt-fake-primary", "gpt-fake-backup"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "search_web", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]

Serve = Callable[..., Gateway]


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI.running() as fake:
        yield fake


def write_policy(folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(ROOT / "policies" / "lockgate.rego", folder / "lockgate.rego")
    (folder / "data.json").write_text(json.dumps({"lockgate": {
        "aliases": {},
        "fallbacks": {"primary": ["backup"]},
        "teams": {"research": {"models": ["primary", "backup"], "monthly_budget_usd": 100}},
        "approval_tools": {},
    }}))
    return folder


def catalog(upstream: FakeOpenAI) -> str:
    common = {"provider": "openai", "base_url": upstream.url, "api_key_env": "FAKE_OPENAI_KEY",
              "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0}
    return json.dumps([{"name": "primary", "upstream_model": PRIMARY, **common},
                       {"name": "backup", "upstream_model": BACKUP, **common}])


@pytest.fixture
def serve(store_url: str, tmp_path: Path, upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> Iterator[Serve]:
    """Start the gateway in front of the fake (retries 1, generous timeout unless a test says)."""
    monkeypatch.setenv("FAKE_OPENAI_KEY", PROVIDER_KEY)  # start_gateway copies os.environ
    policy = write_policy(tmp_path / "policy")
    started: list[Gateway] = []

    def start(**settings: str) -> Gateway:
        values = {"models": catalog(upstream), "policy_dir": str(policy), "upstream_retries": "1",
                  "upstream_timeout_s": "30", **settings}
        started.append(start_gateway(store_url, tmp_path, **values))
        return started[-1]

    yield start
    for gateway in started:
        stop_gateway(gateway)


def sdk(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=gateway.create_key(team="research"), max_retries=0,
                         timeout=30)


def record_of(gateway: Gateway, headers: Any, spans: int = 3) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The one decision record of a call (by its lockgate-trace-id header) and its spans."""
    decisions, found = gateway.trace(headers["lockgate-trace-id"], spans=spans)
    assert len(decisions) == 1, decisions
    return decisions[0], found


def attempts(found: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The provider calls of a trace: (catalog model, span status) in the order they started."""
    return [(s["attributes"]["lockgate.catalog_model"], s["status"]) for s in found if s["kind"] == "CLIENT"]


def route_of(record: dict[str, Any]) -> tuple[Any, ...]:
    return record["outcome"], record["status_code"], record["routed_model"], record["provider"]


# --- the request that reaches the provider -------------------------------------------------------

def test_a_call_reaches_the_provider_as_the_upstream_model_with_the_provider_key(
        serve: Serve, upstream: FakeOpenAI) -> None:
    gateway = serve()
    client = sdk(gateway)
    upstream.script(tool_reply("search_web", content=None, prompt_tokens=40, completion_tokens=7))

    raw = client.chat.completions.with_raw_response.create(
        model="primary", messages=MESSAGES, tools=TOOLS, tool_choice="auto", temperature=0.3,
        extra_body={"x_vendor_option": {"keep": [1, 2]}})
    completion = raw.parse()

    [sent] = upstream.requests
    assert sent.model == PRIMARY
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"  # never the caller's Lockgate key
    assert client.api_key not in json.dumps(sent.headers)
    assert sent.body["tools"] == TOOLS and sent.body["tool_choice"] == "auto"
    assert sent.body["x_vendor_option"] == {"keep": [1, 2]} and sent.body["temperature"] == 0.3
    assert sent.body["messages"] == MESSAGES
    assert completion.model == PRIMARY
    assert completion.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in completion.choices[0].message.tool_calls or []
            if c.type == "function"] == ["search_web"]
    record, found = record_of(gateway, raw.headers)
    assert route_of(record) == ("allowed", 200, "primary", "openai")
    assert (record["requested_model"], record["input_tokens"], record["output_tokens"]) == ("primary", 40, 7)
    assert record["cost_micro_usd"] == 40 * 1 + 7 * 2
    assert attempts(found) == [("primary", "UNSET")]


# --- retries and fallbacks -----------------------------------------------------------------------

def test_a_server_error_is_retried_on_the_same_model(serve: Serve, upstream: FakeOpenAI) -> None:
    gateway = serve()
    upstream.script(error(500), reply("Second time lucky."))

    raw = sdk(gateway).chat.completions.with_raw_response.create(model="primary", messages=MESSAGES)

    assert raw.parse().choices[0].message.content == "Second time lucky."
    assert [r.model for r in upstream.requests] == [PRIMARY, PRIMARY]
    record, found = record_of(gateway, raw.headers, spans=4)
    assert route_of(record) == ("allowed", 200, "primary", "openai")
    assert attempts(found) == [("primary", "ERROR"), ("primary", "UNSET")]


def test_repeated_unavailability_falls_back_to_the_next_model(serve: Serve, upstream: FakeOpenAI) -> None:
    gateway = serve()
    upstream.script(error(503), error(503), reply("From the backup."))

    raw = sdk(gateway).chat.completions.with_raw_response.create(model="primary", messages=MESSAGES)

    assert raw.http_response.status_code == 200
    completion = raw.parse()
    assert completion.choices[0].message.content == "From the backup." and completion.model == BACKUP
    assert [r.model for r in upstream.requests] == [PRIMARY, PRIMARY, BACKUP]
    assert all(r.headers["authorization"] == f"Bearer {PROVIDER_KEY}" for r in upstream.requests)
    record, found = record_of(gateway, raw.headers, spans=5)
    assert route_of(record) == ("allowed", 200, "backup", "openai")
    assert record["requested_model"] == "primary"
    assert attempts(found) == [("primary", "ERROR"), ("primary", "ERROR"), ("backup", "UNSET")]


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_rejected_request_is_not_retried_and_keeps_the_providers_message(
        serve: Serve, upstream: FakeOpenAI, stream: bool) -> None:
    gateway = serve()
    message = "Invalid value for 'temperature': expected a number between 0 and 2."
    upstream.script(error(400, message, param="temperature", code="invalid_value"), reply(), reply())

    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway).chat.completions.create(model="primary", messages=MESSAGES, temperature=7, stream=stream)

    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict) and message in caught.value.body["message"]
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(upstream.requests) == 1
    record, _ = record_of(gateway, caught.value.response.headers)
    assert route_of(record) == ("failed", 400, "primary", "openai")


def test_a_provider_credentials_failure_is_a_502_that_never_shows_the_key(
        serve: Serve, upstream: FakeOpenAI) -> None:
    gateway = serve()
    provider_message = f"Incorrect API key provided: {LEAKED_KEY}. You can find your API key at https://x.test."
    upstream.script(*[error(401, provider_message)] * 4)  # whatever the retry policy, every answer is 401

    with pytest.raises(openai.InternalServerError) as caught:
        sdk(gateway).chat.completions.create(model="primary", messages=MESSAGES)

    assert caught.value.status_code == 502
    body = caught.value.response.text
    assert json.loads(body)["error"]["type"] == "upstream_error"
    assert LEAKED_KEY not in body and "Incorrect API key" not in body and PROVIDER_KEY not in body
    record, found = record_of(gateway, caught.value.response.headers)
    assert route_of(record)[:2] == ("failed", 502) and record["provider"] == "openai"
    audit = json.dumps(record, default=str) + json.dumps(found, default=str)
    assert LEAKED_KEY not in audit and PROVIDER_KEY not in audit
    assert LEAKED_KEY not in gateway.log.read_text()


def test_a_provider_credentials_failure_is_not_retried(serve: Serve, upstream: FakeOpenAI) -> None:
    """routing.py: only timeouts, connection failures, 429 and 5xx are retried. The same key will
    be refused again, so a 401 must not be sent three more times (nor hide behind a fallback)."""
    gateway = serve()
    upstream.script(error(401, f"Incorrect API key provided: {LEAKED_KEY}."))  # any retry gets the fake's 500

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway).chat.completions.create(model="primary", messages=MESSAGES)

    assert caught.value.status_code == 502
    assert [r.model for r in upstream.requests] == [PRIMARY]


def test_a_provider_that_does_not_answer_in_time_is_a_504(serve: Serve, upstream: FakeOpenAI) -> None:
    gateway = serve(upstream_timeout_s="0.5")
    upstream.script(delay(10.0), delay(10.0))  # backup has no fallbacks: two attempts, both too slow

    with pytest.raises(openai.InternalServerError) as caught:
        sdk(gateway).chat.completions.create(model="backup", messages=MESSAGES)

    assert caught.value.status_code == 504
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "upstream_timeout"
    assert [r.model for r in upstream.requests] == [BACKUP, BACKUP]
    record, found = record_of(gateway, caught.value.response.headers, spans=4)
    assert route_of(record) == ("failed", 504, "backup", "openai")
    assert record["error_type"] == "upstream_timeout"
    assert attempts(found) == [("backup", "ERROR"), ("backup", "ERROR")]


def test_a_provider_rate_limit_is_a_failure_not_a_policy_denial(serve: Serve, upstream: FakeOpenAI) -> None:
    """Outcome 'denied' means the gateway refused the call (key, policy, budget); a provider that
    rate-limits us failed to serve it, whatever status it is relayed with."""
    gateway = serve()
    upstream.script(*[error(429)] * 4)

    with pytest.raises(openai.RateLimitError) as caught:
        sdk(gateway).chat.completions.create(model="primary", messages=MESSAGES)

    assert caught.value.status_code == 429
    assert [r.model for r in upstream.requests] == [PRIMARY, PRIMARY, BACKUP, BACKUP]
    record, _ = record_of(gateway, caught.value.response.headers)
    assert route_of(record) == ("failed", 429, "backup", "openai")


# --- streams -------------------------------------------------------------------------------------

def test_a_stream_is_relayed_event_by_event_without_the_usage_chunk(serve: Serve, upstream: FakeOpenAI) -> None:
    gateway = serve()
    gate = Gate()  # the fake sends two events, then waits until the client has seen the first
    upstream.script(reply("One two three four.", split=7, hold=gate, hold_after_events=2))

    raw = sdk(gateway).chat.completions.with_raw_response.create(model="primary", messages=MESSAGES, stream=True)
    chunks = iter(raw.parse())
    first = next(chunks)
    buffered = gate.timed_out  # True only if the first chunk could not arrive while the fake waited
    gate.open()
    rest = list(chunks)

    assert not buffered and not gate.timed_out
    assert first.choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in rest if c.choices and c.choices[0].delta.content]
    assert content == ["One", " two", " three", " four."]
    assert rest[-1].choices[0].finish_reason == "stop"
    assert all(c.choices for c in [first, *rest]) and all(c.usage is None for c in [first, *rest])
    [sent] = upstream.requests
    assert sent.model == PRIMARY and sent.body["stream_options"] == {"include_usage": True}
    record, _ = record_of(gateway, raw.headers)
    assert route_of(record) == ("allowed", 200, "primary", "openai") and record["stream"]
    assert (record["input_tokens"], record["output_tokens"]) == (9, 12)  # charged from the dropped chunk


def test_a_stream_keeps_the_usage_chunk_when_the_client_asks(serve: Serve, upstream: FakeOpenAI) -> None:
    gateway = serve()
    upstream.script(reply("Counted.", split=11, prompt_tokens=21, completion_tokens=3))

    raw = sdk(gateway).chat.completions.with_raw_response.create(
        model="primary", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = list(raw.parse())

    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (21, 3)
    assert all(c.usage is None for c in chunks[:-1])
    record, _ = record_of(gateway, raw.headers)
    assert (record["input_tokens"], record["output_tokens"]) == (21, 3)


def test_a_stream_that_fails_before_its_first_event_falls_back(serve: Serve, upstream: FakeOpenAI) -> None:
    gateway = serve()
    # primary: a 503, then a stream whose connection drops before any event; then backup answers.
    upstream.script(error(503), reply(cut_after_events=0), reply("From the backup."))

    raw = sdk(gateway).chat.completions.with_raw_response.create(model="primary", messages=MESSAGES, stream=True)
    chunks = list(raw.parse())

    assert raw.http_response.status_code == 200
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "From the backup."
    assert {c.model for c in chunks} == {BACKUP}
    assert [r.model for r in upstream.requests] == [PRIMARY, PRIMARY, BACKUP]
    record, found = record_of(gateway, raw.headers, spans=5)
    assert route_of(record) == ("allowed", 200, "backup", "openai")
    assert attempts(found) == [("primary", "ERROR"), ("primary", "ERROR"), ("backup", "UNSET")]


def test_a_stream_cut_after_its_first_event_ends_in_an_error_event(serve: Serve, upstream: FakeOpenAI) -> None:
    """Once the client has an event nothing can be retried: it gets an error event, the audit a failure."""
    gateway = serve()
    upstream.script(reply("One two three.", cut_after_events=2, cut_partial_bytes=20), reply())

    raw = sdk(gateway).chat.completions.with_raw_response.create(model="primary", messages=MESSAGES, stream=True)
    received: list[Any] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in raw.parse():
            received.append(chunk)

    assert [c.choices[0].delta.content for c in received] == ["", "One"]
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "upstream_unavailable"
    assert len(upstream.requests) == 1
    record, _ = record_of(gateway, raw.headers)
    assert route_of(record) == ("failed", 502, "primary", "openai")
