"""Stage 2, describe: a request body becomes CallFacts, or a clear 400.

Validation here is the minimum the gateway needs to govern a call; everything else in the
body is passed through to the provider untouched, which judges it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.errors import InvalidRequest
from gateway.types import CallFacts

# Replies with no max_tokens are estimated (and reserved) at this many output tokens.
DEFAULT_OUTPUT_TOKENS = 4096
# A rough, tokenizer-free estimate: about four characters per token, plus framing per message.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
MAX_MODEL_CHARS = 256


def parse_json_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc.msg} at position {exc.pos}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def _optional_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"'{name}' must be a positive integer.", param=name)
    return value


def _count_text(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # content parts
        return sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return 0


def describe_chat(body: Mapping[str, Any]) -> CallFacts:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string.", param="model")
    if len(model) > MAX_MODEL_CHARS or not model.isprintable():
        # A model name is a catalog name or an alias; it ends up in spans, records and messages.
        raise InvalidRequest(f"'model' must be a printable name of at most {MAX_MODEL_CHARS} characters.",
                             param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' is required and must be a non-empty array.", param="messages")
    chars = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{index}] must be an object with a 'role'.", param=f"messages[{index}]")
        chars += _count_text(message.get("content"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array.", param="tools")
    tool_names = tuple(
        str(((tool.get("function") or {}).get("name")) or tool.get("type") or "")
        for tool in tools if isinstance(tool, dict)
    )
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InvalidRequest("'metadata' must be an object.", param="metadata")
    max_tokens = _optional_int(body, "max_completion_tokens") or _optional_int(body, "max_tokens")
    tool_chars = len(orjson.dumps(tools)) if tools else 0
    return CallFacts(
        endpoint="chat.completions",
        model=model,
        stream=stream,
        max_tokens=max_tokens,
        tools=tool_names,
        message_count=len(messages),
        metadata=metadata,
        input_tokens=(chars + tool_chars) // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE * len(messages),
        output_tokens_max=max_tokens or DEFAULT_OUTPUT_TOKENS,
    )
