"""Provider faults, one by one, end to end: the openai SDK at its default settings (two retries,
its own backoff) -> a real gateway -> a fake OpenAI that misbehaves on cue.

Each test asserts how many requests reached the provider (each one may be a bill) and what the
client got. The gateway retries only what the provider cannot have billed, and tells the SDK
(``x-should-retry``, ``Retry-After``) whether retrying is still its job, so that one SDK call
never turns into a multiple of provider calls. Every test is bounded by small timeouts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import Gateway, start_gateway, stop_gateway, write_policy
from tests.fakes.openai_upstream import FakeOpenAI, Gate, delay, error, reply, trickle
from tests.test_routing import BACKUP, MESSAGES, POLICY_DATA, PRIMARY, PROVIDER_KEY, catalog, record_of, route_of

ServeFaults = Callable[..., Gateway]  # start(**settings)


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI.running() as fake:
        yield fake


@pytest.fixture
def serve(store_url: str, tmp_path: Path, upstream: FakeOpenAI,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[ServeFaults]:
    """The gateway in front of the fake: one retry per deployment, ``primary`` falls back to
    ``backup``, and timeouts of seconds unless a test sets its own."""
    monkeypatch.setenv("FAKE_OPENAI_KEY", PROVIDER_KEY)
    policy = write_policy(tmp_path / "policy", POLICY_DATA)
    started: list[Gateway] = []

    def start(**settings: str) -> Gateway:
        values = {"models": catalog(upstream), "policy_dir": str(policy), "upstream_retries": "1",
                  "upstream_first_byte_timeout_s": "5", "upstream_idle_timeout_s": "5",
                  "upstream_deadline_s": "20", **settings}
        started.append(start_gateway(store_url, tmp_path, **values))
        return started[-1]

    yield start
    for gateway in started:
        stop_gateway(gateway)


def application(gateway: Gateway, **options: Any) -> openai.OpenAI:
    """The openai SDK as an application uses it: default retries and backoff (a timeout only so
    that a broken gateway fails the test instead of hanging it)."""
    return openai.OpenAI(base_url=gateway.v1, api_key=gateway.create_key(team="research"), timeout=30, **options)


def provider_calls(found: list[dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    """The provider calls of a trace: (catalog model, span status, may the provider have billed it)."""
    return [(s["attributes"]["lockgate.catalog_model"], s["status"],
             s["attributes"].get("lockgate.upstream.billable_risk")) for s in found if s["kind"] == "CLIENT"]


def stream_until_error(client: openai.OpenAI, model: str = "primary") -> tuple[list[Any], openai.APIError, Any]:
    """Stream a reply as an application does; the chunks before the error, the error, the headers."""
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, stream=True)
    received: list[Any] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in raw.parse():
            received.append(chunk)
    return received, caught.value, raw.headers


# --- the provider cannot be reached ----------------------------------------------------------------

def test_a_provider_that_refuses_connections_is_retried_by_the_gateway_only(serve: ServeFaults) -> None:
    gateway = serve()

    with pytest.raises(openai.InternalServerError) as caught:
        application(gateway).chat.completions.create(model="lonely", messages=MESSAGES)

    assert caught.value.status_code == 502 and isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "upstream_unavailable"
    assert caught.value.response.headers["x-should-retry"] == "false"  # the gateway already retried
    _, found = record_of(gateway, caught.value.response.headers, spans=4)
    assert provider_calls(found) == [("lonely", "ERROR", False), ("lonely", "ERROR", False)]  # never sent
    assert len(gateway.decisions()) == 1  # one call reached the gateway: the SDK did not retry


def test_a_refused_connection_the_gateway_did_not_retry_is_left_to_the_sdk(serve: ServeFaults) -> None:
    """Nothing was sent, and the gateway made one attempt: the SDK's own retries are safe."""
    gateway = serve(upstream_retries="0")

    with pytest.raises(openai.InternalServerError) as caught:
        application(gateway).chat.completions.create(model="lonely", messages=MESSAGES)

    assert "x-should-retry" not in caught.value.response.headers
    record_of(gateway, caught.value.response.headers)  # the last call's record: the audit has them all
    records = gateway.decisions()
    assert len(records) == 3  # the SDK's call and its two retries, one provider attempt each
    assert all((r["outcome"], r["status_code"]) == ("failed", 502) for r in records)


