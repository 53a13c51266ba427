"""The hot path builds nothing per request and its lean parts keep the contract (issue #8).

- the upstream HTTP/1.1 client (:mod:`proxy.h1`): framing (length, chunked, until close,
  1xx, gzip), strictness (a response that could desynchronise a pooled connection is an
  error and the connection is dropped), pooling (reuse, limit, a cancelled call closes);
- the access-log fast path renders the line structlog would, and ``capture_logs`` still
  sees it; Prometheus children are looked up once per label set.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
import sys
from typing import Any

import orjson
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.cache_key import CacheKey
from proxy import accesslog
from proxy.h1 import Connection, ProtocolError, ResetError
from proxy.h1_pool import Pool
from tests.conftest import access_lines
from tests.core_support import RawUpstream

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def _get(pool: Pool, body: bytes = b"") -> tuple[int, list[tuple[str, str]], bytes]:
    head = (b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body))
    resp = await pool.request("POST", head, body)
    data = await resp.read()
    resp.release()
    return resp.status, resp.headers, data


async def _pool(upstream: RawUpstream, limit: int = 10) -> Pool:
    await upstream.start()
    host, port = upstream.url.removeprefix("http://").split(":")
    return Pool("http", host, int(port), limit=limit)


# ---------------------------------------------------------------- framing and reuse


async def test_sequential_requests_reuse_one_connection():
    """A response read to its end returns the connection to the pool: one connection."""
    upstream = RawUpstream(OK)
    pool = await _pool(upstream)
    for _ in range(5):
        assert (await _get(pool))[::2] == (200, b"{}")
    assert upstream.connections == 1
    pool.close()


@pytest.mark.parametrize("response, body", [
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
     b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\ntrailer: x\r\n\r\n", b"abcde"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + OK, b"{}"),
    (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    (b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s"
     % (len(gzip.compress(b"hello" * 100)), gzip.compress(b"hello" * 100)), b"hello" * 100),
])
async def test_framings_decode_and_keep_the_connection(response, body):
    """Chunked (extensions, trailers), interim 1xx, no-body statuses and gzip decode to the
    body, and the connection is reused afterwards."""
    upstream = RawUpstream(response)
    pool = await _pool(upstream)
    for _ in range(2):
        _, _, got = await _get(pool)
        assert got == body
    assert upstream.connections == 1
    pool.close()


async def test_body_until_close_is_read_and_not_reused():
    """No length and no chunking: the body runs to the end of the connection."""
    upstream = RawUpstream(b"HTTP/1.1 200 OK\r\n\r\nuntil-eof", close_after=True)
    pool = await _pool(upstream)
    assert (await _get(pool))[2] == b"until-eof"
    assert (await _get(pool))[2] == b"until-eof"
    assert upstream.connections == 2
    pool.close()


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\ncontent-length: -2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\n folded: header\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-encoding: br\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"HTTP/2 200\r\n\r\n",
])
async def test_ambiguous_framing_is_an_error_and_the_connection_dropped(response):
    """What could desynchronise a pooled connection is a protocol error, never reused."""
    upstream = RawUpstream(response)
    pool = await _pool(upstream)
    with pytest.raises(ProtocolError):
        await _get(pool)
    assert pool.size == 0
    pool.close()


async def test_bytes_after_the_response_drop_the_connection():
    """An upstream that sends more than one response's worth: the extra bytes are never
    read as the next request's answer."""
    upstream = RawUpstream(OK + b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil")
    pool = await _pool(upstream)
    assert (await _get(pool))[2] == b"{}"
    assert (await _get(pool))[2] == b"{}"
    assert upstream.connections == 2
    pool.close()


async def test_truncated_body_is_a_reset():
    """A connection closed before Content-Length bytes arrived: ResetError, not a short body."""
    upstream = RawUpstream(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
                           close_after=True)
    pool = await _pool(upstream)
    with pytest.raises(ResetError):
        await _get(pool)
    pool.close()


async def test_pool_limit_and_cancellation():
    """At most ``limit`` connections; a call cancelled while waiting for its answer closes
    its connection (the provider sees the client go away) and frees the slot."""
    upstream = RawUpstream(OK)
    await upstream.start()
    host, port = upstream.url.removeprefix("http://").split(":")
    pool = Pool("http", host, int(port), limit=1)
    hang = RawUpstream(b"")  # never answers
    await hang.start()
    hhost, hport = hang.url.removeprefix("http://").split(":")
    stuck = Pool("http", hhost, int(hport), limit=1)
    task = asyncio.create_task(_get(stuck))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(_get(stuck))
    await asyncio.sleep(0.05)
    assert stuck.size == 1 and not waiting.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert stuck.size == 1  # the waiter opened its own connection in the freed slot
    assert hang.connections == 2
    waiting.cancel()
    results = await asyncio.gather(*(_get(pool) for _ in range(5)))
    assert all(r[0] == 200 for r in results) and upstream.connections == 1
    pool.close()
    stuck.close()


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def write(self, data: Any) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=3000), sizes=st.lists(st.integers(1, 700), min_size=1),
       cuts=st.lists(st.integers(1, 50), min_size=1))
