"""Translation between OpenAI's chat completions and Anthropic's Messages, both ways, bytes to bytes.

Chat -> Messages (the ``anthropic`` adapter serving ``chat.completions``):
    ``chat_request_to_messages``   a chat request as a Messages request
    ``message_to_chat_completion`` a Message as a ``chat.completion``
    ``MessagesToChatStream``       Anthropic's named events as ``chat.completion.chunk`` events

Messages -> chat (a chat provider, ``openai`` or ``mock``, serving ``messages``):
    ``messages_request_to_chat``   a Messages request as a chat request
    ``chat_completion_to_message`` a ``chat.completion`` as a Message
    ``ChatToMessagesStream``       chat chunks as Anthropic's named events
    ``complete_messages_over_chat`` / ``stream_messages_over_chat``: the two put to work for any
    provider that speaks chat completions.

What maps: system prompts, text and image content, tools (``parameters`` <-> ``input_schema``),
``tool_choice`` and parallel tool use, assistant tool calls <-> ``tool_use`` blocks, tool
messages <-> ``tool_result`` blocks, ``stop`` <-> ``stop_sequences``, ``temperature``,
``top_p``, ``user`` <-> ``metadata.user_id``, stop reasons and usage (cache reads included).

What does not: a request that needs something the other API cannot express (``n`` > 1,
``response_format`` other than text, legacy ``functions``, audio or file parts, Anthropic's
server tools, documents, images inside tool results) is refused with a 400 naming the field,
rather than sent on with its meaning changed. Other chat fields without a Messages equivalent
(``seed``, ``logit_bias``, penalties, ``logprobs``, ``store``, ``reasoning_effort`` ...) are
left out, as are Anthropic's ``top_k`` and ``thinking`` going the other way; thinking blocks in
a reply are not shown to a chat client.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import replace
from typing import Any

import orjson

from gateway.endpoints.messages import error_from_event, estimate_input_tokens
from gateway.errors import UpstreamError, UpstreamRejected
from gateway.sse import DONE, event_data, sse_event
from gateway.types import Provider, UpstreamCall, UpstreamReply

MESSAGES_ENDPOINTS = frozenset({"messages", "messages.count_tokens"})

STOP_TO_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
                  "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}
FINISH_TO_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                  "content_filter": "refusal"}
TOOL_CHOICE_TO_MESSAGES = {"auto": "auto", "required": "any", "none": "none"}
TOOL_CHOICE_TO_CHAT = {"auto": "auto", "any": "required", "none": "none"}


def refuse(message: str) -> UpstreamRejected:
    """A request this translation cannot carry: a 400, never retried on another deployment."""
    return UpstreamRejected(f"This request cannot be translated for the model's provider: {message}")


def _json_arguments(value: Any) -> str:
    return orjson.dumps(value if value is not None else {}).decode()


def _finish_reason(stop_reason: Any) -> str:
    return STOP_TO_FINISH.get(str(stop_reason), "stop")


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# --- chat -> Messages ------------------------------------------------------------------------------

def _image_block(url: Any, where: str) -> dict[str, Any]:
    if not isinstance(url, str) or not url:
        raise refuse(f"'{where}.image_url.url' must be a URL.")
    if not url.startswith("data:"):
        return {"type": "image", "source": {"type": "url", "url": url}}
    header, _, data = url.partition(",")
    if not header.endswith(";base64"):
        raise refuse(f"'{where}.image_url.url' must be a base64 data URL or an http(s) URL.")
    return {"type": "image", "source": {"type": "base64", "media_type": header[5:-7], "data": data}}


def _chat_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """A chat message's content as Anthropic content blocks (empty text is left out: Anthropic
    refuses empty text blocks)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        kind = part.get("type")
        if kind == "text" and part.get("text"):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and part.get("refusal"):
            blocks.append({"type": "text", "text": part["refusal"]})
        elif kind == "image_url":
            image = part.get("image_url")
            blocks.append(_image_block(image.get("url") if isinstance(image, dict) else image, f"{where}[{index}]"))
        elif kind not in ("text", "refusal"):
            raise refuse(f"'{where}[{index}]' is a {kind!r} part, which Anthropic's Messages API does not take.")
    return blocks


def _tool_input(arguments: Any, where: str) -> dict[str, Any]:
    try:
        value = orjson.loads(arguments or "{}")
    except (orjson.JSONDecodeError, TypeError):
        value = None
    if not isinstance(value, dict):
        raise refuse(f"'{where}' must be a JSON object, as Anthropic's tool_use input is.")
    return value


