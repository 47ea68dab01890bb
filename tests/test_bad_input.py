"""Bad input: every field the gateway reads is checked for type and range before any budget is
touched. Each bad body is a 400 in the endpoint's own error shape, naming the field (OpenAI's
``param``), with a decision record and nothing reserved or spent; a wrong method is a 405 the
same way. Cases are listed per endpoint and run for every spec ``endpoint_specs`` registers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from adapters.mock import MockProvider
from gateway.app import endpoint_specs
from gateway.endpoints import EndpointSpec
from gateway.pipeline import MAX_MICRO_USD
from gateway.settings import DEFAULT_MODELS, MAX_REQUEST_DEPTH, SettingsError, load_settings
from tests.conftest import in_process, shipped_policy_data, write_policy
from tests.endpoint_probe import EndpointProbe, error_of, speaks_anthropic

DEFAULTS = load_settings(environ={})
SPECS = endpoint_specs(DEFAULTS)
MAX_CHOICES = DEFAULTS.max_choices
MAX_OUTPUT = DEFAULTS.max_output_tokens
MAX_DEPTH = DEFAULTS.max_request_depth


def nested(depth: int) -> dict[str, Any]:
    """An object ``depth`` levels deep: {"a": {"a": ... {}}}."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def encode(body: dict[str, Any] | bytes) -> bytes:
    # The standard library, not orjson: it writes integers beyond 64 bits as they are.
    return body if isinstance(body, bytes) else json.dumps(body).encode()


@dataclass(frozen=True)
class Bad:
    """A bad body and the field its 400 must name: ``param`` exactly, or any ``param`` under the
    field when it ends in ``*`` (``input*`` takes ``input`` and ``input[0].content``). None: the
    body as a whole is bad. OpenAI routes only: Anthropic's error shape names no field."""

    name: str
    body: dict[str, Any] | bytes
    param: str | None


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "fast", "messages": [{"role": "user", "content": "hi"}], **fields}


def said(*content: Any, role: str = "user") -> list[dict[str, Any]]:
    return [{"role": role, "content": part} for part in content]


def responses(**fields: Any) -> dict[str, Any]:
    return {"model": "fast", "input": "hi", **fields}


def embeddings(**fields: Any) -> dict[str, Any]:
    return {"model": "fast", "input": "hi", **fields}


def messages(**fields: Any) -> dict[str, Any]:
    return {"model": "fast", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **fields}


def count_tokens(**fields: Any) -> dict[str, Any]:
    return {"model": "fast", "messages": [{"role": "user", "content": "hi"}], **fields}


# A well-formed body per endpoint, from which the cases every endpoint shares are made.
VALID = {"chat.completions": chat(), "responses": responses(), "embeddings": embeddings(),
         "messages": messages(), "messages.count_tokens": count_tokens()}

