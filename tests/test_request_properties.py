"""Properties of every governed endpoint over generated request bodies (hypothesis).

Whatever reaches an endpoint (a body of its API's public shape, one with fields swapped for
wrong types, huge integers, deep nesting, odd unicode, NUL and lone surrogates written as JSON
escapes, or bytes that are not JSON at all, by any HTTP method), the gateway:

- never answers with a 5xx, and its record never says it failed with one;
- answers in the endpoint's shape: its success shape (a whole reply or an event stream) or its
  error shape (OpenAI's, or Anthropic's under /v1/messages);
- leaves exactly one decision record, found by the ``lockgate-decision-id`` header;
- holds no reservation once the audit is written.

Bodies are generated for all five endpoint names; a meta-test fails when a registered spec has
none. Runs are derandomized, so each run tries the same bodies.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.mock import MockProvider
from gateway.app import endpoint_specs
from gateway.endpoints import EndpointSpec
from gateway.settings import load_settings
from gateway.sse import event_data
from tests.conftest import in_process
from tests.endpoint_probe import EndpointProbe, error_of, speaks_anthropic

SPECS = endpoint_specs(load_settings(environ={}))
Strategy = st.SearchStrategy[Any]

# ---------------------------------------------------------------- values

# Strings that have broken parsers, databases and policy engines: NUL, lone surrogates (which
# the encoder below writes as JSON escapes, or as bytes that are not UTF-8), a BOM, bidi
# overrides, line separators, combining marks, the last code point, JSON look-alikes.
ODD_TEXT = ["", " ", "\x00", "a\x00b", "\ud800", "\udfff", "x\udc00y", "\ud83d\ude00", "\U0001f600", "\u2028\u2029",
            "\ufeff", "e\u0301", "\u202eevil", "\U0010ffff", "\x7f", "\n\r\t", "null", "{}", "\\", '"', "a" * 600]
texts = st.one_of(st.text(st.characters(exclude_categories=()), max_size=12), st.sampled_from(ODD_TEXT))
BIG_INTS = [0, -1, 1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**40, -(2**63) - 1]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(BIG_INTS), st.floats(), texts)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8)


def nested(depth: int, kind: str) -> Any:
    value: Any = {} if kind == "object" else []
    for _ in range(depth - 1):
        value = {"a": value} if kind == "object" else [value]
    return value


deep_values = st.builds(nested, st.integers(min_value=20, max_value=300), st.sampled_from(["object", "array"]))
junk = st.one_of(scalars, scalars, json_values, json_values, deep_values)
# Field names of every API, so an added field is often one the gateway reads.
FIELDS = ["model", "messages", "stream", "stream_options", "include_usage", "n", "max_tokens", "max_completion_tokens",
          "max_output_tokens", "tools", "tool_choice", "functions", "function_call", "function", "metadata", "input",
          "system", "content", "type", "text", "role", "name", "temperature", "user", "parameters", "input_schema",
          "tool_calls", "dimensions", "encoding_format", "instructions", "previous_response_id", "refusal"]
field_names = st.one_of(st.sampled_from(FIELDS), texts)

# ---------------------------------------------------------------- valid-shaped bodies, per API

models = st.sampled_from(["fast", "mock-fast"])
words = st.text(max_size=24)  # any unicode but surrogates
tool_names = st.sampled_from(["lookup", "search_web", "get_weather"])
schemas = st.just({"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]})
openai_metadata = st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3)
IMAGE_URL = "https://example.com/cat.png"


def some(required: dict[str, Strategy], **optional: Strategy) -> Strategy:
    return st.fixed_dictionaries(required, optional=optional)


# OpenAI chat completions: https://platform.openai.com/docs/api-reference/chat/create
chat_parts = st.one_of(
    some({"type": st.just("text"), "text": words}),
    some({"type": st.just("image_url"), "image_url": some({"url": st.just(IMAGE_URL)},
                                                           detail=st.sampled_from(["auto", "low", "high"]))}))
chat_tool_calls = st.lists(some({"id": st.just("call_1"), "type": st.just("function"),
                                 "function": some({"name": tool_names, "arguments": st.just('{"q": "x"}')})}),
                           min_size=1, max_size=2)
chat_messages = st.one_of(
    some({"role": st.sampled_from(["system", "developer", "user"]),
          "content": st.one_of(words, st.lists(chat_parts, min_size=1, max_size=3))}, name=st.just("ana")),
    some({"role": st.just("assistant"), "content": st.one_of(st.none(), words)}, tool_calls=chat_tool_calls),
    some({"role": st.just("tool"), "tool_call_id": st.just("call_1"), "content": words}))
chat_tools = st.lists(some({"type": st.just("function"),
                            "function": some({"name": tool_names}, description=words, parameters=schemas)}),
                      min_size=1, max_size=2)


@st.composite
def chat_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body = draw(some(
        {"model": models, "messages": st.lists(chat_messages, min_size=1, max_size=4)},
        stream=st.booleans(), n=st.integers(1, 3), max_tokens=st.integers(1, 512),
        max_completion_tokens=st.integers(1, 512), temperature=st.floats(0, 2), top_p=st.floats(0, 1),
        seed=st.integers(0, 2**31), stop=st.one_of(words, st.lists(words, max_size=2)), user=words,
        tools=chat_tools, metadata=openai_metadata, parallel_tool_calls=st.booleans(),
        tool_choice=st.one_of(st.sampled_from(["none", "auto", "required"]),
                              tool_names.map(lambda name: {"type": "function", "function": {"name": name}})),
        response_format=st.just({"type": "text"})))
    if body.get("stream") and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    return body


# OpenAI responses: https://platform.openai.com/docs/api-reference/responses/create
response_parts = st.one_of(some({"type": st.just("input_text"), "text": words}),
                           some({"type": st.just("input_image"), "image_url": st.just(IMAGE_URL)}))
response_items = st.one_of(
    some({"role": st.sampled_from(["user", "system", "developer"]),
          "content": st.one_of(words, st.lists(response_parts, min_size=1, max_size=3))}),
    some({"role": st.just("assistant"), "content": words}),
    some({"type": st.just("function_call_output"), "call_id": st.just("call_1"), "output": words}))
response_bodies = some(
    {"model": models, "input": st.one_of(words, st.lists(response_items, min_size=1, max_size=3))},
    instructions=words, stream=st.booleans(), max_output_tokens=st.integers(16, 512), temperature=st.floats(0, 2),
    store=st.booleans(), metadata=openai_metadata, user=words,
    tools=st.lists(some({"type": st.just("function"), "name": tool_names, "parameters": schemas}),
                   min_size=1, max_size=2),
    tool_choice=st.one_of(st.sampled_from(["none", "auto", "required"]),
                          tool_names.map(lambda name: {"type": "function", "name": name})),
    reasoning=some({}, effort=st.sampled_from(["low", "medium", "high"])),
    text=st.just({"format": {"type": "text"}}))

# OpenAI embeddings: https://platform.openai.com/docs/api-reference/embeddings/create
tokens = st.lists(st.integers(0, 100_000), min_size=1, max_size=8)
embedding_bodies = some(
    {"model": models, "input": st.one_of(words.filter(bool), st.lists(words.filter(bool), min_size=1, max_size=4),
                                         tokens, st.lists(tokens, min_size=1, max_size=3))},
    dimensions=st.integers(1, 1536), encoding_format=st.sampled_from(["float", "base64"]), user=words)

# Anthropic messages: https://docs.anthropic.com/en/api/messages
text_blocks = some({"type": st.just("text"), "text": words.filter(bool)})
PIXEL_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/"
             "PchI7wAAAABJRU5ErkJggg==")
image_blocks = st.just({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL_PNG}})
tool_use_blocks = some({"type": st.just("tool_use"), "id": st.just("toolu_1"), "name": tool_names,
                        "input": st.fixed_dictionaries({"q": words})})
tool_result_blocks = some({"type": st.just("tool_result"), "tool_use_id": st.just("toolu_1"),
                           "content": st.one_of(words, st.lists(text_blocks, min_size=1, max_size=2))})
anthropic_messages = st.lists(st.one_of(
    some({"role": st.just("user"), "content": st.one_of(words.filter(bool), st.lists(
        st.one_of(text_blocks, image_blocks, tool_result_blocks), min_size=1, max_size=3))}),
    some({"role": st.just("assistant"), "content": st.one_of(
        words.filter(bool), st.lists(st.one_of(text_blocks, tool_use_blocks), min_size=1, max_size=2))})),
    min_size=1, max_size=4)
anthropic_tools = st.lists(some({"name": tool_names, "input_schema": schemas}, description=words),
                           min_size=1, max_size=2)
anthropic_tool_choice = st.one_of(st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"}]),
                                  tool_names.map(lambda name: {"type": "tool", "name": name}))
anthropic_system = st.one_of(words, st.lists(text_blocks, min_size=1, max_size=2))
message_bodies = some(
    {"model": models, "max_tokens": st.integers(1, 1024), "messages": anthropic_messages},
    system=anthropic_system, stream=st.booleans(), temperature=st.floats(0, 1), top_p=st.floats(0, 1),
    stop_sequences=st.lists(words.filter(bool), max_size=2), tools=anthropic_tools, tool_choice=anthropic_tool_choice,
    metadata=some({}, user_id=st.text(max_size=16)))
count_token_bodies = some({"model": models, "messages": anthropic_messages},
                          system=anthropic_system, tools=anthropic_tools, tool_choice=anthropic_tool_choice)

BODIES: dict[str, Strategy] = {
    "chat.completions": chat_bodies(),
    "responses": response_bodies,
    "embeddings": embedding_bodies,
    "messages": message_bodies,
    "messages.count_tokens": count_token_bodies,
}

# ---------------------------------------------------------------- mutations and encodings


def slots(value: Any) -> Iterator[tuple[Any, Any]]:
    """Every (container, key or index) in a JSON value, outermost first."""
    stack = [value]
    while stack:
        node = stack.pop()
        keys: Any = node.keys() if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else ()
        for key in list(keys):
            yield node, key
            stack.append(node[key])


@st.composite
def mutated(draw: st.DrawFn, bodies: Strategy) -> Any:
    """A body with one to three fields replaced by junk, removed, or added."""
    body = copy.deepcopy(draw(bodies))  # a copy: ``st.just`` hands out the same object every time
    for _ in range(draw(st.integers(1, 3))):
        places = list(slots(body))
        operation = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if operation == "add" or not places:
            objects = [body] + [node[key] for node, key in places if isinstance(node[key], dict)]
            draw(st.sampled_from(objects))[draw(field_names)] = draw(junk)
            continue
        node, key = draw(st.sampled_from(places))
        if operation == "delete":
            del node[key]
        else:
            node[key] = draw(junk)
    return body


@st.composite
def encoded(draw: st.DrawFn, values: Strategy) -> bytes:
    """JSON text (the standard library's: it writes integers beyond 64 bits, NaN, and lone
    surrogates as escapes), as ASCII with escapes or as raw UTF-8 (lone surrogates then become
    bytes that are not UTF-8)."""
    text = json.dumps(draw(values), ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


def contents(name: str) -> Strategy:
    valid = BODIES[name]
    mutants = encoded(mutated(valid))
    return st.one_of(
        encoded(valid), encoded(valid),
        mutants, mutants, mutants, mutants, mutants,
        encoded(json_values),  # any JSON, mostly not an object
        encoded(valid).flatmap(lambda raw: st.integers(1, len(raw) - 1).map(lambda cut: raw[:cut])),  # cut off
        st.binary(min_size=1, max_size=64),
    )


METHODS = st.sampled_from(["POST"] * 40 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"])

# ---------------------------------------------------------------- each endpoint's success shape


def _chat(body: dict[str, Any]) -> bool:
    return body.get("object") == "chat.completion" and isinstance(body.get("choices"), list)


def _chat_event(event: dict[str, Any]) -> bool:
    return event.get("object") == "chat.completion.chunk"


def _response(body: dict[str, Any]) -> bool:
    return body.get("object") == "response" and isinstance(body.get("output"), list)


def _typed_event(event: dict[str, Any]) -> bool:
    return isinstance(event.get("type"), str)


def _embeddings(body: dict[str, Any]) -> bool:
    return body.get("object") == "list" and isinstance(body.get("data"), list)


def _message(body: dict[str, Any]) -> bool:
    return body.get("type") == "message" and isinstance(body.get("content"), list)


def _token_count(body: dict[str, Any]) -> bool:
    return isinstance(body.get("input_tokens"), int) and not isinstance(body["input_tokens"], bool)


# name: (a whole reply, one stream event, the event that ends a stream)
SUCCESS: dict[str, tuple[Callable[[dict[str, Any]], bool], Callable[[dict[str, Any]], bool], Callable[[Any], bool]]] = {
    "chat.completions": (_chat, _chat_event, lambda last: last == "[DONE]"),
    "responses": (_response, _typed_event,
                  lambda last: isinstance(last, dict) and last.get("type") in ("response.completed",
                                                                               "response.incomplete")),
    "embeddings": (_embeddings, lambda event: False, lambda last: False),
    "messages": (_message, _typed_event, lambda last: isinstance(last, dict) and last.get("type") == "message_stop"),
    "messages.count_tokens": (_token_count, lambda event: False, lambda last: False),
}


def _stream_error(spec: EndpointSpec, event: dict[str, Any]) -> bool:
    """An error event in the endpoint's shape: Anthropic's ``error`` event, OpenAI's error body
    (chat), or the Responses API's ``error`` event."""
    if speaks_anthropic(spec):
        error = event.get("error")
        return event.get("type") == "error" and isinstance(error, dict) and set(error) == {"type", "message"}
    if "error" in event:
        return isinstance(event["error"], dict) and {"message", "type"} <= set(event["error"])
    return event.get("type") == "error" and isinstance(event.get("message"), str)


