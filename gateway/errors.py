"""Every error the gateway returns, in one hierarchy, rendered by one function.

    GatewayError                      500 server_error
    ├── InvalidRequest                400 invalid_request_error
    │   ├── ModelNotFound             404 invalid_request_error / model_not_found
    │   ├── RouteNotFound             404 invalid_request_error / not_found
    │   ├── MethodNotAllowed          405 invalid_request_error / method_not_allowed
    │   └── RequestTooLarge           413 invalid_request_error / request_too_large
    ├── AuthenticationFailed          401 invalid_request_error / invalid_api_key
    ├── PermissionDenied              403 permission_error
    │   ├── PolicyDenied                  / policy_denied
    │   ├── PolicyFailed                  / policy_error      (the engine failed: fail closed)
    │   ├── ApprovalRequired              / approval_required
    │   └── ApprovalRejected              / approval_denied
    ├── BudgetExceeded                429 insufficient_quota / budget_exceeded
    ├── StoreUnavailable              503 server_error / store_unavailable
    ├── ClientClosed                  499 (never sent: the client left mid-stream; audit only)
    └── UpstreamError                 502 upstream_error      (the provider failed)
        ├── UpstreamAuthFailed        502 upstream_error / upstream_auth_failed (our provider key; not retried)
        ├── UpstreamRejected          400 invalid_request_error (the provider refused the request)
        ├── UpstreamRateLimited       429 rate_limit_exceeded
        ├── UpstreamTimeout           504 upstream_error / upstream_timeout
        └── UpstreamUnavailable       502 upstream_error / upstream_unavailable

Status codes come only from these class attributes, never from message text. Messages are
written for the caller and must never contain secrets; details for operators go to the log.
"""

from __future__ import annotations

from typing import ClassVar

import orjson
from starlette.responses import Response


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None
    retryable: ClassVar[bool] = True
    default_message: ClassVar[str] = "The gateway failed to handle this request."

    def __init__(self, message: str | None = None, *, param: str | None = None) -> None:
        self.message = message or self.default_message
        self.param = param
        super().__init__(self.message)


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


class PolicyFailed(PermissionDenied):
    code = "policy_error"
    default_message = "The policy could not be evaluated, so the call was denied."


class ApprovalRequired(PermissionDenied):
    code = "approval_required"
    default_message = "This call needs approval."


class ApprovalRejected(PermissionDenied):
    code = "approval_denied"
    default_message = "The approval for this call was denied, has expired or does not match it."


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


class ClientClosed(GatewayError):
    status = 499
    code = "client_closed"
    default_message = "The client closed the connection before the reply ended."


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    default_message = "The model provider failed to answer."


class UpstreamAuthFailed(UpstreamError):
    code = "upstream_auth_failed"
    retryable = False
    default_message = "The model provider refused the gateway's credentials."


class UpstreamRejected(UpstreamError):
    status = 400
    type = "invalid_request_error"
    retryable = False
    default_message = "The model provider rejected the request."


class UpstreamRateLimited(UpstreamError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"
    default_message = "The model provider is rate limiting requests."


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    default_message = "The model provider did not answer in time."


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"
    default_message = "The model provider could not be reached."


# Errors that no retry can fix: tell the official SDKs not to retry them (they honour this header).
_NO_RETRY = {"x-should-retry": "false"}


def error_body(exc: GatewayError) -> bytes:
    return orjson.dumps(
        {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    )


def error_response(exc: GatewayError) -> Response:
    """The one place an error becomes an HTTP response."""
    headers = {} if exc.retryable else _NO_RETRY
    return Response(error_body(exc), status_code=exc.status, headers=headers, media_type="application/json")


def sse_error_event(exc: GatewayError) -> bytes:
    """An error that happens after a stream has started is sent as a final SSE event."""
    return b"data: " + error_body(exc) + b"\n\n"
