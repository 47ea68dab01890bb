"""Stage 7 on streamed replies: from the first tool-call delta, events are held back until the
response policy has seen the finished tool calls; what it refuses never reaches the client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Gateway, start_gateway, stop_gateway, write_policy

REVIEW = """package lockgate

import rego.v1

response_decision := {"allow": false, "reasons": ["the model may not call delete_repo"]} if {
\t"delete_repo" in input.response.tool_calls
}

response_decision := {"allow": true} if { not "delete_repo" in input.response.tool_calls }
"""


def tool(name: str) -> dict[str, object]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture
def reviewing_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """The default policy plus a response_decision that refuses calls of delete_repo; SQLite."""
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