def assert_success_shape(spec: EndpointSpec, response: httpx.Response) -> None:
    whole, one_event, last_event = SUCCESS[spec.name]
    if not response.headers["content-type"].startswith("text/event-stream"):
        body = response.json()
        assert isinstance(body, dict) and whole(body), body
        return
    last: Any = None
    for raw in response.content.split(b"\n\n"):
        data = event_data(raw + b"\n\n") if raw.strip() else None
        if data is None:
            continue  # a comment (keep-alive) or the end of the stream
        assert last is None or not (isinstance(last, dict) and _stream_error(spec, last)), "an event after an error"
        if data == b"[DONE]":
            last = "[DONE]"
            continue
        event = json.loads(data)
        assert isinstance(event, dict) and (one_event(event) or _stream_error(spec, event)), event
        last = event
    assert last_event(last) or (isinstance(last, dict) and _stream_error(spec, last)), last


# ---------------------------------------------------------------- the properties


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EndpointProbe]:
    """The gateway on its defaults (mock provider, default policy) and a key of team research."""
    path = tmp_path_factory.mktemp("properties")
    with in_process(load_settings(environ={"LOCKGATE_DATABASE_URL": f"sqlite:///{path}/lockgate.db"})) as gateway:
        yield EndpointProbe(gateway, gateway.create_key(team="research"))


