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
class Deployment:
    """One place a catalog model is served: a provider wire format at a URL, with its key."""

    provider: str
    upstream_model: str
    base_url: str = ""
    api_key_env: str = ""
    api_version: str = ""  # azure_openai only
    weight: float = 1.0
    timeout_s: float | None = None

    @property
    def label(self) -> str:
        """How spans, logs and the cool-down name this deployment (never its key)."""
        return f"{self.provider}:{self.base_url or '-'}:{self.upstream_model}"


@dataclass(frozen=True, slots=True)
class CatalogModel:
    """One model the gateway can route to, declared in configuration (never by a client).

    The top-level ``provider``/``upstream_model``/``base_url``/``api_key_env`` describe its first
    deployment; ``deployments`` lists every one (settings always fill it, with at least one).
    """

    name: str
    provider: str
    upstream_model: str
    base_url: str = ""
    api_key_env: str = ""
    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0
    cached_input_usd_per_mtok: float | None = None  # input read from the provider's cache; None: the input price
    free: bool = False  # a model without prices is refused unless the catalog says it is free
    # What this route serves through rather than refuse: "audit" (the audit store cannot be
    # written), "policy" (the policy cannot be evaluated). Off unless configured; every call let
    # through is marked (docs/audit.md).
    fail_open: tuple[str, ...] = ()
    timeout_s: float | None = None
    api_version: str = ""
    deployments: tuple[Deployment, ...] = ()

    @property
    def priced(self) -> bool:
        """Its calls can be charged: it has a price, or the catalog marks it free."""
        return self.free or self.input_usd_per_mtok > 0 or self.output_usd_per_mtok > 0

    def cost_micro_usd(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> int:
        """Cost in integer micro-dollars (prices are USD per million tokens). ``cached_input_tokens``
        are part of ``input_tokens``, priced at the cached-input price."""
        cached = min(cached_input_tokens, input_tokens)
        cached_price = self.input_usd_per_mtok if self.cached_input_usd_per_mtok is None \
            else self.cached_input_usd_per_mtok
        return round((input_tokens - cached) * self.input_usd_per_mtok + cached * cached_price
                     + output_tokens * self.output_usd_per_mtok)


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
    output_tokens_max: int  # over every choice: ``choices`` times the most one choice may produce
    choices: int = 1  # chat's ``n``: a policy's max_tokens caps each choice
    include_usage: bool = False  # the client asked for the usage chunk of a chat stream
    previous_response_id: str | None = None  # a stored response the call continues: must be the caller's


@dataclass(frozen=True, slots=True)
class Budget:
    """One budget a call is charged against: scope such as ``team:research``, window
    minute|day|month|total, and a limit in its unit: usd (micro-dollars), tokens, calls, or
    concurrent (calls running at once)."""

    scope: str
    window: str
    limit: int
    unit: str = "usd"


@dataclass(frozen=True, slots=True)
class ApprovalRequirement:
    reason: str
    approvers: tuple[str, ...]
    timeout_s: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer for one call (see the contract in docs/architecture.md and docs/policies.md)."""

    allow: bool
    reasons: tuple[str, ...]
    route_model: str | None = None
    fallbacks: tuple[str, ...] = ()
    approval: ApprovalRequirement | None = None
    budgets: tuple[Budget, ...] = ()
    max_tokens: int | None = None
    max_steps_per_run: int | None = None  # limits.max_steps_per_run: calls one run may make
    max_run_micro_usd: int | None = None  # limits.max_cost_usd_per_run
    # limits.requests_per_minute / tokens_per_minute / concurrent: {"key"|"user"|"team": limit};
    # made budgets per call (gateway/policy, rate_budgets), since a decision is shared by callers.
    rate_limits: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    audit_labels: Mapping[str, str] = field(default_factory=dict)
    audit_content: str = "off"  # audit.content: off | hash | redacted | full (gateway/audit/content.py)


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0  # every input token, cached ones included
    output_tokens: int = 0
    cached_input_tokens: int = 0  # of input_tokens, those read from the provider's prompt cache
    provider_cost_micro_usd: int | None = None  # a cost the provider reported (usage.cost): recorded, never charged


@dataclass(slots=True)
class ReplyFacts:
    """What an endpoint spec read from a reply, or from a stream so far."""

    usage: Usage = field(default_factory=Usage)
    usage_reported: bool = False  # the provider's reply carried a usage block
    response_model: str = ""
    response_id: str = ""
    finish_reasons: list[str] = field(default_factory=list)
    tool_calls: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """One request for a provider, in the wire format of the endpoint the client called.

    The adapter rewrites ``model`` to the deployment's upstream model and translates the body
    when the deployment speaks another wire format; what it returns is again in ``endpoint``'s
    wire format, so the endpoint spec can read usage and tool calls from it.
    """

    endpoint: str  # "chat.completions" | "responses" | "embeddings" | "messages" | "messages.count_tokens"
    model: CatalogModel
    deployment: Deployment
    body: Mapping[str, Any]
    api_key: str
    stream: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)  # client headers the endpoint passes on
    traceparent: str = ""  # W3C trace context of this attempt's span: the provider's request carries it


@dataclass(slots=True)
class UpstreamReply:
    """A provider's whole (non-streamed) answer, already in the client's wire format."""

    status: int
    body: bytes
    content_type: str = "application/json"


class Provider(Protocol):
    """A provider wire format (see ``adapters/``). Raises ``gateway.errors.UpstreamError`` subclasses.

    ``endpoints`` lists the client endpoints it can serve, natively or by translation.
    """

    name: str
    endpoints: frozenset[str]

    async def complete(self, call: UpstreamCall) -> UpstreamReply: ...

    def stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        """Yield SSE events of ``call.endpoint``'s wire format, each ending in a blank line."""
        ...


class PolicyEngine(Protocol):
    """Evaluates one Rego entrypoint for one input document. An engine with ``remote`` set answers
    only through ``RemotePolicyEngine.evaluate_async`` (gateway/policy/opa.py)."""

    remote: bool

    def evaluate(self, entrypoint: str, policy_input: Mapping[str, Any]) -> Any: ...

    def defines(self, entrypoint: str) -> bool: ...

    @property
    def input_reads(self) -> tuple[tuple[str, ...], ...] | None:
        """The input paths the policy can read, or None if its answers must not be reused."""

    def close(self) -> None: ...


class RemotePolicyEngine(PolicyEngine, Protocol):
    """A policy engine reached over the network: every evaluation is awaited."""

    async def evaluate_async(self, entrypoint: str, policy_input: Mapping[str, Any]) -> Any: ...

    async def start(self) -> None: ...

    async def ready(self) -> bool: ...

    async def lost_push(self) -> bool:
        """Push mode: OPA no longer holds every module pushed (it restarted); False when it does,
        or cannot be asked."""
        ...

    async def aclose(self) -> None: ...

    async def retire(self) -> None:
        """Close once the queries in flight can have ended (after a swap)."""
