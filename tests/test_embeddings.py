"""The embeddings endpoint spec, and the offline mock answering embeddings through a real gateway."""

from __future__ import annotations

import math
from typing import Any

import openai
import pytest

from gateway.endpoints.checks import RequestLimits
from gateway.endpoints.embeddings import Embeddings
from gateway.errors import InvalidRequest, UpstreamError
from tests.conftest import Gateway

SPEC = Embeddings(RequestLimits())


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "fast", "input": "hello", **fields}


@pytest.mark.parametrize(("value", "inputs", "tokens"), [
    ("x" * 40, 1, 15),  # three characters a token, rounded up (an estimate that errs high), one more per input
    (["x" * 40, "y" * 8, ""], 3, 16 + 3),  # 48 characters, and one per input
    ([101, 7592, 102], 1, 3),  # token ids are counted, not estimated
    ([[101, 7592], [1, 2, 3, 4]], 2, 6),
])
def test_every_kind_of_input_is_counted(value: Any, inputs: int, tokens: int) -> None:
    facts = SPEC.describe(body(input=value, dimensions=256, encoding_format="base64", user="ana"))

    assert (facts.message_count, facts.input_tokens) == (inputs, tokens)
    assert (facts.endpoint, facts.stream, facts.output_tokens_max, facts.tools) == ("embeddings", False, 0, ())


@pytest.mark.parametrize(("fields", "param"), [
    ({"input": None}, "input"),
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": {"text": "hi"}}, "input"),
    ({"input": ["a", 5]}, "input[1]"),
    ({"input": [1, "a"]}, "input[1]"),
    ({"input": [1, -2]}, "input[1]"),
    ({"input": [1, True]}, "input[1]"),
    ({"input": [[1], "a"]}, "input[1]"),
    ({"input": [[1], []]}, "input[1]"),
    ({"input": [[1], [2.5]]}, "input[1][0]"),
    ({"input": [{"text": "hi"}]}, "input[0]"),
    ({"encoding_format": "int8"}, "encoding_format"),
    ({"dimensions": 0}, "dimensions"),
    ({"dimensions": "256"}, "dimensions"),
    ({"dimensions": 10**6}, "dimensions"),
    ({"user": 5}, "user"),
    ({"model": ""}, "model"),
])
def test_a_field_the_gateway_reads_is_checked(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        SPEC.describe(body(**fields))
    assert caught.value.param == param


def test_the_reply_gives_input_tokens_only() -> None:
    facts = SPEC.read_reply(b'{"object": "list", "data": [], "model": "text-embedding-3-small", '
                            b'"usage": {"prompt_tokens": 8, "total_tokens": 8}}')

    assert (facts.usage.input_tokens, facts.usage.output_tokens, facts.usage_reported) == (8, 0, True)
    assert facts.response_model == "text-embedding-3-small"
    assert not SPEC.read_reply(b'{"data": []}').usage_reported
    for junk in (b"[]", b"{}", b'{"data": {}}', b"nope"):
        with pytest.raises(UpstreamError):
            SPEC.read_reply(junk)


def test_the_mock_embeds_offline_deterministically_and_is_charged(gateway: Gateway) -> None:
    sdk = openai.OpenAI(base_url=gateway.v1, api_key=gateway.create_key(), max_retries=0, timeout=30)
    text = " ".join(["lockgate"] * 40)

    raw = sdk.embeddings.with_raw_response.create(model="fast", input=[text, "short"], dimensions=5)
    result = raw.parse()
    again = sdk.embeddings.create(model="fast", input=text, dimensions=5, encoding_format="float")
    default = sdk.embeddings.create(model="fast", input=[[1, 2, 3]])

    assert [len(d.embedding) for d in result.data] == [5, 5] and len(default.data[0].embedding) == 16
    assert math.isclose(sum(x * x for x in result.data[0].embedding), 1.0, rel_tol=1e-5)  # unit vectors
    assert again.data[0].embedding == pytest.approx(result.data[0].embedding, rel=1e-6)  # same input, same vector
    assert result.data[0].embedding != pytest.approx(result.data[1].embedding)
    assert (result.usage.prompt_tokens, default.usage.prompt_tokens) == (41, 3)  # words, or token ids
    [record], _ = gateway.trace(raw.headers["lockgate-trace-id"], spans=3)
    assert (record["endpoint"], record["requested_model"], record["routed_model"]) == ("embeddings", "fast",
                                                                                       "mock-fast")
    assert (record["input_tokens"], record["output_tokens"]) == (41, 0)
    assert record["cost_micro_usd"] == round(41 * 0.15) > 0
