"""Stage 6, route and call, end to end: the openai SDK -> a real gateway -> a fake OpenAI.

The catalog has two models on the fake provider, ``primary`` and ``backup`` (each with its own
upstream model name), and the policy lets team research use both, with ``backup`` as the
fallback of ``primary``. ``pooled`` has two deployments: one at a port where nothing listens
(almost always picked first, by weight) and one on the fake; ``lonely`` has only the dead one.
``accounts`` has three deployments on the fake: two under the usual key (the first almost always
picked first) and one under a second key. Every end-to-end test reads the decision record the
call left in the audit.

Fault by fault (refused, stalled, trickling, cut off, and what the SDK then does):
tests/test_faults.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracer

from gateway.errors import UpstreamTimeout
from gateway.routing import DeploymentHealth, Router, RoutingLimits, StreamWatch
from gateway.settings import load_settings
from gateway.types import CatalogModel, Deployment
from tests.conftest import Gateway, in_process, start_gateway, stop_gateway, write_policy
from tests.fakes.openai_upstream import FakeOpenAI, Gate, error, reply, tool_reply

PROVIDER_KEY = "sk-fake-provider-key-routing-0123456789"
SECOND_KEY = "sk-fake-second-account-routing-0123456789"
LEAKED_KEY = "sk-fake-LEAKED-routing-abcdef0123456789"
PRIMARY, BACKUP = "gpt-fake-primary", "gpt-fake-backup"
DEAD, ALIVE = "gpt-fake-dead", "gpt-fake-alive"
FIRST_ACCOUNT, SAME_ACCOUNT = "gpt-fake-first-account", "gpt-fake-same-account"
SECOND_ACCOUNT = "gpt-fake-second-account"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "search_web", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]

Serve = Callable[..., Gateway]

# A port bound for the whole session and never listened on: every connection to it is refused,
# and no server a test starts can be given it (a port merely closed again could be).
_REFUSING = socket.socket()
_REFUSING.bind(("127.0.0.1", 0))
NOWHERE = f"http://127.0.0.1:{_REFUSING.getsockname()[1]}/v1"


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI.running() as fake:
        yield fake


POLICY_DATA: dict[str, Any] = {
    "aliases": {},
    "fallbacks": {"primary": ["backup"]},
    "teams": {"research": {"models": ["primary", "backup", "pooled", "lonely", "accounts"],
                           "monthly_budget_micro_usd": 100_000_000}},
    "approval_tools": {},
}


def catalog(upstream: FakeOpenAI) -> str:
    common = {"provider": "openai", "base_url": upstream.url, "api_key_env": "FAKE_OPENAI_KEY",
              "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0}
    # The dead deployment is picked first but for one call in 10^12.
    dead = {"base_url": NOWHERE, "upstream_model": DEAD, "weight": 1e6}
    alive = {"base_url": upstream.url, "upstream_model": ALIVE, "weight": 1e-6}
    # The first account's deployment is picked first but for one call in 10^12; while it cools
    # down, the second account's is picked first but for one call in 10^12.
    accounts = [{"upstream_model": FIRST_ACCOUNT, "weight": 1e12}, {"upstream_model": SAME_ACCOUNT, "weight": 1e-12},
                {"upstream_model": SECOND_ACCOUNT, "api_key_env": "FAKE_OPENAI_SECOND_KEY", "weight": 1}]
    return json.dumps([{"name": "primary", "upstream_model": PRIMARY, **common},
                       {"name": "backup", "upstream_model": BACKUP, **common},
                       {"name": "pooled", **common, "deployments": [dead, alive]},
                       {"name": "lonely", **common, "deployments": [dead]},
                       {"name": "accounts", **common, "deployments": accounts}])


@pytest.fixture
def serve(store_url: str, tmp_path: Path, upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> Iterator[Serve]:
    """Start the gateway in front of the fake (retries 1, generous timeouts unless a test says)."""
    monkeypatch.setenv("FAKE_OPENAI_KEY", PROVIDER_KEY)  # start_gateway copies os.environ
    policy = write_policy(tmp_path / "policy", POLICY_DATA)
    started: list[Gateway] = []

    def start(**settings: str) -> Gateway:
        values = {"models": catalog(upstream), "policy_dir": str(policy), "upstream_retries": "1",
                  "upstream_first_byte_timeout_s": "30", "upstream_deadline_s": "60", **settings}
        started.append(start_gateway(store_url, tmp_path, **values))
        return started[-1]

    yield start
    for gateway in started:
        stop_gateway(gateway)


def sdk(gateway: Gateway, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=gateway.create_key(team="research"),
                         **{"max_retries": 0, "timeout": 30, **options})


def record_of(gateway: Gateway, headers: Any, spans: int = 3) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The one decision record of a call (by its lockgate-trace-id header) and its spans."""
    decisions, found = gateway.trace(headers["lockgate-trace-id"], spans=spans)
    assert len(decisions) == 1, decisions
    return decisions[0], found


