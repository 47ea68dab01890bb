"""Stage 7 on streamed replies: from the first tool-call event, events are held back until the
stream's last event, when the response policy has seen every tool call; what it refuses never
reaches the client. The first tests run a real gateway on the mock; the later ones run it in
process against the fake OpenAI, scripted with streams a provider may send (several choices, a
tool call named late, a Responses item that runs a client's shell)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.settings import load_settings
from tests.conftest import Gateway, InProcessGateway, in_process, start_gateway, stop_gateway, write_policy
from tests.fakes.openai_responses import named_sse
from tests.fakes.openai_upstream import DONE, FakeOpenAI, raw, sse

REVIEW = """package lockgate

import rego.v1

forbidden_calls := [sprintf("the model may not call %s", [name]) |
\tsome name in input.response.tool_calls
\tname in {"delete_repo", "local_shell"}
]

response_decision := {"allow": false, "reasons": forbidden_calls} if count(forbidden_calls) > 0

response_decision := {"allow": true} if count(forbidden_calls) == 0
"""


def tool(name: str) -> dict[str, object]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture
def reviewing_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """The default policy plus a response_decision that refuses calls of delete_repo (and of a
    Responses client's local_shell); SQLite."""
    policy = write_policy(tmp_path / "policy", review=REVIEW)
    server = start_gateway(f"sqlite:///{tmp_path}/lockgate.db", tmp_path, policy_dir=str(policy))
    yield server
    stop_gateway(server)


def stream_raw(gateway: Gateway, key: str, tool_name: str) -> tuple[httpx.Headers, list[bytes]]:
    body = {"model": "fast", "stream": True, "tools": [tool(tool_name)],
            "messages": [{"role": "user", "content": "please do it"}]}
    with httpx.stream("POST", gateway.v1 + "/chat/completions", json=body, timeout=30,
                      headers={"authorization": f"Bearer {key}"}) as response:
        assert response.status_code == 200
        events = [e for e in response.read().split(b"\n\n") if e]
        return response.headers, events


def test_a_refused_streamed_tool_call_never_reaches_the_client(reviewing_gateway: Gateway) -> None:
    key = reviewing_gateway.create_key()

    headers, events = stream_raw(reviewing_gateway, key, "delete_repo")

    assert not any(b"delete_repo" in e for e in events[:-1]), "the refused tool call was relayed"
    assert events[0].startswith(b'data: {"id"')  # the role chunk, sent before any tool call
    assert b'"code":"policy_denied"' in events[-1] and b"may not call delete_repo" in events[-1]
    [record], _ = reviewing_gateway.trace(headers["lockgate-trace-id"])
    assert (record["outcome"], record["status_code"], record["error_type"]) == ("denied", 403, "policy_denied")
    assert record["reasons"] == ["the model may not call delete_repo"]
    assert record["output_tokens"] > 0  # the provider did the work: the call is charged for it


def test_the_sdk_raises_when_the_policy_refuses_a_streamed_tool_call(reviewing_gateway: Gateway) -> None:
    sdk = openai.OpenAI(base_url=reviewing_gateway.v1, api_key=reviewing_gateway.create_key(), max_retries=0)
    stream = sdk.chat.completions.create(model="fast", stream=True, tools=[tool("delete_repo")],  # type: ignore[list-item]
                                         messages=[{"role": "user", "content": "please"}])
    seen: list[str] = []
    with pytest.raises(openai.APIError, match="may not call delete_repo"):
        for chunk in stream:
            for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                seen.append(call.function.name if call.function else "")
    assert seen == []


def test_an_allowed_streamed_tool_call_is_released_whole(reviewing_gateway: Gateway) -> None:
    key = reviewing_gateway.create_key()

    headers, events = stream_raw(reviewing_gateway, key, "search_web")

    assert any(b'"name":"search_web"' in e for e in events)
    assert events[-1] == b"data: [DONE]"
    [record], _ = reviewing_gateway.trace(headers["lockgate-trace-id"])
    assert (record["outcome"], record["status_code"]) == ("allowed", 200)


def test_a_refused_tool_call_in_a_whole_reply_is_withheld(reviewing_gateway: Gateway) -> None:
    sdk = openai.OpenAI(base_url=reviewing_gateway.v1, api_key=reviewing_gateway.create_key(), max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="may not call delete_repo") as refused:
        sdk.chat.completions.create(model="fast", tools=[tool("delete_repo")],  # type: ignore[list-item]
                                    messages=[{"role": "user", "content": "please"}])
    assert b"delete_repo" not in refused.value.response.content.replace(b"may not call delete_repo", b"")


# --- streams a provider may send, in process against the fake OpenAI ------------------------------------------


@dataclass
class Scripted:
    gateway: InProcessGateway
    upstream: FakeOpenAI
    key: str

    def stream(self, path: str, events: list[bytes], **body: Any) -> tuple[str, dict[str, Any]]:
        """Answer the next call with ``events``; the client's whole stream and the call's record."""
        self.upstream.script(raw(200, b"".join(events), "text/event-stream"))
        response = self.gateway.client.post(path, json={"model": "mock-fast", "stream": True, **body},
                                            headers={"authorization": f"Bearer {self.key}"})
        assert response.status_code == 200, response.text
        [record] = [r for r in self.gateway.decisions() if r["id"] == response.headers["lockgate-decision-id"]]
        return response.text, record


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[Scripted]:
    """The reviewing policy in process, its model mock-fast served by the fake OpenAI."""
    with FakeOpenAI.running() as upstream:
        models = [{"name": "mock-fast", "provider": "openai", "base_url": upstream.url, "upstream_model": "gpt-up",
                   "api_key_env": "FAKE_OPENAI_KEY", "input_usd_per_mtok": 1, "output_usd_per_mtok": 2}]
        settings = load_settings(environ={
            "LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db", "FAKE_OPENAI_KEY": "sk-fake",
            "LOCKGATE_POLICY_DIR": str(write_policy(tmp_path / "policy", review=REVIEW)),
            "LOCKGATE_MODELS": json.dumps(models)})
        with in_process(settings) as gateway:
            yield Scripted(gateway, upstream, gateway.create_key())


def chunk(*choices: dict[str, Any], usage: dict[str, int] | None = None) -> bytes:
    return sse({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "gpt-up",
                "choices": list(choices), **({"usage": usage} if usage else {})})


def choice(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish_reason}


def call_delta(name: str | None, arguments: str) -> dict[str, Any]:
    function = {"arguments": arguments} if name is None else {"name": name, "arguments": arguments}
    return {"tool_calls": [{"index": 0, "id": f"call_{name}", "type": "function", "function": function}]}


USAGE = {"prompt_tokens": 9, "completion_tokens": 14, "total_tokens": 23}
CHAT = {"messages": [{"role": "user", "content": "tidy up"}], "tools": [tool("search_web"), tool("delete_repo")]}


def test_a_refused_tool_call_in_a_later_choice_never_reaches_the_client(scripted: Scripted) -> None:
    # The first choice's allowed call finishes first; the second choice's call comes after it.
    events = [chunk(choice(0, {"role": "assistant", **call_delta("search_web", '{"q": "x"}')})),
              chunk(choice(0, {}, "tool_calls")),
              chunk(choice(1, {"role": "assistant", **call_delta("delete_repo", '{"repo": "prod"}')})),
              chunk(choice(1, {}, "tool_calls")),
              chunk(usage=USAGE), DONE]

    text, record = scripted.stream("/v1/chat/completions", events, n=2, **CHAT)

    assert "delete_repo" not in text.replace("may not call delete_repo", "")
    assert "search_web" not in text  # held with the rest of the reply, which the policy refused
    assert '"code":"policy_denied"' in text
    assert (record["outcome"], record["status_code"], record["reasons"]) == (
        "denied", 403, ["the model may not call delete_repo"])
    assert (record["input_tokens"], record["output_tokens"]) == (9, 14)  # charged what the provider billed


def test_a_tool_call_is_held_from_its_first_delta_even_when_its_name_comes_later(scripted: Scripted) -> None:
    events = [chunk(choice(0, {"role": "assistant", **call_delta(None, '{"repo": "prod"}')})),
              chunk(choice(0, {"tool_calls": [{"index": 0, "function": {"name": "delete_repo"}}]})),
              chunk(choice(0, {}, "tool_calls")), chunk(usage=USAGE), DONE]

    text, record = scripted.stream("/v1/chat/completions", events, **CHAT)

    assert "prod" not in text and "call_None" not in text  # not even the arguments of the unnamed call
    assert record["reasons"] == ["the model may not call delete_repo"]


def test_a_responses_shell_call_is_reviewed_by_its_tools_type(scripted: Scripted) -> None:
    shell = {"id": "lsh_1", "type": "local_shell_call", "call_id": "call_1", "status": "completed",
             "action": {"type": "exec", "command": ["rm", "-rf", "/srv"], "env": {}}}
    response = {"id": "resp_s", "object": "response", "model": "gpt-up", "status": "in_progress", "output": []}
    done = {**response, "status": "completed", "output": [shell],
            "usage": {"input_tokens": 9, "output_tokens": 14, "total_tokens": 23}}
    events = [named_sse({"type": "response.created", "response": response}),
              named_sse({"type": "response.output_item.added", "output_index": 0,
                         "item": {**shell, "status": "in_progress"}}),
              named_sse({"type": "response.output_item.done", "output_index": 0, "item": shell}),
              named_sse({"type": "response.completed", "response": done})]

    text, record = scripted.stream("/v1/responses", events, input="tidy up", tools=[{"type": "local_shell"}])

    assert "/srv" not in text and "lsh_1" not in text
    assert "event: error" in text and "may not call local_shell" in text
    assert (record["outcome"], record["reasons"]) == ("denied", ["the model may not call local_shell"])
    assert record["output_tokens"] == 14
