"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic's Messages API.

Errors are written in Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``,
and the named ``error`` event once a stream has started), which the ``anthropic`` SDKs raise as
their own exception classes. The ``anthropic-version`` header a client sends is accepted and not
read (the adapter speaks one API version to the provider); ``anthropic-beta`` is passed on to a
provider that speaks Messages natively.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.endpoints import EndpointSpec, StreamReader
from gateway.endpoints.chat import MAX_TOKENS_REPORTED, token_count
from gateway.endpoints.checks import (
    boolean,
    estimate_tokens,
    json_chars,
    model_name,
    optional_array,
    optional_object,
    positive_int,
    tool_name,
)
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamUnavailable,
    anthropic_error_body,
    anthropic_sse_error_event,
)
from gateway.sse import event_data, event_name
from gateway.types import CallFacts, ReplyFacts, Usage
from gateway.upstream import scrub_secrets

ROLES = ("user", "assistant")
# Content blocks of a reply that call a tool: the client's own, and those Anthropic runs itself.
TOOL_USE_BLOCKS = ("tool_use", "server_tool_use", "mcp_tool_use")
TOOL_CHOICES = ("auto", "any", "none", "tool")


def read_usage(usage: Any) -> Usage:
    """Anthropic's usage: every input token is billed, whether fresh, written to or read from the cache."""
    if not isinstance(usage, Mapping):
        return Usage()
    input_tokens = (token_count(usage.get("input_tokens")) + token_count(usage.get("cache_creation_input_tokens"))
                    + token_count(usage.get("cache_read_input_tokens")))
    # Each count is bounded, their sum too: the audit's token columns hold what token_count allows.
    return Usage(input_tokens=min(input_tokens, MAX_TOKENS_REPORTED),
                 output_tokens=token_count(usage.get("output_tokens")),
                 cached_input_tokens=token_count(usage.get("cache_read_input_tokens")))


def error_from_event(payload: Any) -> UpstreamError:
    """The gateway error for a provider's ``error`` event in a stream that had started fine.

    Only a complaint about the request is passed on in the provider's words (scrubbed, as for a
    failed status in gateway/upstream.py); an overload or a server failure is described by the
    gateway. The stream had started, so the provider may have billed what it generated.
    """
    error = payload.get("error") if isinstance(payload, Mapping) else None
    kind = error.get("type") if isinstance(error, Mapping) else None
    message = error.get("message") if isinstance(error, Mapping) else None
    if kind == "rate_limit_error":
        return UpstreamRateLimited(billable_risk=True)
    if kind == "overloaded_error":
        return UpstreamUnavailable("The model provider is overloaded and broke off the stream.", billable_risk=True)
    if kind == "invalid_request_error" and isinstance(message, str):
        return UpstreamRejected(f"The model provider rejected the request: {scrub_secrets(message)}",
                                billable_risk=True)
    return UpstreamError(f"The model provider broke off the stream with an error ({kind or 'unknown'}).",
                         billable_risk=True)


# --- describe: every field the gateway reads ------------------------------------------------------

def block_chars(block: Any, where: str) -> tuple[int, int]:
    """(characters of text, non-text blocks) of one content block, checking what the gateway reads:
    its ``type``, and the text of text, thinking, tool_use and tool_result blocks."""
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise InvalidRequest(f"'{where}' must be a content block: an object with a string 'type'.", param=where)
    kind = block["type"]
    if kind == "text":
        text = block.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"'{where}.text' must be a string.", param=f"{where}.text")
        return len(text), 0
    if kind == "thinking":
        return len(str(block.get("thinking") or "")), 0
    if kind in TOOL_USE_BLOCKS:
        return len(str(block.get("name") or "")) + json_chars(block.get("input")), 0
    if kind == "tool_result":
        return content_chars(block.get("content"), f"{where}.content")
    if kind in ("image", "document"):
        return 0, 1
    return json_chars(block), 0  # search results, server tool results, redacted thinking...