def check_call(probe: EndpointProbe, spec: EndpointSpec, method: str, content: bytes) -> httpx.Response:
    """Send one request and check every property; returns the response for further checks."""
    before = probe.record_count()
    response = probe.send(spec, content, method)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error_of(spec, response)
    else:
        assert response.status_code == 200
        assert_success_shape(spec, response)
    if method != "POST":
        assert response.status_code == 405
    probe.flush()
    [record] = probe.records(response.headers["lockgate-decision-id"])
    assert probe.record_count() == before + 1
    assert record["endpoint"] == spec.name
    assert record["status_code"] < 500, record
    if not response.headers["content-type"].startswith("text/event-stream"):
        assert record["status_code"] == response.status_code
    assert (record["outcome"] == "allowed") == (record["status_code"] == 200), record
    assert probe.ledger()[0] == 0
    return response


@pytest.mark.parametrize("spec", SPECS, ids=[spec.name for spec in SPECS])
def test_any_request_is_answered_in_shape_with_one_record(probe: EndpointProbe, spec: EndpointSpec) -> None:
    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(method=METHODS, content=contents(spec.name))
    def holds(method: str, content: bytes) -> None:
        check_call(probe, spec, method, content)

    holds()


# Specs whose calls the mock provider can serve: their well-formed bodies must be served.
SERVED = [spec for spec in SPECS if spec.name in MockProvider.endpoints]