def attempts(found: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The provider calls of a trace: (catalog model, span status) in the order they started."""
    return [(s["attributes"]["lockgate.catalog_model"], s["status"]) for s in found if s["kind"] == "CLIENT"]


def deployments_tried(found: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The provider calls of a trace: (upstream model, span status) in the order they started."""
    return [(s["attributes"]["gen_ai.request.model"], s["status"]) for s in found if s["kind"] == "CLIENT"]


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


# --- deployments: the order of attempts, and the cool-down -----------------------------------------

class Serving:
    """A provider as far as ``Router.order`` looks at it: the endpoints it serves."""

    def __init__(self, name: str, endpoints: frozenset[str] = frozenset({"chat.completions"})) -> None:
        self.name = name
        self.endpoints = endpoints


def deployment(name: str, weight: float = 1.0, provider: str = "openai") -> Deployment:
    return Deployment(provider=provider, upstream_model=name, base_url=f"http://{name}.test/v1", weight=weight)


def model_of(name: str, *deployments: Deployment) -> CatalogModel:
    first = deployments[0]
    return CatalogModel(name=name, provider=first.provider, upstream_model=first.upstream_model,
                        base_url=first.base_url, deployments=deployments)


def router_for(*models: CatalogModel, seed: int = 7, **limits: Any) -> Router:
    providers: dict[str, Any] = {"openai": Serving("openai"),
                                 "embedder": Serving("embedder", frozenset({"embeddings"}))}
    return Router(models, providers, lambda env: "", NoOpTracer(), RoutingLimits(**limits), random.Random(seed))


def test_the_first_deployment_is_picked_by_weight_and_the_others_follow_in_order() -> None:
    heavy, light, spare = deployment("heavy", 3.0), deployment("light", 1.0), deployment("spare", 0.5)
    pooled = model_of("pooled", heavy, light, spare)
    fallback = model_of("fallback", deployment("fb-1"), deployment("fb-2"))
    router = router_for(pooled, fallback)

    orders = [router.order("chat.completions", [pooled, fallback]) for _ in range(4500)]

    firsts = [order[0][1].upstream_model for order in orders]
    # Weights 3 : 1 : 0.5 -> 3000, 1000, 500 of 4500 expected (a seeded generator: the same every run).
    assert 2850 < firsts.count("heavy") < 3150 and 900 < firsts.count("light") < 1100
    assert 420 < firsts.count("spare") < 580
    for order in orders:
        chosen = order[0][1]
        assert [d for _, d in order[:3]] == [chosen] + [d for d in (heavy, light, spare) if d is not chosen]
        # Then the fallback's deployments, picked the same way (equal weights: either may lead).
        assert sorted((m.name, d.upstream_model) for m, d in order[3:]) == [("fallback", "fb-1"), ("fallback", "fb-2")]
    assert {order[3][1].upstream_model for order in orders} == {"fb-1", "fb-2"}


def test_only_deployments_that_serve_the_endpoint_are_tried() -> None:
    mixed = model_of("mixed", deployment("chat-only"), deployment("embed-only", provider="embedder"))
    router = router_for(mixed)

    assert [d.upstream_model for _, d in router.order("embeddings", [mixed])] == ["embed-only"]
    assert [d.upstream_model for _, d in router.order("chat.completions", [mixed])] == ["chat-only"]


def test_a_cooling_deployment_is_skipped_unless_every_one_is_cooling() -> None:
    first, second, third = deployment("first", 1e9), deployment("second"), deployment("third")
    pooled = model_of("pooled", first, second)
    fallback = model_of("fallback", third)
    router = router_for(pooled, fallback, cooldown_failures=2, cooldown_s=60)

    router.health.failed(first)
    assert router.order("chat.completions", [pooled, fallback])[0][1] is first  # one failure: not yet
    router.health.failed(first)
    assert [d for _, d in router.order("chat.completions", [pooled, fallback])] == [second, third]
    for _ in range(2):
        router.health.failed(third)
        router.health.failed(second)
    # Every deployment cooling: the one whose last failure is the oldest is still tried, alone.
    assert [d for _, d in router.order("chat.completions", [pooled, fallback])] == [first]


def test_deployment_health_cools_down_recovers_and_forgets_on_success() -> None:
    now = [1000.0]
    health = DeploymentHealth(failures=3, cooldown_s=30, clock=lambda: now[0])
    sick = deployment("sick")

    for _ in range(2):
        health.failed(sick)
    assert not health.cooling(sick)
    health.failed(sick)
    assert health.cooling(sick)
    now[0] += 29.9
    assert health.cooling(sick)
    now[0] += 0.2
    assert not health.cooling(sick)  # tried again after its cool-down...
    health.failed(sick)
    assert health.cooling(sick)  # ...and one more failure sends it back
    health.succeeded(sick)
    assert not health.cooling(sick)
    health.failed(sick)
    assert not health.cooling(sick)  # a success forgot the earlier failures

    never = DeploymentHealth(failures=0, cooldown_s=30, clock=lambda: now[0])
    for _ in range(10):
        never.failed(sick)
    assert not never.cooling(sick)


def test_a_refused_connection_is_retried_then_the_next_deployment_answers(serve: Serve, upstream: FakeOpenAI) -> None:
    gateway = serve()
    upstream.script(reply("From the live deployment."))

    raw = sdk(gateway).chat.completions.with_raw_response.create(model="pooled", messages=MESSAGES)

    assert raw.parse().choices[0].message.content == "From the live deployment."
    assert [r.model for r in upstream.requests] == [ALIVE]
    record, found = record_of(gateway, raw.headers, spans=5)
    assert route_of(record) == ("allowed", 200, "pooled", "openai")
    assert deployments_tried(found) == [(DEAD, "ERROR"), (DEAD, "ERROR"), (ALIVE, "UNSET")]
    dead = [s for s in found if s["kind"] == "CLIENT" and s["status"] == "ERROR"]
    assert all(s["attributes"]["lockgate.upstream.billable_risk"] is False for s in dead)  # never sent


def test_a_failing_deployment_cools_down_and_is_skipped(serve: Serve, upstream: FakeOpenAI) -> None:
    gateway = serve(upstream_cooldown_failures="2", upstream_cooldown_s="600")
    upstream.script(reply("One."), reply("Two."))
    client = sdk(gateway)

    first = client.chat.completions.with_raw_response.create(model="pooled", messages=MESSAGES)
    second = client.chat.completions.with_raw_response.create(model="pooled", messages=MESSAGES)

    assert [r.parse().choices[0].message.content for r in (first, second)] == ["One.", "Two."]
    assert [r.model for r in upstream.requests] == [ALIVE, ALIVE]
    _, found = record_of(gateway, first.headers, spans=5)
    assert deployments_tried(found) == [(DEAD, "ERROR"), (DEAD, "ERROR"), (ALIVE, "UNSET")]
    _, found = record_of(gateway, second.headers, spans=3)
    assert deployments_tried(found) == [(ALIVE, "UNSET")]  # the dead one is cooling down: not even tried


def test_when_every_deployment_is_cooling_down_the_call_is_still_tried(serve: Serve) -> None:
    gateway = serve(upstream_cooldown_failures="2", upstream_cooldown_s="600")
    client = sdk(gateway)

    failures = []
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="lonely", messages=MESSAGES)
        failures.append(caught.value)

    for failure in failures:  # refused by the provider's address, never by the gateway
        assert failure.status_code == 502 and isinstance(failure.body, dict)
        assert failure.body["code"] == "upstream_unavailable"
    _, found = record_of(gateway, failures[0].response.headers, spans=4)
    assert deployments_tried(found) == [(DEAD, "ERROR"), (DEAD, "ERROR")]
    _, found = record_of(gateway, failures[1].response.headers, spans=3)
    assert deployments_tried(found) == [(DEAD, "ERROR")]  # tried once more; no retry while it cools down