BAD: dict[str, list[Bad]] = {
    "chat.completions": [
        Bad("content part is a string", chat(messages=said(["hi"])), "messages[0].content[0]"),
        Bad("content part text is a number", chat(messages=said([{"type": "text", "text": 5}])),
            "messages[0].content[0].text"),
        Bad("content part has no type", chat(messages=said([{"text": "hi"}])), "messages[0].content[0]"),
        Bad("text part without text", chat(messages=said([{"type": "text"}])), "messages[0].content[0].text"),
        Bad("refusal part is not a string", chat(messages=said([{"type": "refusal", "refusal": {}}], role="assistant")),
            "messages[0].content[0].refusal"),
        Bad("content is a number", chat(messages=said(5)), "messages[0].content"),
        Bad("messages missing", {"model": "fast"}, "messages"),
        Bad("messages empty", chat(messages=[]), "messages"),
        Bad("message is a string", chat(messages=["hi"]), "messages[0]"),
        Bad("role is a number", chat(messages=[{"role": 1, "content": "hi"}]), "messages[0]"),
        Bad("tool_calls is an object", chat(messages=[{"role": "assistant", "tool_calls": {}}]),
            "messages[0].tool_calls"),
        Bad("tool call's function is a string", chat(messages=[
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": "lookup"}]}]),
            "messages[0].tool_calls[0].function"),
        Bad("model missing", {"messages": said("hi")}, "model"),
        Bad("model is a number", chat(model=5), "model"),
        Bad("model has a NUL", chat(model="fa\x00st"), "model"),
        Bad("tools is an object", chat(tools={"lookup": {}}), "tools"),
        Bad("tool is a string", chat(tools=["lookup"]), "tools[0]"),
        Bad("function is not an object", chat(tools=[{"type": "function", "function": "lookup"}]), "tools[0].function"),
        Bad("function name is a number", chat(tools=[{"type": "function", "function": {"name": 5}}]),
            "tools[0].function.name"),
        Bad("legacy function is a string", chat(functions=["lookup"]), "functions[0]"),
        Bad("function_call is a number", chat(function_call=5), "function_call"),
        Bad("tool_choice function is a string", chat(tool_choice={"type": "function", "function": "lookup"}),
            "tool_choice"),
        Bad("tool_choice is an unknown word", chat(tool_choice="always"), "tool_choice"),
        Bad("stream is a string", chat(stream="yes"), "stream"),
        Bad("stream_options is a string", chat(stream=True, stream_options="usage"), "stream_options"),
        Bad("stream_options without stream", chat(stream_options={"include_usage": True}), "stream_options"),
        Bad("include_usage is a string", chat(stream=True, stream_options={"include_usage": "yes"}),
            "stream_options.include_usage"),
        Bad("n beyond the ceiling", chat(n=MAX_CHOICES + 1), "n"),
        Bad("n beyond 64 bits", chat(n=2**64 + 1), "n"),
        Bad("n is zero", chat(n=0), "n"),
        Bad("n is a boolean", chat(n=True), "n"),
        Bad("max_tokens beyond the ceiling", chat(max_tokens=MAX_OUTPUT + 1), "max_tokens"),
        Bad("max_tokens beyond 64 bits", chat(max_tokens=2**64 + 1), "max_tokens"),
        Bad("max_tokens is negative", chat(max_tokens=-1), "max_tokens"),
        Bad("max_tokens is a string", chat(max_tokens="100"), "max_tokens"),
        Bad("max_tokens is a fraction", chat(max_tokens=100.5), "max_tokens"),
        Bad("max_completion_tokens beyond the ceiling", chat(max_completion_tokens=MAX_OUTPUT + 1),
            "max_completion_tokens"),
        Bad("max_tokens bad beside a good max_completion_tokens", chat(max_completion_tokens=10, max_tokens="lots"),
            "max_tokens"),
        Bad("metadata is a string", chat(metadata="x"), "metadata"),
        Bad("metadata value is an object", chat(metadata={"a": {"b": "c"}}), "metadata"),
        Bad("metadata has 17 pairs", chat(metadata={str(i): "v" for i in range(17)}), "metadata"),
        Bad("temperature is a string", chat(temperature="hot"), "temperature"),
        Bad("user is an object", chat(user={"id": 1}), "user"),
        Bad("NaN is not JSON", b'{"model": "fast", "messages": [{"role": "user", "content": "hi"}], '
                               b'"temperature": NaN}', None),
    ],
    "responses": [
        Bad("input part text is a number",
            responses(input=[{"role": "user", "content": [{"type": "input_text", "text": 5}]}]), "input*"),
        Bad("input part is a string", responses(input=[{"role": "user", "content": ["hi"]}]), "input*"),
        Bad("input is a number", responses(input=5), "input*"),
        Bad("model missing", {"input": "hi"}, "model"),
        Bad("model is a number", responses(model=5), "model"),
        Bad("tool is a string", responses(tools=["lookup"]), "tools*"),
        Bad("function tool name is a number", responses(tools=[{"type": "function", "name": 5, "parameters": {}}]),
            "tools*"),
        Bad("tool_choice is a number", responses(tool_choice=5), "tool_choice*"),
        Bad("stream is a string", responses(stream="yes"), "stream"),
        Bad("stream_options is a string", responses(stream=True, stream_options="x"), "stream_options*"),
        Bad("max_output_tokens beyond the ceiling", responses(max_output_tokens=MAX_OUTPUT + 1), "max_output_tokens"),
        Bad("max_output_tokens beyond 64 bits", responses(max_output_tokens=2**64 + 1), "max_output_tokens"),
        Bad("max_output_tokens is negative", responses(max_output_tokens=-1), "max_output_tokens"),
        Bad("metadata is an array", responses(metadata=[]), "metadata*"),
    ],
    "embeddings": [
        Bad("input is a number", embeddings(input=5), "input*"),
        Bad("input is an object", embeddings(input={"text": "hi"}), "input*"),
        Bad("input item is an object", embeddings(input=[{"text": "hi"}]), "input*"),
        Bad("input missing", {"model": "fast"}, "input*"),
        Bad("model is a number", embeddings(model=5), "model"),
    ],
    "messages": [
        Bad("content block text is a number", messages(messages=said([{"type": "text", "text": 5}])), None),
        Bad("content block is a string", messages(messages=said(["hi"])), None),
        Bad("content is a number", messages(messages=said(5)), None),
        Bad("messages missing", {"model": "fast", "max_tokens": 64}, None),
        Bad("message is a string", messages(messages=["hi"]), None),
        Bad("model is a number", messages(model=5), None),
        Bad("system is a number", messages(system=5), None),
        Bad("tool is a string", messages(tools=["lookup"]), None),
        Bad("tool name is a number", messages(tools=[{"name": 5, "input_schema": {"type": "object"}}]), None),
        Bad("tool_choice is a string", messages(tool_choice="auto"), None),
        Bad("stream is a string", messages(stream="yes"), None),
        Bad("max_tokens missing", {"model": "fast", "messages": said("hi")}, None),
        Bad("max_tokens beyond the ceiling", messages(max_tokens=MAX_OUTPUT + 1), None),
        Bad("max_tokens beyond 64 bits", messages(max_tokens=2**64 + 1), None),
        Bad("max_tokens is zero", messages(max_tokens=0), None),
        Bad("metadata is a string", messages(metadata="x"), None),
    ],
    "messages.count_tokens": [
        Bad("content block text is a number", count_tokens(messages=said([{"type": "text", "text": 5}])), None),
        Bad("content is a number", count_tokens(messages=said(5)), None),
        Bad("messages missing", {"model": "fast"}, None),
        Bad("model is a number", count_tokens(model=5), None),
        Bad("system is a number", count_tokens(system=5), None),
        Bad("tool is a string", count_tokens(tools=["lookup"]), None),
        Bad("tool_choice is a string", count_tokens(tool_choice="auto"), None),
    ],
}


def shared_cases(name: str) -> list[Bad]:
    """Bodies bad for every endpoint: not a JSON object, or nested deeper than the limit."""
    valid = VALID[name]
    return [
        Bad("empty body", b"", None),
        Bad("cut-off JSON", encode(valid)[:-3], None),
        Bad("invalid UTF-8", b'{"model": "fa\xffst"}', None),
        Bad("lone surrogate escape", encode(valid)[:-1] + b', "user": "\\ud800"}', None),
        Bad("array body", b"[]", None),
        Bad("string body", b'"hi"', None),
        Bad("nested one level too deep", {**valid, "extra": nested(MAX_DEPTH)}, None),
    ]


CASES = [(spec, case) for spec in SPECS for case in BAD.get(spec.name, []) + shared_cases(spec.name)]


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EndpointProbe]:
    """The gateway on its defaults (mock provider, default policy) and a key of team research."""
    path = tmp_path_factory.mktemp("bad-input")
    with in_process(load_settings(environ={"LOCKGATE_DATABASE_URL": f"sqlite:///{path}/lockgate.db"})) as gateway:
        yield EndpointProbe(gateway, gateway.create_key(team="research"))


def assert_refused(probe: EndpointProbe, spec: EndpointSpec, response: Any, status: int) -> dict[str, Any]:
    """The call was refused with ``status`` in the endpoint's shape, left one record saying so,
    and touched no budget. Returns the error object."""
    assert response.status_code == status, response.text
    error = error_of(spec, response)
    assert probe.key not in response.text
    probe.flush()
    [record] = probe.records(response.headers["lockgate-decision-id"])
    assert (record["outcome"], record["status_code"], record["endpoint"]) == ("failed", status, spec.name)
    assert record["error_message"] == error["message"]
    assert probe.ledger() == (0, 0)
    return error


@pytest.mark.parametrize(("spec", "case"), CASES, ids=[f"{spec.name}: {case.name}" for spec, case in CASES])
def test_a_bad_body_is_a_400_with_a_record_and_no_budget_touched(
        probe: EndpointProbe, spec: EndpointSpec, case: Bad) -> None:
    error = assert_refused(probe, spec, probe.send(spec, encode(case.body)), 400)
    if speaks_anthropic(spec):
        assert error["type"] == "invalid_request_error"
        return
    assert error["type"] == "invalid_request_error"
    if case.param is not None and case.param.endswith("*"):
        field = case.param[:-1]
        assert error["param"] == field or str(error["param"]).startswith((f"{field}[", f"{field}.")), error
    else:
        assert error["param"] == case.param, error


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "PROPFIND"])
@pytest.mark.parametrize("spec", SPECS, ids=[spec.name for spec in SPECS])
def test_a_wrong_method_is_a_405_in_the_endpoints_shape_with_a_record(
        probe: EndpointProbe, spec: EndpointSpec, method: str) -> None:
    response = probe.send(spec, encode(VALID[spec.name]), method=method)
    error = assert_refused(probe, spec, response, 405)
    assert response.headers["allow"] == "POST"
    if not speaks_anthropic(spec):
        assert (error["type"], error["code"]) == ("invalid_request_error", "method_not_allowed")


