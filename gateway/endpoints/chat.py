"""``POST /v1/chat/completions``: OpenAI's chat completions, plain and streamed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.endpoints import EndpointSpec, StreamReader
from gateway.endpoints.checks import (
    ARRAY,
    BOOLEAN,
    INTEGER,
    NUMBER,
    OBJECT,
    STRING,
    STRING_OR_ARRAY,
    Kind,
    boolean,
    estimate_tokens,
    json_chars,
    model_name,
    optional_array,
    optional_object,
    positive_int,
    reported_cost,
    string_map,
    text_chars,
    tool_name,
    typed_fields,
)
from gateway.errors import InvalidRequest, UpstreamError
from gateway.sse import event_data
from gateway.types import CallFacts, ReplyFacts, Usage

MAX_TOKENS_REPORTED = 2**31 - 1  # what the audit's token columns hold; no real call comes near it
# The output caps a chat request may name: a provider honours one or the other, so the gateway
# reads, reserves for and limits both.
OUTPUT_CAPS = ("max_completion_tokens", "max_tokens")
# Fields the gateway passes on unread, checked for their JSON type only (see ``typed_fields``).
PASSED_ON: dict[str, Kind] = {
    "temperature": NUMBER, "top_p": NUMBER, "presence_penalty": NUMBER, "frequency_penalty": NUMBER,
    "seed": INTEGER, "top_logprobs": INTEGER, "logprobs": BOOLEAN, "parallel_tool_calls": BOOLEAN,
    "store": BOOLEAN, "user": STRING, "service_tier": STRING, "reasoning_effort": STRING, "verbosity": STRING,
    "prompt_cache_key": STRING, "safety_identifier": STRING, "stop": STRING_OR_ARRAY, "response_format": OBJECT,
    "logit_bias": OBJECT, "prediction": OBJECT, "audio": OBJECT, "web_search_options": OBJECT, "modalities": ARRAY,
}


def token_count(value: Any) -> int:
    """A provider's token count, as a sane integer: a bogus value must not break charging or the audit."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return min(max(int(value), 0), MAX_TOKENS_REPORTED)


def read_usage(usage: Any) -> Usage:
    if not isinstance(usage, Mapping):
        return Usage()
    details = usage.get("prompt_tokens_details")
    return Usage(input_tokens=token_count(usage.get("prompt_tokens")),
                 output_tokens=token_count(usage.get("completion_tokens")),
                 cached_input_tokens=token_count(details.get("cached_tokens")) if isinstance(details, Mapping) else 0,
                 provider_cost_micro_usd=reported_cost(usage))


def chat_tool_names(body: Mapping[str, Any]) -> tuple[str, ...]:
    """Every tool a chat request offers the model or names: ``tools`` of type ``function`` and
    ``custom``, the legacy ``functions`` and ``function_call``, ``tool_choice``, and the search
    models' built-in ``web_search`` (``web_search_options``). A tool the gateway cannot read is a
    400, never passed on unread."""
    names: list[str] = []
    for index, tool in enumerate(optional_array(body, "tools")):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where)
        kind = tool.get("type", "function")
        if kind not in ("function", "custom"):
            raise InvalidRequest(f"'{where}.type' must be 'function' or 'custom'.", param=f"{where}.type")
        spec = tool.get(kind)
        if not isinstance(spec, dict):
            raise InvalidRequest(f"'{where}.{kind}' must be an object.", param=f"{where}.{kind}")
        names.append(tool_name(spec.get("name"), f"{where}.{kind}.name"))
    for index, function in enumerate(optional_array(body, "functions")):
        where = f"functions[{index}]"
        if not isinstance(function, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where)
        names.append(tool_name(function.get("name"), f"{where}.name"))
    function_call = body.get("function_call")
    if isinstance(function_call, dict):
        names.append(tool_name(function_call.get("name"), "function_call.name"))
    elif function_call is not None and function_call not in ("none", "auto"):
        raise InvalidRequest("'function_call' must be 'none', 'auto' or an object with a 'name'.",
                             param="function_call")
    tool_choice = body.get("tool_choice")
    if isinstance(tool_choice, dict):
        kind = tool_choice.get("type", "function")
        spec = tool_choice.get(kind) if isinstance(kind, str) else None
        if kind in ("function", "custom"):
            if not isinstance(spec, dict):
                raise InvalidRequest(f"'tool_choice.{kind}' must be an object.", param="tool_choice")
            names.append(tool_name(spec.get("name"), f"tool_choice.{kind}.name"))
        elif kind == "allowed_tools":
            pass  # names a subset of ``tools``, which are read above
        else:
            raise InvalidRequest("'tool_choice' has an unknown type.", param="tool_choice.type")
    elif tool_choice is not None and tool_choice not in ("none", "auto", "required"):
        raise InvalidRequest("'tool_choice' must be 'none', 'auto', 'required' or an object.", param="tool_choice")
    if body.get("web_search_options") is not None:
        names.append("web_search")  # as the Responses and Messages APIs name their web search tool
    return tuple(dict.fromkeys(names))  # each name once, in the order first named


