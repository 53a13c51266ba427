"""The data plane's own HTTP/1.1 server (``proxy/protocol.py`` on llhttp), on the wire: what
it adds beyond parsing (covered in test_malformed_http.py) — pipelining, HEAD, HTTP/1.0
framing, keep-alive timers, heads and bodies in pieces, ``Expect: 100-continue``, chunked
request bodies, CONNECT / Upgrade, absolute-form targets with a query, a client leaving
mid-stream, and the ``server`` / ``date`` headers on every answer. Real proxy, real mock
provider, raw sockets on loopback; every read is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import orjson
import pytest

from tests.conftest import access_lines, wait_for

CONFIG = """
version: 1
server: {{keepalive_timeout: {ka}, header_read_timeout: 2s, max_request_body: 64KiB}}
providers:
  p1: {{url: "{mock}", format: openai}}
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions, methods: [POST]}}
    provider: p1
  - name: plain
    match: {{path_prefix: /v1/plain}}
    provider: p1
"""

STREAM = orjson.dumps({"model": "m1", "stream": True, "messages": []})
#: bounds every single read: a hang fails the test instead of stalling the suite
READ_S = 3.0


@dataclass
class Reply:
    status: int
    head: bytes
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


async def start(make_proxy, mock_provider, ka: str = "75s"):
    return await make_proxy(CONFIG.format(mock=mock_provider.url, ka=ka))


@pytest.fixture
async def proxy(mock_provider, make_proxy):
    return await start(make_proxy, mock_provider)


async def connect(proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = proxy.data_url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


def parse_head(head: bytes) -> tuple[int, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip().lower(), value.strip()))
    return int(lines[0].split(" ")[1]), headers


async def read_reply(reader: asyncio.StreamReader, *, method: str = "POST",
                     skip_interim: bool = True, within: float = READ_S) -> Reply:
    """One answer: framed by content-length, chunked, or the end of the connection."""
    async with asyncio.timeout(within):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            status, headers = parse_head(head)
            if not (skip_interim and 100 <= status < 200):
                break
        reply = Reply(status, head, headers, b"")
        te = reply.get("transfer-encoding")
        length = reply.get("content-length")
        if method == "HEAD" or status in (204, 304) or status < 200:
            return reply
        if te is not None:
            assert te == "chunked", head
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                data = await reader.readexactly(size + 2)
                assert data[-2:] == b"\r\n"
                if size == 0:
                    break
                parts.append(data[:-2])
            reply.body = b"".join(parts)
        elif length is not None:
            reply.body = await reader.readexactly(int(length))
        else:
            reply.body = await reader.read()  # close-delimited
        return reply


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server closes the connection within ``seconds`` (nothing else sent)."""
    try:
        async with asyncio.timeout(seconds):
            return await reader.read(1) == b""
    except TimeoutError:
        return False