@pytest.mark.parametrize("spec", SPECS, ids=[spec.name for spec in SPECS])
def test_metadata_253_deep_is_refused_with_a_record(probe: EndpointProbe, spec: EndpointSpec) -> None:
    """The fuzzed request of issue 6 that was served and charged without a record."""
    assert_refused(probe, spec, probe.send(spec, encode({**VALID[spec.name], "metadata": nested(253)})), 400)


def test_every_registered_endpoint_has_bad_bodies() -> None:
    """Meta-test: a new endpoint spec needs its own list of bad bodies here."""
    assert not [spec.name for spec in SPECS if spec.name not in BAD or spec.name not in VALID]


def test_the_depth_limit_cannot_be_raised_past_what_the_audit_can_write() -> None:
    """JSON serialisers stop at 255 levels (orjson among them): a body nested deeper could reach
    the policy input, and so the decision record, in a form the audit writer cannot write."""
    with pytest.raises(SettingsError, match="max_request_depth"):
        load_settings(environ={"LOCKGATE_MAX_REQUEST_DEPTH": str(MAX_REQUEST_DEPTH + 1)})


@pytest.mark.parametrize("spec", SPECS, ids=[spec.name for spec in SPECS])
def test_the_deepest_body_accepted_still_leaves_its_record(tmp_path: Path, spec: EndpointSpec) -> None:
    """At the highest depth limit the settings allow, metadata as deep as allowed is answered
    (refused or served) without a 5xx, and its call leaves exactly one record."""
    settings = load_settings(environ={"LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db",
                                      "LOCKGATE_MAX_REQUEST_DEPTH": str(MAX_REQUEST_DEPTH)})
    with in_process(settings) as gateway:
        probe = EndpointProbe(gateway, gateway.create_key(team="research"))
        # The body is one level, so its metadata may be one less than the limit.
        response = probe.send(spec, encode({**VALID[spec.name], "metadata": nested(MAX_REQUEST_DEPTH - 1)}))
        assert response.status_code < 500, response.text
        probe.flush()
        assert len(probe.records(response.headers["lockgate-decision-id"])) == 1
        assert probe.ledger()[0] == 0


