"""Checks shared by the endpoint specs: every field the gateway reads is checked for type and
range before any budget is touched, and fails with a 400 naming the field.

Fields the gateway does not read pass through to the provider, which judges them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import InvalidRequest, UpstreamError

MAX_MODEL_CHARS = 256
# A tokenizer-free estimate that errs high, since a budget is reserved from it: three characters
# a token (English runs near four, code and other scripts nearer three), framing per message, and
# the tokens that prime the reply (OpenAI counts 3).
CHARS_PER_TOKEN = 3
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3
# A non-text input part (image, audio, file) is estimated at this many tokens: above what
# OpenAI bills for its largest high-detail image (about 2,500 on patch-based models).
TOKENS_PER_MEDIA_PART = 2_600
# OpenAI's limits on ``metadata`` (https://platform.openai.com/docs/api-reference/chat/create).
METADATA_PAIRS = 16
METADATA_KEY_CHARS = 64
METADATA_VALUE_CHARS = 512


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Ceilings from the settings, applied by every spec."""

    max_depth: int = 32  # JSON nesting
    max_choices: int = 8  # n
    max_output_tokens: int = 262_144  # max_tokens and its kin
    default_output_tokens: int = 4_096  # reserved for a call that names no max_tokens


def parse_json_body(raw: bytes, max_depth: int) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc.msg} at position {exc.pos}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    # Nesting needs an opening bracket per level: a body with few brackets (every usual one)
    # cannot be too deep, and counting bytes in C is cheaper than walking the parsed body.
    if raw.count(b"{") + raw.count(b"[") > max_depth and _too_deep(body, max_depth):
        raise InvalidRequest(f"The request body is nested deeper than {max_depth} levels.")
    return body


def parse_json_reply(content: bytes, what: str) -> dict[str, Any]:
    """A provider's whole reply as a JSON object; an UpstreamError saying it is not ``what`` otherwise."""
    try:
        reply = orjson.loads(content)
    except orjson.JSONDecodeError:
        reply = None
    if not isinstance(reply, dict):
        raise UpstreamError(f"The model provider sent a reply that is not {what}.")
    return reply