def post(path: str, body: bytes = b"{}", extra: str = "", version: str = "1.1") -> bytes:
    host = "Host: x\r\n" if version == "1.1" else ""
    return (f"POST {path} HTTP/{version}\r\n{host}Content-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def mock_requests(http, mock_provider) -> list[dict]:
    async with http.get(mock_provider.url + "/mock/requests") as resp:
        return await resp.json()


# ------------------------------------------------------------------------- pipelining


async def test_pipelined_requests_answered_in_order(proxy, mock_provider, http, logs):
    """Three complete requests in one socket write get three answers on that connection, in
    the order sent (each with its own request id), three upstream calls in that order, and
    three access-log lines; the last one's ``Connection: close`` closes the connection."""
    data = (post("/v1/plain/a", b'{"n": 1}', "x-request-id: pipe-1\r\n")
            + post("/v1/plain/b", b'{"n": 2}', "x-request-id: pipe-2\r\n")
            + post("/v1/plain/c", b'{"n": 3}', "x-request-id: pipe-3\r\nConnection: close\r\n"))
    reader, writer = await connect(proxy)
    try:
        writer.write(data)  # one write: the three requests arrive together
        replies = [await read_reply(reader) for _ in range(3)]
        assert await closed_within(reader, READ_S)
    finally:
        writer.close()
    assert [r.status for r in replies] == [200, 200, 200]
    assert [r.get("x-request-id") for r in replies] == ["pipe-1", "pipe-2", "pipe-3"]
    assert [r.get("connection") for r in replies] == [None, None, "close"]
    received = await mock_requests(http, mock_provider)
    assert [(r["path"], r["body"]) for r in received] == [
        ("/v1/plain/a", '{"n": 1}'), ("/v1/plain/b", '{"n": 2}'), ("/v1/plain/c", '{"n": 3}')]
    await wait_for(lambda: len(access_lines(logs)) == 3, timeout=2)
    lines = access_lines(logs)
    assert [(x["request_id"], x["path"], x["status"]) for x in lines] == [
        ("pipe-1", "/v1/plain/a", 200), ("pipe-2", "/v1/plain/b", 200),
        ("pipe-3", "/v1/plain/c", 200)]


async def test_deep_pipeline_pauses_and_resumes_reading(proxy, mock_provider):
    """24 pipelined requests of ~24 KB in one write (~580 KB: several socket reads, and
    more than PIPELINE_MAX queued, so reading pauses and must resume) are all answered, in
    order, on the one connection, each body intact."""
    n = 24
    bodies = [orjson.dumps({"i": i, "pad": "p" * 24_000}) for i in range(n)]
    reader, writer = await connect(proxy)
    try:
        writer.write(b"".join(post(f"/v1/plain/{i}", bodies[i], f"x-request-id: deep-{i}\r\n")
                              for i in range(n)))
        replies = [await read_reply(reader) for _ in range(n)]
    finally:
        writer.close()
    assert [r.get("x-request-id") for r in replies] == [f"deep-{i}" for i in range(n)]
    received = mock_provider.mock.recent
    assert [r["path"] for r in received] == [f"/v1/plain/{i}" for i in range(n)]
    assert [r["body"].encode() for r in received] == bodies


async def test_connection_close_ends_the_pipeline(proxy, mock_provider):
    """A request saying ``Connection: close`` with another pipelined behind it in the same
    write: the first is answered (``connection: close``), the connection closed, and what
    followed never reaches the upstream."""
    data = post("/v1/plain/first", extra="Connection: close\r\n") + post("/v1/plain/second")
    reader, writer = await connect(proxy)
    try:
        writer.write(data)
        first = await read_reply(reader, within=1.0)
        assert await closed_within(reader, 1.0)
    finally:
        writer.close()
    assert first.status == 200 and first.get("connection") == "close"
    assert [r["path"] for r in mock_provider.mock.recent] == ["/v1/plain/first"]


async def test_good_then_malformed_in_one_write(proxy, mock_provider, logs):
    """A good request followed, in the same write, by a malformed one: the good one is
    answered first, then the proxy's JSON 400, and the connection closes (the module
    docstring: a parse error is answered once the requests before it are answered)."""
    data = (post("/v1/plain/good", extra="x-request-id: good-1\r\n")
            + b"GET /v1/plain HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n")
    reader, writer = await connect(proxy)
    try:
        writer.write(data)
        good = await read_reply(reader, within=1.0)
        bad = await read_reply(reader, within=1.0)
        assert await closed_within(reader, 1.0)
    finally:
        writer.close()
    assert (good.status, good.get("x-request-id")) == (200, "good-1")
    assert bad.status == 400 and orjson.loads(bad.body)["error"]["route"] is None
    assert mock_provider.mock.calls == 1
    await wait_for(lambda: len(access_lines(logs)) == 2, timeout=1)
    assert [(x["route"], x["status"]) for x in access_lines(logs)] == [
        ("plain", 200), ("_none", 400)]


# ------------------------------------------------------------------------- HEAD


async def test_head_has_length_but_no_body(proxy, mock_provider):
    """HEAD answers carry ``content-length`` and no body bytes (a relayed one and the proxy's
    own 404): the next request on the same keep-alive connection parses cleanly."""
    reader, writer = await connect(proxy)
    try:
        writer.write(b"HEAD /v1/plain/h HTTP/1.1\r\nHost: x\r\n\r\n")
        relayed = await read_reply(reader, method="HEAD")
        writer.write(b"HEAD /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        own = await read_reply(reader, method="HEAD")
        writer.write(post("/v1/plain/after"))
        after = await read_reply(reader)
    finally:
        writer.close()
    assert relayed.status == 200 and relayed.get("content-length") is not None
    assert own.status == 404 and int(own.get("content-length")) > 0  # the JSON it would send
    # had any body bytes followed a HEAD answer, this would not start with a status line
    assert after.status == 200, after.head
    assert orjson.loads(after.body)["text"] == "MOCK RESULT"
    assert [r["method"] for r in mock_provider.mock.recent] == ["HEAD", "POST"]


async def test_head_content_length_matches_get(proxy, mock_provider):
    """The ``content-length`` of a relayed HEAD answer is the one a GET of the same resource
    gets (or is absent), never a made-up 0."""
    reader, writer = await connect(proxy)
    try:
        writer.write(b"GET /v1/plain/h HTTP/1.1\r\nHost: x\r\n\r\n")
        got = await read_reply(reader, method="GET")
        writer.write(b"HEAD /v1/plain/h HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await read_reply(reader, method="HEAD")
    finally:
        writer.close()
    assert got.status == head.status == 200
    assert len(got.body) > 0
    assert head.get("content-length") in (None, str(len(got.body))), head.head


# ------------------------------------------------------------------------- HTTP/1.0


async def test_http10_stream_is_close_delimited(proxy, mock_provider):
    """An HTTP/1.0 client cannot take chunked framing: a streamed (SSE) answer has no
    ``transfer-encoding`` and no ``content-length``, says ``connection: close``, and its body
    (every ``data:`` event, raw, no chunk sizes) ends when the connection closes."""
    reader, writer = await connect(proxy)
    try:
        writer.write(post("/v1/chat/completions", STREAM, "x-mock-chunks: 3\r\n", version="1.0"))
        async with asyncio.timeout(READ_S):
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.read()  # returns only once the proxy closes the connection
    finally:
        writer.close()
    status, headers = parse_head(head)
    names = [k for k, _ in headers]
    assert status == 200, head
    assert head.startswith(b"HTTP/1.1 200")
    assert "transfer-encoding" not in names and "content-length" not in names
    assert dict(headers)["connection"] == "close"
    assert dict(headers)["content-type"].startswith("text/event-stream")
    events = [e for e in body.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events), body
    assert [orjson.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:3]] == [
        "word0 ", "word1 ", "word2 "]
    assert events[-1] == b"data: [DONE]"


async def test_http10_plain_reply_closes_unless_keep_alive(proxy, mock_provider):
    """HTTP/1.0 without keep-alive: ``connection: close`` and the socket closes after the
    answer. With ``Connection: keep-alive`` the answer says so and the connection serves a
    second request."""
    reader, writer = await connect(proxy)
    try:
        writer.write(post("/v1/plain/one", version="1.0"))
        first = await read_reply(reader)
        assert await closed_within(reader, READ_S)
    finally:
        writer.close()
    assert first.status == 200 and first.get("connection") == "close"
    assert first.get("content-length") == str(len(first.body))

    reader, writer = await connect(proxy)
    try:
        writer.write(post("/v1/plain/ka1", extra="Connection: keep-alive\r\n", version="1.0"))
        one = await read_reply(reader)
        writer.write(post("/v1/plain/ka2", version="1.0"))  # no keep-alive this time
        two = await read_reply(reader)
        assert await closed_within(reader, READ_S)
    finally:
        writer.close()
    assert (one.status, one.get("connection")) == (200, "keep-alive")
    assert (two.status, two.get("connection")) == (200, "close")
    assert mock_provider.mock.calls == 3


# ------------------------------------------------------------------------- keep-alive


async def test_keepalive_timeout_closes_an_idle_connection(mock_provider, make_proxy):
    """Two requests on one HTTP/1.1 connection are both answered; then, idle, the connection
    is closed after about ``server.keepalive_timeout`` (300 ms), not before."""
    proxy = await start(make_proxy, mock_provider, ka="300ms")
    reader, writer = await connect(proxy)
    try:
        for i in range(2):
            writer.write(post(f"/v1/plain/{i}"))
            reply = await read_reply(reader)
            assert reply.status == 200 and reply.get("connection") is None
        t0 = time.monotonic()
        assert await closed_within(reader, 2.0)
        idle = time.monotonic() - t0
    finally:
        writer.close()
    assert 0.2 <= idle < 1.5, idle
    assert mock_provider.mock.calls == 2


async def test_keepalive_timeout_never_cuts_a_request_in_flight(mock_provider, make_proxy):
    """keepalive_timeout (200 ms) only applies between requests: a request whose upstream
    takes 500 ms, and one whose body arrives 400 ms after its head, are both answered on the
    same connection, which then idles out."""
    proxy = await start(make_proxy, mock_provider, ka="200ms")
    reader, writer = await connect(proxy)
    try:
        writer.write(post("/v1/plain/slow", extra="x-mock-delay: 500ms\r\n"))
        slow = await read_reply(reader)
        body = b'{"late": true}'
        writer.write(post("/v1/plain/late", body)[:-len(body)])
        await asyncio.sleep(0.4)
        writer.write(body)
        late = await read_reply(reader)
        assert await closed_within(reader, 2.0)
    finally:
        writer.close()
    assert slow.status == 200 and late.status == 200
    assert [(r["path"], r["body"]) for r in mock_provider.mock.recent] == [
        ("/v1/plain/slow", "{}"), ("/v1/plain/late", '{"late": true}')]


async def test_keepalive_zero_serves_one_request_per_connection(mock_provider, make_proxy):
    """``keepalive_timeout: 0`` means no keep-alive: a request is answered, with
    ``connection: close``, and the connection then closes."""
    proxy = await start(make_proxy, mock_provider, ka="0s")
    reader, writer = await connect(proxy)
    try:
        await asyncio.sleep(0.05)  # a client that sends a moment after connecting
        writer.write(post("/v1/plain/once"))
        reply = await read_reply(reader, within=1.0)
        assert await closed_within(reader, 1.0)
    finally:
        writer.close()
    assert reply.status == 200 and reply.get("connection") == "close"
    assert mock_provider.mock.calls == 1


async def test_pipelined_partial_head_gets_header_timeout(mock_provider, make_proxy, logs):
    """A complete request and the start of a second head in one write, then silence: the
    first is answered, and the stalled head gets 408 after header_read_timeout (200 ms),
    long before keepalive_timeout (1.5 s)."""
    proxy = await make_proxy(CONFIG.replace("header_read_timeout: 2s", "header_read_timeout: 200ms")
                             .format(mock=mock_provider.url, ka="1500ms"))
    reader, writer = await connect(proxy)
    try:
        writer.write(post("/v1/plain/1") + b"POST /v1/plain/2 HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        first = await read_reply(reader)
        rest = b"<nothing within 1 s>"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                rest = await reader.read()
    finally:
        writer.close()
    assert first.status == 200
    assert rest.startswith(b"HTTP/1.1 408"), rest
    assert [(x["status"], x["outcome"]) for x in access_lines(logs)] == [
        (200, "ok"), (408, "header_timeout")]


# ------------------------------------------------------------------------- pieces


async def test_head_in_pieces_and_late_body(proxy, mock_provider):
    """A head written in several small pieces (well within header_read_timeout) is served
    normally; a body sent 200 ms after its head (Content-Length) reaches the upstream
    intact."""
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 300}]})
    data = post("/v1/plain/pieces", body, "x-request-id: piecewise\r\n")
    head = data[:-len(body)]
    reader, writer = await connect(proxy)
    try:
        for i in range(0, len(head), 7):  # 7-byte pieces, splitting names, values and CRLFs
            writer.write(head[i:i + 7])
            await writer.drain()
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)
        writer.write(body[:100])
        await asyncio.sleep(0.05)
        writer.write(body[100:])
        reply = await read_reply(reader)
    finally:
        writer.close()
    assert reply.status == 200 and reply.get("x-request-id") == "piecewise"
    [received] = mock_provider.mock.recent
    assert received["path"] == "/v1/plain/pieces"
    assert received["body"].encode() == body
    assert received["headers"]["x-request-id"] == "piecewise"