# Specs the mock provider serves: a worst case is only priced once the call is routed.
PRICED = [spec for spec in SPECS if spec.billable and spec.name in MockProvider.endpoints]


@pytest.mark.parametrize("spec", PRICED, ids=[spec.name for spec in PRICED])
def test_a_worst_case_cost_beyond_64_bits_is_a_400_not_a_503(tmp_path: Path, spec: EndpointSpec) -> None:
    """A catalog model priced so high that the call's worst case does not fit the ledger's
    64-bit columns: refused as a bad request before the ledger is touched."""
    models = [dict(DEFAULT_MODELS[0]), {**DEFAULT_MODELS[1], "input_usd_per_mtok": 1e30, "output_usd_per_mtok": 1e30}]
    settings = load_settings(environ={"LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db",
                                      "LOCKGATE_MODELS": json.dumps(models)})
    with in_process(settings) as gateway:
        probe = EndpointProbe(gateway, gateway.create_key(team="research"))
        response = probe.send(spec, encode({**VALID[spec.name], "model": "mock-smart"}))
        error = assert_refused(probe, spec, response, 400)
    assert "worst-case cost" in error["message"]
    if spec.name == "chat.completions":
        assert error["param"] == "max_tokens"


def test_a_worst_case_near_64_bits_beside_a_held_reservation_is_a_429_not_a_503(store_url: str, tmp_path: Path) -> None:
    """A worst case that fits 64 bits, but not added to what another call holds: PostgreSQL's
    BIGINT sum in the reservation's condition would overflow (a store error, so a 503). A
    reservation beyond the budget's limit can never fit, and is refused without asking the store."""
    [spec] = [spec for spec in SPECS if spec.name == "chat.completions"]
    body = chat(model="mock-smart")
    facts = spec.describe(body)
    tokens = facts.input_tokens + facts.output_tokens_max
    price = MAX_MICRO_USD / tokens  # micro-dollars per token, which is dollars per million tokens
    while round(tokens * price) > MAX_MICRO_USD:
        price = math.nextafter(price, 0)
    cheap = dict(DEFAULT_MODELS[0])
    held = round(facts.input_tokens * cheap["input_usd_per_mtok"]
                 + facts.output_tokens_max * cheap["output_usd_per_mtok"])
    assert MAX_MICRO_USD - round(tokens * price) < held  # the sum overflows while the cheap call's is held
    models = [cheap, {**DEFAULT_MODELS[1], "input_usd_per_mtok": price, "output_usd_per_mtok": price}]
    data = shipped_policy_data()
    del data["expensive_calls"]  # the shipped policy would hold so dear a call for an approver first
    settings = load_settings(environ={"LOCKGATE_DATABASE_URL": store_url, "LOCKGATE_MODELS": json.dumps(models),
                                      "LOCKGATE_POLICY_DIR": str(write_policy(tmp_path / "policy", data)),
                                      "LOCKGATE_AUDIT_FLUSH_INTERVAL_S": "60"})  # the reservation stays held
    with in_process(settings) as gateway:
        probe = EndpointProbe(gateway, gateway.create_key(team="research"))
        assert probe.send(spec, encode(chat(model="mock-fast"))).status_code == 200
        assert probe.ledger()[0] == held
        response = probe.send(spec, encode(body))
        assert response.status_code == 429, response.text
        assert error_of(spec, response)["code"] == "budget_exceeded"
        probe.flush()
        [record] = probe.records(response.headers["lockgate-decision-id"])
        assert (record["outcome"], record["status_code"]) == ("denied", 429)
        assert probe.ledger()[0] == 0


def test_both_output_caps_are_reserved_for_and_limited() -> None:
    """A provider honours ``max_tokens`` or ``max_completion_tokens``: the worst case counts the
    larger, and a policy's cap lowers every one the body names."""
    [spec] = [spec for spec in SPECS if spec.name == "chat.completions"]
    body = chat(max_completion_tokens=10, max_tokens=500, n=2)
    facts = spec.describe(body)
    assert (facts.max_tokens, facts.output_tokens_max) == (500, 1000)
    assert {k: v for k, v in spec.limit(body, 100).items() if k.startswith("max_")} == {
        "max_completion_tokens": 10, "max_tokens": 100}
    assert spec.limit(chat(), 100)["max_tokens"] == 100
