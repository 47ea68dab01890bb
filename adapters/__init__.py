"""Provider adapters: one module per provider wire format.

Each adapter turns an ``UpstreamCall`` into the provider's request, and the provider's answer
back into OpenAI's chat-completions wire format plus token usage, so no other part of the
gateway parses provider JSON.
"""