def _simplify(blocks: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """One text block is sent as a plain string, as people write it."""
    if len(blocks) == 1 and blocks[0]["type"] == "text" and set(blocks[0]) == {"type", "text"}:
        return str(blocks[0]["text"])
    return blocks


def _chat_tools(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    tools = []
    for index, tool in enumerate(body.get("tools") or ()):
        function = tool.get("function") if tool.get("type", "function") == "function" else None
        if not isinstance(function, dict):
            raise refuse(f"'tools[{index}]' is not a function tool; Anthropic takes function tools only.")
        converted: dict[str, Any] = {"name": function.get("name"),
                                     "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}
        if function.get("description"):
            converted["description"] = function["description"]
        tools.append(converted)
    return tools


def _chat_tool_choice(body: Mapping[str, Any]) -> dict[str, Any] | None:
    choice = body.get("tool_choice")
    converted: dict[str, Any] | None = None
    if isinstance(choice, str):
        if choice not in TOOL_CHOICE_TO_MESSAGES:
            raise refuse(f"'tool_choice' {choice!r} has no Anthropic equivalent.")
        converted = {"type": TOOL_CHOICE_TO_MESSAGES[choice]}
    elif isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, dict):
            raise refuse("'tool_choice' must name a function tool.")
        converted = {"type": "tool", "name": function.get("name")}
    if body.get("parallel_tool_calls") is False and body.get("tools"):
        converted = {**(converted or {"type": "auto"}), "disable_parallel_tool_use": True}
    return converted


def _untranslatable(body: Mapping[str, Any]) -> None:
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        raise refuse("'n' above 1: Anthropic's Messages API answers with one message.")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        raise refuse("'response_format' other than text.")
    if body.get("functions") or body.get("function_call"):
        raise refuse("legacy 'functions' and 'function_call'; use 'tools'.")


def chat_request_to_messages(body: Mapping[str, Any], model: str, default_max_tokens: int) -> dict[str, Any]:
    """A chat completions request as a Messages request for ``model``.

    ``max_tokens`` is required by Anthropic: a request without one gets ``default_max_tokens``
    (the gateway's ``default_output_tokens``, which is what its reservation assumed).
    """
    _untranslatable(body)
    system: list[str] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        # Anthropic alternates roles: consecutive turns of one role (several tool results, or a
        # tool result followed by the user's text) become one turn.
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": list(blocks)})

    for index, message in enumerate(body.get("messages") or ()):
        where = f"messages[{index}]"
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            system.extend(str(b["text"]) for b in _chat_blocks(content, f"{where}.content") if b["type"] == "text")
        elif role == "user":
            add("user", _chat_blocks(content, f"{where}.content"))
        elif role == "assistant":
            blocks = _chat_blocks(content, f"{where}.content")
            for number, call in enumerate(message.get("tool_calls") or ()):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    raise refuse(f"'{where}.tool_calls[{number}]' is not a function call.")
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                               "input": _tool_input(function.get("arguments"),
                                                    f"{where}.tool_calls[{number}].function.arguments")})
            if blocks:
                add("assistant", blocks)
        elif role == "tool":
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.get("tool_call_id")}
            result["content"] = content if isinstance(content, str) else _chat_blocks(content, f"{where}.content")
            add("user", [result])
        else:
            raise refuse(f"'{where}.role' {role!r} has no Anthropic equivalent.")
    request: dict[str, Any] = {"model": model, "max_tokens": body.get("max_completion_tokens")
                               or body.get("max_tokens") or default_max_tokens,
                               "messages": [{"role": t["role"], "content": _simplify(t["content"])} for t in turns]}
    if system:
        request["system"] = "\n\n".join(system)
    stop = body.get("stop")
    if stop:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            request[name] = body[name]
    if body.get("user"):
        request["metadata"] = {"user_id": str(body["user"])}
    if body.get("tools"):
        request["tools"] = _chat_tools(body)
    tool_choice = _chat_tool_choice(body)
    if tool_choice is not None:
        request["tool_choice"] = tool_choice
    if body.get("stream"):
        request["stream"] = True
    return request


