"""The one pooled HTTP client for providers, and the one place its failures become gateway errors.

Adapters call providers through the ``UpstreamClient`` built here and hand every failure to
``map_upstream_errors`` (transport exceptions) or ``upstream_status_error`` (HTTP statuses),
so routing decides on retries from the error alone: its class, and whether the provider may
have received, and billed, the request (``UpstreamError.billable_risk``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from gateway.errors import (
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamQuotaExceeded,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)

try:
    USER_AGENT = f"lockgate/{version('lockgate')}"
except PackageNotFoundError:  # run from a source tree that was never installed
    USER_AGENT = "lockgate"


MAX_CACHED_URLS = 1024


class UpstreamClient:
    """httpx requests sent straight to one pooled httpx-aiohttp transport.

    ``httpx.AsyncClient.send`` adds an auth flow, redirect handling, event hooks and a cookie jar
    on top of the transport, none of which a gateway wants: a jar shared by every caller would
    replay one tenant's provider cookies on another's calls. Skipping them cuts the client's CPU
    per call from 0.79 ms to 0.50 ms on the bench machine (aiohttp alone: 0.25 ms).
    """

    def __init__(self, transport: httpx.AsyncBaseTransport, timeout: httpx.Timeout) -> None:
        self._transport = transport
        self._timeout = timeout.as_dict()
        self._urls: dict[str, httpx.URL] = {}  # httpx parses URLs in pure Python: once per provider

    def request(self, url: str, body: bytes, headers: Mapping[str, str], *, stream: bool,
                timeout_s: float | None = None, method: str = "POST") -> httpx.Request:
        timeout = self._timeout if timeout_s is None else {**self._timeout, "read": timeout_s, "write": timeout_s}
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= MAX_CACHED_URLS:
                self._urls.clear()  # URLs that name a resource (/responses/{id}) would grow it without end
            parsed = self._urls[url] = httpx.URL(url)
        return httpx.Request(method, parsed, content=body, extensions={"timeout": timeout}, headers={
            "user-agent": USER_AGENT,
            # An event stream is relayed as it comes, so it must not be compressed; a JSON reply
            # may be, and is decoded when it is read.
            "accept-encoding": "identity" if stream else "gzip, deflate",
            **headers,
        })

    async def send(self, request: httpx.Request) -> httpx.Response:
        """The response with its body unread; the caller reads or closes it."""
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self._transport.aclose()


def build_http_client(*, timeout_s: float, connect_timeout_s: float, max_connections: int) -> UpstreamClient:
    """``timeout_s`` bounds each socket read (aiohttp's ``sock_read``), a backstop only: the router
    holds every attempt to its first-byte, idle and deadline limits (gateway/routing.py)."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    tls = httpx.create_ssl_context(trust_env=False)

    def session() -> aiohttp.ClientSession:  # made on first use, inside the running loop
        # aiohttp keeps cookies too, and would share them across callers like httpx's jar.
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=limits.keepalive_expiry, ssl=tls),
            cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)

    return UpstreamClient(AiohttpTransport(client=session), httpx.Timeout(timeout_s, connect=connect_timeout_s))


# Transport failures that happen before any byte of the request leaves: connecting, resolving the
# name, the TLS handshake, a proxy's refusal, a URL that cannot be requested. Everything else (a
# reset or a closed connection after the request was written, a read timeout, a body cut short)
# may have reached the provider, which may have done, and billed, the work.
_UNSENT_AIOHTTP = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL,
                   aiohttp.NonHttpUrlClientError)
_UNSENT_HTTPX = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol,
                 httpx.ProxyError, httpx.InvalidURL)


