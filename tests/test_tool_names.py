"""Every place a request can name a tool, in each API, reaches the policy as ``request.tools``
(docs/policies.md), read from the decision record of a call through the real pipeline; a tool
the gateway cannot read is a 400 in the endpoint's shape, never a 500 and never passed on unread."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.app import endpoint_specs
from gateway.settings import load_settings
from tests.conftest import in_process
from tests.endpoint_probe import EndpointProbe, error_of

SPECS = {spec.name: spec for spec in endpoint_specs(load_settings(environ={}))}
SAID = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {}}


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EndpointProbe]:
    path = tmp_path_factory.mktemp("tool-names")
    with in_process(load_settings(environ={"LOCKGATE_DATABASE_URL": f"sqlite:///{path}/lockgate.db"})) as gateway:
        yield EndpointProbe(gateway, gateway.create_key(team="research"))


def tools_seen(probe: EndpointProbe, endpoint: str, body: dict[str, Any]) -> list[str]:
    """What the policy saw as request.tools for one call (whatever the provider then made of it)."""
    response = probe.send(SPECS[endpoint], json.dumps({"model": "fast", **body}).encode())
    probe.flush()
    [record] = probe.records(response.headers["lockgate-decision-id"])
    return list(record["policy_input"]["request"]["tools"])


CASES = [
    ("chat.completions", {"messages": SAID, "web_search_options": {"search_context_size": "low"}}, ["web_search"]),
    ("chat.completions", {"messages": SAID, "tools": [{"type": "function", "function": {"name": "lookup"}}],
                          "web_search_options": {}}, ["lookup", "web_search"]),
    ("messages", {"max_tokens": 16, "messages": SAID,
                  "mcp_servers": [{"type": "url", "url": "https://mcp.example.com/sse", "name": "github"}]},
     ["mcp:github"]),
    ("messages", {"max_tokens": 16, "messages": SAID,
                  "mcp_servers": [{"type": "url", "url": "https://mcp.example.com/mcp", "name": "github"}],
                  "tools": [{"name": "lookup", "input_schema": SCHEMA},
                            {"type": "mcp_toolset", "mcp_server_name": "github"}]},
     ["mcp:github", "lookup"]),
    ("messages.count_tokens", {"messages": SAID, "mcp_servers": [
        {"type": "url", "url": "https://mcp.example.com/mcp", "name": "jira"}]}, ["mcp:jira"]),
]


@pytest.mark.parametrize(("endpoint", "body", "tools"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_the_policy_sees_every_tool_a_request_names(
        probe: EndpointProbe, endpoint: str, body: dict[str, Any], tools: list[str]) -> None:
    assert tools_seen(probe, endpoint, body) == tools


UNREADABLE = [
    ("responses", {"input": "hi", "tool_choice": {"type": []}}, "tool_choice.type"),
    ("responses", {"input": "hi", "tool_choice": {"type": {"name": "lookup"}}}, "tool_choice.type"),
    ("responses", {"input": "hi", "tools": [{"type": "namespace", "name": "crm", "tools": [{"type": ["function"]}]}]},
     "tools[0].tools[0]"),
    ("messages", {"max_tokens": 16, "messages": SAID, "mcp_servers": [{"type": "url", "url": "https://x"}]},
     "mcp_servers[0].name"),
    ("messages", {"max_tokens": 16, "messages": SAID, "mcp_servers": {"github": {}}}, "mcp_servers"),
    ("messages", {"max_tokens": 16, "messages": SAID, "tools": [{"type": "mcp_toolset"}]},
     "tools[0].mcp_server_name"),
]


@pytest.mark.parametrize(("endpoint", "body", "param"), UNREADABLE, ids=[u[2] for u in UNREADABLE])
def test_a_tool_the_gateway_cannot_read_is_a_400_naming_it(
        probe: EndpointProbe, endpoint: str, body: dict[str, Any], param: str) -> None:
    spec = SPECS[endpoint]
    response = probe.send(spec, json.dumps({"model": "fast", **body}).encode())
    assert response.status_code == 400, response.text
    error = error_of(spec, response)
    assert error.get("param", param) == param and param in error["message"]