def _too_deep(value: Any, limit: int) -> bool:
    """True if containers nest deeper than ``limit``; iterative, visiting containers only."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def model_name(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string.", param="model")
    if len(model) > MAX_MODEL_CHARS or not model.isprintable():
        # A model name is a catalog name or an alias; it ends up in spans, records and messages.
        raise InvalidRequest(f"'model' must be a printable name of at most {MAX_MODEL_CHARS} characters.",
                             param="model")
    return model


def boolean(body: Mapping[str, Any], name: str, default: bool = False, *, param: str | None = None) -> bool:
    """``body[name]`` as a boolean; ``param`` names it in the error when it sits deeper than the top."""
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        param = param or name
        raise InvalidRequest(f"'{param}' must be a boolean.", param=param)
    return value


def positive_int(body: Mapping[str, Any], name: str, ceiling: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"'{name}' must be a positive integer.", param=name)
    if value > ceiling:
        raise InvalidRequest(f"'{name}' must be at most {ceiling}.", param=name)
    return value


def optional_object(body: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{name}' must be an object.", param=name)
    return value


def optional_array(body: Mapping[str, Any], name: str) -> list[Any]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest(f"'{name}' must be an array.", param=name)
    return value


def string_map(body: Mapping[str, Any], name: str, *, pairs: int = METADATA_PAIRS) -> dict[str, str]:
    """OpenAI's ``metadata``: at most ``pairs`` string keys of at most 64 characters, each with a
    string value of at most 512. It reaches the policy input and every decision record, so
    anything else (deep, huge, or not a string) is a 400 here rather than a surprise there."""
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{name}' must be an object.", param=name)
    if len(value) > pairs:
        raise InvalidRequest(f"'{name}' may hold at most {pairs} key-value pairs.", param=name)
    for key, item in value.items():
        if len(key) > METADATA_KEY_CHARS:
            raise InvalidRequest(f"Each key of '{name}' must be at most {METADATA_KEY_CHARS} characters.", param=name)
        if not isinstance(item, str) or len(item) > METADATA_VALUE_CHARS:
            raise InvalidRequest(f"Each value of '{name}' must be a string of at most {METADATA_VALUE_CHARS} "
                                 "characters.", param=name)
    return value


# The JSON types of ``typed_fields``: what the error says, and the Python types orjson gives.
# A boolean is not a number here, although Python's bool is an int.
Kind = tuple[str, tuple[type, ...]]
NUMBER: Kind = ("a number", (int, float))
INTEGER: Kind = ("an integer", (int,))
STRING: Kind = ("a string", (str,))
BOOLEAN: Kind = ("a boolean", (bool,))
OBJECT: Kind = ("an object", (dict,))
ARRAY: Kind = ("an array", (list,))
STRING_OR_ARRAY: Kind = ("a string or an array", (str, list))


def typed_fields(body: Mapping[str, Any], fields: Mapping[str, Kind]) -> None:
    """Each named field, when present and not null, has its JSON type, or a 400 naming it.

    For fields the gateway passes on unread whose wrong type some providers answer with a 500
    (which the gateway would retry and report as the provider's failure): one lookup per field
    the body names.
    """
    for name, value in body.items():  # a body names a few fields; the table lists many
        kind = fields.get(name)
        if kind is None or value is None:
            continue
        what, types = kind
        if not isinstance(value, types) or (value.__class__ is bool and bool not in types):
            raise InvalidRequest(f"'{name}' must be {what}.", param=name)


def tool_name(value: Any, param: str) -> str:
    """A tool's name, which policies match on: a non-empty printable string, or a 400."""
    if not isinstance(value, str) or not value or len(value) > MAX_MODEL_CHARS or not value.isprintable():
        raise InvalidRequest(f"'{param}' must be a tool name: a printable string of at most "
                             f"{MAX_MODEL_CHARS} characters.", param=param)
    return value


def text_chars(content: Any, param: str) -> tuple[int, int]:
    """(characters of text, non-text parts) of a message's content: a string, null, or an array of
    parts, each an object with a string ``type``; a text part's ``text`` (and a refusal part's
    ``refusal``) must be a string."""
    if content is None:
        return 0, 0
    if isinstance(content, str):
        return len(content), 0
    if not isinstance(content, list):
        raise InvalidRequest(f"'{param}' must be a string or an array of content parts.", param=param)
    chars = media = 0
    for index, part in enumerate(content):
        if isinstance(part, str):
            # Not a content part of any API: a common mistake the provider would refuse anyway.
            raise InvalidRequest(f"'{param}[{index}]' must be a content part object, not a string.",
                                 param=f"{param}[{index}]")
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise InvalidRequest(f"'{param}[{index}]' must be an object with a string 'type'.",
                                 param=f"{param}[{index}]")
        if kind == "text" or "text" in part:
            text = part.get("text")
            if not isinstance(text, str):
                where = f"{param}[{index}].text"
                raise InvalidRequest(f"'{where}' must be a string.", param=where)
            chars += len(text)
        elif kind == "refusal":
            refusal = part.get("refusal")
            if not isinstance(refusal, str):
                where = f"{param}[{index}].refusal"
                raise InvalidRequest(f"'{where}' must be a string.", param=where)
            chars += len(refusal)
        else:
            media += 1
    return chars, media


def reported_cost(usage: Mapping[str, Any]) -> int | None:
    """A cost in dollars a provider reports in its usage (``cost``, as OpenRouter does), in
    micro-dollars; None when there is none, or none that reads as a sane number."""
    cost = usage.get("cost")
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 0 <= cost < 1e9:
        return None
    return round(cost * 1_000_000)


def estimate_tokens(chars: int, media_parts: int, messages: int) -> int:
    return (-(-chars // CHARS_PER_TOKEN) + TOKENS_PER_MEDIA_PART * media_parts + TOKENS_PER_MESSAGE * messages
            + (TOKENS_PER_REPLY if messages else 0))


def json_chars(value: Any) -> int:
    return len(orjson.dumps(value)) if value else 0
