"""Azure OpenAI: OpenAI's wire format at Azure's addresses, with Azure's ``api-key`` header.

A deployment's ``base_url`` is the resource's endpoint (``https://<resource>.openai.azure.com``)
and its ``upstream_model`` is the Azure deployment name. With an ``api_version`` the classic
deployment URLs are used::

    {base_url}/openai/deployments/{upstream_model}/chat/completions?api-version={api_version}
    {base_url}/openai/deployments/{upstream_model}/embeddings?api-version={api_version}

Without one, and always for the Responses API (which Azure serves only there), the v1 API,
where the deployment is named by the body's ``model``::

    {base_url}/openai/v1/chat/completions, /openai/v1/embeddings, /openai/v1/responses[/{id}]

Everything else (bodies, streams, errors, usage) is OpenAI's, so this adapter is the OpenAI
adapter with another URL and key header.
"""

from __future__ import annotations

from urllib.parse import quote

from adapters.openai import OpenAIProvider, resource_path
from gateway.types import UpstreamCall

# Endpoints Azure serves under a deployment's own URL (with an api-version).
DEPLOYMENT_ENDPOINTS = frozenset({"chat.completions", "embeddings"})


class AzureOpenAIProvider(OpenAIProvider):
    name = "azure_openai"

    def _url(self, call: UpstreamCall) -> str:
        base = call.deployment.base_url.rstrip("/") + "/openai"
        version = call.deployment.api_version
        if version and call.endpoint in DEPLOYMENT_ENDPOINTS:
            deployment = quote(call.deployment.upstream_model, safe="")
            return (f"{base}/deployments/{deployment}{resource_path(call)}"
                    f"?api-version={quote(version, safe='')}")
        return f"{base}/v1{resource_path(call)}"

    def _auth_headers(self, call: UpstreamCall) -> dict[str, str]:
        return {"api-key": call.api_key} if call.api_key else {}