# ------------------------------------------------------------------------- Expect


async def test_expect_100_continue(proxy, mock_provider):
    """``Expect: 100-continue`` with a body within the limit: ``HTTP/1.1 100 Continue``
    comes first (before any body was sent), then, once the body is sent, the final 200; the
    upstream gets the body and no ``expect`` header."""
    body = b'{"expect": "continue"}'
    reader, writer = await connect(proxy)
    try:
        writer.write(post("/v1/plain/expect", body, "Expect: 100-continue\r\n")[:-len(body)])
        async with asyncio.timeout(READ_S):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert mock_provider.mock.calls == 0
        writer.write(body)
        final = await read_reply(reader, skip_interim=False)
    finally:
        writer.close()
    assert final.status == 200
    [received] = mock_provider.mock.recent
    assert received["body"].encode() == body
    assert "expect" not in received["headers"]


# ------------------------------------------------------------------------- chunked


async def test_chunked_request_body_is_dechunked(proxy, mock_provider):
    """A chunked request body, sent as several chunks in separate writes and ended with a
    trailer, reaches the upstream de-chunked with the same bytes (no chunk framing, no
    transfer-encoding), and the connection serves the next request."""
    pieces = [b'{"model": "m", ', b'"messages": [{"role": "user", ', b'"content": "' + b"z" * 5000,
              b'"}]}']
    reader, writer = await connect(proxy)
    try:
        writer.write(b"POST /v1/plain/chunked HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            await asyncio.sleep(0.02)
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await asyncio.sleep(0.02)
        writer.write(b"0\r\nX-Trailer: t\r\n\r\n")  # a trailer section ends it
        reply = await read_reply(reader)
        writer.write(post("/v1/plain/next"))  # the connection is still in step
        after = await read_reply(reader)
    finally:
        writer.close()
    assert reply.status == 200 and after.status == 200
    received, nxt = mock_provider.mock.recent
    assert nxt["path"] == "/v1/plain/next"
    sent = b"".join(pieces)
    assert received["body"].encode() == sent
    assert "transfer-encoding" not in received["headers"]
    assert received["headers"]["content-length"] == str(len(sent))


async def test_bad_chunk_after_the_handler_started(proxy, mock_provider, logs):
    """A chunked body whose framing breaks after its head was handed to the data plane (the
    handler is waiting for the body): a JSON 400 on the route, the connection closed, no
    upstream call, one access line."""
    reader, writer = await connect(proxy)
    try:
        writer.write(b"POST /v1/plain/bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"\r\n3\r\nabc\r\n")
        await asyncio.sleep(0.1)
        writer.write(b"zz\r\nnot a chunk\r\n0\r\n\r\n")
        reply = await read_reply(reader)
        assert await closed_within(reader, READ_S)
    finally:
        writer.close()
    assert reply.status == 400 and reply.get("connection") == "close"
    err = orjson.loads(reply.body)["error"]
    assert err["type"] == "bad_request" and err["route"] == "plain"
    assert mock_provider.mock.calls == 0
    await wait_for(lambda: len(access_lines(logs)) == 1, timeout=2)
    assert [(x["route"], x["status"], x["outcome"]) for x in access_lines(logs)] == [
        ("plain", 400, "bad_request")]


# ------------------------------------------------------------------------- CONNECT, Upgrade


async def test_connect_is_refused(proxy, mock_provider, logs):
    """``CONNECT host:443``: the proxy's JSON 400 (route null), the connection closed, no
    upstream call, one access line on route _none."""
    reader, writer = await connect(proxy)
    try:
        writer.write(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
        reply = await read_reply(reader)
        assert await closed_within(reader, READ_S)
    finally:
        writer.close()
    assert reply.status == 400
    assert reply.get("content-type") == "application/json"
    err = orjson.loads(reply.body)["error"]
    assert err["type"] == "bad_request" and err["route"] is None
    assert mock_provider.mock.calls == 0
    await wait_for(lambda: len(access_lines(logs)) == 1, timeout=2)
    assert [(x["route"], x["status"]) for x in access_lines(logs)] == [("_none", 400)]


async def test_upgrade_is_answered_plainly_then_closed(proxy, mock_provider):
    """``GET`` with ``Upgrade: websocket``: answered as a plain request (the upstream sees no
    Upgrade, it is hop-by-hop), ``connection: close``, and the connection closed; what
    followed the head (a would-be second request) is never read as HTTP."""
    data = (b"GET /v1/plain/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
            b"GET /v1/plain/smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    reader, writer = await connect(proxy)
    try:
        writer.write(data)
        reply = await read_reply(reader, method="GET")
        assert await closed_within(reader, READ_S)  # and no second answer before the close
    finally:
        writer.close()
    assert reply.status == 200 and reply.get("connection") == "close"
    assert reply.get("upgrade") is None
    assert [r["path"] for r in mock_provider.mock.recent] == ["/v1/plain/ws"]
    seen = mock_provider.mock.recent[0]["headers"]
    assert "upgrade" not in seen
    assert "upgrade" not in seen.get("connection", "").lower()


# ------------------------------------------------------------------------- absolute form


async def test_absolute_form_keeps_its_query(proxy, mock_provider):
    """An absolute-form target is routed by its path only; its query string reaches the
    configured provider unchanged (the scheme and host are dropped, never followed)."""
    data = (b"POST http://evil.example/v1/plain/abs?a=1&b=2 HTTP/1.1\r\nHost: evil.example\r\n"
            b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    reader, writer = await connect(proxy)
    try:
        writer.write(data)
        reply = await read_reply(reader)
    finally:
        writer.close()
    assert reply.status == 200 and reply.get("x-rp-route") == "plain"
    [received] = mock_provider.mock.recent
    assert received["path"] == "/v1/plain/abs"
    assert received["raw_query"] == "a=1&b=2"


# ------------------------------------------------------------------------- client leaves


async def test_client_leaving_mid_stream_is_one_499(proxy, mock_provider, logs):
    """A client that closes its socket after the first SSE chunk: its handler and the
    upstream call are cancelled at once (not at the next chunk, a second later), exactly
    one access line (499 client_disconnected), and the proxy keeps serving."""
    reader, writer = await connect(proxy)
    try:
        # the mock sends its first chunk at once, the next one a second later
        writer.write(post("/v1/chat/completions", STREAM,
                          "x-mock-chunks: 3\r\nx-mock-chunk-delay: 1s\r\n"))
        async with asyncio.timeout(READ_S):
            head = await reader.readuntil(b"\r\n\r\n")
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            first = await reader.readexactly(size)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
    assert first.startswith(b"data: ") and b"word0" in first
    # cancelled at once, not found out at the next write a second later
    await wait_for(lambda: mock_provider.mock.cancelled == 1, timeout=0.5)
    await wait_for(lambda: len(access_lines(logs)) == 1, timeout=0.5)
    await asyncio.sleep(0.2)  # a second line (e.g. a late "ok") would show up by now
    lines = access_lines(logs)
    assert [(x["route"], x["status"], x["outcome"]) for x in lines] == [
        ("chat", 499, "client_disconnected")]
    reader, writer = await connect(proxy)
    try:
        writer.write(post("/v1/plain/after", extra="Connection: close\r\n"))
        after = await read_reply(reader)
    finally:
        writer.close()
    assert after.status == 200
    assert proxy.dataplane.in_flight == 0


# ------------------------------------------------------------------------- server, date


async def test_every_answer_has_one_server_and_one_date(proxy, mock_provider):
    """A relayed 200 (the mock sends its own Server and Date), a streamed 200, the proxy's
    404 no_route and a 400 malformed request each carry exactly one
    ``server: resilience-proxy`` and one ``date``."""
    raw = {
        "relayed": post("/v1/plain/x", extra="Connection: close\r\n"),
        "streamed": post("/v1/chat/completions", STREAM, "x-mock-chunks: 1\r\nConnection: close\r\n"),
        "no_route": post("/nowhere", extra="Connection: close\r\n"),
        "malformed": b"POST /v1/plain HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n",
    }
    seen = {}
    for name, data in raw.items():
        reader, writer = await connect(proxy)
        try:
            writer.write(data)
            reply = await read_reply(reader)
        finally:
            writer.close()
        seen[name] = (reply.status, reply.all("server"), len(reply.all("date")))
    assert seen == {
        "relayed": (200, ["resilience-proxy"], 1),
        "streamed": (200, ["resilience-proxy"], 1),
        "no_route": (404, ["resilience-proxy"], 1),
        "malformed": (400, ["resilience-proxy"], 1),
    }


async def test_the_providers_date_is_kept_and_its_x_rp_headers_are_not(make_proxy):
    """A provider's Date passes through (RFC 9110 §6.6.1: an intermediary adds one only when
    there is none), still exactly one; ``x-rp-*`` names are the proxy's, so a provider's
    (here one the proxy does not set for this request) is not relayed."""
    from tests.test_cache import _raw_upstream

    server, url, calls = await _raw_upstream(
        b"date: Mon, 01 Jan 2024 00:00:00 GMT\r\nx-rp-canary: forged\r\nx-rp-route: forged")
    try:
        proxy = await make_proxy(f"""
providers: {{p1: {{url: "{url}"}}}}
routes: [{{name: plain, match: {{path_prefix: /v1/plain}}, provider: p1}}]
""")
        reader, writer = await connect(proxy)
        try:
            writer.write(post("/v1/plain"))
            reply = await read_reply(reader)
        finally:
            writer.close()
    finally:
        server.close()
    assert reply.status == 200 and calls[0] == 1
    assert [v for k, v in reply.headers if k == "date"] == ["Mon, 01 Jan 2024 00:00:00 GMT"]
    assert not [k for k, _ in reply.headers if k == "x-rp-canary"]
    assert [v for k, v in reply.headers if k == "x-rp-route"] == ["plain"]


async def test_a_client_leaving_mid_head_or_mid_pipeline_is_logged(proxy, mock_provider, logs):
    """Every request ends with one log line, also one the data plane never saw: a head left
    half-sent, and a pipelined request still queued behind one in flight (499, _none)."""
    reader, writer = await connect(proxy)
    writer.write(b"POST /v1/plain HTTP/1.1\r\nHost: x\r\nX-Half: ")
    await asyncio.sleep(0.05)
    writer.close()
    await wait_for(lambda: len(access_lines(logs)) == 1, 3)
    line = access_lines(logs)[0]
    assert (line["route"], line["status"], line["outcome"]) == ("_none", 499, "client_disconnected")
    reader, writer = await connect(proxy)
    writer.write(post("/v1/plain/slow", extra="x-mock-delay: 2s\r\n") + post("/v1/plain/next"))
    await wait_for(lambda: mock_provider.mock.calls == 1, 3)
    writer.close()
    await wait_for(lambda: len(access_lines(logs)) == 3, 3)
    got = sorted((x["route"], x["status"], x["outcome"]) for x in access_lines(logs)[1:])
    assert got == [("_none", 499, "client_disconnected"), ("plain", 499, "client_disconnected")]
    assert mock_provider.mock.calls == 1  # the queued one never went upstream
    reader, writer = await connect(proxy)  # and the proxy keeps serving
    try:
        writer.write(post("/v1/plain"))
        assert (await read_reply(reader)).status == 200
    finally:
        writer.close()
