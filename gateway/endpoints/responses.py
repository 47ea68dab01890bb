"""``POST /v1/responses``: OpenAI's Responses API, plain and streamed.

A stream is a series of named events (``event: response.created`` ... each ``data`` a JSON object
with its ``type``) that ends in ``response.completed``, ``response.incomplete`` or
``response.failed``, which carry the whole response with its usage; there is no ``[DONE]``.

Responses are kept by the provider under their id; the gateway remembers which key made each
one (``keeps_responses``, see gateway/stored_responses.py), and a ``previous_response_id`` must
name one of the caller's own. Background responses are refused: the gateway could not meter
what they generate after the call has ended. Conversations (``conversation``) are refused too:
they are the provider's state, shared by every key, and the gateway does not govern them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.endpoints import EndpointSpec, StreamReader
from gateway.endpoints.chat import token_count
from gateway.endpoints.checks import (
    ARRAY,
    BOOLEAN,
    INTEGER,
    NUMBER,
    OBJECT,
    STRING,
    Kind,
    boolean,
    estimate_tokens,
    json_chars,
    model_name,
    optional_array,
    parse_json_reply,
    positive_int,
    reported_cost,
    string_map,
    text_chars,
    tool_name,
    typed_fields,
)
from gateway.errors import GatewayError, InvalidRequest
from gateway.sse import event_data, event_name, sse_event
from gateway.types import CallFacts, ReplyFacts, Usage

# The events that end a stream, each carrying the whole response with its usage.
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Output items that call a tool by its name: the client's functions and custom tools, and a remote
# MCP server's tools (by the bare tool name, as Anthropic's mcp_tool_use block names them).
NAMED_CALL_ITEMS = frozenset({"function_call", "custom_tool_call", "mcp_call"})
# Tools a request can offer that carry a name of their own; every other tool (web_search,
# file_search, code_interpreter, image_generation, computer_use_preview, local_shell, shell,
# apply_patch, and any the API adds) is named by its type.
NAMED_TOOLS = ("function", "custom")  # a tuple: a client's unhashable "type" compares unequal, never raises
# Fields the gateway passes on unread, checked for their JSON type only (see ``typed_fields``).
PASSED_ON: dict[str, Kind] = {
    "temperature": NUMBER, "top_p": NUMBER, "top_logprobs": INTEGER, "max_tool_calls": INTEGER,
    "parallel_tool_calls": BOOLEAN, "store": BOOLEAN, "user": STRING, "service_tier": STRING,
    "truncation": STRING, "prompt_cache_key": STRING, "safety_identifier": STRING, "reasoning": OBJECT,
    "text": OBJECT, "prompt": OBJECT, "stream_options": OBJECT, "include": ARRAY,
}


def read_usage(usage: Any) -> Usage:
    if not isinstance(usage, Mapping):
        return Usage()
    details = usage.get("input_tokens_details")
    return Usage(input_tokens=token_count(usage.get("input_tokens")),
                 output_tokens=token_count(usage.get("output_tokens")),
                 cached_input_tokens=token_count(details.get("cached_tokens")) if isinstance(details, Mapping) else 0,
                 provider_cost_micro_usd=reported_cost(usage))


def _tool_names(tool: Mapping[str, Any], where: str) -> list[str]:
    """The policy-visible names of one offered tool: a function's or custom tool's name, the names
    inside a namespace, ``mcp:<server_label>`` for a remote MCP server, else the tool's type."""
    kind = tool.get("type")
    if not isinstance(kind, str) or not kind:
        raise InvalidRequest(f"'{where}.type' must be a string.", param=f"{where}.type")
    if kind in NAMED_TOOLS:
        return [tool_name(tool.get("name"), f"{where}.name")]
    if kind == "namespace":
        tool_name(tool.get("name"), f"{where}.name")
        inner = tool.get("tools")
        if not isinstance(inner, list):
            raise InvalidRequest(f"'{where}.tools' must be an array.", param=f"{where}.tools")
        names = []
        for index, member in enumerate(inner):
            at = f"{where}.tools[{index}]"
            if not isinstance(member, dict) or member.get("type") not in NAMED_TOOLS:
                raise InvalidRequest(f"'{at}' must be a function or custom tool.", param=at)
            # The bare name, as the model's function_call names it: a rule on a tool's name
            # holds whatever namespace the tool is put in.
            names.append(tool_name(member.get("name"), f"{at}.name"))
        return names
    if kind == "mcp":
        return ["mcp:" + tool_name(tool.get("server_label"), f"{where}.server_label")]
    return [tool_name(kind, f"{where}.type")]


