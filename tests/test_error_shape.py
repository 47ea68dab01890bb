"""Every error path answers in OpenAI's one error shape, with the status its class declares."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.settings import load_settings
from tests.conftest import InProcessGateway, in_process, write_policy


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def app_client(tmp_path: Path) -> Iterator[tuple[InProcessGateway, dict[str, str]]]:
    policies = write_policy(tmp_path / "policies", {
        "aliases": {"ghost": "not-in-catalog"}, "fallbacks": {},
        "approval_tools": {"transfer_funds": {"approvers": ["finance"]}},
        "teams": {
            "research": {"models": ["mock-fast", "not-in-catalog", "down"], "monthly_budget_micro_usd": 100_000_000},
            "broke": {"models": ["mock-fast"], "monthly_budget_micro_usd": 0},
        },
    })
    models = [
        {"name": "mock-fast", "provider": "mock", "input_usd_per_mtok": 1, "output_usd_per_mtok": 1},
        {"name": "down", "provider": "openai", "base_url": f"http://127.0.0.1:{_closed_port()}/v1",
         "input_usd_per_mtok": 1, "output_usd_per_mtok": 1},
    ]
    settings = load_settings(environ={
        "LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db", "LOCKGATE_POLICY_DIR": str(policies),
        "LOCKGATE_MODELS": json.dumps(models), "LOCKGATE_UPSTREAM_RETRIES": "0", "LOCKGATE_MAX_REQUEST_BYTES": "2048",
        "LOCKGATE_APPROVAL_HOLD_S": "0",
    })
    with in_process(settings) as gateway:
        yield gateway, {team: gateway.create_key(team=team, user="u") for team in ("research", "broke")}


def chat(model: str = "mock-fast", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


CASES = [
    # name, method, path, team (None: no key), body (bytes or json), status, type, code
    ("missing key", "POST", "/v1/chat/completions", None, chat(), 401, "invalid_request_error", "invalid_api_key"),
    ("malformed json", "POST", "/v1/chat/completions", "research", b"{", 400, "invalid_request_error", None),
    ("missing model", "POST", "/v1/chat/completions", "research", {"messages": []}, 400, "invalid_request_error", None),
    ("bad max_tokens", "POST", "/v1/chat/completions", "research", chat(max_tokens=-1), 400,
     "invalid_request_error", None),
    ("too large", "POST", "/v1/chat/completions", "research", chat(pad="x" * 4096), 413,
     "invalid_request_error", "request_too_large"),
    ("model not in catalog", "POST", "/v1/chat/completions", "research", chat("ghost"), 404,
     "invalid_request_error", "model_not_found"),
    ("policy denies", "POST", "/v1/chat/completions", "research", chat("gpt-4o"), 403, "permission_error",
     "policy_denied"),
    ("needs approval, past the hold limit", "POST", "/v1/chat/completions", "research",
     chat(tools=[{"type": "function", "function": {"name": "transfer_funds", "parameters": {}}}]), 408,
     "permission_error", "approval_pending"),
    ("approvals without the role", "GET", "/admin/approvals", "research", None, 403, "permission_error",
     "approver_role_required"),
    ("approval of nobody", "GET", "/v1/approvals/apr_nobody", "research", None, 404, "invalid_request_error",
     "approval_not_found"),
    ("approval verdict unknown", "POST", "/admin/approvals/apr_nobody/maybe", "research", b"", 404,
     "invalid_request_error", "approval_not_found"),
    ("budget exhausted", "POST", "/v1/chat/completions", "broke", chat(), 429, "insufficient_quota",
     "budget_exceeded"),
    ("provider down", "POST", "/v1/chat/completions", "research", chat("down"), 502, "upstream_error",
     "upstream_unavailable"),
    ("unknown route", "GET", "/v1/nothing", "research", None, 404, "invalid_request_error", "not_found"),
    ("wrong method", "GET", "/v1/chat/completions", "research", None, 405, "invalid_request_error",
     "method_not_allowed"),
    ("models without key", "GET", "/v1/models", None, None, 401, "invalid_request_error", "invalid_api_key"),
    ("model not allowed", "GET", "/v1/models/gpt-4o", "research", None, 404, "invalid_request_error",
     "model_not_found"),
    ("response of nobody", "GET", "/v1/responses/resp_nobody", "research", None, 404, "invalid_request_error",
     "response_not_found"),
    ("response without key", "DELETE", "/v1/responses/resp_nobody", None, None, 401, "invalid_request_error",
     "invalid_api_key"),
]


@pytest.mark.parametrize(("name", "method", "path", "team", "body", "status", "type_", "code"), CASES,
                         ids=[c[0] for c in CASES])
def test_error_shape(app_client: tuple[InProcessGateway, dict[str, str]], name: str, method: str, path: str,
                     team: str | None, body: object, status: int, type_: str, code: str | None) -> None:
    gateway, keys = app_client
    client = gateway.client
    headers = {"Authorization": f"Bearer {keys[team]}"} if team else {}
    content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    response = client.request(method, path, content=content, headers={**headers, "content-type": "application/json"})

    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(response.json()) == {"error"}
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["code"]) == (type_, code)
    if team:
        assert keys[team] not in response.text


def test_refused_calls_leave_no_reservation(app_client: tuple[InProcessGateway, dict[str, str]]) -> None:
    gateway, keys = app_client
    response = gateway.client.post("/v1/chat/completions", json=chat("down"),
                                   headers={"Authorization": f"Bearer {keys['research']}"})
    assert response.status_code == 502
    runtime = gateway.runtime

    async def reserved() -> int:
        from sqlalchemy import text
        await runtime.audit.flush()  # the settlement is written with the call's record
        async with runtime.engine.connect() as connection:
            return int((await connection.execute(
                text("SELECT COALESCE(SUM(reserved_micro_usd), 0) FROM budget_ledger"))).scalar_one())

    assert gateway.call(reserved) == 0


def test_every_route_is_tested() -> None:
    """Meta-test: each path the app serves appears in at least one test module."""
    settings = load_settings(environ={})
    routes = {route.path for route in create_app(settings).routes}  # type: ignore[attr-defined]
    sources = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py") if p.name != Path(__file__).name)
    # A route counts as tested when a test names its path or calls it through the openai SDK.
    sdk_calls = {"/v1/chat/completions": "chat.completions.create", "/v1/models": "models.list()",
                 "/v1/models/{model_id:path}": "models.retrieve(", "/v1/responses/{response_id}": "responses.retrieve("}
    def named(path: str) -> bool:  # a string literal of the path, any value in place of each {parameter}
        pattern = '"' + "[^\"/]+".join(re.escape(part) for part in re.split(r"\{[^}]*\}", path)) + '"'
        return re.search(pattern, sources) is not None

    untested = sorted(path for path in routes
                      if not named(path) and (path not in sdk_calls or sdk_calls[path] not in sources))
    assert not untested, f"routes without a test: {untested}"