def test_chunked_body_survives_any_segmentation(body, sizes, cuts):
    """Chunked framing decodes to the same bytes however the chunks and TCP segments fall."""
    chunks, rest, i = [], body, 0
    while rest:
        n = sizes[i % len(sizes)]
        chunks.append(rest[:n])
        rest, i = rest[n:], i + 1
    wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"".join(
        b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"

    async def run() -> bytes:
        pool = Pool("http", "127.0.0.1", 1, limit=1)
        conn = Connection(pool)
        conn.connection_made(_Transport())
        future = conn.send(b"GET / HTTP/1.1\r\n\r\n", b"", "GET")
        pos, j = 0, 0
        while pos < len(wire):
            n = cuts[j % len(cuts)]
            conn.data_received(wire[pos:pos + n])
            pos, j = pos + n, j + 1
        resp = await future
        data = await resp.read()
        assert conn.reusable()
        return data

    assert asyncio.run(run()) == body


# ---------------------------------------------------------------- through the proxy


async def test_ambiguous_upstream_answer_is_502_upstream_error(make_proxy, http, logs):
    """Content-Length with Transfer-Encoding from a provider: 502 upstream_error (reset)."""
    upstream = await RawUpstream(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    ).start()
    proxy = await make_proxy(f"""
providers: {{p: {{url: "{upstream.url}"}}}}
routes: [{{name: r, match: {{path_prefix: /}}, provider: p}}]
""")
    async with http.post(proxy.data_url + "/x", data=b"{}") as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["type"] == "upstream_error"
    assert access_lines(logs)[0]["attempt_log"][0]["error"] == "reset"


async def test_upstream_request_carries_the_auto_headers(make_proxy, http):
    """The upstream sees Host, Accept, Accept-Encoding, a Content-Type for an untyped body and
    the body's Content-Length (as aiohttp's client sent), and never the client's own length."""
    upstream = await RawUpstream(OK).start()
    proxy = await make_proxy(f"""
providers: {{p: {{url: "{upstream.url}/base"}}}}
routes: [{{name: r, match: {{path_prefix: /}}, provider: p}}]
""")
    async with http.post(proxy.data_url + "/x?q=a%26b", data=b"abc",
                         headers={"content-type": ""}) as resp:
        assert resp.status == 200
    head = upstream.requests[0].decode()
    lines = head.split("\r\n")
    assert lines[0] == "POST /base/x?q=a%26b HTTP/1.1"
    names = [line.split(":")[0].lower() for line in lines[1:] if ":" in line]
    assert names.count("content-length") == 1 and "Content-Length: 3" in head
    port = upstream.url.rsplit(":", 1)[1]
    assert f"Host: 127.0.0.1:{port}" in head
    assert "Accept: */*" in head and "Accept-Encoding: gzip, deflate" in head


async def test_metric_children_are_looked_up_once(make_proxy, http, mock_provider):
    """Requests with the same labels reuse one Prometheus child (no labels() per request),
    and every request still counts once."""
    proxy = await make_proxy(f"""
providers: {{p: {{url: "{mock_provider.url}", format: openai, pricing: {{"*": {{input: 1, output: 1}}}}}}}}
routes: [{{name: chat, match: {{path_prefix: /v1/chat}}, provider: p}}]
""")
    for _ in range(3):
        async with http.post(proxy.data_url + "/v1/chat/completions", json={"model": "m"}) as r:
            assert r.status == 200
    dataplane = proxy.dataplane
    assert dataplane is not None
    assert list(dataplane._requests_children) == [("chat", 200, "ok")]
    assert dataplane._requests_children[("chat", 200, "ok")].value() == 3.0
    assert list(dataplane._duration_children) == ["chat"]


# ---------------------------------------------------------------- access log and cache key


def _sink(level: int = logging.INFO) -> tuple[accesslog._Sink, io.BytesIO]:
    out = io.BytesIO()
    processors = structlog.get_config()["processors"]
    return accesslog._Sink(level, out, processors, processors[-1]), out


def test_fast_access_line_is_one_json_line_with_the_structlog_fields():
    """Outside capture_logs the line is rendered directly: the fields, event, level and a
    UTC timestamp, one line; a non-UTF-8 value is escaped rather than losing the line."""
    sink, out = _sink()
    log = accesslog.AccessLog(structlog.get_logger(), sink)
    log.write({"request_id": "r1", "status": 200, "prompt_version": "v\udcff", "t_total": 1.5})
    log.write({"request_id": "r2", "status": 502, "prompt_version": None, "t_total": 2.0})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = orjson.loads(lines[0])
    assert first["event"] == "request" and first["level"] == "info"
    assert first["timestamp"].endswith("Z") and first["prompt_version"] == "v\\udcff"
    assert orjson.loads(lines[1])["status"] == 502


def test_access_line_respects_the_level_and_capture_logs():
    """At level warning no access line is written; under capture_logs it goes through
    structlog (what the tests assert is what production writes)."""
    sink, out = _sink(logging.WARNING)
    accesslog.AccessLog(structlog.get_logger(), sink).write({"request_id": "r"})
    assert out.getvalue() == b""
    sink, out = _sink()
    with structlog.testing.capture_logs() as captured:
        accesslog.AccessLog(structlog.get_logger(), sink).write({"request_id": "r3"})
    assert out.getvalue() == b""
    assert captured == [{"request_id": "r3", "event": "request", "log_level": "info"}]


async def test_log_lines_are_buffered_when_stdout_is_unbuffered(tmp_path, monkeypatch):
    """Under PYTHONUNBUFFERED=1 (set in the image) ``sys.stdout.buffer`` is the raw file:
    access lines still wait in a buffer of their own (no write per line), an event line
    writes them out before itself (order kept), and :func:`accesslog.flush` empties it."""
    path = tmp_path / "stdout"
    raw = open(path, "wb", buffering=0)  # noqa: ASYNC230  (what python -u gives sys.stdout)
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, write_through=True))
    try:
        accesslog.configure("info")
        assert accesslog._sink is not None and accesslog._sink.out is not raw
        access = accesslog.AccessLog(structlog.get_logger(), accesslog._sink)
        for i in range(50):
            access.write({"request_id": f"r{i}", "status": 200})
        assert path.read_bytes() == b""  # fifty lines, no write yet
        structlog.get_logger().warning("something_happened")
        events = [orjson.loads(x)["event"] for x in path.read_bytes().splitlines()]
        assert events == ["request"] * 50 + ["something_happened"]
        access.write({"request_id": "last", "status": 200})
        accesslog.flush()
        assert orjson.loads(path.read_bytes().splitlines()[-1])["request_id"] == "last"
    finally:
        accesslog._buffered.pop(raw.fileno(), None)
        monkeypatch.undo()
        raw.close()
        accesslog.configure("debug", cache=False)