# --- the provider is slow ----------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_provider_that_stalls_before_the_first_byte_is_cut_off_and_not_retried(
        serve: ServeFaults, upstream: FakeOpenAI, stream: bool) -> None:
    gateway = serve(upstream_first_byte_timeout_s="0.5")
    upstream.script(delay(10.0), reply("A second bill."), reply("A third."), reply("A fourth."))

    with pytest.raises(openai.InternalServerError) as caught:
        application(gateway).chat.completions.create(model="primary", messages=MESSAGES, stream=stream)

    # Before any event: a plain 504, which the SDK is told not to retry (the provider has the request).
    assert caught.value.status_code == 504 and isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "upstream_timeout"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert [r.model for r in upstream.requests] == [PRIMARY]
    record, found = record_of(gateway, caught.value.response.headers)
    assert route_of(record) == ("failed", 504, "primary", "openai")
    assert provider_calls(found) == [("primary", "ERROR", True)]


def test_a_provider_that_stalls_between_events_is_cut_off_by_the_idle_timeout(
        serve: ServeFaults, upstream: FakeOpenAI) -> None:
    gateway = serve(upstream_idle_timeout_s="0.5")
    upstream.script(reply("One two three four.", hold=Gate(), hold_after_events=2), reply())  # never reopened

    received, failure, headers = stream_until_error(application(gateway))

    assert [c.choices[0].delta.content for c in received] == ["", "One"]
    assert all(c.choices[0].finish_reason is None for c in received)  # no made-up "stop"
    assert isinstance(failure.body, dict) and failure.body["code"] == "upstream_timeout"
    assert "silent for more than 0.5 s" in failure.message
    assert len(upstream.requests) == 1
    record, _ = record_of(gateway, headers)
    assert route_of(record) == ("failed", 504, "primary", "openai")
    # Charged for what was streamed: the provider never reported usage, so it is estimated.
    assert record["output_tokens"] == 2 and record["input_tokens"] > 0 and record["cost_micro_usd"] > 0
    assert any("usage estimated" in reason for reason in record["reasons"])


def test_a_provider_that_trickles_forever_is_cut_off_by_the_deadline(serve: ServeFaults, upstream: FakeOpenAI) -> None:
    """Never silent long enough for the idle timeout: only the call's deadline ends it."""
    gateway = serve(upstream_idle_timeout_s="1", upstream_deadline_s="1.5")
    upstream.script(trickle(interval_s=0.05, limit_s=20))  # ends properly after 20 s: no deadline, test fails

    received, failure, headers = stream_until_error(application(gateway))

    assert len(received) >= 2 and {c.choices[0].delta.content for c in received[1:]} == {"tick"}
    assert all(c.choices[0].finish_reason is None for c in received)
    assert isinstance(failure.body, dict) and failure.body["code"] == "upstream_timeout"
    assert "deadline of 1.5 s" in failure.message
    assert len(upstream.requests) == 1
    record, _ = record_of(gateway, headers)
    assert route_of(record) == ("failed", 504, "primary", "openai")
    assert record["output_tokens"] == len(received)  # one estimated token per relayed event
    assert any("usage estimated" in reason for reason in record["reasons"])


# --- the provider answers with an error ------------------------------------------------------------

def test_a_500_is_one_provider_call_in_all(serve: ServeFaults, upstream: FakeOpenAI) -> None:
    """Before: the gateway retried it, the SDK retried the gateway: six provider calls, six bills."""
    gateway = serve()
    upstream.script(*[error(500)] * 6)

    with pytest.raises(openai.InternalServerError) as caught:
        application(gateway).chat.completions.create(model="primary", messages=MESSAGES)

    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert [r.model for r in upstream.requests] == [PRIMARY]  # not again, not on the fallback, not by the SDK
    _, found = record_of(gateway, caught.value.response.headers)
    assert provider_calls(found) == [("primary", "ERROR", True)]


def test_a_503_is_retried_by_the_gateway_and_then_not_by_the_sdk(serve: ServeFaults, upstream: FakeOpenAI) -> None:
    gateway = serve()
    upstream.script(*[error(503)] * 12)

    with pytest.raises(openai.InternalServerError) as caught:
        application(gateway).chat.completions.create(model="primary", messages=MESSAGES)

    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert [r.model for r in upstream.requests] == [PRIMARY, PRIMARY, BACKUP, BACKUP]  # the gateway's four
    _, found = record_of(gateway, caught.value.response.headers, spans=6)
    assert [(m, s) for m, s, _ in provider_calls(found)] == [("primary", "ERROR")] * 2 + [("backup", "ERROR")] * 2


def test_a_503_the_gateway_did_not_retry_passes_its_retry_after_to_the_sdk(
        serve: ServeFaults, upstream: FakeOpenAI) -> None:
    gateway = serve(upstream_retries="0")
    upstream.script(*[error(503, headers=(("retry-after-ms", "100"),))] * 6)

    with pytest.raises(openai.InternalServerError) as caught:
        application(gateway).chat.completions.create(model="backup", messages=MESSAGES)

    assert caught.value.response.headers["retry-after-ms"] == "100"
    assert "x-should-retry" not in caught.value.response.headers
    assert [r.model for r in upstream.requests] == [BACKUP] * 3  # the SDK's call and its two retries