def _chat_usage(usage: Any) -> dict[str, Any]:
    """Anthropic's usage as chat's: the prompt counts every input token, cached ones included."""
    usage = usage if isinstance(usage, Mapping) else {}
    cached = _int(usage.get("cache_read_input_tokens"))
    prompt = _int(usage.get("input_tokens")) + _int(usage.get("cache_creation_input_tokens")) + cached
    completion = _int(usage.get("output_tokens"))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def message_to_chat_completion(message: Mapping[str, Any], created: int) -> dict[str, Any]:
    """A Message as a ``chat.completion`` with one choice. Server tools (run by Anthropic) and
    thinking are not the client's to see: only text and the client's own tool calls are."""
    texts, tool_calls = [], []
    for block in message.get("content") or ():
        if block.get("type") == "text":
            texts.append(str(block.get("text") or ""))
        elif block.get("type") == "tool_use":
            function = {"name": block.get("name"), "arguments": _json_arguments(block.get("input"))}
            tool_calls.append({"id": block.get("id"), "type": "function", "function": function})
    text = "".join(texts)
    reply: dict[str, Any] = {"role": "assistant", "content": text or (None if tool_calls else ""), "refusal": None}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    return {"id": message.get("id"), "object": "chat.completion", "created": created, "model": message.get("model"),
            "choices": [{"index": 0, "message": reply, "logprobs": None,
                         "finish_reason": _finish_reason(message.get("stop_reason"))}],
            "usage": _chat_usage(message.get("usage"))}


