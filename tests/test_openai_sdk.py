"""The official ``openai`` Python SDK as a real client of the proxy (its retries off)."""

from __future__ import annotations

import openai
import pytest

PROVIDER_KEY = "sk-provider-side-key-0000"

CONFIG = """
version: 1
providers:
  mock: {{url: "{mock}", format: openai, headers: {{authorization: "Bearer {key}"}}}}
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions, methods: [POST]}}
    provider: mock
    timeout: {{attempt: 1s, total: 10s}}
"""


@pytest.fixture
async def client(mock_provider, make_proxy):
    proxy = await make_proxy(CONFIG.format(mock=mock_provider.url, key=PROVIDER_KEY))
    sdk = openai.AsyncOpenAI(base_url=proxy.data_url + "/v1", api_key="sk-app-key-not-sent",
                             max_retries=0, timeout=10)
    yield sdk
    await sdk.close()


async def test_chat_completion_through_the_proxy(client, mock_provider):
    """A normal completion: the SDK parses the reply; the provider saw the proxy's key."""
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-request-id": "sdk-1"})
    completion = raw.parse()
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.content.startswith("This is a mock completion")
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert raw.headers["x-rp-route"] == "chat" and raw.headers["x-request-id"] == "sdk-1"
    seen = mock_provider.mock.recent[-1]["headers"]
    assert seen["authorization"] == f"Bearer {PROVIDER_KEY}"


async def test_streaming_completion_through_the_proxy(client):
    """A streamed completion: the SDK reads every delta and the final usage chunk."""
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == "word0 word1 word2 word3 word4 "
    assert usage is not None and usage.completion_tokens > 0


async def test_provider_error_reaches_the_sdk_as_its_error(client):
    """A provider 429 is relayed so the SDK raises its own RateLimitError."""
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(
            model="m", messages=[], extra_headers={"x-mock-status": "429"})
    assert info.value.status_code == 429


async def test_proxy_timeout_reaches_the_sdk_as_504(client):
    """A proxy timeout is a 504 the SDK surfaces as an InternalServerError with our body."""
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(
            model="m", messages=[], extra_headers={"x-mock-delay": "3s"}, timeout=20)
    assert info.value.status_code == 504
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "timeout"