def test_cache_key_is_unchanged_by_the_one_call_hash():
    """The key hashed in one call equals the length-prefixed, part-by-part sha256 it replaced
    (stored entries in a shared Redis stay valid across the upgrade)."""
    import hashlib
    from types import SimpleNamespace

    from multidict import CIMultiDict, CIMultiDictProxy

    from proxy.call import Call
    from proxy.config import CacheKeyConfig

    cfg = CacheKeyConfig(body=True, headers=["x-tenant-id"], ignore_json_fields=["user"])
    key = CacheKey("chat", cfg, ("authorization",))
    route = SimpleNamespace(stable=SimpleNamespace(name="stable"))
    call = Call(runtime=None, route=route, clock=None, request_id="r",  # type: ignore[arg-type]
                method="POST", path="/v1/chat", query="a=1",
                headers=CIMultiDictProxy(CIMultiDict({"x-tenant-id": "t", "authorization": "k"})),
                body=b'{"b": 1, "a": 2, "user": "u"}', remote=None, started=0.0, deadline=1.0)

    h = hashlib.sha256(b"rp-cache-key-1")
    for data in (b"POST", b"/v1/chat", b"a=1", b"stable", b"", b"chat", b"+t", b"+k",
                 b'json:{"a":2,"b":1}'):
        h.update(len(data).to_bytes(8, "big") + data)
    assert key(call) == h.hexdigest()


