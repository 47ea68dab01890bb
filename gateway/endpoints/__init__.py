"""Stage 2, describe, and everything else that differs per API: one endpoint spec per endpoint.

The pipeline (``gateway/pipeline.py``) does not know which API a call came in on. An
``EndpointSpec`` tells it, for one endpoint:

- how a body becomes ``CallFacts`` (model, stream, tools, token estimate), or a clear 400;
- how the body is limited before it goes upstream (the policy's ``max_tokens``);
- how usage, tool calls and the finish are read from a whole reply and from each stream event
  (a ``StreamReader``), including whether the stream reached its proper end;
- how an error is written in that API's own shape, as a body and as a stream event.

Adapters (``adapters/``) answer in the wire format of the endpoint the client called, so a
spec reads every provider's replies the same way. See docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from starlette.responses import Response

from gateway.endpoints.checks import RequestLimits
from gateway.errors import GatewayError, error_body, error_response, sse_error_event
from gateway.types import CallFacts, ReplyFacts


class StreamReader:
    """Reads one stream's events as they pass: usage, tool calls, finish, and its proper end.

    ``observe`` returns the event to relay (possibly rewritten) or None to drop it.
    ``terminated`` turns true at the wire format's terminating event (``[DONE]``,
    ``response.completed``, ``message_stop``); a stream that closes before it was cut off. A tool
    call counts in ``facts.tool_calls`` from its first event on, named or not (``""``): the
    pipeline holds the stream back from there while the policy reviews replies.
    """

    def __init__(self) -> None:
        self.facts = ReplyFacts()
        self.terminated = False
        self.events = 0  # content events relayed: what a stream cut off early is charged for

    def observe(self, event: bytes) -> bytes | None:
        raise NotImplementedError


class EndpointSpec:
    """What one endpoint needs of the pipeline; subclasses fill in each part for their API."""

    name: ClassVar[str]  # "chat.completions": the decision record's and the policy input's endpoint
    operation: ClassVar[str]  # gen_ai.operation.name of its spans
    path: ClassVar[str]
    output_param: ClassVar[str] = "max_tokens"  # the field that caps output, named in errors about it
    # Client headers passed on to a provider that speaks this endpoint's API natively (lower case).
    forwarded_headers: ClassVar[tuple[str, ...]] = ()
    billable: ClassVar[bool] = True  # False for calls no provider charges (counting tokens)
    keeps_responses: ClassVar[bool] = False  # the provider stores replies under an id (gateway/stored_responses.py)

    def __init__(self, limits: RequestLimits | None = None) -> None:
        # The settings' request ceilings; a spec that reads no body (gateway/stored_responses.py) needs none.
        self.limits = limits if limits is not None else RequestLimits()

    def describe(self, body: Mapping[str, Any]) -> CallFacts:
        raise NotImplementedError

    def limit(self, body: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
        """The body to send upstream, with the policy's output-token cap applied."""
        return body

    def read_reply(self, content: bytes) -> ReplyFacts:
        """Usage, tool calls and finish of a whole reply; raises UpstreamError if it is not one."""
        raise NotImplementedError

    def stream_reader(self, facts: CallFacts) -> StreamReader:
        raise NotImplementedError

    # -- errors, in this API's own shape
    def error_body(self, exc: GatewayError) -> bytes:
        return error_body(exc)

    def error_event(self, exc: GatewayError) -> bytes:
        return sse_error_event(exc)

    def error_response(self, exc: GatewayError) -> Response:
        return error_response(exc, self.error_body(exc))

    def keepalive_event(self) -> bytes:
        """An SSE comment: keeps proxies from closing a stream that waits (approvals, slow providers)."""
        return b": lockgate keep-alive\n\n"
