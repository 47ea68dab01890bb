"""``POST /v1/embeddings``: OpenAI's embeddings, never streamed.

An embedding call has input tokens only; it is estimated, reserved, charged and recorded like
any other call (at the catalog model's input price).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.endpoints import EndpointSpec
from gateway.endpoints.chat import read_usage
from gateway.endpoints.checks import STRING, estimate_tokens, model_name, positive_int, typed_fields
from gateway.errors import InvalidRequest, UpstreamError
from gateway.types import CallFacts, ReplyFacts

MAX_DIMENSIONS = 65_536  # far above any embedding model's; a bound, so the value stays a sane integer
ENCODING_FORMATS = ("float", "base64")
INPUT_KINDS = "a string, an array of strings, an array of token ids or an array of arrays of token ids"


def _token_ids(value: list[Any], param: str) -> int:
    """The length of an array of token ids (non-negative integers), or a 400."""
    if not value:
        raise InvalidRequest(f"'{param}' must not be empty.", param=param)
    for index, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise InvalidRequest(f"'{param}[{index}]' must be a token id (a non-negative integer).",
                                 param=f"{param}[{index}]")
    return len(value)


def input_size(value: Any) -> tuple[int, int]:
    """(inputs, estimated tokens) of ``input``: token ids counted, text estimated (one token more
    per input, so that a short text is not estimated at none)."""
    if isinstance(value, str):
        return 1, estimate_tokens(len(value), 0, 0) + 1
    if not isinstance(value, list) or not value:
        raise InvalidRequest(f"'input' is required and must be {INPUT_KINDS}.", param="input")
    first = value[0]
    if isinstance(first, str):
        chars = 0
        for index, text in enumerate(value):
            if not isinstance(text, str):
                raise InvalidRequest(f"'input[{index}]' must be a string, like the other inputs.",
                                     param=f"input[{index}]")
            chars += len(text)
        return len(value), estimate_tokens(chars, 0, 0) + len(value)
    if isinstance(first, list):
        tokens = 0
        for index, ids in enumerate(value):
            if not isinstance(ids, list):
                raise InvalidRequest(f"'input[{index}]' must be an array of token ids, like the other inputs.",
                                     param=f"input[{index}]")
            tokens += _token_ids(ids, f"input[{index}]")
        return len(value), tokens
    if isinstance(first, bool) or not isinstance(first, int):
        raise InvalidRequest(f"'input' must be {INPUT_KINDS}.", param="input[0]")
    return 1, _token_ids(value, "input")


class Embeddings(EndpointSpec):
    name = "embeddings"
    output_param = "input"
    operation = "embeddings"
    path = "/v1/embeddings"

    def describe(self, body: Mapping[str, Any]) -> CallFacts:
        model = model_name(body)
        inputs, tokens = input_size(body.get("input"))
        encoding = body.get("encoding_format")
        if encoding is not None and encoding not in ENCODING_FORMATS:
            raise InvalidRequest("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
        positive_int(body, "dimensions", MAX_DIMENSIONS)
        typed_fields(body, {"user": STRING})
        return CallFacts(endpoint=self.name, model=model, stream=False, max_tokens=None, tools=(),
                         message_count=inputs, metadata={}, input_tokens=tokens, output_tokens_max=0)

    def read_reply(self, content: bytes) -> ReplyFacts:
        try:
            reply = orjson.loads(content)
        except orjson.JSONDecodeError:
            reply = None
        if not isinstance(reply, dict) or not isinstance(reply.get("data"), list):
            raise UpstreamError("The model provider sent a reply that is not an embeddings list.")
        facts = ReplyFacts(response_model=str(reply.get("model") or ""))
        if isinstance(reply.get("usage"), Mapping):
            facts.usage, facts.usage_reported = read_usage(reply["usage"]), True
        return facts
