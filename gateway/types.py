"""Plain data types and Protocols shared by the pipeline stages.

This module imports nothing from the project, so any module may import it without cycles.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: resolved from a virtual API key by the authenticate stage."""

    key_id: str
    user: str
    team: str
    org: str
    roles: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def as_policy_input(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "user": self.user,
            "team": self.team,
            "org": self.org,
            "roles": list(self.roles),
            "labels": dict(self.labels),
        }


@dataclass(frozen=True, slots=True)
class CatalogModel:
    """One model the gateway can route to, declared in configuration (never by a client)."""

    name: str
    provider: str
    upstream_model: str
    base_url: str = ""
    api_key_env: str = ""
    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0
    timeout_s: float | None = None

    def cost_micro_usd(self, input_tokens: int, output_tokens: int) -> int:
        """Cost in integer micro-dollars (prices are USD per million tokens)."""
        return round(input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok)


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What the describe stage learned about a request, before any decision."""

    endpoint: str
    model: str
    stream: bool
    max_tokens: int | None
    tools: tuple[str, ...]
    message_count: int
    metadata: Mapping[str, Any]
    input_tokens: int
    output_tokens_max: int


@dataclass(frozen=True, slots=True)
class Budget:
    """One budget the policy asks to charge: scope such as ``team:research``, window day|month|total."""

    scope: str
    window: str
    limit_micro_usd: int


@dataclass(frozen=True, slots=True)
class ApprovalRequirement:
    reason: str
    approvers: tuple[str, ...]
    timeout_s: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer for one call (see the contract in ARCHITECTURE.md)."""

    allow: bool
    reasons: tuple[str, ...]
    route_model: str | None = None
    fallbacks: tuple[str, ...] = ()
    approval: ApprovalRequirement | None = None
    budgets: tuple[Budget, ...] = ()
    max_tokens: int | None = None
    audit_labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(slots=True)
class Completion:
    """A non-streaming reply, already in OpenAI chat.completion wire format."""

    body: bytes
    usage: Usage
    response_model: str
    finish_reasons: tuple[str, ...]
    tool_calls: tuple[str, ...] = ()


@dataclass(slots=True)
class StreamSummary:
    """Filled in by a provider while it streams, read once the stream has ended."""

    usage: Usage = field(default_factory=Usage)
    response_model: str = ""
    finish_reasons: list[str] = field(default_factory=list)
    tool_calls: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """One request for a provider: the client's body with the model already rewritten."""

    model: CatalogModel
    body: Mapping[str, Any]
    api_key: str
    include_usage: bool = True


class Provider(Protocol):
    """A provider wire format (see ``adapters/``). Raises ``gateway.errors.UpstreamError`` subclasses."""

    name: str

    async def complete(self, call: UpstreamCall) -> Completion: ...

    def stream(self, call: UpstreamCall, summary: StreamSummary) -> AsyncIterator[bytes]:
        """Yield OpenAI-format SSE events (each ending in a blank line) and fill ``summary``."""
        ...


class PolicyEngine(Protocol):
    """Evaluates one Rego entrypoint for one input document."""

    def evaluate(self, entrypoint: str, policy_input: Mapping[str, Any]) -> Any: ...

    def defines(self, entrypoint: str) -> bool: ...

    @property
    def input_reads(self) -> tuple[tuple[str, ...], ...] | None:
        """The input paths the policy can read, or None if its answers must not be reused."""

    def close(self) -> None: ...
