"""Every error the gateway returns, in one hierarchy, rendered by one function.

    GatewayError                      500 server_error
    ├── InvalidRequest                400 invalid_request_error
    │   ├── ModelNotFound             404 invalid_request_error / model_not_found
    │   ├── RouteNotFound             404 invalid_request_error / not_found
    │   ├── ResponseNotFound          404 invalid_request_error / response_not_found (not this key's)
    │   ├── MethodNotAllowed          405 invalid_request_error / method_not_allowed
    │   └── RequestTooLarge           413 invalid_request_error / request_too_large
    ├── AuthenticationFailed          401 invalid_request_error / invalid_api_key
    ├── PermissionDenied              403 permission_error
    │   ├── PolicyDenied                  / policy_denied
    │   ├── ModelUnpriced                 / model_unpriced    (no price in the catalog, not marked free)
    │   ├── ApprovalRejected              / approval_denied, approval_expired, approval_mismatch
    │   └── DecisionRefused               / approval_forbidden, self_approval (a decider may not decide)
    ├── ApprovalNotFound              404 invalid_request_error / approval_not_found
    ├── TraceNotFound                 404 invalid_request_error / trace_not_found (or another org's)
    ├── ApprovalPending               408 permission_error / approval_pending (retry: attaches to the approval)
    ├── ApprovalConflict              409 invalid_request_error / approval_conflict (decided, running or used)
    ├── TooManyApprovals              429 rate_limit_exceeded / too_many_pending_approvals
    ├── BudgetExceeded                429 insufficient_quota / budget_exceeded
    ├── RateLimited                   429 requests|tokens / rate_limit_exceeded (the policy's per-minute limits)
    ├── PolicyFailed                  503 server_error / policy_error (the engine failed or answered
    │                                     no valid decision: denied, fail closed)
    ├── StoreUnavailable              503 server_error / store_unavailable
    │   └── AuditUnavailable              / audit_unavailable (the audit cannot be written: fail closed)
    ├── ClientClosed                  499 (never sent: the client left mid-stream; audit only)
    └── UpstreamError                 502 upstream_error      (the provider failed)
        ├── UpstreamAuthFailed        502 upstream_error / upstream_auth_failed (our key: another key is tried)
        ├── UpstreamRejected          400 invalid_request_error (the provider refused the request)
        │   └── UpstreamNotFound      404 invalid_request_error / not_found (a stored response is gone)
        ├── UpstreamRateLimited       429 rate_limit_exceeded
        │   └── UpstreamQuotaExceeded 429 insufficient_quota / upstream_quota_exceeded (our account: likewise)
        ├── UpstreamTimeout           504 upstream_error / upstream_timeout
        └── UpstreamUnavailable       502 upstream_error / upstream_unavailable

Status codes come only from these class attributes, never from message text. Messages are
written for the caller and must never contain secrets; details for operators go to the log.
"""

from __future__ import annotations

import math
from typing import ClassVar

import orjson
from starlette.responses import Response


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None
    retryable: ClassVar[bool] = True
    tell_retry: ClassVar[bool] = False  # say ``x-should-retry: true``: the SDK retries whatever the status
    default_message: ClassVar[str] = "The gateway failed to handle this request."

    def __init__(self, message: str | None = None, *, param: str | None = None,
                 retry_after_s: float | None = None) -> None:
        self.message = message or self.default_message
        self.param = param
        self.retry_after_s = retry_after_s  # passed on as Retry-After (a provider's, or ours)
        self.gateway_retried = False  # the gateway already retried it: the SDK must not multiply that
        super().__init__(self.message)

    @property
    def should_retry(self) -> bool:
        return self.retryable and not self.gateway_retried


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    retryable = False
    default_message = "The request is not valid."


class ModelNotFound(InvalidRequest):
    status = 404
    code = "model_not_found"


class RouteNotFound(InvalidRequest):
    status = 404
    code = "not_found"
    default_message = "No such endpoint."


class ResponseNotFound(InvalidRequest):
    """A stored response (Responses API) that does not exist, or that another key made."""

    status = 404
    code = "response_not_found"
    default_message = "No response with this id was found."


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"
    default_message = "This method is not allowed on this endpoint."


class RequestTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"
    default_message = "The request body is too large."


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    retryable = False
    default_message = "Missing, unknown or revoked API key."


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    retryable = False


class PolicyDenied(PermissionDenied):
    code = "policy_denied"
    default_message = "The policy denied this call."


class ModelUnpriced(PermissionDenied):
    """The catalog gives the model no price: its cost could not be controlled, so it is not served."""

    code = "model_unpriced"
    default_message = "This model has no price in the gateway's catalog."


class PolicyFailed(GatewayError):
    """The policy engine failed, timed out, or gave no decision of the contract's shape: the call is
    denied (fail closed) unless its route fails open for the policy."""

    status = 503
    code = "policy_error"
    retryable = False  # the same call meets the same policy
    default_message = "The policy could not be evaluated, so the call was denied."


class ApprovalRejected(PermissionDenied):
    """The call's approval was denied or expired, or it was given for another request."""

    code = "approval_denied"
    default_message = "The approval for this call was denied."

    def __init__(self, message: str | None = None, *, code: str = "approval_denied") -> None:
        super().__init__(message)
        self.code = code  # type: ignore[misc]


class DecisionRefused(PermissionDenied):
    """A decider who may not decide this approval (the policy's may_approve, or her own call)."""

    code = "approval_forbidden"
    default_message = "You may not decide this approval."

    def __init__(self, message: str | None = None, *, code: str = "approval_forbidden") -> None:
        super().__init__(message)
        self.code = code  # type: ignore[misc]


class TraceNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "trace_not_found"
    retryable = False
    default_message = "No trace with this id was found."


class ApprovalNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "approval_not_found"
    retryable = False
    default_message = "No approval with this id was found."


class ApprovalPending(GatewayError):
    """The hold limit passed before anyone decided: the client is told to retry (``x-should-retry:
    true``), and the identical request attaches to the same pending approval."""

    status = 408
    type = "permission_error"
    code = "approval_pending"
    tell_retry = True
    default_message = "This call is still waiting for approval."


class ApprovalConflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "approval_conflict"
    retryable = False
    default_message = "This approval is no longer in a state that allows this."


class TooManyApprovals(GatewayError):
    status = 429
    type = "rate_limit_exceeded"
    code = "too_many_pending_approvals"
    retryable = False
    default_message = "Too many of your calls are waiting for approval."


class RateLimited(GatewayError):
    """A per-minute or concurrency limit of the policy: the SDK retries after Retry-After."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"
    default_message = "Rate limit reached."

    def __init__(self, message: str | None = None, *, retry_after_s: float | None = None,
                 tokens: bool = False) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        if tokens:
            self.type = "tokens"  # type: ignore[misc]  # as OpenAI names a tokens-per-minute limit


class BudgetExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"
    retryable = False
    default_message = "A budget for this call is exhausted."


class StoreUnavailable(GatewayError):
    status = 503
    code = "store_unavailable"
    default_message = "The gateway's store is unavailable, so the call was refused."


class AuditUnavailable(StoreUnavailable):
    code = "audit_unavailable"
    default_message = ("The audit store cannot be written, so the call was refused (this route does not fail "
                       "open). Try again shortly.")


class ClientClosed(GatewayError):
    status = 499
    code = "client_closed"
    default_message = "The client closed the connection before the reply ended."


class UpstreamError(GatewayError):
    """A provider failed. ``billable_risk``: the request may have reached the provider, which may
    have done (and billed) the work: such a failure is never retried, by the gateway or (told by
    ``x-should-retry``) the SDK, and spend control charges it. Unless told, a subclass assumes
    ``may_bill``."""

    status = 502
    type = "upstream_error"
    may_bill: ClassVar[bool] = True
    default_message = "The model provider failed to answer."

    def __init__(self, message: str | None = None, *, param: str | None = None,
                 retry_after_s: float | None = None, billable_risk: bool | None = None) -> None:
        super().__init__(message, param=param, retry_after_s=retry_after_s)
        self.billable_risk = self.may_bill if billable_risk is None else billable_risk
        self.provider_status: int | None = None  # the provider's HTTP status, when it answered with one

    @property
    def should_retry(self) -> bool:
        return super().should_retry and not self.billable_risk


class UpstreamAuthFailed(UpstreamError):
    code = "upstream_auth_failed"
    retryable = False
    may_bill = False
    default_message = "The model provider refused the gateway's credentials."


class UpstreamRejected(UpstreamError):
    status = 400
    type = "invalid_request_error"
    retryable = False
    may_bill = False
    default_message = "The model provider rejected the request."


class UpstreamNotFound(UpstreamRejected):
    """The provider no longer has a response it stored (deleted, expired, or never stored)."""

    status = 404
    code = "not_found"
    default_message = "The model provider has no response with this id."


class UpstreamRateLimited(UpstreamError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"
    may_bill = False
    default_message = "The model provider is rate limiting requests."


class UpstreamQuotaExceeded(UpstreamRateLimited):
    """The provider says the gateway's account has no quota left: no retry of this deployment can
    help (a deployment under another key can: gateway/routing.py tries it)."""

    type = "insufficient_quota"
    code = "upstream_quota_exceeded"
    retryable = False
    default_message = "The model provider's quota for this gateway is exhausted."


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    default_message = "The model provider did not answer in time."


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"
    default_message = "The model provider could not be reached."


# Anthropic's error types, by status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                    409: "invalid_request_error", 413: "request_too_large",
                    429: "rate_limit_error", 499: "api_error", 500: "api_error", 502: "api_error",
                    503: "overloaded_error", 504: "api_error", 529: "overloaded_error"}


def error_body(exc: GatewayError) -> bytes:
    """OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps(
        {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    )


def anthropic_error_body(exc: GatewayError) -> bytes:
    """Anthropic's shape: ``{"type": "error", "error": {"type", "message"}}``."""
    return orjson.dumps({"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(exc.status, "api_error"),
                                                    "message": exc.message}})


def error_headers(exc: GatewayError) -> dict[str, str]:
    """``x-should-retry`` (which the official SDKs honour) and ``Retry-After``: a retry the SDK
    makes on its own must be one that can help, and one the gateway has not already made."""
    if not exc.should_retry:
        return {"x-should-retry": "false"}
    headers = {"x-should-retry": "true"} if exc.tell_retry else {}
    if exc.retry_after_s is not None:
        headers["retry-after"] = str(max(0, math.ceil(exc.retry_after_s)))  # whole seconds, never sooner
        headers["retry-after-ms"] = str(max(0, round(exc.retry_after_s * 1000)))
    return headers


def error_response(exc: GatewayError, body: bytes | None = None) -> Response:
    """The one place an error becomes an HTTP response (OpenAI's shape unless ``body`` is given)."""
    return Response(error_body(exc) if body is None else body, status_code=exc.status,
                    headers=error_headers(exc), media_type="application/json")


def sse_error_event(exc: GatewayError) -> bytes:
    """An error after an OpenAI stream has started: a final event the SDKs raise as an APIError."""
    return b"data: " + error_body(exc) + b"\n\n"


def anthropic_sse_error_event(exc: GatewayError) -> bytes:
    """An error after an Anthropic stream has started: the named ``error`` event."""
    return b"event: error\ndata: " + anthropic_error_body(exc) + b"\n\n"
