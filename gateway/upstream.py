"""The one pooled HTTP client for providers, and the one place its failures become gateway errors.

Adapters call providers through the client built here and hand every failure to
``map_upstream_errors`` (transport exceptions) or ``upstream_status_error`` (HTTP statuses),
so routing can decide on retries from the error class alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from gateway.errors import (
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)


def build_http_client(*, timeout_s: float, connect_timeout_s: float, max_connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits, trust_env=False),
        timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        limits=limits,
        follow_redirects=False,
    )


@contextmanager
def map_upstream_errors() -> Iterator[None]:
    """Translate transport exceptions, most specific first."""
    try:
        yield
    except UpstreamError:
        raise
    except httpx.TimeoutException as exc:
        # httpx-aiohttp 0.2 maps every aiohttp connection error (refused, reset, disconnected) to
        # ConnectTimeout; only a real timeout underneath is a timeout.
        cause = exc.__cause__
        if isinstance(cause, aiohttp.ClientError) and not isinstance(cause, TimeoutError):
            raise UpstreamUnavailable() from exc
        raise UpstreamTimeout() from exc
    except (httpx.ConnectError, httpx.UnsupportedProtocol, httpx.ProxyError) as exc:
        raise UpstreamUnavailable() from exc
    except TimeoutError as exc:  # aiohttp's own timeouts are ClientErrors too: this branch first
        raise UpstreamTimeout() from exc
    except (httpx.TransportError, httpx.StreamError, aiohttp.ClientError) as exc:
        raise UpstreamUnavailable() from exc
    except (httpx.HTTPError, httpx.InvalidURL, httpx.CookieConflict) as exc:
        raise UpstreamError() from exc


def _provider_message(body: bytes) -> str | None:
    try:
        message = orjson.loads(body)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return message if isinstance(message, str) else None


def upstream_status_error(status: int, body: bytes) -> UpstreamError:
    """An error for a provider's non-2xx answer. Its message is relayed only where it is about
    the caller's request (4xx other than auth); auth failures concern our credentials."""
    if status in (401, 403):
        return UpstreamAuthFailed()
    if status == 429:
        return UpstreamRateLimited()
    if status in (408, 409) or status >= 500:
        return UpstreamUnavailable(f"The model provider failed with status {status}.")
    if 400 <= status < 500:
        detail = _provider_message(body)
        return UpstreamRejected(f"The model provider rejected the request: {detail}" if detail else None)
    return UpstreamError(f"The model provider answered with unexpected status {status}.")