def content_chars(content: Any, param: str) -> tuple[int, int]:
    """A message's (or tool result's) content: a string, or an array of content blocks."""
    if content is None:
        return 0, 0
    if isinstance(content, str):
        return len(content), 0
    if not isinstance(content, list):
        raise InvalidRequest(f"'{param}' must be a string or an array of content blocks.", param=param)
    chars = media = 0
    for index, block in enumerate(content):
        c, m = block_chars(block, f"{param}[{index}]")
        chars, media = chars + c, media + m
    return chars, media


def system_chars(system: Any) -> int:
    """``system``: a string, or an array of text blocks."""
    if system is None or isinstance(system, str):
        return len(system or "")
    if not isinstance(system, list):
        raise InvalidRequest("'system' must be a string or an array of text blocks.", param="system")
    chars = 0
    for index, block in enumerate(system):
        where = f"system[{index}]"
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise InvalidRequest(f"'{where}' must be a text block: {{\"type\": \"text\", \"text\": \"...\"}}.",
                                 param=where)
        chars += len(block["text"])
    return chars


def messages_tool_names(body: Mapping[str, Any]) -> tuple[str, ...]:
    """Every tool a Messages request offers or names: client tools (``{name, input_schema}``),
    server tools (``{"type": "web_search_20250305", "name": ...}``), ``tool_choice``, and the
    remote MCP servers of the MCP connector (``mcp_servers``, and ``mcp_toolset`` tools) as
    ``mcp:<server name>``, as the Responses API's are. A tool whose name the gateway cannot read
    is a 400, never passed on unread."""
    names: list[str] = []
    for index, server in enumerate(optional_array(body, "mcp_servers")):
        where = f"mcp_servers[{index}]"
        if not isinstance(server, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where)
        names.append("mcp:" + tool_name(server.get("name"), f"{where}.name"))
    for index, tool in enumerate(optional_array(body, "tools")):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where)
        kind = tool.get("type")
        if kind is not None and not isinstance(kind, str):
            raise InvalidRequest(f"'{where}.type' must be a string.", param=f"{where}.type")
        if kind == "mcp_toolset":
            names.append("mcp:" + tool_name(tool.get("mcp_server_name"), f"{where}.mcp_server_name"))
            continue
        names.append(tool_name(tool.get("name"), f"{where}.name"))
        if kind in (None, "custom") and not isinstance(tool.get("input_schema"), dict):
            # A client tool's schema is what a translation to another wire format carries.
            raise InvalidRequest(f"'{where}.input_schema' must be an object (a JSON schema).",
                                 param=f"{where}.input_schema")
    choice = body.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in TOOL_CHOICES:
            raise InvalidRequest("'tool_choice' must be an object whose 'type' is one of "
                                 f"{', '.join(TOOL_CHOICES)}.", param="tool_choice")
        if choice["type"] == "tool":
            names.append(tool_name(choice.get("name"), "tool_choice.name"))
        boolean(choice, "disable_parallel_tool_use")
    return tuple(dict.fromkeys(names))


def thinking_budget(body: Mapping[str, Any], ceiling: int) -> int | None:
    thinking = optional_object(body, "thinking")
    if thinking.get("budget_tokens") is None:
        return None
    budget = thinking["budget_tokens"]
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= ceiling:
        raise InvalidRequest(f"'thinking.budget_tokens' must be a positive integer of at most {ceiling}.",
                             param="thinking.budget_tokens")
    return int(budget)