@pytest.mark.parametrize("spec", SERVED, ids=[spec.name for spec in SERVED])
def test_a_well_formed_body_is_served(probe: EndpointProbe, spec: EndpointSpec) -> None:
    """The checks refuse no body of the API's public shape: the generated bodies reach the mock."""
    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(content=encoded(BODIES[spec.name]))
    def served(content: bytes) -> None:
        response = check_call(probe, spec, "POST", content)
        assert response.status_code == 200, response.text

    served()


def test_every_registered_endpoint_has_a_body_strategy() -> None:
    """Meta-test: a new endpoint spec needs its bodies here, or it goes unfuzzed."""
    assert not [spec.name for spec in SPECS if spec.name not in BODIES or spec.name not in SUCCESS]


# ---------------------------------------------------------------- the routes that call no model

# Ids and queries a client controls on GET/DELETE /v1/responses/{id} and GET /v1/models/{id}:
# any text, percent-encoded (NUL, line breaks, lone surrogates as their bytes, dots), any query.
# Never empty and never a "/": either would make it another route's path. Never a "%" either:
# Starlette's TestClient decodes a path twice, where a server decodes it once.
path_texts = st.one_of(texts, st.sampled_from(["..", ".", "a" * 300, "fast", "mock-fast", "\n"])).filter(
    lambda text: text and "/" not in text and "%" not in text)
