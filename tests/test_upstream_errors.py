"""Every exception the HTTP stack can raise maps to a gateway error, and to the right one.

httpx's exception classes are enumerated, not listed: a new class in a new httpx release fails
here until ``map_upstream_errors`` says what it means. The same goes for aiohttp's client
exceptions, both as httpx-aiohttp translates them (the path every provider call takes) and raw.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp.client_reqrep import ConnectionKey
from httpx_aiohttp.transport import map_aiohttp_exceptions
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.upstream import map_upstream_errors

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