# --- retries and fallbacks -----------------------------------------------------------------------

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


def test_a_rate_limit_is_retried_after_the_wait_the_provider_asks(serve: Serve, upstream: FakeOpenAI) -> None:
    gateway = serve()
    upstream.script(error(429, headers=(("retry-after-ms", "150"),)), reply("After the wait."))

    raw = sdk(gateway).chat.completions.with_raw_response.create(model="backup", messages=MESSAGES)

    assert raw.parse().choices[0].message.content == "After the wait."
    assert [r.model for r in upstream.requests] == [BACKUP, BACKUP]
    record, found = record_of(gateway, raw.headers, spans=4)
    assert route_of(record) == ("allowed", 200, "backup", "openai")
    assert attempts(found) == [("backup", "ERROR"), ("backup", "UNSET")]


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


def test_a_provider_credentials_failure_is_not_retried_with_the_same_key(serve: Serve, upstream: FakeOpenAI) -> None:
    """The same key at the same address will be refused again: a 401 is sent neither again nor to
    the fallback, whose deployment uses that key too."""
    gateway = serve()
    upstream.script(error(401, f"Incorrect API key provided: {LEAKED_KEY}."))  # any retry gets the fake's 500

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway).chat.completions.create(model="primary", messages=MESSAGES)

    assert caught.value.status_code == 502
    assert [r.model for r in upstream.requests] == [PRIMARY]