async def test_memory_ledger_does_not_grow_per_request():
    """Settled holds leave no per-request residue beyond the bounded dedupe: after many
    reserve/settle pairs the counter keeps at most MEMORY_SETTLED_MAX settled ids (the most
    recent: the last one still deduplicates) and no holds (it grew by ~200 bytes a request
    for an hour). The bound costs O(1) per settle: a dict used as a FIFO (delete its first
    key) made each settle scan the deleted slots, 2.8% of the full set's CPU."""
    from proxy.state.ledger import (
        MEMORY_SETTLED_MAX,
        CounterRef,
        Limits,
        MemoryLedger,
    )

    ledger = MemoryLedger()
    counter = CounterRef("b:test:global", "m202601", 1e12)
    limits = Limits()
    for i in range(MEMORY_SETTLED_MAX + 5000):
        res = await ledger.reserve(counter, limits, 10, 10, 1000.0 + i * 1e-3, 1e9)
        assert res.reservation is not None
        await ledger.settle(res.reservation, 5, True, limits, 1000.0 + i * 1e-3)
    c = ledger._counters[(counter.tag, counter.window)]
    remembered = len(c.settled) + len(c.settled_before)
    assert MEMORY_SETTLED_MAX // 2 <= remembered <= MEMORY_SETTLED_MAX and len(c.holds) == 0
    assert c.requests == MEMORY_SETTLED_MAX + 5000
    again = await ledger.settle(res.reservation, 5, True, limits, 2000.0)
    assert not again.applied and c.requests == MEMORY_SETTLED_MAX + 5000


async def test_streamed_replies_leave_no_garbage_cycles(make_proxy, http, mock_provider):
    """A streamed reply's callbacks (metering, budget, cache recorder) held the reply that
    holds the stream: a reference cycle per stream, freed only by a cyclic collection (RSS
    climbed under a stream soak). Closing the stream breaks it: nothing is left for the GC."""
    import gc

    proxy = await make_proxy(f"""
state: {{backend: memory}}
providers: {{p: {{url: "{mock_provider.url}", format: openai, pricing: {{"*": {{input: 1, output: 1}}}}}}}}
budgets: {{b: {{window: day, limit_usd: 1000000}}}}
routes: [{{name: chat, match: {{path_prefix: /v1/chat}}, provider: p, budgets: [b],
          cache: {{ttl: 1m}}, retry: {{attempts: 2}}}}]
""")

    async def stream(i: int) -> None:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": f"{i}"}]}
        async with http.post(proxy.data_url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200 and (await resp.read()).rstrip().endswith(b"[DONE]")

    for i in range(5):
        await stream(i)
    await asyncio.sleep(0.1)
    gc.collect()
    gc.disable()
    try:
        for i in range(40):
            await stream(100 + i)
        await asyncio.sleep(0.1)
        found = gc.collect()
    finally:
        gc.enable()
    assert found < 40  # before: ~60 objects in cycles per stream


# ---------------------------------------------------------------- deferred metrics


def test_deferred_metrics_read_the_same_as_direct_ones():
    """The hot path's deferred children (FastCounter, FastHistogram) expose exactly what
    prometheus-client's own inc/observe would, as soon as anything reads the registry
    (boundary values land in the bucket whose bound equals them, as prometheus-client's)."""
    from proxy.metrics import Metrics

    direct, fast = Metrics(), Metrics()
    values = [0.0, 0.005, 0.0051, 0.01, 0.3, 1.0, 29.9, 60.0, 119.0, 500.0, 0.025, 0.025]
    h = fast.histogram(fast.request_duration.labels("r"))
    c = fast.counter(fast.requests.labels("r", "2xx", "ok"))
    assert fast.histogram(fast.request_duration.labels("r")) is h  # one per child
    for v in values:
        direct.request_duration.labels("r").observe(v)
        direct.requests.labels("r", "2xx", "ok").inc()
        h.observe(v)
        c.inc()
    assert c.value() == len(values)
    key = {"route": "r", "code": "2xx", "outcome": "ok"}
    assert fast.registry.get_sample_value("rp_requests_total", key) == len(values)

    def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for metric in m.registry.collect() for s in metric.samples
                if s.name.startswith(("rp_request_duration", "rp_requests_total"))
                and not s.name.endswith("_created")}

    assert samples(fast) == samples(direct)
    h.observe(2.0)  # after a flush, increments keep accumulating and flush again
    direct.request_duration.labels("r").observe(2.0)
    assert samples(fast) == samples(direct)


async def test_in_flight_gauge_is_read_at_scrape(mock_provider, make_proxy, http):
    """rp_requests_in_flight is set from the data plane's count when scraped."""
    proxy = await make_proxy(f"""
providers: {{p: {{url: "{mock_provider.url}"}}}}
routes: [{{name: slow, match: {{path_prefix: /v1}}, provider: p}}]
""")
    task = asyncio.ensure_future(http.post(proxy.data_url + "/v1/x",
                                           headers={"x-mock-delay": "400ms"}))
    for _ in range(100):
        if proxy.dataplane.in_flight == 1:
            break
        await asyncio.sleep(0.01)
    assert "rp_requests_in_flight 1.0" in proxy.deps.metrics.render().decode()
    resp = await task
    resp.release()
    assert "rp_requests_in_flight 0.0" in proxy.deps.metrics.render().decode()