def responses_tool_names(body: Mapping[str, Any]) -> tuple[str, ...]:
    """Every tool a Responses request offers (``tools``) or names (``tool_choice``). A tool whose
    name cannot be read is a 400, never passed on unread."""
    names: list[str] = []
    for index, tool in enumerate(optional_array(body, "tools")):
        if not isinstance(tool, dict):
            raise InvalidRequest(f"'tools[{index}]' must be an object.", param=f"tools[{index}]")
        names.extend(_tool_names(tool, f"tools[{index}]"))
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind in NAMED_TOOLS:
            names.append(tool_name(choice.get("name"), "tool_choice.name"))
        elif kind == "mcp":
            names.append("mcp:" + tool_name(choice.get("server_label"), "tool_choice.server_label"))
        elif kind == "allowed_tools":
            pass  # names a subset of ``tools``, which are read above
        else:
            names.append(tool_name(kind, "tool_choice.type"))
    elif choice is not None and choice not in ("none", "auto", "required"):
        raise InvalidRequest("'tool_choice' must be 'none', 'auto', 'required' or an object.", param="tool_choice")
    return tuple(dict.fromkeys(names))  # each name once, in the order first named


def input_size(value: Any) -> tuple[int, int, int]:
    """(characters of text, non-text parts, items) of ``input``: a string, or an array of input
    items (messages, earlier tool calls and their outputs, reasoning, references...)."""
    if value is None:
        return 0, 0, 0
    if isinstance(value, str):
        return len(value), 0, 1
    if not isinstance(value, list):
        raise InvalidRequest("'input' must be a string or an array of input items.", param="input")
    chars = media = 0
    for index, item in enumerate(value):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if not isinstance(kind, str):
            raise InvalidRequest(f"'{where}' must be an object with a 'role' or a string 'type'.", param=where)
        if kind == "message":
            if not isinstance(item.get("role"), str):
                raise InvalidRequest(f"'{where}.role' must be a string.", param=f"{where}.role")
            c, m = text_chars(item.get("content"), f"{where}.content")
        elif kind in ("function_call_output", "custom_tool_call_output"):
            output = item.get("output")
            if isinstance(output, str):
                c, m = len(output), 0
            elif isinstance(output, list):
                c, m = text_chars(output, f"{where}.output")
            else:
                raise InvalidRequest(f"'{where}.output' must be a string or an array of content parts.",
                                     param=f"{where}.output")
        else:
            # Earlier tool calls, reasoning, item references...: input the provider charges for,
            # estimated by their size.
            c, m = json_chars(item), 0
        chars, media = chars + c, media + m
    return chars, media, len(value)


def tool_call_name(item: Any) -> str | None:
    """The policy-visible name of an output item that calls a tool, None for any other item. Every
    item whose type ends in ``_call`` is one: the named ones by their name, the rest (the client's
    ``local_shell_call``, ``shell_call``, ``computer_call``, ``apply_patch_call``, the provider's
    ``web_search_call``, ``code_interpreter_call``...) by their tool's type, the item's without ``_call``."""
    kind = item.get("type") if isinstance(item, dict) else None
    if not isinstance(kind, str) or not kind.endswith("_call"):
        return None
    if kind in NAMED_CALL_ITEMS:
        return str(item.get("name") or "")
    return kind.removesuffix("_call")


def _finish(response: Mapping[str, Any]) -> str:
    """The finish of a response: its status, or why it is incomplete (``max_output_tokens``...)."""
    status = str(response.get("status") or "completed")
    if status == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, Mapping) else None
        return str(reason or status)
    return status