@pytest.mark.parametrize("refusal", [
    error(401, "Incorrect API key provided."),
    error(429, "You exceeded your current quota.", type="insufficient_quota", code="insufficient_quota"),
], ids=["credentials", "quota"])
def test_an_account_refused_by_the_provider_gives_way_to_a_deployment_under_another_key(
        serve: Serve, upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, refusal: Any) -> None:
    """One account's key revoked or quota spent: the model's deployment under another key answers
    (the one under the same key is skipped), and the refused deployment then cools down."""
    monkeypatch.setenv("FAKE_OPENAI_SECOND_KEY", SECOND_KEY)
    gateway = serve(upstream_cooldown_failures="1", upstream_cooldown_s="600")
    upstream.script(refusal, reply("From the second account."), reply("Again from the second account."))
    client = sdk(gateway)

    first = client.chat.completions.with_raw_response.create(model="accounts", messages=MESSAGES)
    second = client.chat.completions.with_raw_response.create(model="accounts", messages=MESSAGES)

    assert [r.parse().choices[0].message.content for r in (first, second)] == [
        "From the second account.", "Again from the second account."]
    assert [(r.model, r.headers["authorization"]) for r in upstream.requests] == [
        (FIRST_ACCOUNT, f"Bearer {PROVIDER_KEY}"), (SECOND_ACCOUNT, f"Bearer {SECOND_KEY}"),
        (SECOND_ACCOUNT, f"Bearer {SECOND_KEY}")]
    record, found = record_of(gateway, first.headers, spans=4)
    assert route_of(record) == ("allowed", 200, "accounts", "openai")
    assert deployments_tried(found) == [(FIRST_ACCOUNT, "ERROR"), (SECOND_ACCOUNT, "UNSET")]
    assert "failed 1 times in a row" in gateway.log.read_text()  # the operator hears of the refused key


# --- provider messages never carry our key --------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_provider_that_quotes_our_key_in_an_error_never_shows_it(
        serve: Serve, upstream: FakeOpenAI, stream: bool) -> None:
    gateway = serve()
    upstream.script(error(400, "Invalid value for 'temperature'.", param="temperature",
                          echo_header="authorization"))

    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway).chat.completions.create(model="primary", messages=MESSAGES, temperature=7, stream=stream)

    assert PROVIDER_KEY in upstream.replies[0].decode()  # the provider did quote it
    body = caught.value.response.text
    assert "Invalid value for 'temperature'." in body and "[redacted]" in body
    assert PROVIDER_KEY not in body
    record, found = record_of(gateway, caught.value.response.headers)
    assert "Invalid value for 'temperature'." in record["error_message"]
    assert PROVIDER_KEY not in json.dumps(record, default=str)
    assert PROVIDER_KEY not in json.dumps(found, default=str)
    assert "Invalid value for 'temperature'." in gateway.log.read_text()  # the attempt is logged...
    assert PROVIDER_KEY not in gateway.log.read_text()  # ...scrubbed


def test_a_key_of_no_known_shape_is_removed_from_every_span(tmp_path: Path, upstream: FakeOpenAI) -> None:
    """The deployment's own key is removed wherever it appears, whatever it looks like; checked on
    the spans as an exporter receives them (status descriptions and exception events included)."""
    key = "correct-horse-battery-staple"  # no pattern would recognise it as a key
    upstream.script(error(404, f"The key {key} has no access to model '{PRIMARY}'."))
    exporter = InMemorySpanExporter()
    settings = load_settings(environ={
        "LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db",
        "LOCKGATE_POLICY_DIR": str(write_policy(tmp_path / "policy", POLICY_DATA)),
        "LOCKGATE_MODELS": catalog(upstream), "FAKE_OPENAI_KEY": key})

    with in_process(settings, [SimpleSpanProcessor(exporter)]) as gateway:
        response = gateway.client.post("/v1/chat/completions", json={"model": "primary", "messages": MESSAGES},
                                       headers={"authorization": f"Bearer {gateway.create_key()}"})
        [record] = gateway.decisions()

    assert upstream.requests[0].headers["authorization"] == f"Bearer {key}"
    assert response.status_code == 400 and "has no access to model" in response.json()["error"]["message"]
    assert key not in response.text
    assert "has no access to model" in record["error_message"] and key not in json.dumps(record, default=str)
    spans = exporter.get_finished_spans()
    assert {s.kind.name for s in spans} >= {"SERVER", "CLIENT"}
    for span in spans:
        seen = json.dumps([span.status.description, dict(span.attributes or {}),
                           [(e.name, dict(e.attributes or {})) for e in span.events]], default=str)
        assert key not in seen, span.name
    assert any("has no access" in (s.status.description or "") for s in spans)


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