class MessagesToChatStream:
    """Anthropic's named events in, ``chat.completion.chunk`` events out, ending with the usage
    chunk (``choices: []``) and ``data: [DONE]`` at ``message_stop``. A provider's ``error``
    event is raised as the gateway error it stands for."""

    def __init__(self, created: int | None = None) -> None:
        self.created = created if created is not None else int(time.time())
        self.id = ""
        self.model = ""
        self._usage: dict[str, Any] = {}
        self._tools: dict[int, int] = {}  # content block index -> tool call index

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return sse_event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                          "model": self.model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                            "finish_reason": finish_reason}]})

    def feed(self, event: bytes) -> list[bytes]:
        data = event_data(event)
        if data is None:
            return []
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamError("The model provider sent a stream event that is not JSON.") from None
        kind = payload.get("type") if isinstance(payload, dict) else None
        if kind == "error":
            raise error_from_event(payload)
        if kind == "message_start":
            message = payload.get("message") or {}
            self.id, self.model = str(message.get("id") or ""), str(message.get("model") or "")
            self._take_usage(message.get("usage"))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = payload.get("content_block") or {}
            if block.get("type") == "tool_use":
                number = self._tools[payload.get("index", -1)] = len(self._tools)
                return [self._chunk({"tool_calls": [{"index": number, "id": block.get("id"), "type": "function",
                                                     "function": {"name": block.get("name"), "arguments": ""}}]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = payload.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                return [self._chunk({"content": delta["text"]})]
            tool = self._tools.get(payload.get("index", -1))
            if delta.get("type") == "input_json_delta" and delta.get("partial_json") and tool is not None:
                return [self._chunk({"tool_calls": [{"index": tool,
                                                     "function": {"arguments": delta["partial_json"]}}]})]
            return []  # thinking, signatures, citations: not part of a chat reply
        if kind == "message_delta":
            self._take_usage(payload.get("usage"))
            return [self._chunk({}, _finish_reason((payload.get("delta") or {}).get("stop_reason")))]
        if kind == "message_stop":
            usage = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                     "choices": [], "usage": _chat_usage(self._usage)}
            return [sse_event(usage), DONE]
        return []  # ping, content_block_stop

    def _take_usage(self, usage: Any) -> None:
        if isinstance(usage, Mapping):
            self._usage.update({k: v for k, v in usage.items() if v is not None})


# --- Messages -> chat ------------------------------------------------------------------------------

def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(str(b.get("text") or "") for b in content or () if isinstance(b, dict) and b.get("type") == "text")


def _image_part(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
        return {"type": "image_url", "image_url": {"url": url}}
    if isinstance(source, dict) and source.get("type") == "url":
        return {"type": "image_url", "image_url": {"url": source.get("url")}}
    raise refuse(f"'{where}.source' must be a base64 or url image source.")


def _tool_message(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    content = block.get("content")
    if isinstance(content, list) and any(b.get("type") != "text" for b in content if isinstance(b, dict)):
        raise refuse(f"'{where}.content' holds non-text blocks; a chat tool message is text only.")
    text = _text(content)
    if block.get("is_error"):
        text = f"Error: {text}" if text else "Error"
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}


def _user_messages(content: Any, where: str) -> list[dict[str, Any]]:
    """A user turn: its tool results as tool messages first (chat wants them right after the
    assistant's tool calls), then whatever else it says as one user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools, parts = [], []
    for index, block in enumerate(content or ()):
        kind, at = block.get("type"), f"{where}[{index}]"
        if kind == "tool_result":
            tools.append(_tool_message(block, at))
        elif kind == "text":
            parts.append({"type": "text", "text": block.get("text")})
        elif kind == "image":
            parts.append(_image_part(block, at))
        else:
            raise refuse(f"'{at}' is a {kind!r} block, which chat completions do not take.")
    if len(parts) == 1 and parts[0]["type"] == "text":
        return [*tools, {"role": "user", "content": parts[0]["text"]}]
    return [*tools, {"role": "user", "content": parts}] if parts else tools


def _assistant_message(content: Any, where: str) -> dict[str, Any] | None:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts, calls = [], []
    for index, block in enumerate(content or ()):
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text") or ""))
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": _json_arguments(block.get("input"))}})
        elif kind not in ("thinking", "redacted_thinking"):  # the chat model cannot read Anthropic's thinking
            raise refuse(f"'{where}[{index}]' is a {kind!r} block, which chat completions do not take.")
    if not texts and not calls:
        return None
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _messages_tools(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    tools = []
    for index, tool in enumerate(body.get("tools") or ()):
        if tool.get("type") not in (None, "custom"):
            raise refuse(f"'tools[{index}]' is Anthropic's server tool {tool.get('type')!r}, which only "
                         "Anthropic runs.")
        function: dict[str, Any] = {"name": tool.get("name"), "parameters": tool.get("input_schema")}
        if tool.get("description"):
            function["description"] = tool["description"]
        tools.append({"type": "function", "function": function})
    return tools


def messages_request_to_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Messages request (or a count_tokens one, without ``max_tokens``) as a chat request."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": system if isinstance(system, str)
                         else "\n\n".join(str(b.get("text") or "") for b in system)})
    for index, message in enumerate(body.get("messages") or ()):
        where = f"messages[{index}].content"
        if message.get("role") == "user":
            messages.extend(_user_messages(message.get("content"), where))
        else:
            reply = _assistant_message(message.get("content"), where)
            if reply is not None:
                messages.append(reply)
    request: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if body.get("max_tokens") is not None:
        request["max_tokens"] = body["max_tokens"]
    if body.get("stop_sequences"):
        request["stop"] = list(body["stop_sequences"])
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            request[name] = body[name]
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and metadata.get("user_id"):
        request["user"] = str(metadata["user_id"])
    tools = _messages_tools(body)
    choice = body.get("tool_choice")
    if tools:
        request["tools"] = tools
        if isinstance(choice, dict):
            if choice.get("type") == "tool":
                request["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
            elif choice.get("type") in TOOL_CHOICE_TO_CHAT:
                request["tool_choice"] = TOOL_CHOICE_TO_CHAT[choice["type"]]
            if choice.get("disable_parallel_tool_use"):
                request["parallel_tool_calls"] = False
    if body.get("stream"):
        request["stream"] = True
        request["stream_options"] = {"include_usage": True}  # the call is charged by it
    return request


def _messages_usage(usage: Any) -> dict[str, int]:
    """Chat's usage as Anthropic's: cached prompt tokens are cache reads, the rest fresh input."""
    usage = usage if isinstance(usage, Mapping) else {}
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
    prompt = _int(usage.get("prompt_tokens"))
    return {"input_tokens": max(prompt - cached, 0), "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": min(cached, prompt), "output_tokens": _int(usage.get("completion_tokens"))}


def _tool_use_input(arguments: Any) -> dict[str, Any]:
    """A chat tool call's arguments as tool_use input; arguments that are not a JSON object (a
    model's slip) are kept whole under ``_arguments`` rather than lost."""
    try:
        value = orjson.loads(arguments or "{}")
    except (orjson.JSONDecodeError, TypeError):
        value = None
    return value if isinstance(value, dict) else {"_arguments": arguments}


def chat_completion_to_message(completion: Mapping[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` (its first choice: Messages has no ``n``) as a Message."""
    choices = completion.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = message.get("content") or message.get("refusal")
    if isinstance(text, list):
        text = _text(text)
    if text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                        "input": _tool_use_input(function.get("arguments"))})
    return {"id": completion.get("id"), "type": "message", "role": "assistant", "model": completion.get("model"),
            "content": content, "stop_reason": FINISH_TO_STOP.get(str(choice.get("finish_reason")), "end_turn"),
            "stop_sequence": None, "usage": _messages_usage(completion.get("usage"))}


class ChatToMessagesStream:
    """``chat.completion.chunk`` events in, Anthropic's named events out: ``message_start``,
    one content block per text run or tool call (``content_block_start`` / ``_delta`` /
    ``_stop``), then ``message_delta`` (stop reason, usage) and ``message_stop`` at ``[DONE]``.
    A stream cut off before ``[DONE]`` ends without ``message_stop``, so it reads as cut off."""

    def __init__(self, model: str) -> None:
        self.id = ""
        self.model = model
        self._started = False
        self._open: int | None = None  # the content block open now
        self._open_kind = ""
        self._blocks = 0
        self._tools: dict[int, int] = {}  # tool call index -> content block index
        self._stop_reason = "end_turn"
        self._usage: dict[str, int] = {"input_tokens": 0, "output_tokens": 0}

    def feed(self, event: bytes) -> list[bytes]:
        data = event_data(event)
        if data is None:
            return []
        if data == b"[DONE]":
            return [*self._start(), *self._close(), self._event("message_delta", {
                "delta": {"stop_reason": self._stop_reason, "stop_sequence": None}, "usage": self._usage}),
                self._event("message_stop", {})]
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamError("The model provider sent a stream event that is not JSON.") from None
        if not isinstance(chunk, dict):
            return []
        if isinstance(chunk.get("error"), dict):
            raise UpstreamError("The model provider broke off the stream with an error.")
        self.id = self.id or str(chunk.get("id") or "")
        self.model = str(chunk.get("model") or self.model)
        out = self._start()
        if isinstance(chunk.get("usage"), Mapping):
            self._usage = _messages_usage(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self._open_kind != "text":
                    out += [*self._close(), self._open_block("text", {"type": "text", "text": ""})]
                out.append(self._delta(self._blocks - 1, {"type": "text_delta", "text": delta["content"]}))
            for call in delta.get("tool_calls") or ():
                out += self._tool_call(call)
            if choice.get("finish_reason"):
                self._stop_reason = FINISH_TO_STOP.get(str(choice["finish_reason"]), "end_turn")
        return out

    def _tool_call(self, call: Mapping[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        number = call.get("index", 0)
        function = call.get("function") or {}
        if number not in self._tools:
            out += [*self._close(), self._open_block("tool_use", {"type": "tool_use", "id": call.get("id"),
                                                                  "name": function.get("name"), "input": {}})]
            self._tools[number] = self._blocks - 1
        if function.get("arguments"):
            out.append(self._delta(self._tools[number], {"type": "input_json_delta",
                                                         "partial_json": function["arguments"]}))
        return out

    def _event(self, name: str, payload: dict[str, Any]) -> bytes:
        return sse_event({"type": name, **payload}, name)

    def _start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        # Chat reports usage only at the end: message_delta carries it, input tokens included.
        return [self._event("message_start", {"message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}})]

    def _open_block(self, kind: str, block: dict[str, Any]) -> bytes:
        self._open, self._open_kind = self._blocks, kind
        self._blocks += 1
        return self._event("content_block_start", {"index": self._open, "content_block": block})

    def _delta(self, index: int, delta: dict[str, Any]) -> bytes:
        return self._event("content_block_delta", {"index": index, "delta": delta})

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        index, self._open, self._open_kind = self._open, None, ""
        return [self._event("content_block_stop", {"index": index})]


# --- a chat provider serving Messages ---------------------------------------------------------------

def _chat_call(call: UpstreamCall) -> UpstreamCall:
    return replace(call, endpoint="chat.completions", body=messages_request_to_chat(call.body))


async def complete_messages_over_chat(chat: Provider, call: UpstreamCall,
                                      count: Callable[[UpstreamCall], int] | None = None) -> UpstreamReply:
    """Answer a ``messages`` or ``messages.count_tokens`` call with a chat provider.

    No chat API counts tokens, so a count is ``count`` of the translated chat call when the
    provider can tell (the mock), and the gateway's own estimate otherwise.
    """
    if call.endpoint == "messages.count_tokens":
        tokens = count(_chat_call(call)) if count is not None else estimate_input_tokens(call.body)
        return UpstreamReply(status=200, body=orjson.dumps({"input_tokens": tokens}))
    reply = await chat.complete(_chat_call(call))
    try:
        completion = orjson.loads(reply.body)
        message = chat_completion_to_message(completion)
    except (orjson.JSONDecodeError, AttributeError, TypeError, IndexError):
        raise UpstreamError("The model provider sent a reply that is not chat-completion JSON.") from None
    return UpstreamReply(status=200, body=orjson.dumps(message))


async def stream_messages_over_chat(chat: Provider, call: UpstreamCall) -> AsyncGenerator[bytes, None]:
    """Stream a ``messages`` call from a chat provider, as Anthropic's named events."""
    translator = ChatToMessagesStream(call.deployment.upstream_model)
    events = chat.stream(_chat_call(call))
    try:
        async for event in events:
            for out in translator.feed(event):
                yield out
    finally:
        await events.aclose()  # type: ignore[attr-defined]