def tool_call_chars(calls: Any, param: str) -> int:
    """Characters of the tool calls an assistant message made earlier in the conversation: the
    names and arguments are input the provider charges for, like the content."""
    if not isinstance(calls, list):
        raise InvalidRequest(f"'{param}' must be an array.", param=param)
    chars = 0
    for index, call in enumerate(calls):
        where = f"{param}[{index}]"
        kind = call.get("type", "function") if isinstance(call, dict) else None
        if kind not in ("function", "custom"):
            raise InvalidRequest(f"'{where}' must be an object of type 'function' or 'custom'.", param=where)
        spec = call.get(kind)
        if not isinstance(spec, dict):
            raise InvalidRequest(f"'{where}.{kind}' must be an object.", param=f"{where}.{kind}")
        for field in ("name", "arguments", "input"):
            value = spec.get(field)
            if isinstance(value, str):
                chars += len(value)
    return chars


class ChatCompletions(EndpointSpec):
    name = "chat.completions"
    operation = "chat"
    path = "/v1/chat/completions"

    def describe(self, body: Mapping[str, Any]) -> CallFacts:
        model = model_name(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' is required and must be a non-empty array.", param="messages")
        chars = media = 0
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest(f"messages[{index}] must be an object with a 'role'.", param=f"messages[{index}]")
            c, m = text_chars(message.get("content"), f"messages[{index}].content")
            chars, media = chars + c, media + m
            if message.get("tool_calls") is not None:
                chars += tool_call_chars(message["tool_calls"], f"messages[{index}].tool_calls")
        stream = boolean(body, "stream")
        stream_options = optional_object(body, "stream_options")
        if stream_options and not stream:
            # OpenAI and vLLM refuse it too; the gateway says so before the call costs anything.
            raise InvalidRequest("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
        include_usage = boolean(stream_options, "include_usage", param="stream_options.include_usage")
        tools = chat_tool_names(body)
        metadata = string_map(body, "metadata")
        ceiling = self.limits.max_output_tokens
        max_tokens = max(positive_int(body, "max_completion_tokens", ceiling) or 0,
                         positive_int(body, "max_tokens", ceiling) or 0) or None
        choices = positive_int(body, "n", self.limits.max_choices) or 1
        typed_fields(body, PASSED_ON)
        tool_chars = json_chars(body.get("tools")) + json_chars(body.get("functions"))
        return CallFacts(
            endpoint=self.name,
            model=model,
            stream=stream,
            max_tokens=max_tokens,
            tools=tools,
            message_count=len(messages),
            metadata=metadata,
            input_tokens=estimate_tokens(chars + tool_chars, media, len(messages)),
            output_tokens_max=(max_tokens or self.limits.default_output_tokens) * choices,
            choices=choices,
            include_usage=include_usage,
        )

    def limit(self, body: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
        if max_tokens is None:
            return body
        limited = dict(body)
        for key in [cap for cap in OUTPUT_CAPS if body.get(cap) is not None] or ["max_tokens"]:
            current = body.get(key)
            limited[key] = min(current, max_tokens) if isinstance(current, int) else max_tokens
        return limited

    def read_reply(self, content: bytes) -> ReplyFacts:
        try:
            reply = orjson.loads(content)
            choices = reply.get("choices") or []
            facts = ReplyFacts(response_model=str(reply.get("model") or ""), response_id=str(reply.get("id") or ""))
            if isinstance(reply.get("usage"), Mapping):
                facts.usage, facts.usage_reported = read_usage(reply["usage"]), True
            for choice in choices:
                if choice.get("finish_reason"):
                    facts.finish_reasons.append(str(choice["finish_reason"]))
                message = choice.get("message") or {}
                for call in message.get("tool_calls") or ():
                    facts.tool_calls.append(str((call.get("function") or call.get("custom") or {}).get("name") or ""))
                if message.get("function_call"):
                    facts.tool_calls.append(str(message["function_call"].get("name") or ""))
            return facts
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            raise UpstreamError("The model provider sent a reply that is not chat-completion JSON.") from None

    def stream_reader(self, facts: CallFacts) -> StreamReader:
        return ChatStreamReader(facts.include_usage)


class ChatStreamReader(StreamReader):
    """``chat.completion.chunk`` events, ending in ``data: [DONE]``.

    The gateway always asks the provider for the usage chunk (so the call can be charged); it is
    dropped again for a client that did not ask for it.
    """

    def __init__(self, include_usage: bool) -> None:
        super().__init__()
        self._include_usage = include_usage
        # Where each tool call begun so far is in ``facts.tool_calls``, by (choice, call index).
        self._tool_calls: dict[tuple[int | None, int | str | None], int] = {}

    def observe(self, event: bytes) -> bytes | None:
        data = event_data(event)
        if data is None:
            return event
        if data == b"[DONE]":
            self.terminated = True
            return event
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(chunk, dict):
            return event
        facts = self.facts
        if chunk.get("model"):
            facts.response_model = str(chunk["model"])
        if chunk.get("id") and not facts.response_id:
            facts.response_id = str(chunk["id"])
        choices = chunk.get("choices") or []
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if choice.get("finish_reason"):
                facts.finish_reasons.append(str(choice["finish_reason"]))
            delta = choice.get("delta") or {}
            if delta.get("tool_calls") or delta.get("function_call"):
                self._read_tool_calls(_index(choice.get("index")), delta)
        if chunk.get("usage"):
            facts.usage, facts.usage_reported = read_usage(chunk["usage"]), True
            if not choices and not self._include_usage:
                return None
            return event
        if choices:
            self.events += 1
        return event

    def _read_tool_calls(self, choice: int | None, delta: Mapping[str, Any]) -> None:
        """A delta's tool calls. A call counts from its first delta on, named or not, so that the
        relay holds the stream back from there; a name in a later delta fills in an unnamed call
        (or, if it differs, is added: the policy sees every name the provider sent)."""
        calls: list[tuple[int | str | None, Any]] = [
            (_index(call.get("index")), call.get("function") or call.get("custom"))
            for call in delta.get("tool_calls") or () if isinstance(call, dict)]
        if delta.get("function_call"):
            calls.append(("function_call", delta["function_call"]))
        names = self.facts.tool_calls
        for index, function in calls:
            name = function.get("name") if isinstance(function, dict) else None
            name = str(name) if name else ""
            at = self._tool_calls.get((choice, index))
            if at is None:
                self._tool_calls[choice, index] = len(names)
                names.append(name)
            elif name and not names[at]:
                names[at] = name
            elif name and name != names[at]:
                names.append(name)


def _index(value: Any) -> int | None:
    """A provider's choice or tool-call index, as a key (anything but an integer counts as none)."""
    return value if isinstance(value, int) else None

