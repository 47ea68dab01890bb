"""Every exception the HTTP stack can raise maps to a gateway error, and to the right one; every
provider status too, each saying whether the provider may have billed it; and provider messages
are scrubbed of credentials.

httpx's exception classes are enumerated, not listed: a new class in a new httpx release fails
here until ``map_upstream_errors`` says what it means. The same goes for aiohttp's client
exceptions, both as httpx-aiohttp translates them (the path every provider call takes) and raw.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp.client_reqrep import ConnectionKey
from httpx_aiohttp.transport import map_aiohttp_exceptions
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.errors import (
    GatewayError,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamQuotaExceeded,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_headers,
)
from gateway.upstream import (
    MAX_PROVIDER_MESSAGE,
    REDACTED,
    build_http_client,
    map_upstream_errors,
    retry_after_s,
    scrub_secrets,
    upstream_status_error,
)
from tests.conftest import free_port
from tests.fakes.openai_upstream import FakeOpenAI, delay, drop

URL_TEXT = "http://127.0.0.1:9/v1/chat/completions"


def _exception_classes(module: Any, names: list[str]) -> list[type[Exception]]:
    found = {value for value in (getattr(module, name, None) for name in names)
             if isinstance(value, type) and issubclass(value, Exception)}
    pending = list(found)
    while pending:  # subclasses the module defines without exporting them
        for subclass in pending.pop().__subclasses__():
            if subclass.__module__.startswith(module.__name__) and subclass not in found:
                found.add(subclass)
                pending.append(subclass)
    return sorted(found, key=lambda cls: cls.__name__)


HTTPX_EXCEPTIONS = _exception_classes(httpx, [*httpx.__all__, *vars(httpx)])
AIOHTTP_EXCEPTIONS = [cls for cls in _exception_classes(aiohttp, [*aiohttp.client_exceptions.__all__, *vars(aiohttp)])
                      if issubclass(cls, aiohttp.ClientError)]


def make_httpx_error(cls: type[Exception]) -> Exception:
    request = httpx.Request("POST", URL_TEXT)
    if issubclass(cls, httpx.HTTPStatusError):
        return cls("provider failed", request=request, response=httpx.Response(500, request=request))
    attempts: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        (("provider failed",), {"request": request}), (("provider failed",), {}), ((), {})]
    for args, kwargs in attempts:
        try:
            return cls(*args, **kwargs)
        except TypeError:
            continue
    raise AssertionError(f"cannot construct {cls.__name__}; teach make_httpx_error how")


def make_aiohttp_error(cls: type[Exception]) -> Exception:
    fields: dict[str, Any] = {name: None for name in ConnectionKey._fields}
    key = ConnectionKey(**fields | {"host": "127.0.0.1", "port": 9, "is_ssl": False, "ssl": True})
    info = aiohttp.RequestInfo(URL(URL_TEXT), "POST", CIMultiDictProxy(CIMultiDict()), URL(URL_TEXT))
    if issubclass(cls, aiohttp.client_exceptions.UnixClientConnectorError):
        return cls("/run/provider.sock", key, ConnectionRefusedError(111, "Connect call failed"))
    if issubclass(cls, aiohttp.ClientConnectorCertificateError):
        return cls(key, ValueError("bad certificate"))
    if issubclass(cls, aiohttp.ClientConnectorError):
        return cls(key, ConnectionRefusedError(111, "Connect call failed"))
    if issubclass(cls, aiohttp.ServerFingerprintMismatch):
        return cls(b"expected", b"got", "127.0.0.1", 9)
    if issubclass(cls, aiohttp.ClientResponseError):
        return cls(info, (), status=500, message="provider failed")
    if issubclass(cls, aiohttp.InvalidURL):
        return cls(URL_TEXT)
    try:
        return cls("provider failed")
    except TypeError:
        return cls()


def mapped(exc: Exception, *, through_transport: bool = False) -> BaseException:
    """What leaves ``map_upstream_errors`` when ``exc`` is raised inside it."""
    try:
        with map_upstream_errors():
            if through_transport:
                with map_aiohttp_exceptions():
                    raise exc
            raise exc
    except BaseException as result:
        return result
    raise AssertionError("map_upstream_errors swallowed the exception")


def expected_for_httpx(cls: type[Exception]) -> type[UpstreamError]:
    if issubclass(cls, httpx.TimeoutException):
        return UpstreamTimeout
    if issubclass(cls, (httpx.TransportError, httpx.StreamError)):  # connect, read, write, protocol, proxy
        return UpstreamUnavailable
    return UpstreamError  # a status, decoding, redirect or URL error: the provider failed, somehow


def expected_for_aiohttp(cls: type[Exception]) -> type[UpstreamError]:
    if issubclass(cls, TimeoutError):
        return UpstreamTimeout
    return UpstreamUnavailable  # refused, reset, dropped, cut short, or an answer that is not HTTP


def test_the_enumeration_finds_the_classes_that_matter() -> None:
    assert {httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.StreamConsumed,
            httpx.HTTPStatusError, httpx.InvalidURL} <= set(HTTPX_EXCEPTIONS)
    assert {aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.SocketTimeoutError,
            aiohttp.ClientPayloadError, aiohttp.ClientResponseError} <= set(AIOHTTP_EXCEPTIONS)


@pytest.mark.parametrize("cls", HTTPX_EXCEPTIONS, ids=lambda cls: cls.__name__)
def test_every_httpx_exception_becomes_an_upstream_error(cls: type[Exception]) -> None:
    original = make_httpx_error(cls)

    result = mapped(original)

    assert isinstance(result, GatewayError) and isinstance(result, UpstreamError), repr(result)
    assert result.__cause__ is original  # raise ... from exc: the log keeps what happened


@pytest.mark.parametrize("cls", HTTPX_EXCEPTIONS, ids=lambda cls: cls.__name__)
def test_every_httpx_exception_maps_to_its_specific_error(cls: type[Exception]) -> None:
    result = mapped(make_httpx_error(cls))

    assert type(result) is expected_for_httpx(cls)


def test_timeouts_and_refused_connections_are_told_apart() -> None:
    assert type(mapped(httpx.ReadTimeout("slow"))) is UpstreamTimeout
    assert type(mapped(httpx.ConnectTimeout("slow"))) is UpstreamTimeout
    assert type(mapped(httpx.ConnectError("refused"))) is UpstreamUnavailable
    assert mapped(httpx.ConnectError("refused")).status == 502  # type: ignore[attr-defined]
    assert mapped(httpx.ReadTimeout("slow")).status == 504  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", AIOHTTP_EXCEPTIONS, ids=lambda cls: cls.__name__)
def test_every_aiohttp_exception_through_the_transport_maps_to_its_specific_error(cls: type[Exception]) -> None:
    """The path every provider call takes: aiohttp raises, httpx-aiohttp translates (it turns
    refused and dropped connections into ConnectTimeout), map_upstream_errors decides."""
    original = make_aiohttp_error(cls)

    result = mapped(original, through_transport=True)

    assert type(result) is expected_for_aiohttp(cls), repr(result)


@pytest.mark.parametrize("cls", AIOHTTP_EXCEPTIONS, ids=lambda cls: cls.__name__)
def test_every_raw_aiohttp_exception_maps_to_its_specific_error(cls: type[Exception]) -> None:
    """aiohttp exceptions that httpx-aiohttp lets through unchanged, most specific first: an
    aiohttp timeout is a timeout even though it is also an aiohttp.ClientError."""
    original = make_aiohttp_error(cls)

    result = mapped(original)

    assert isinstance(result, UpstreamError) and result.__cause__ is original
    assert type(result) is expected_for_aiohttp(cls), repr(result)


@pytest.mark.parametrize("exc", [TimeoutError("slow"), UpstreamTimeout(), UpstreamUnavailable()],
                         ids=["TimeoutError", "UpstreamTimeout", "UpstreamUnavailable"])
def test_plain_timeouts_and_gateway_errors_keep_their_meaning(exc: Exception) -> None:
    result = mapped(exc)

    assert type(result) is (UpstreamTimeout if isinstance(exc, TimeoutError) else type(exc))


def test_other_exceptions_are_not_mapped() -> None:
    """A bug in our own code stays a bug (a logged 500), not a provider failure."""
    assert type(mapped(KeyError("model"))) is KeyError


# --- whether the provider may have received (and billed) the request ---------------------------------

# Failures that certainly happen before any byte of the request leaves: connecting (refused, name
# not found, TLS, a proxy), a URL that cannot be requested. Everything else may have been sent.
UNSENT_AIOHTTP = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL,
                  aiohttp.client_exceptions.NonHttpUrlClientError)
UNSENT_HTTPX = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol,
                httpx.ProxyError, httpx.InvalidURL)


@pytest.mark.parametrize("through_transport", [True, False], ids=["through-transport", "raw"])
@pytest.mark.parametrize("cls", AIOHTTP_EXCEPTIONS, ids=lambda cls: cls.__name__)
def test_only_failures_before_the_request_was_sent_are_free_of_billing_risk(
        cls: type[Exception], through_transport: bool) -> None:
    """httpx-aiohttp maps refused and reset connections alike to ConnectTimeout: the aiohttp
    exception underneath tells a connection that never opened from one that broke after the
    request was written (which the provider may have processed)."""
    result = mapped(make_aiohttp_error(cls), through_transport=through_transport)

    assert isinstance(result, UpstreamError)
    assert result.billable_risk is not issubclass(cls, UNSENT_AIOHTTP), repr(result)


@pytest.mark.parametrize("cls", HTTPX_EXCEPTIONS, ids=lambda cls: cls.__name__)
def test_httpx_failures_say_whether_the_request_was_sent(cls: type[Exception]) -> None:
    result = mapped(make_httpx_error(cls))

    assert isinstance(result, UpstreamError)
    assert result.billable_risk is not issubclass(cls, UNSENT_HTTPX), repr(result)


def test_a_risky_failure_tells_the_sdk_not_to_retry() -> None:
    sent = mapped(httpx.ReadTimeout("slow"))
    unsent = mapped(httpx.ConnectError("refused"))

    assert isinstance(sent, UpstreamError) and isinstance(unsent, UpstreamError)
    assert error_headers(sent) == {"x-should-retry": "false"}
    assert error_headers(unsent) == {}


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI.running() as fake:
        yield fake


async def send_through_the_transport(url: str, timeout_s: float = 5.0) -> BaseException:
    client = build_http_client(timeout_s=timeout_s, connect_timeout_s=5.0, max_connections=2)
    try:
        with map_upstream_errors():
            response = await client.send(client.request(url, b"{}", {"content-type": "application/json"},
                                                        stream=False))
            await response.aread()
    except BaseException as exc:
        return exc
    finally:
        await client.aclose()
    raise AssertionError("the request succeeded")


async def test_a_refused_connection_was_never_sent() -> None:
    failure = await send_through_the_transport(f"http://127.0.0.1:{free_port()}/v1/chat/completions")

    assert type(failure) is UpstreamUnavailable and failure.billable_risk is False


@pytest.mark.parametrize(("cassette", "expected"), [(drop(), UpstreamUnavailable), (delay(5.0), UpstreamTimeout)],
                         ids=["closed-after-the-request", "read-timeout"])
async def test_a_connection_that_fails_after_the_request_may_have_been_billed(
        upstream: FakeOpenAI, cassette: Any, expected: type[UpstreamError]) -> None:
    upstream.script(cassette)

    failure = await send_through_the_transport(upstream.url + "/chat/completions", timeout_s=0.3)

    assert len(upstream.requests) == 1  # the provider had the whole request
    assert type(failure) is expected and failure.billable_risk is True


# --- provider statuses ---------------------------------------------------------------------------

STATUSES: list[tuple[int, type[UpstreamError], bool]] = [
    # status, error, may the provider have billed it
    (400, UpstreamRejected, False), (404, UpstreamRejected, False), (422, UpstreamRejected, False),
    (401, UpstreamAuthFailed, False), (403, UpstreamAuthFailed, False),
    (408, UpstreamUnavailable, False), (409, UpstreamUnavailable, False), (429, UpstreamRateLimited, False),
    (502, UpstreamUnavailable, False), (503, UpstreamUnavailable, False), (529, UpstreamUnavailable, False),
    (500, UpstreamUnavailable, True), (501, UpstreamUnavailable, True), (504, UpstreamUnavailable, True),
    (302, UpstreamError, True),
]


@pytest.mark.parametrize(("status", "expected", "billable"), STATUSES, ids=[str(s) for s, _, _ in STATUSES])
def test_each_provider_status_says_whether_it_was_refused_or_may_have_been_billed(
        status: int, expected: type[UpstreamError], billable: bool) -> None:
    failure = upstream_status_error(status, b'{"error": {"message": "no", "type": "x", "code": null}}',
                                    {"retry-after": "3"})

    assert type(failure) is expected
    assert failure.billable_risk is billable and failure.provider_status == status
    refused = status in (408, 409, 429, 502, 503, 529)
    assert failure.retry_after_s == (3.0 if refused else None)  # a refusal's wait is passed on
    assert failure.should_retry is (refused and failure.retryable)


@pytest.mark.parametrize("field", ["code", "type"])
def test_insufficient_quota_is_never_retried(field: str) -> None:
    body = {"error": {"message": "You exceeded your current quota.", "type": "requests", "code": None}}
    body["error"][field] = "insufficient_quota"

    failure = upstream_status_error(429, json.dumps(body).encode(), {"retry-after": "1"})

    assert type(failure) is UpstreamQuotaExceeded and failure.status == 429
    assert (failure.type, failure.code) == ("insufficient_quota", "upstream_quota_exceeded")
    assert not failure.retryable and error_headers(failure) == {"x-should-retry": "false"}


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"retry-after": "7"}, 7.0),
    ({"retry-after": "1.5"}, 1.5),
    ({"retry-after-ms": "250", "retry-after": "7"}, 0.25),  # the finer one wins, as in the SDKs
    ({"retry-after": "-3"}, 0.0),
    ({"retry-after": "soon"}, None),
    ({"retry-after": "inf"}, None),
    ({"retry-after-ms": "nan", "retry-after": "2"}, 2.0),
    ({}, None),
])
def test_retry_after_in_seconds_or_milliseconds(headers: dict[str, str], seconds: float | None) -> None:
    assert retry_after_s(headers) == seconds


def test_retry_after_as_an_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)

    seconds = retry_after_s({"retry-after": format_datetime(when, usegmt=True)})

    assert seconds is not None and 25 <= seconds <= 30
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # already past


# --- provider messages are scrubbed before anyone sees them -----------------------------------------

@pytest.mark.parametrize("leak", [
    "Bearer sk-proj-abcdef0123456789", "sk-ant-api03-abcdefghijklmnop", "sk-abcdef0123456789",
    "bearer eyJhbGciOiJIUzI1NiJ9.payload.signature", "api_key=0123456789abcdef",
    '"x-api-key": "k-0123456789"', "0123456789abcdef0123456789abcdef", "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUv",
])
def test_anything_shaped_like_a_credential_is_redacted(leak: str) -> None:
    message = f"Invalid request: header was {leak}, please check."

    failure = upstream_status_error(400, json.dumps({"error": {"message": message}}).encode())

    assert type(failure) is UpstreamRejected
    secret_part = leak.split()[-1].split("=")[-1].strip('"')
    assert secret_part not in failure.message and REDACTED in failure.message
    assert failure.message.startswith("The model provider rejected the request: Invalid request: header was")


def test_ordinary_words_and_model_names_are_kept() -> None:
    message = "Invalid value for 'temperature': gpt-4o-mini-2024-07-18 accepts a number between 0 and 2."

    assert scrub_secrets(message) == message


def test_a_given_secret_is_removed_whatever_its_shape_and_long_messages_are_cut() -> None:
    assert scrub_secrets("the key correct-horse is wrong", ["correct-horse"]) == f"the key {REDACTED} is wrong"
    assert len(scrub_secrets("x" * 10_000)) == MAX_PROVIDER_MESSAGE