def _read_response(response: Mapping[str, Any], facts: ReplyFacts, *, final: bool) -> None:
    if response.get("id") and not facts.response_id:
        facts.response_id = str(response["id"])
    if response.get("model"):
        facts.response_model = str(response["model"])
    if not final:
        return
    if isinstance(response.get("usage"), Mapping):
        facts.usage, facts.usage_reported = read_usage(response["usage"]), True
    facts.finish_reasons.append(_finish(response))


class Responses(EndpointSpec):
    name = "responses"
    output_param = "max_output_tokens"
    operation = "chat"
    path = "/v1/responses"
    keeps_responses = True

    def describe(self, body: Mapping[str, Any]) -> CallFacts:
        model = model_name(body)
        chars, media, items = input_size(body.get("input"))
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise InvalidRequest("'instructions' must be a string.", param="instructions")
        if boolean(body, "background"):
            raise InvalidRequest("Background responses are not supported by the gateway: what they generate after "
                                 "the call has ended could not be metered.", param="background")
        if body.get("conversation") is not None:
            raise InvalidRequest("Conversations are not supported by the gateway; continue a response with "
                                 "'previous_response_id' instead.", param="conversation")
        previous = body.get("previous_response_id")
        if previous is not None and (not isinstance(previous, str) or not previous):
            raise InvalidRequest("'previous_response_id' must be a string.", param="previous_response_id")
        stream = boolean(body, "stream")
        tools = responses_tool_names(body)
        metadata = string_map(body, "metadata")
        max_tokens = positive_int(body, "max_output_tokens", self.limits.max_output_tokens)
        typed_fields(body, PASSED_ON)
        chars += len(instructions or "") + json_chars(body.get("tools"))
        return CallFacts(
            endpoint=self.name,
            model=model,
            stream=stream,
            max_tokens=max_tokens,
            tools=tools,
            message_count=items,
            metadata=metadata,
            input_tokens=estimate_tokens(chars, media, items),
            output_tokens_max=max_tokens or self.limits.default_output_tokens,
            previous_response_id=previous,
        )

    def limit(self, body: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
        if max_tokens is None:
            return body
        current = body.get("max_output_tokens")
        return {**body, "max_output_tokens": min(current, max_tokens) if isinstance(current, int) else max_tokens}

    def read_reply(self, content: bytes) -> ReplyFacts:
        reply = parse_json_reply(content, "a Responses API response")
        facts = ReplyFacts()
        _read_response(reply, facts, final=True)
        output = reply.get("output")
        for item in output if isinstance(output, list) else ():
            if (name := tool_call_name(item)) is not None:
                facts.tool_calls.append(name)
        return facts

    def stream_reader(self, facts: CallFacts) -> StreamReader:
        return ResponsesStreamReader()

    def error_event(self, exc: GatewayError) -> bytes:
        """The Responses ``error`` event (type, code, message, param), with the error also nested
        under ``error``: the openai SDKs (Python and Node) raise an APIError for an event whose
        data has an ``error`` member, and would otherwise hand it over as one more event."""
        error = {"type": exc.type, "code": exc.code, "message": exc.message, "param": exc.param}
        return sse_event({"type": "error", "code": exc.code or exc.type, "message": exc.message, "param": exc.param,
                          "error": error}, "error")


class ResponsesStreamReader(StreamReader):
    """The Responses event stream: ids and model from ``response.created``, tool calls from
    ``response.output_item.added``, usage and finish from the terminating event."""

    def observe(self, event: bytes) -> bytes | None:
        name = event_name(event)
        if name is not None and name.endswith(b".delta"):
            self.events += 1  # text, arguments, reasoning...: content, read no further
            return event
        data = event_data(event)
        if data is None:
            return event
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event
        kind = payload.get("type") if isinstance(payload, dict) else None
        if not isinstance(kind, str):
            return event
        if kind.endswith(".delta"):  # a provider that does not name its events
            self.events += 1
        elif kind == "response.output_item.added":
            if (called := tool_call_name(payload.get("item"))) is not None:
                self.facts.tool_calls.append(called)
        elif kind.startswith("response.") and isinstance(payload.get("response"), dict):
            final = kind in TERMINAL_EVENTS
            _read_response(payload["response"], self.facts, final=final)
            if final:
                self.terminated = True
        return event