def _request_unsent(exc: BaseException) -> bool:
    """Whether a transport failure certainly happened before the request was sent.

    httpx-aiohttp 0.2 maps every aiohttp connection error, refused or reset alike, to httpx's
    ConnectTimeout, so the aiohttp exception underneath decides when there is one."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    underneath = [e for e in chain if isinstance(e, aiohttp.ClientError)]
    if underneath:
        return isinstance(underneath[-1], _UNSENT_AIOHTTP)
    return isinstance(exc, _UNSENT_HTTPX)


@contextmanager
def map_upstream_errors() -> Iterator[None]:
    """Translate transport exceptions, most specific first, saying whether the provider may have
    received the request (``billable_risk``)."""
    try:
        yield
    except UpstreamError:
        raise
    except httpx.TimeoutException as exc:
        # httpx-aiohttp 0.2 maps every aiohttp connection error (refused, reset, disconnected) to
        # ConnectTimeout; only a real timeout underneath is a timeout.
        cause = exc.__cause__
        if isinstance(cause, aiohttp.ClientError) and not isinstance(cause, TimeoutError):
            raise UpstreamUnavailable(billable_risk=not _request_unsent(exc)) from exc
        raise UpstreamTimeout(billable_risk=not _request_unsent(exc)) from exc
    except (httpx.ConnectError, httpx.UnsupportedProtocol, httpx.ProxyError) as exc:
        raise UpstreamUnavailable(billable_risk=not _request_unsent(exc)) from exc
    except TimeoutError as exc:  # aiohttp's own timeouts are ClientErrors too: this branch first
        raise UpstreamTimeout(billable_risk=not _request_unsent(exc)) from exc
    except (httpx.TransportError, httpx.StreamError, aiohttp.ClientError) as exc:
        raise UpstreamUnavailable(billable_risk=not _request_unsent(exc)) from exc
    except (httpx.HTTPError, httpx.InvalidURL, httpx.CookieConflict) as exc:
        raise UpstreamError(billable_risk=not _request_unsent(exc)) from exc


# --- provider answers -------------------------------------------------------------------------

MAX_PROVIDER_MESSAGE = 500  # characters of a provider's error message relayed to the caller
REDACTED = "[redacted]"
# What a credential looks like in an error message: a bearer token, an OpenAI or Anthropic key
# (sk-..., sk-proj-..., sk-ant-...), a quoted header or parameter carrying a key, and any long
# opaque token of letters and digits (Azure's 32 hex characters, Google's AIza... keys).
_SECRET_SHAPES = re.compile(
    r"(?i:bearer|basic)\s+[^\s\"',;]+"
    r"|\bsk-[A-Za-z0-9_\-]{6,}"
    r"|(?i:api[-_]?key|authorization|access[-_]?token|secret)[\"']?\s*[:=]\s*[\"']?[^\s\"',;]+"
    r"|\b(?=[A-Za-z0-9_\-]*[0-9])(?=[A-Za-z0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{32,}"
)


def scrub_secrets(text: str, secrets: Iterable[str] = ()) -> str:
    """A provider's text, safe to show the caller, record and log: every given secret and anything
    shaped like a credential replaced, and at most MAX_PROVIDER_MESSAGE characters."""
    text = text[:4 * MAX_PROVIDER_MESSAGE]  # the patterns never see a huge body
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _SECRET_SHAPES.sub(REDACTED, text)
    return text if len(text) <= MAX_PROVIDER_MESSAGE else text[:MAX_PROVIDER_MESSAGE - 1] + "…"


def _provider_error(body: bytes) -> Mapping[str, Any]:
    """The ``error`` object of OpenAI's and Anthropic's error bodies, or an empty one."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return {}
    return error if isinstance(error, Mapping) else {}


# The longest wait passed on: a header is the provider's (or whoever sits between) to write, and
# a wait of 1e306 s, or a date in the year 10^20, must neither crash the gateway nor mean anything.
MAX_RETRY_AFTER_S = 86_400.0


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """A provider's requested wait: ``retry-after-ms``, else ``retry-after`` in seconds or as an
    HTTP date, between 0 and MAX_RETRY_AFTER_S. None when it asks for nothing (or nothing readable)."""
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if math.isfinite(seconds):
            return min(max(0.0, seconds), MAX_RETRY_AFTER_S)
    value = headers.get("retry-after")
    if value:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is not None:
            return min(max(0.0, (when - datetime.now(UTC)).total_seconds()), MAX_RETRY_AFTER_S)
    return None


# Statuses with which a provider refuses a request before doing any work: it timed out reading
# the request, is locked, or is overloaded or unavailable (529 is Anthropic's "overloaded").
_REFUSED = frozenset({408, 409, 502, 503, 529})


def upstream_status_error(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> UpstreamError:
    """An error for a provider's non-2xx answer.

    Its message is relayed only where it is about the caller's request (4xx other than auth),
    and then scrubbed of anything shaped like a credential; the router also removes the
    deployment's own key. A refusal (429, 408, 409, 502, 503, 529) carries the provider's
    ``Retry-After`` and was not billed; any other 5xx may have been (the provider may have done
    the work before failing), so it is never retried."""
    error = _provider_error(body)
    exc: UpstreamError
    if status in (401, 403):
        exc = UpstreamAuthFailed()
    elif status == 429 and "insufficient_quota" in (error.get("code"), error.get("type")):
        exc = UpstreamQuotaExceeded()
    elif status == 429:
        exc = UpstreamRateLimited(retry_after_s=retry_after_s(headers))
    elif status in _REFUSED:
        exc = UpstreamUnavailable(f"The model provider is unavailable (status {status}).",
                                  retry_after_s=retry_after_s(headers), billable_risk=False)
    elif status >= 500:
        exc = UpstreamUnavailable(f"The model provider failed with status {status}.", billable_risk=True)
    elif 400 <= status < 500:
        detail = error.get("message")
        exc = UpstreamRejected(f"The model provider rejected the request: {scrub_secrets(detail)}"
                               if isinstance(detail, str) and detail else None)
    else:
        exc = UpstreamError(f"The model provider answered with unexpected status {status}.")
    exc.provider_status = status
    return exc
