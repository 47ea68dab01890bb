"""Azure OpenAI (its own adapter: deployment URLs, api-version, the ``api-key`` header) and Gemini
through Google's OpenAI-compatible endpoint (the openai adapter at another base URL), each
against the fake OpenAI on loopback under the provider's own path."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import load_settings
from tests.conftest import InProcessGateway, in_process, write_policy
from tests.fakes.openai_upstream import FakeOpenAI, Reply, reply

AZURE_KEY = "0123456789abcdef0123456789abcdef"  # Azure's keys are 32 hex characters
GEMINI_KEY = "AIzaFakeGeminiKey0123456789"
API_VERSION = "2024-10-21"


@pytest.fixture
def azure() -> Iterator[FakeOpenAI]:
    with FakeOpenAI.running(prefix="/openai") as fake:
        yield fake


@pytest.fixture
def gemini() -> Iterator[FakeOpenAI]:
    with FakeOpenAI.running(prefix="/v1beta/openai") as fake:
        yield fake


@pytest.fixture
def gateway(tmp_path: Path, azure: FakeOpenAI, gemini: FakeOpenAI) -> Iterator[InProcessGateway]:
    on_azure = {"provider": "azure_openai", "base_url": azure.root, "api_key_env": "AZURE_OPENAI_KEY",
                "input_usd_per_mtok": 1, "output_usd_per_mtok": 1}
    models = [
        # The classic deployment URLs, with an api-version.
        {"name": "azure-gpt", **on_azure, "upstream_model": "gpt-4o-deploy", "api_version": API_VERSION},
        # No api-version: Azure's v1 API, the deployment named by the body's model.
        {"name": "azure-v1", **on_azure, "upstream_model": "gpt-4o-v1-deploy"},
        {"name": "azure-embed", **on_azure, "upstream_model": "embed-deploy", "api_version": API_VERSION},
        # Gemini: the openai adapter, at Google's OpenAI-compatible base URL (the fake's, here).
        {"name": "gemini-flash", "provider": "openai", "base_url": gemini.url, "api_key_env": "GEMINI_API_KEY",
         "upstream_model": "gemini-2.5-flash", "input_usd_per_mtok": 0.3, "output_usd_per_mtok": 2.5},
    ]
    policy = write_policy(tmp_path / "policy", {
        "aliases": {}, "fallbacks": {}, "approval_tools": {},
        "teams": {"research": {"models": [m["name"] for m in models], "monthly_budget_micro_usd": 100_000_000}}})
    settings = load_settings(environ={
        "LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db", "LOCKGATE_POLICY_DIR": str(policy),
        "LOCKGATE_MODELS": json.dumps(models), "LOCKGATE_UPSTREAM_RETRIES": "0",
        "AZURE_OPENAI_KEY": AZURE_KEY, "GEMINI_API_KEY": GEMINI_KEY})
    with in_process(settings) as gateway:
        yield gateway


def post(gateway: InProcessGateway, key: str, path: str, body: dict[str, Any]) -> Any:
    response = gateway.client.post(path, json=body, headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response


def test_azure_chat_goes_to_the_deployment_url_with_api_version_and_api_key(
        gateway: InProcessGateway, azure: FakeOpenAI) -> None:
    key = gateway.create_key()
    azure.script(reply("Hello from Azure."))

    answer = post(gateway, key, "/v1/chat/completions",
                  {"model": "azure-gpt", "messages": [{"role": "user", "content": "hi"}]}).json()

    [sent] = azure.requests
    assert (sent.method, sent.path) == (
        "POST", f"/openai/deployments/gpt-4o-deploy/chat/completions?api-version={API_VERSION}")
    assert sent.headers["api-key"] == AZURE_KEY and "authorization" not in sent.headers
    assert key not in json.dumps(sent.headers)
    assert sent.body["model"] == "gpt-4o-deploy"
    assert answer["choices"][0]["message"]["content"] == "Hello from Azure."
    [record] = gateway.decisions()
    assert (record["provider"], record["routed_model"], record["input_tokens"]) == ("azure_openai", "azure-gpt", 9)


def test_azure_streams_and_embeddings_use_the_same_addresses(gateway: InProcessGateway, azure: FakeOpenAI) -> None:
    key = gateway.create_key()
    azure.script(reply("one two"), Reply(prompt_tokens=4))

    streamed = gateway.client.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, json={
        "model": "azure-gpt", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    embedded = post(gateway, key, "/v1/embeddings", {"model": "azure-embed", "input": "hi", "dimensions": 3}).json()

    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert [r.path for r in azure.requests] == [
        f"/openai/deployments/gpt-4o-deploy/chat/completions?api-version={API_VERSION}",
        f"/openai/deployments/embed-deploy/embeddings?api-version={API_VERSION}"]
    assert all(r.headers["api-key"] == AZURE_KEY for r in azure.requests)
    assert len(embedded["data"][0]["embedding"]) == 3 and embedded["usage"]["prompt_tokens"] == 4


def test_azure_without_an_api_version_and_azure_responses_use_the_v1_api(
        gateway: InProcessGateway, azure: FakeOpenAI) -> None:
    key = gateway.create_key()
    azure.script(reply("v1 chat"), reply("v1 response"))

    post(gateway, key, "/v1/chat/completions", {"model": "azure-v1", "messages": [{"role": "user", "content": "hi"}]})
    created = post(gateway, key, "/v1/responses", {"model": "azure-gpt", "input": "hi"}).json()
    read = gateway.client.get(f"/v1/responses/{created['id']}", headers={"authorization": f"Bearer {key}"})

    assert read.status_code == 200 and read.json()["id"] == created["id"]
    assert [(r.method, r.path) for r in azure.requests] == [
        ("POST", "/openai/v1/chat/completions"), ("POST", "/openai/v1/responses"),
        ("GET", f"/openai/v1/responses/{created['id']}")]
    assert [r.body.get("model") for r in azure.requests] == ["gpt-4o-v1-deploy", "gpt-4o-deploy", None]
    assert all(r.headers["api-key"] == AZURE_KEY and "authorization" not in r.headers for r in azure.requests)


def test_gemini_through_its_openai_endpoint_is_the_openai_adapter_with_a_bearer_key(
        gateway: InProcessGateway, gemini: FakeOpenAI) -> None:
    key = gateway.create_key()
    gemini.script(reply("Hello from Gemini.", prompt_tokens=7, completion_tokens=4))

    answer = post(gateway, key, "/v1/chat/completions",
                  {"model": "gemini-flash", "messages": [{"role": "user", "content": "hi"}]}).json()

    [sent] = gemini.requests
    assert (sent.method, sent.path) == ("POST", "/v1beta/openai/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {GEMINI_KEY}" and "api-key" not in sent.headers
    assert sent.body["model"] == "gemini-2.5-flash"
    assert answer["choices"][0]["message"]["content"] == "Hello from Gemini."
    [record] = gateway.decisions()
    assert (record["provider"], record["input_tokens"], record["output_tokens"]) == ("openai", 7, 4)
    assert record["cost_micro_usd"] == round(7 * 0.3 + 4 * 2.5)
