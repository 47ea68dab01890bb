"""Calling a governed endpoint in process and reading back what the call left behind: the error
shape of its answer, its decision record, and the budget ledger.

Shared by tests/test_bad_input.py and tests/test_request_properties.py. Which error shape an
endpoint answers in follows from its path: Anthropic's under /v1/messages, OpenAI's elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import func, select, text

from gateway.endpoints import EndpointSpec
from gateway.store import DecisionRecord
from tests.conftest import InProcessGateway

_decisions = DecisionRecord.__table__  # type: ignore[attr-defined]


def speaks_anthropic(spec: EndpointSpec) -> bool:
    return spec.path.startswith("/v1/messages")


def error_of(spec: EndpointSpec, response: httpx.Response) -> dict[str, Any]:
    """The error object of a refused call, after checking it is exactly the endpoint's error shape:
    OpenAI's ``{"error": {message, type, param, code}}`` or Anthropic's ``{"type": "error",
    "error": {type, message}}``."""
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    if speaks_anthropic(spec):
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        error = body["error"]
        assert set(error) == {"type", "message"}, error
    else:
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["param"] is None or isinstance(error["param"], str), error
        assert error["code"] is None or isinstance(error["code"], str), error
    assert isinstance(error["type"], str) and error["type"], error
    assert isinstance(error["message"], str) and error["message"], error
    return dict(error)


@dataclass
class EndpointProbe:
    """A gateway in process and a key of team "research" (default policy, mock provider)."""

    gateway: InProcessGateway
    key: str

    def send(self, spec: EndpointSpec, content: bytes | None, method: str = "POST") -> httpx.Response:
        headers = {"content-type": "application/json"}
        if speaks_anthropic(spec):
            headers.update({"x-api-key": self.key, "anthropic-version": "2023-06-01"})
        else:
            headers["authorization"] = f"Bearer {self.key}"
        return self.gateway.client.request(method, spec.path, content=content, headers=headers)

    def flush(self) -> None:
        """Write every buffered record and settlement, as the audit writer would on its next tick."""
        self.gateway.call(self.gateway.runtime.audit.flush)

    def records(self, decision_id: str) -> list[dict[str, Any]]:
        """The decision records of one call (after a flush): its ``lockgate-decision-id`` header's."""
        async def read() -> list[dict[str, Any]]:
            async with self.gateway.runtime.engine.connect() as connection:
                rows = await connection.execute(select(_decisions).where(_decisions.c.id == decision_id))
                return [dict(row._mapping) for row in rows]

        return list(self.gateway.call(read))

    def record_count(self) -> int:
        async def count() -> int:
            async with self.gateway.runtime.engine.connect() as connection:
                return int((await connection.execute(select(func.count()).select_from(_decisions))).scalar_one())

        return int(self.gateway.call(count))

    def ledger(self) -> tuple[int, int]:
        """(reserved, spent) over every budget: what the calls so far hold and have been charged."""
        async def totals() -> tuple[int, int]:
            async with self.gateway.runtime.engine.connect() as connection:
                row = (await connection.execute(text(
                    "SELECT COALESCE(SUM(reserved_micro_usd), 0), COALESCE(SUM(spent_micro_usd), 0) "
                    "FROM budget_ledger"))).one()
                return int(row[0]), int(row[1])

        reserved, spent = self.gateway.call(totals)
        return int(reserved), int(spent)