queries = st.one_of(st.just(""), st.lists(st.tuples(st.sampled_from(["stream", "include[]", "starting_after", "x"]),
                                                    texts), max_size=3))
PATH_METHODS = st.sampled_from(["GET"] * 4 + ["DELETE"] * 2 + ["POST", "PUT", "HEAD"])


def quoted(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="").replace(".", "%2E")  # no dot segments


def query_string(pairs: Any) -> str:
    return "&".join(f"{quoted(name)}={quoted(value)}" for name, value in pairs) if pairs else ""


def test_any_stored_response_or_model_path_is_answered_in_shape_with_one_record(probe: EndpointProbe) -> None:
    gateway = probe.gateway
    kept = gateway.client.post("/v1/responses", json={"model": "fast", "input": "hi"},
                               headers={"authorization": f"Bearer {probe.key}"}).json()["id"]

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(route=st.sampled_from(["responses", "models"]), ident=st.one_of(path_texts, st.just(kept)),
           method=PATH_METHODS, pairs=queries)
    def holds(route: str, ident: str, method: str, pairs: Any) -> None:
        path = f"/v1/{route}/{quoted(ident)}"
        query = query_string(pairs)
        response = gateway.client.request(method, f"{path}?{query}" if query else path,
                                          headers={"authorization": f"Bearer {probe.key}"})
        assert response.status_code < 500, response.text
        if "lockgate-decision-id" not in response.headers:
            # No call, so no record: a wrong method on a models route (the generic 405), or an id
            # with a line break, which Starlette's {model_id:path} does not match (the generic 404).
            assert route == "models" and response.status_code in (404, 405), response.text
            assert response.status_code == 404 or method not in ("GET", "HEAD")
            return
        if method != "HEAD" and response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and probe.key not in response.text
        probe.flush()
        [record] = probe.records(response.headers["lockgate-decision-id"])
        assert record["status_code"] == response.status_code < 500
        assert record["endpoint"] in (("models.retrieve",) if route == "models" else
                                      ("responses.retrieve", "responses.delete"))

    holds()
