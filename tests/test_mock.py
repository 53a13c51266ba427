"""The mock provider (DESIGN §4): OpenAI-shaped chat with usage, SSE, the generic endpoint,
every x-mock-* header, and its counters."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from tests.conftest import wait_for

CHAT = "/v1/chat/completions"


async def post(http, mock, path=CHAT, body=None, **headers):
    async with http.post(mock.url + path, json=body if body is not None else {"model": "m1"},
                         headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_chat_completion_is_openai_shaped(http, mock_provider):
    """A chat completion has choices, the requested model and usage tokens."""
    status, headers, raw = await post(http, mock_provider, body={"model": "gpt-x", "messages": []})
    body = orjson.loads(raw)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body["object"] == "chat.completion" and body["model"] == "gpt-x"
    assert body["choices"][0]["message"]["role"] == "assistant"
    u = body["usage"]
    assert u["prompt_tokens"] > 0 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


async def test_sse_stream_with_usage_chunk(http, mock_provider):
    """``stream: true`` answers SSE: content chunks, a usage chunk when asked, then [DONE]."""
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    status, headers, raw = await post(http, mock_provider, body=body,
                                      **{"x-mock-chunks": "3", "x-mock-output-tokens": "42"})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    datas = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert datas[-1] == b"[DONE]"
    chunks = [orjson.loads(d) for d in datas[:-1]]
    assert [c["choices"][0]["delta"]["content"] for c in chunks[:3]] == ["word0 ", "word1 ", "word2 "]
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["completion_tokens"] == 42
    assert mock_provider.mock.streams == 1


async def test_stream_without_usage(http, mock_provider):
    """``x-mock-usage: none`` leaves the usage chunk (and buffered usage) out."""
    body = {"stream": True, "stream_options": {"include_usage": True}}
    _, _, raw = await post(http, mock_provider, body=body, **{"x-mock-usage": "none"})
    assert b'"usage"' not in raw
    _, _, raw = await post(http, mock_provider, **{"x-mock-usage": "none"})
    assert "usage" not in orjson.loads(raw)


async def test_status_retry_after_and_error_code(http, mock_provider):
    """``x-mock-status`` answers an OpenAI-style error, with Retry-After and code if asked."""
    status, headers, raw = await post(http, mock_provider, **{
        "x-mock-status": "429", "x-mock-retry-after": "7", "x-mock-error-code": "insufficient_quota"})
    assert status == 429 and headers["Retry-After"] == "7"
    err = orjson.loads(raw)["error"]
    assert err["code"] == "insufficient_quota" and err["type"] == "mock_error"
    assert mock_provider.mock.by_status[429] == 1


async def test_redirect_status(http, mock_provider):
    """A 3xx ``x-mock-status`` is a redirect to ``x-mock-location``."""
    async with http.post(mock_provider.url + CHAT, allow_redirects=False, headers={
            "x-mock-status": "307", "x-mock-location": "http://elsewhere/x"}) as resp:
        assert resp.status == 307 and resp.headers["location"] == "http://elsewhere/x"


async def test_delay(http, mock_provider):
    """``x-mock-delay`` waits before the response headers."""
    t0 = time.monotonic()
    status, _, _ = await post(http, mock_provider, **{"x-mock-delay": "200ms"})
    assert status == 200 and time.monotonic() - t0 >= 0.2


async def test_chunk_delay_spaces_the_chunks(http, mock_provider):
    """``x-mock-chunk-delay`` spaces the SSE chunks out in time."""
    t0 = time.monotonic()
    async with http.post(mock_provider.url + CHAT, json={"stream": True},
                         headers={"x-mock-chunk-delay": "100ms", "x-mock-chunks": "4"}) as resp:
        first = await resp.content.readany()
        t_first = time.monotonic() - t0
        await resp.read()
    assert b"word0" in first and time.monotonic() - t0 - t_first >= 0.25


async def test_generic_endpoint_confidence(http, mock_provider):
    """``/v1/generic`` answers JSON with ``confidence`` (default 0.92, or the header's)."""
    _, _, raw = await post(http, mock_provider, "/v1/generic", {"barcode": "123"})
    body = orjson.loads(raw)
    assert body["confidence"] == 0.92 and body["barcode"] == "123" and body["handwritten"] is False
    _, _, raw = await post(http, mock_provider, "/v1/generic", {}, **{
        "x-mock-confidence": "0.4", "x-mock-handwritten": "true"})
    body = orjson.loads(raw)
    assert body["confidence"] == 0.4 and body["handwritten"] is True


async def test_other_shapes(http, mock_provider):
    """Anthropic- and Gemini-shaped endpoints carry their own usage fields."""
    _, _, raw = await post(http, mock_provider, "/v1/messages", {"model": "claude-x"})
    body = orjson.loads(raw)
    assert body["type"] == "message" and body["usage"]["output_tokens"] > 0
    _, _, raw = await post(http, mock_provider, "/v1beta/models/gem-1:generateContent", {})
    body = orjson.loads(raw)
    assert body["modelVersion"] == "gem-1" and body["usageMetadata"]["totalTokenCount"] > 0


async def test_model_and_output_tokens(http, mock_provider):
    """``x-mock-model`` names the answering model; ``x-mock-output-tokens`` sets usage."""
    _, _, raw = await post(http, mock_provider, **{"x-mock-model": "other",
                                                   "x-mock-output-tokens": "9"})
    body = orjson.loads(raw)
    assert body["model"] == "other" and body["usage"]["completion_tokens"] == 9


async def test_malformed_body(http, mock_provider):
    """``x-mock-body: malformed`` is a 200 whose JSON body does not parse."""
    status, _, raw = await post(http, mock_provider, **{"x-mock-body": "malformed"})
    assert status == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)