def input_chars(body: Mapping[str, Any]) -> tuple[int, int, int]:
    """(characters, non-text blocks, messages) of a Messages request's input, checked."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' is required and must be a non-empty array.", param="messages")
    chars, media = system_chars(body.get("system")), 0
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidRequest(f"'{where}' must be an object whose 'role' is 'user' or 'assistant'.", param=where)
        if "content" not in message:
            raise InvalidRequest(f"'{where}.content' is required.", param=f"{where}.content")
        c, m = content_chars(message["content"], f"{where}.content")
        chars, media = chars + c, media + m
    return chars + json_chars(body.get("tools")), media, len(messages)


def estimate_input_tokens(body: Mapping[str, Any]) -> int:
    """The gateway's tokenizer-free estimate of a Messages request's input tokens."""
    return estimate_tokens(*input_chars(body))



def anthropic_metadata(body: Mapping[str, Any]) -> dict[str, Any]:
    """Anthropic's ``metadata`` is ``{"user_id": string}``; it reaches the policy input and every
    record, so nothing else is let in."""
    metadata = optional_object(body, "metadata")
    unknown = sorted(set(metadata) - {"user_id"})
    if unknown:
        raise InvalidRequest(f"'metadata' may only hold 'user_id', not '{unknown[0]}'.", param="metadata")
    user_id = metadata.get("user_id")
    if user_id is not None and (not isinstance(user_id, str) or len(user_id) > 256):
        raise InvalidRequest("'metadata.user_id' must be a string of at most 256 characters.",
                             param="metadata.user_id")
    return metadata


class Messages(EndpointSpec):
    name = "messages"
    forwarded_headers = ("anthropic-beta",)  # opts into features such as prompt caching betas
    operation = "chat"
    path = "/v1/messages"

    def describe(self, body: Mapping[str, Any]) -> CallFacts:
        model = model_name(body)
        ceiling = self.limits.max_output_tokens
        max_tokens = positive_int(body, "max_tokens", ceiling)
        if max_tokens is None:
            raise InvalidRequest("'max_tokens' is required and must be a positive integer.", param="max_tokens")
        chars, media, count = input_chars(body)
        thinking_budget(body, ceiling)
        return CallFacts(
            endpoint=self.name,
            model=model,
            stream=boolean(body, "stream"),
            max_tokens=max_tokens,
            tools=messages_tool_names(body),
            message_count=count,
            metadata=anthropic_metadata(body),
            input_tokens=estimate_tokens(chars, media, count),
            output_tokens_max=max_tokens,  # thinking tokens count within max_tokens
        )

    def limit(self, body: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
        current = body.get("max_tokens")
        if max_tokens is None or (isinstance(current, int) and current <= max_tokens):
            return body
        limited = {**body, "max_tokens": max_tokens}
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and isinstance(thinking.get("budget_tokens"), int) \
                and thinking["budget_tokens"] >= max_tokens:
            # Anthropic requires the thinking budget below max_tokens; the cap lowers both.
            limited["thinking"] = {**thinking, "budget_tokens": max(max_tokens - 1, 1)}
        return limited

    def read_reply(self, content: bytes) -> ReplyFacts:
        try:
            reply = orjson.loads(content)
            if not isinstance(reply, dict) or not isinstance(reply.get("content", []), list):
                raise TypeError
            facts = ReplyFacts(response_model=str(reply.get("model") or ""), response_id=str(reply.get("id") or ""))
            if isinstance(reply.get("usage"), Mapping):
                facts.usage, facts.usage_reported = read_usage(reply["usage"]), True
            if reply.get("stop_reason"):
                facts.finish_reasons.append(str(reply["stop_reason"]))
            for block in reply.get("content") or ():
                if isinstance(block, dict) and block.get("type") in TOOL_USE_BLOCKS:
                    facts.tool_calls.append(str(block.get("name") or ""))
            return facts
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            raise UpstreamError("The model provider sent a reply that is not a Messages API message.") from None

    def stream_reader(self, facts: CallFacts) -> StreamReader:
        return MessagesStreamReader()

    def error_body(self, exc: GatewayError) -> bytes:
        return anthropic_error_body(exc)

    def error_event(self, exc: GatewayError) -> bytes:
        return anthropic_sse_error_event(exc)


class MessagesStreamReader(StreamReader):
    """Anthropic's named events: ``message_start`` (input usage), ``content_block_start`` /
    ``_delta`` / ``_stop``, ``message_delta`` (stop reason and cumulative usage), and
    ``message_stop``, the terminator. ``ping`` is relayed. A provider's ``error`` event is never
    relayed raw: it becomes an ``UpstreamError``, which the pipeline ends the stream with, as an
    ``error`` event in Anthropic's shape written by the gateway."""

    def __init__(self) -> None:
        super().__init__()
        # Usage as last reported: message_delta's counts are cumulative and may leave some out.
        self._usage: dict[str, Any] = {}

    def observe(self, event: bytes) -> bytes | None:
        data = event_data(event)
        if data is None:
            return event  # a comment
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            payload = None
        name = event_name(event)
        kind = payload.get("type") if isinstance(payload, dict) else None
        kind = kind if isinstance(kind, str) else (name.decode(errors="replace") if name else None)
        if kind == "error":
            raise error_from_event(payload)
        if not isinstance(payload, dict):
            return event
        facts = self.facts
        if kind == "message_start":
            message = payload.get("message")
            if isinstance(message, dict):
                facts.response_model = str(message.get("model") or "")
                facts.response_id = str(message.get("id") or "")
                self._take_usage(message.get("usage"))
                facts.usage = read_usage(self._usage)  # the input is known now; output so far
        elif kind == "content_block_start":
            block = payload.get("content_block")
            if isinstance(block, dict) and block.get("type") in TOOL_USE_BLOCKS:
                # Named or not, as in a whole reply: from here on the relay holds the stream back.
                facts.tool_calls.append(str(block.get("name") or ""))
            self.events += 1
        elif kind == "content_block_delta":
            self.events += 1
        elif kind == "message_delta":
            delta = payload.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason"):
                facts.finish_reasons.append(str(delta["stop_reason"]))
            if isinstance(payload.get("usage"), Mapping):
                self._take_usage(payload["usage"])
                facts.usage, facts.usage_reported = read_usage(self._usage), True
        elif kind == "message_stop":
            self.terminated = True
        return event

    def _take_usage(self, usage: Any) -> None:
        if isinstance(usage, Mapping):
            self._usage.update({k: v for k, v in usage.items() if v is not None})