def test_a_stream_refused_before_its_first_event_falls_back(serve: Serve, upstream: FakeOpenAI) -> None:
    gateway = serve()
    upstream.script(error(503), error(429), reply("From the backup."))

    raw = sdk(gateway).chat.completions.with_raw_response.create(model="primary", messages=MESSAGES, stream=True)
    chunks = list(raw.parse())

    assert raw.http_response.status_code == 200
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "From the backup."
    assert {c.model for c in chunks} == {BACKUP}
    assert [r.model for r in upstream.requests] == [PRIMARY, PRIMARY, BACKUP]
    record, found = record_of(gateway, raw.headers, spans=5)
    assert route_of(record) == ("allowed", 200, "backup", "openai")
    assert attempts(found) == [("primary", "ERROR"), ("primary", "ERROR"), ("backup", "UNSET")]


def test_a_stream_dropped_after_the_provider_accepted_it_is_not_retried(serve: Serve, upstream: FakeOpenAI) -> None:
    """A 200 and then nothing: the provider took the request and may be generating (and billing)
    it. Nothing reached the client yet, so it gets a plain error, which the SDK must not retry."""
    gateway = serve()
    upstream.script(reply(cut_after_events=0), reply("A second bill."), reply("A third."))

    with pytest.raises(openai.InternalServerError) as caught:
        sdk(gateway, max_retries=2).chat.completions.create(model="primary", messages=MESSAGES, stream=True)

    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert [r.model for r in upstream.requests] == [PRIMARY]
    record, found = record_of(gateway, caught.value.response.headers)
    assert route_of(record) == ("failed", 502, "primary", "openai")
    assert attempts(found) == [("primary", "ERROR")]


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


# --- the watch on a stream's silences -------------------------------------------------------------

async def provider_events(*pauses: float) -> AsyncIterator[bytes]:
    """A provider stream: before each event, a pause of that many seconds."""
    for index, pause in enumerate(pauses):
        await asyncio.sleep(pause)
        yield f"data: {index}\n\n".encode()


async def relay(watch: StreamWatch, events: AsyncIterator[bytes], client_pause_s: float = 0.0) -> list[bytes]:
    received = []
    try:
        while True:
            try:
                received.append(await watch.next(events))
            except StopAsyncIteration:
                return received
            await asyncio.sleep(client_pause_s)  # sending to the client
    finally:
        watch.close()


async def test_a_silent_stream_is_cut_off_after_the_idle_gap() -> None:
    loop = asyncio.get_running_loop()
    watch = StreamWatch(idle_s=0.2, deadline=loop.time() + 30, deadline_s=30)
    events = provider_events(0, 0.05, 10)

    with pytest.raises(UpstreamTimeout, match=r"silent for more than 0\.2 s"):
        await relay(watch, events)


async def test_a_stream_that_never_goes_silent_is_cut_off_at_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    watch = StreamWatch(idle_s=0.2, deadline=loop.time() + 0.5, deadline_s=0.5)
    events = provider_events(*[0.05] * 1000)  # 50 s of events, none of them late

    with pytest.raises(UpstreamTimeout, match=r"deadline of 0\.5 s"):
        await relay(watch, events)


async def test_time_spent_on_a_slow_client_is_not_silence() -> None:
    loop = asyncio.get_running_loop()
    watch = StreamWatch(idle_s=0.1, deadline=loop.time() + 30, deadline_s=30)

    received = await relay(watch, provider_events(0, 0, 0, 0), client_pause_s=0.25)

    assert len(received) == 4


async def test_the_watch_leaves_other_cancellations_alone() -> None:
    loop = asyncio.get_running_loop()
    watch = StreamWatch(idle_s=30, deadline=loop.time() + 30, deadline_s=30)
    task = asyncio.create_task(relay(watch, provider_events(0, 10)))
    await asyncio.sleep(0.1)

    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