async def test_drop_headers_closes_without_response(http, mock_provider):
    """``x-mock-drop: headers`` closes the connection before any response."""
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(http, mock_provider, **{"x-mock-drop": "headers"})
    assert mock_provider.mock.cancelled == 0  # the mock's own drop is not a client hang-up


async def test_drop_mid_stream(http, mock_provider):
    """``x-mock-drop: mid-stream`` breaks the stream after its first chunks (no [DONE])."""
    async with http.post(mock_provider.url + CHAT, json={"stream": True},
                         headers={"x-mock-drop": "mid-stream"}) as resp:
        got = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_any():
                got += chunk
    assert b"word0" in got and b"[DONE]" not in got


async def test_fail_first_per_key(http, mock_provider):
    """``x-mock-fail-first: N`` fails the first N calls of each ``x-mock-key``, then succeeds."""
    statuses = []
    for key in ("a", "a", "a", "b"):
        status, _, _ = await post(http, mock_provider, **{"x-mock-fail-first": "2",
                                                          "x-mock-key": key})
        statuses.append(status)
    assert statuses == [503, 503, 200, 503]
    status, _, _ = await post(http, mock_provider, **{"x-mock-fail-first": "1", "x-mock-key": "c",
                                                      "x-mock-status": "429"})
    assert status == 429


@pytest.mark.parametrize(("name", "value"), [
    ("x-mock-status", "abc"), ("x-mock-delay", "soon"), ("x-mock-chunks", "0"),
    ("x-mock-fail-first", "-1"), ("x-mock-confidence", "high"), ("x-mock-drop", "later"),
])
async def test_bad_mock_header_is_400(http, mock_provider, name, value):
    """A malformed x-mock-* value is a clear 400, not a crash half-way."""
    status, _, raw = await post(http, mock_provider, **{name: value})
    assert status == 400 and orjson.loads(raw)["error"]["type"] == "mock_bad_header"
    assert name in orjson.loads(raw)["error"]["message"]


async def test_stats_requests_and_reset(http, mock_provider):
    """/mock/stats counts calls by path, status and key; /mock/requests shows what arrived;
    /mock/reset clears both."""
    await post(http, mock_provider, **{"x-mock-key": "k"})
    await post(http, mock_provider, "/v1/generic?q=1", {}, **{"x-mock-status": "500"})
    async with http.get(mock_provider.url + "/mock/stats") as resp:
        stats = await resp.json()
    assert stats["calls"] == 2 and stats["by_path"] == {CHAT: 1, "/v1/generic": 1}
    assert stats["by_status"] == {"200": 1, "500": 1} and stats["by_key"]["k"] == 1
    assert stats["tokens"]["input"] > 0 and stats["cancelled"] == 0
    async with http.get(mock_provider.url + "/mock/requests") as resp:
        recent = await resp.json()
    assert recent[1]["raw_query"] == "q=1" and recent[0]["headers"]["x-mock-key"] == "k"
    async with http.post(mock_provider.url + "/mock/reset") as resp:
        assert resp.status == 200
    async with http.get(mock_provider.url + "/mock/stats") as resp:
        assert (await resp.json())["calls"] == 0


async def test_cancelled_counts_callers_that_hang_up(mock_provider):
    """A caller that goes away while the mock is still working is counted in ``cancelled``."""
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(mock_provider.url + CHAT,
                                                headers={"x-mock-delay": "5s"}))
        await wait_for(lambda: mock_provider.mock.calls == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await wait_for(lambda: mock_provider.mock.cancelled == 1)


async def test_mock_cli_serves(tmp_path):
    """``resilience-proxy mock --listen`` serves the same mock as a process."""
    import subprocess
    import sys

    from tests.conftest import free_port

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "mock", "--listen", f"127.0.0.1:{port}",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with session.post(f"http://127.0.0.1:{port}{CHAT}", json={}) as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