class CountTokens(EndpointSpec):
    """Counting a request's input tokens: governed (authenticated, decided, recorded) like any
    call, but nothing is charged or reserved. The answer is ``{"input_tokens": N}``; the record
    holds no tokens, since counting consumes none."""

    name = "messages.count_tokens"
    forwarded_headers = ("anthropic-beta",)
    operation = "count_tokens"
    path = "/v1/messages/count_tokens"
    billable = False

    def describe(self, body: Mapping[str, Any]) -> CallFacts:
        model = model_name(body)
        if boolean(body, "stream"):
            raise InvalidRequest("Counting tokens cannot be streamed; leave 'stream' out.", param="stream")
        chars, media, count = input_chars(body)
        thinking_budget(body, self.limits.max_output_tokens)
        return CallFacts(
            endpoint=self.name,
            model=model,
            stream=False,
            max_tokens=None,
            tools=messages_tool_names(body),
            message_count=count,
            metadata=anthropic_metadata(body),
            input_tokens=estimate_tokens(chars, media, count),
            output_tokens_max=0,
        )

    def read_reply(self, content: bytes) -> ReplyFacts:
        try:
            reply = orjson.loads(content)
            if not isinstance(reply, dict) or isinstance(reply.get("input_tokens"), bool) \
                    or not isinstance(reply.get("input_tokens"), int):
                raise TypeError
        except (orjson.JSONDecodeError, TypeError):
            raise UpstreamError("The model provider sent a token count that is not {\"input_tokens\": N}.") from None
        return ReplyFacts()

    def error_body(self, exc: GatewayError) -> bytes:
        return anthropic_error_body(exc)

    def error_event(self, exc: GatewayError) -> bytes:
        return anthropic_sse_error_event(exc)