def test_a_rate_limit_whose_wait_fits_the_deadline_is_waited_out_by_the_gateway(
        serve: ServeFaults, upstream: FakeOpenAI) -> None:
    gateway = serve()
    upstream.script(*[error(429, headers=(("retry-after-ms", "50"),))] * 6)

    with pytest.raises(openai.RateLimitError) as caught:
        application(gateway).chat.completions.create(model="backup", messages=MESSAGES)

    assert caught.value.response.headers["x-should-retry"] == "false"
    assert [r.model for r in upstream.requests] == [BACKUP, BACKUP]  # the gateway waited and retried once


def test_a_rate_limit_whose_wait_does_not_fit_the_deadline_is_left_to_the_sdk(
        serve: ServeFaults, upstream: FakeOpenAI) -> None:
    gateway = serve(upstream_deadline_s="1.2")
    upstream.script(*[error(429, headers=(("retry-after-ms", "1500"),))] * 6)

    with pytest.raises(openai.RateLimitError) as caught:
        application(gateway).chat.completions.create(model="backup", messages=MESSAGES)

    assert caught.value.response.headers["retry-after-ms"] == "1500"  # the provider's wait, passed on
    assert [r.model for r in upstream.requests] == [BACKUP] * 3  # one each: the SDK's call and its two retries


def test_a_providers_retry_after_reaches_the_client(serve: ServeFaults, upstream: FakeOpenAI) -> None:
    gateway = serve(upstream_deadline_s="2")
    upstream.script(error(429, headers=(("retry-after", "7"),)), reply())

    with pytest.raises(openai.RateLimitError) as caught:  # without retries: the SDK would wait 7 s twice
        application(gateway, max_retries=0).chat.completions.create(model="backup", messages=MESSAGES)

    # 7 s does not fit the 2 s deadline: the gateway does not wait, and the client learns the wait.
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.response.headers["retry-after-ms"] == "7000"
    assert [r.model for r in upstream.requests] == [BACKUP]


def test_insufficient_quota_is_never_retried(serve: ServeFaults, upstream: FakeOpenAI) -> None:
    gateway = serve()
    upstream.script(*[error(429, "You exceeded your current quota, please check your plan and billing details.",
                            type="insufficient_quota", code="insufficient_quota")] * 6)

    with pytest.raises(openai.RateLimitError) as caught:
        application(gateway).chat.completions.create(model="primary", messages=MESSAGES)

    assert isinstance(caught.value.body, dict)
    assert (caught.value.body["type"], caught.value.body["code"]) == ("insufficient_quota", "upstream_quota_exceeded")
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert [r.model for r in upstream.requests] == [PRIMARY]  # not again, not on the fallback, not by the SDK
    record, _ = record_of(gateway, caught.value.response.headers)
    assert route_of(record) == ("failed", 429, "primary", "openai")


# --- the provider's stream breaks ------------------------------------------------------------------

@pytest.mark.parametrize("cleanly", [False, True], ids=["connection-dropped", "closed-without-done"])
def test_a_stream_cut_after_three_events_ends_in_an_error_and_is_charged(
        serve: ServeFaults, upstream: FakeOpenAI, cleanly: bool) -> None:
    """Dropped mid-body, or closed as if complete but before ``[DONE]``: both are broken streams.
    The SDK raises; the record says failed, charged for the events the client got."""
    gateway = serve()
    upstream.script(reply("One two three four five.", cut_after_events=3, cut_cleanly=cleanly), reply(), reply())

    received, failure, headers = stream_until_error(application(gateway))

    assert [c.choices[0].delta.content for c in received] == ["", "One", " two"]
    assert all(c.choices[0].finish_reason is None for c in received)  # never a made-up "stop"
    assert isinstance(failure.body, dict) and failure.body["code"] == "upstream_unavailable"
    assert len(upstream.requests) == 1  # a stream under way is never retried, by the gateway or the SDK
    record, found = record_of(gateway, headers)
    assert route_of(record) == ("failed", 502, "primary", "openai")
    assert record["output_tokens"] == 3 and record["input_tokens"] > 0 and record["cost_micro_usd"] > 0
    assert any("usage estimated" in reason for reason in record["reasons"])
    if not cleanly:  # the router saw the break; a clean close is only known broken by the pipeline
        assert provider_calls(found) == [("primary", "ERROR", True)]
