"""Malformed and hostile HTTP over raw sockets (issue #10): every case is refused with a 4xx
(the connection closed where HTTP requires it), reaches no upstream, is logged and counted
once, and the proxy keeps serving; hostile bodies cannot crash or stall the body-reading
policies; client-controlled strings cannot forge or colour a log line."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from tests.conftest import access_lines
from tests.hardening_support import CliProxy, exchange, metric

CONFIG = """
version: 1
server: {{header_read_timeout: {hrt}, max_request_body: 64KiB, max_header_size: 4KiB}}
providers:
  p1: {{url: "{mock}", format: openai, pricing: {{"*": {{input: 1, output: 1}}}}}}
budgets:
  daily: {{window: day, limit_usd: 1000, thresholds: [{{at: 1.0, action: block}}]}}
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions, methods: [POST]}}
    tiers: [{{provider: p1, model: gpt-x}}]
    redact: [email, phone, kr_rrn, card_number]
    cache: {{ttl: 60s}}
    budgets: [daily]
    canary: {{weight: 50, hash_on: "header:x-user", variant: {{tiers: [{{provider: p1}}]}}}}
  - name: plain
    match: {{path_prefix: /v1/plain}}
    provider: p1
"""

GOOD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
#: a string that must never be echoed back (aiohttp's own error page quoted request bytes)
MARK = b"sk-CLIENT-SECRET-77"

MALFORMED = {
    "cl_and_te": b"POST /v1/plain HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                 b"Transfer-Encoding: chunked\r\nX-K: " + MARK + b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "duplicate_cl": b"POST /v1/plain HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                    b"Content-Length: 3\r\n\r\n{}",
    "cl_list": b"POST /v1/plain HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\n\r\n{}",
    "cl_negative": b"POST /v1/plain HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "te_unknown": b"POST /v1/plain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
    "te_twice": b"POST /v1/plain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
                b"0\r\n\r\n",
    "bad_chunk": b"POST /v1/plain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"zz\r\n" + MARK + b"\r\n0\r\n\r\n",
    "bare_lf": b"POST /v1/plain HTTP/1.1\nHost: x\nAuthorization: " + MARK + b"\n\n",
    "cr_in_value": b"GET /v1/plain HTTP/1.1\r\nHost: x\r\nx-request-id: a\rb" + MARK + b"\r\n\r\n",
    "obs_fold": b"GET /v1/plain HTTP/1.1\r\nHost: x\r\nX-A: a\r\n " + MARK + b"\r\n\r\n",
    "space_before_colon": b"GET /v1/plain HTTP/1.1\r\nHost: x\r\nX-A : " + MARK + b"\r\n\r\n",
    "huge_header": b"GET /v1/plain HTTP/1.1\r\nHost: x\r\nAuthorization: " + MARK + b"A" * 9000
                   + b"\r\n\r\n",
    "huge_target": b"GET /v1/plain/" + MARK + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "too_many_headers": b"GET /v1/plain HTTP/1.1\r\nHost: x\r\n"
                        + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
    "nul_in_path": b"GET /v1/plain/\x00" + MARK + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "esc_in_value": b"GET /v1/plain HTTP/1.1\r\nHost: x\r\nx-prompt-version: \x1b[31m" + MARK
                    + b"\r\n\r\n",
    "utf8_in_path": b"GET /v1/plain/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    "no_host": b"GET /v1/plain HTTP/1.1\r\n\r\n",
    "two_hosts": b"GET /v1/plain HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "lowercase_method": b"get /v1/plain HTTP/1.1\r\nHost: x\r\n\r\n",
    "tls_to_plain_port": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + MARK,
    "userinfo_target": b"POST @127.0.0.1:1/v1/plain HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.fixture
async def proxy(mock_provider, make_proxy):
    return await make_proxy(CONFIG.format(mock=mock_provider.url, hrt="10s"))


async def served(proxy) -> None:
    answer = await exchange(proxy.data_url, GOOD)
    assert answer.status == 200, answer


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_request_refused(case, proxy, mock_provider, logs):
    """A malformed request gets the proxy's JSON 400 (nothing of it echoed, no aiohttp
    banner), its connection closed, no upstream call, one access line and one count on
    route _none; the proxy then serves a good request."""
    answer = await exchange(proxy.data_url, MALFORMED[case])
    assert answer.status == 400, answer
    assert answer.closed
    err = orjson.loads(answer.body)["error"]
    assert err["type"] == "bad_request" and err["route"] is None
    assert MARK not in answer.body and b"\\x" not in answer.body
    assert answer.headers["server"] == "resilience-proxy"
    assert mock_provider.mock.calls == 0
    lines = access_lines(logs)
    assert len(lines) == 1
    assert lines[0]["route"] == "_none" and lines[0]["outcome"] == "bad_request"
    assert lines[0]["status"] == 400
    assert MARK.decode() not in repr(logs)
    text = proxy.deps.metrics.render().decode()
    assert metric(text, "rp_requests_total", route="_none", outcome="bad_request") == 1
    await served(proxy)
    assert mock_provider.mock.calls == 1


async def test_slowloris_head_is_cut_and_counted(mock_provider, make_proxy, logs):
    """A head trickled a byte at a time is cut at header_read_timeout (the timer does not
    restart per byte): 408, connection closed, one access line (outcome header_timeout) and
    one count; no upstream call."""
    proxy = await make_proxy(CONFIG.format(mock=mock_provider.url, hrt="300ms"))
    host, port = proxy.data_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = b"POST /v1/plain HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    t0 = time.monotonic()
    raw = b""
    for byte in head:
        writer.write(bytes([byte]))
        await asyncio.sleep(0.02)
        if reader.at_eof() or writer.is_closing():
            break
        try:
            raw += await asyncio.wait_for(reader.read(4096), 0.001)
        except TimeoutError:
            pass
        if raw:
            break
    async with asyncio.timeout(5):
        raw += await reader.read()
    writer.close()
    assert raw.startswith(b"HTTP/1.1 408")
    assert b"server: resilience-proxy" in raw
    assert time.monotonic() - t0 < 3.0  # 200 bytes at 20 ms would take 4 s: it was cut
    assert mock_provider.mock.calls == 0
    lines = access_lines(logs)
    assert [(x["route"], x["status"], x["outcome"]) for x in lines] == [
        ("_none", 408, "header_timeout")]
    text = proxy.deps.metrics.render().decode()
    assert metric(text, "rp_requests_total", route="_none", outcome="header_timeout") == 1
    await served(proxy)


async def test_keepalive_idle_is_not_a_slow_head(mock_provider, make_proxy):
    """An idle keep-alive connection between requests is not cut by the head timer."""
    proxy = await make_proxy(CONFIG.format(mock=mock_provider.url, hrt="200ms"))
    host, port = proxy.data_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = (b"POST /v1/plain HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    for _ in range(2):
        writer.write(request)
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.5)  # idle longer than header_read_timeout
    writer.close()
    assert mock_provider.mock.calls == 2


@pytest.mark.parametrize("how", ["content_length", "chunked", "expect_100"])
async def test_huge_body_413_before_upstream(how, proxy, mock_provider, logs):
    """A body over max_request_body is refused with 413 before the upstream is touched
    (with Content-Length, without it, and with Expect: 100-continue, which gets no 100
    first), the connection is closed, and the proxy keeps serving."""
    head = b"POST /v1/plain HTTP/1.1\r\nHost: x\r\n"
    if how == "content_length":
        data = head + b"Content-Length: 1000000\r\n\r\n" + b"a" * 70000
    elif how == "chunked":
        data = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
            b"4000\r\n" + b"a" * 0x4000 + b"\r\n" for _ in range(5))
    else:
        data = head + b"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
    host, port = proxy.data_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    async with asyncio.timeout(5):
        first = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert first.startswith(b"HTTP/1.1 413"), first
    assert b"connection: close" in first.lower()
    assert mock_provider.mock.calls == 0
    assert [x["outcome"] for x in access_lines(logs)] == ["body_too_large"]
    await served(proxy)


async def test_invalid_utf8_in_headers_and_body(proxy, mock_provider, logs):
    """Bytes that are not UTF-8 in a header value or in a JSON body's string neither crash
    nor lose the request: it is served and logged once."""
    bad_header = (b"POST /v1/plain HTTP/1.1\r\nHost: x\r\nx-prompt-version: v\xff\xfe1\r\n"
                  b"x-user: \xc3\x28\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert (await exchange(proxy.data_url, bad_header)).status == 200
    body = b'{"model": "m", "messages": [{"content": "\xff\xfe a@b.com"}]}'
    bad_body = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(body), body))
    answer = await exchange(proxy.data_url, bad_body)
    assert answer.status == 200  # not JSON to the proxy: passed as bytes, not a crash
    assert mock_provider.mock.calls == 2
    assert [x["status"] for x in access_lines(logs)] == [200, 200]


def nested(depth: int, leaf: bytes = b'"a@b.com"') -> bytes:
    return b'{"model": "m", "messages": ' + b"[" * depth + leaf + b"]" * depth + b"}"


@pytest.mark.parametrize("depth", [300, 1000])
async def test_deep_json_is_400_for_body_policies(depth, proxy, mock_provider, http, logs):
    """JSON nested deeper than the proxy can write back (redact, cache key, budget estimate,
    canary, the tier's model rewrite all read it) is a 400 bad_request, not a 500, with no
    upstream call; the proxy keeps serving."""
    async with http.post(proxy.data_url + "/v1/chat/completions", data=nested(depth),
                         headers={"content-type": "application/json", "x-user": "u1"}) as resp:
        assert resp.status == 400
        err = (await resp.json())["error"]
    assert err["type"] == "bad_request" and "nested deeper" in err["message"]
    assert mock_provider.mock.calls == 0
    assert [x["outcome"] for x in access_lines(logs)] == ["bad_request"]
    async with http.post(proxy.data_url + "/v1/chat/completions",
                         data=nested(250), headers={"x-user": "u1"}) as resp:
        assert resp.status == 200  # 250 levels is still JSON the policies handle
    assert mock_provider.mock.calls == 1


async def test_json_past_orjson_depth_limit_passes_as_bytes(mock_provider, make_proxy, http):
    """100k nested '[' is past orjson's parse limit (1024, verified here): not JSON to the
    proxy, so it goes upstream as bytes, untouched, promptly."""
    proxy = await make_proxy(CONFIG.format(mock=mock_provider.url, hrt="10s").replace(
        "64KiB", "2MiB"))
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(b"[" * 1025 + b"]" * 1025)
    body = nested(100_000)
    t0 = time.monotonic()
    async with http.post(proxy.data_url + "/v1/chat/completions", data=body,
                         headers={"x-user": "u1"}) as resp:
        assert resp.status == 200
    assert time.monotonic() - t0 < 10  # generous: it must not hang
    assert mock_provider.mock.calls == 1
    sent = (await (await http.get(mock_provider.url + "/mock/requests")).json())[-1]["body"]
    assert sent.encode() == body


@pytest.mark.parametrize("text", ["1 " * 300_000, "1-" * 300_000, "a@" * 300_000,
                                  "a@" + "a." * 300_000, "x" * 600_000 + "@",
                                  "010-1234-567 " * 46_000, "+1 " * 200_000])
async def test_redaction_of_hostile_strings_is_bounded(text, mock_provider, make_proxy, http):
    """Half-megabyte strings built to make the redaction patterns work hard are answered
    promptly (no catastrophic backtracking; the card check is linear), and the proxy
    answers another request meanwhile."""
    proxy = await make_proxy(CONFIG.format(mock=mock_provider.url, hrt="10s").replace(
        "64KiB", "2MiB"))
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
    t0 = time.monotonic()
    async with http.post(proxy.data_url + "/v1/chat/completions", data=body,
                         headers={"content-type": "application/json"}) as resp:
        assert resp.status == 200
    assert time.monotonic() - t0 < 5  # ~0.3 s here; the card check alone took 7 s before
    async with http.post(proxy.data_url + "/v1/plain") as resp:
        assert resp.status == 200


async def test_log_injection_is_escaped(mock_provider, tmp_path):
    """CR/LF and ANSI escapes that clients manage to get into a path, a request id or a
    prompt version come out escaped in the real process's JSON log: every stdout line is one
    JSON object, no raw ESC byte, one access line per request."""
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(CONFIG.format(mock=mock_provider.url, hrt="10s"))
    proc = CliProxy(cfg)
    try:
        await proc.ready()
        requests = [
            b"POST /v1/plain/a%0d%0a%1b[31m{\"event\":\"forged\"} HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n",
            b"POST /v1/plain HTTP/1.1\r\nHost: x\r\nx-request-id: a%0d%0a\"}\r\n"
            b"x-prompt-version: v1\", \"outcome\": \"forged\xff\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n",
            b"POST /v1/plain HTTP/1.1\r\nHost: x\r\nx-prompt-version: \x1b[2J\r\n\r\n",
            b"POST /v1/plain\x1b[31m HTTP/1.1\r\nHost: x\r\n\r\n",
        ]
        statuses = [(await exchange(proc.url, r)).status for r in requests]
        assert statuses == [404, 200, 400, 400]  # the provider has no such path: its 404
        await asyncio.sleep(0.3)
    finally:
        proc.proc.terminate()
        await proc.wait(15)
    out = proc.output()
    assert b"\x1b" not in out
    lines = [line for line in out.splitlines() if line.startswith(b"{")]
    events = [orjson.loads(line) for line in lines]  # every line parses: none was split
    access = [e for e in events if e["event"] == "request"]
    assert len(access) == 4 and all(e.get("outcome") != "forged" for e in access)
    assert not any(e["event"] == "forged" for e in events)
    assert access[0]["path"].startswith("/v1/plain/a%0d%0a%1b")
    assert access[1]["prompt_version"] == 'v1", "outcome": "forged\\udcff'
    assert access[1]["request_id"] != 'a%0d%0a"}'  # not a valid id: replaced


async def test_no_aiohttp_banner(proxy, mock_provider, http):
    """Neither plane shows aiohttp's Server banner: relayed answers, proxy errors and admin
    answers say server: resilience-proxy (the provider's own banner is overwritten)."""
    answers = []
    async with http.post(proxy.data_url + "/v1/plain") as resp:
        answers.append(resp.headers.get("server"))  # relayed (the mock is aiohttp too)
    async with http.get(proxy.data_url + "/nowhere") as resp:
        answers.append(resp.headers.get("server"))
    async with http.get(proxy.admin_url + "/metrics") as resp:
        answers.append(resp.headers.get("server"))
    async with http.get(proxy.admin_url + "/admin/nowhere") as resp:
        answers.append(resp.headers.get("server"))
    assert answers == ["resilience-proxy"] * 4
