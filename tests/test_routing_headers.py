"""The data plane (DESIGN §3–4, §8 Headers/URLs): matching, upstream URL, header rules,
redirects, body limit, error-body redaction, client disconnect, connection pooling."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import access_lines, wait_for
from tests.core_support import RawUpstream, parse_response, raw_http

SECRET = "sk-test-0123456789abcdef"

CONFIG = """
version: 1
server:
  max_request_body: 1KiB
providers:
  inject:
    url: "{mock}"
    headers: {{authorization: "Bearer {secret}", x-team: core}}
  passthru: {{url: "{mock}"}}
  based: {{url: "{mock}/base/v9"}}
routes:
  - name: exact
    match: {{path: /v1/exact, methods: [POST]}}
    provider: passthru
  - name: tenant
    match: {{path_prefix: /v1/h, headers: {{x-tenant: acme}}}}
    provider: passthru
  - name: flagged
    match: {{path_prefix: /v1/h, headers: {{x-flag: "*"}}}}
    provider: passthru
  - name: first
    match: {{path_prefix: /v1/chat/}}
    provider: inject
  - name: shadowed
    match: {{path_prefix: /v1/chat/completions}}
    provider: passthru
  - name: pass
    match: {{path_prefix: /pass/}}
    provider: passthru
  - name: based
    match: {{path_prefix: /b/}}
    provider: based
  - name: rewrite
    match: {{path_prefix: /rewrite}}
    tiers: [{{provider: passthru, path: /v1/generic}}]
"""


@pytest.fixture
async def proxy(mock_provider, make_proxy):
    return await make_proxy(CONFIG.format(mock=mock_provider.url, secret=SECRET))


def last_request(mock_provider) -> dict:
    return mock_provider.mock.recent[-1]


# ------------------------------------------------------------------------- route matching


async def test_exact_path_and_method(proxy, http, mock_provider):
    """``path:`` is exact and ``methods`` restricts; anything else is a JSON 404."""
    async with http.post(proxy.data_url + "/v1/exact", json={}) as resp:
        assert resp.status == 200 and resp.headers["x-rp-route"] == "exact"
    for method, path in (("POST", "/v1/exact/more"), ("GET", "/v1/exact")):
        async with http.request(method, proxy.data_url + path) as resp:
            assert resp.status == 404
            body = await resp.json()
            assert body["error"]["type"] == "no_route" and body["error"]["route"] is None
            assert resp.headers["content-type"].startswith("application/json")
    assert mock_provider.mock.calls == 1


async def test_header_match_exact_and_present(proxy, http):
    """``match.headers`` needs the exact value, or only presence with ``"*"``."""
    cases = [({"x-tenant": "acme"}, 200, "tenant"), ({"x-tenant": "other"}, 404, None),
             ({"x-flag": "anything"}, 200, "flagged"), ({}, 404, None)]
    for headers, status, route in cases:
        async with http.post(proxy.data_url + "/v1/h", headers=headers) as resp:
            assert resp.status == status, headers
            assert resp.headers.get("x-rp-route") == route


async def test_first_matching_route_wins(proxy, http):
    """Routes are tried in file order: an earlier, broader prefix shadows a later one."""
    async with http.post(proxy.data_url + "/v1/chat/completions", json={}) as resp:
        assert resp.headers["x-rp-route"] == "first"


# ------------------------------------------------------------------------- upstream URL


async def test_url_is_provider_base_plus_path_plus_raw_query(proxy, http, mock_provider):
    """Upstream URL = provider url (with base path) + request path + the raw query, unchanged."""
    async with http.get(proxy.data_url + "/b/items%2Fx?a=b%26c&d=%20e&d=2",
                        skip_auto_headers=()) as resp:
        assert resp.status == 200
    seen = last_request(mock_provider)
    assert seen["raw_path"] == "/base/v9/b/items%2Fx?a=b%26c&d=%20e&d=2"
    assert seen["raw_query"] == "a=b%26c&d=%20e&d=2"


async def test_tier_path_rewrites_the_path_and_keeps_the_query(proxy, http, mock_provider):
    """A tier's ``path`` replaces the request path; the query string still goes along."""
    async with http.post(proxy.data_url + "/rewrite/anything?q=1", json={}) as resp:
        assert resp.status == 200
    assert last_request(mock_provider)["raw_path"] == "/v1/generic?q=1"


async def test_absolute_uri_and_host_cannot_change_the_upstream(proxy, mock_provider):
    """An absolute-form target or a forged Host reaches the configured provider, never the
    host they name (the attacker's listener sees no connection)."""
    attacker = await RawUpstream().start()
    try:
        a = attacker.url.removeprefix("http://")
        for target in (f"http://{a}/pass/x?y=1", "/pass/x?y=1"):
            raw = await raw_http(proxy.data_url, (
                f"POST {target} HTTP/1.1\r\nHost: {a}\r\nX-Forwarded-Host: {a}\r\n"
                "Content-Length: 2\r\nConnection: close\r\n\r\n{}").encode())
            status, headers, _ = parse_response(raw)
            assert status == 200 and headers["x-rp-route"] == "pass"
            seen = last_request(mock_provider)
            assert seen["raw_path"] == "/pass/x?y=1"
            assert seen["headers"]["host"] == mock_provider.url.removeprefix("http://")
        assert attacker.connections == 0
    finally:
        await attacker.stop()


async def test_dot_segments_are_refused(proxy, mock_provider):
    """``..`` segments (even percent-encoded) are a 400: the upstream could resolve them out
    of the route's prefix or the provider's base path."""
    for path in ("/pass/../admin", "/pass/%2e%2e/admin", "/b/./x"):
        raw = await raw_http(proxy.data_url, f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                                             "Connection: close\r\n\r\n".encode())
        status, _, body = parse_response(raw)
        assert status == 400 and b"bad_request" in body, path
    assert mock_provider.mock.calls == 0


# ------------------------------------------------------------------------- header rules


async def test_provider_headers_injected_and_client_credentials_dropped(proxy, http, mock_provider):
    """A provider with configured headers gets them, and never the client's credentials."""
    sent = {"Authorization": "Bearer client-key", "x-api-key": "k1", "api-key": "k2",
            "x-goog-api-key": "k3", "X-Team": "spoofed", "x-custom": "kept"}
    async with http.post(proxy.data_url + "/v1/chat/completions", json={}, headers=sent) as resp:
        assert resp.status == 200
    h = last_request(mock_provider)["headers"]
    assert h["authorization"] == f"Bearer {SECRET}" and h["x-team"] == "core"
    assert "x-api-key" not in h and "api-key" not in h and "x-goog-api-key" not in h
    assert h["x-custom"] == "kept"


async def test_provider_without_headers_passes_credentials_through(proxy, http, mock_provider):
    """A provider with no ``headers`` is pass-through: the app's own key goes upstream."""
    sent = {"Authorization": "Bearer app-own-key", "x-api-key": "k1"}
    async with http.post(proxy.data_url + "/pass/x", json={}, headers=sent) as resp:
        assert resp.status == 200
    h = last_request(mock_provider)["headers"]
    assert h["authorization"] == "Bearer app-own-key" and h["x-api-key"] == "k1"


async def test_hop_by_hop_and_control_headers_dropped_toward_provider(proxy, mock_provider):
    """Hop-by-hop headers (and those named in Connection) and x-rp-* never go upstream."""
    raw = await raw_http(proxy.data_url, (
        b"POST /pass/x HTTP/1.1\r\nHost: x\r\nConnection: close, X-Hop-Secret\r\n"
        b"X-Hop-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: x-t\r\n"
        b"Proxy-Authorization: Basic abc\r\nX-RP-Cache: bypass\r\nX-Stays: yes\r\n"
        b"Content-Length: 2\r\n\r\n{}"))
    assert parse_response(raw)[0] == 200
    h = set(last_request(mock_provider)["headers"])
    for gone in ("x-hop-secret", "keep-alive", "te", "trailer", "proxy-authorization",
                 "x-rp-cache"):
        assert gone not in h, gone
    assert "x-stays" in h


async def test_hop_by_hop_dropped_from_provider_response(make_proxy, http):
    """A provider's hop-by-hop response headers (incl. ones named in Connection) are dropped."""
    upstream = await RawUpstream(response=(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: keep-alive, x-up-hop\r\n"
        b"x-up-hop: 1\r\nkeep-alive: timeout=9\r\nproxy-authenticate: Basic\r\n"
        b"x-up-kept: yes\r\ncontent-length: 2\r\n\r\n{}")).start()
    try:
        proxy = await make_proxy(f"""
providers: {{up: {{url: "{upstream.url}"}}}}
routes: [{{name: r, match: {{path_prefix: /}}, provider: up}}]
""")
        async with http.get(proxy.data_url + "/x") as resp:
            assert resp.status == 200 and await resp.read() == b"{}"
            for gone in ("x-up-hop", "keep-alive", "proxy-authenticate"):
                assert gone not in resp.headers, gone
            assert resp.headers["x-up-kept"] == "yes"
    finally:
        await upstream.stop()


@pytest.mark.parametrize(("given", "kept"), [
    ("abc-123_DEF.4:5", True), ("x" * 128, True), ("x" * 129, False), ("bad id", False),
    ("evil\u00e9", False), ("a/b", False),
])
async def test_request_id_sanitised_sent_upstream_and_returned(proxy, mock_provider, given, kept):
    """A valid x-request-id is kept, sent upstream and returned; an invalid one is replaced."""
    raw = await raw_http(proxy.data_url, (
        f"POST /pass/x HTTP/1.1\r\nHost: x\r\nx-request-id: {given}\r\n"
        "Content-Length: 2\r\nConnection: close\r\n\r\n{}").encode())
    status, headers, _ = parse_response(raw)
    assert status == 200
    rid = headers["x-request-id"]
    assert (rid == given) is kept
    assert len(rid) <= 128 and all(c.isalnum() or c in "._:-" for c in rid)
    assert last_request(mock_provider)["headers"]["x-request-id"] == rid


async def test_request_id_in_error_body_and_log(proxy, http, logs):
    """The id given back on a proxy error is the one in its body and in its log line."""
    async with http.get(proxy.data_url + "/nowhere", headers={"x-request-id": "rid-1"}) as resp:
        body = await resp.json()
    assert resp.headers["x-request-id"] == "rid-1" == body["error"]["request_id"]
    assert access_lines(logs)[-1]["request_id"] == "rid-1"


# ------------------------------------------------------------------------- replies


async def test_redirects_are_relayed_never_followed(proxy, http, mock_provider):
    """A provider's 3xx is relayed as-is (Location included); the proxy does not follow it."""
    attacker = await RawUpstream().start()
    try:
        headers = {"x-mock-status": "302", "x-mock-location": attacker.url + "/steal"}
        async with http.post(proxy.data_url + "/pass/x", headers=headers,
                             allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["location"] == attacker.url + "/steal"
        assert attacker.connections == 0 and mock_provider.mock.calls == 1
    finally:
        await attacker.stop()


async def test_provider_error_body_relayed_with_secret_redacted(proxy, http):
    """A provider error quoting the injected key is relayed with the key as [REDACTED]."""
    headers = {"x-mock-status": "401", "x-mock-echo-auth": "true"}
    async with http.post(proxy.data_url + "/v1/chat/completions", json={}, headers=headers) as resp:
        assert resp.status == 401
        text = await resp.text()
    assert SECRET not in text
    assert "(credentials received: [REDACTED])" in text and "mock provider answered 401" in text


async def test_provider_error_relayed_as_it_came(proxy, http):
    """A provider's own error (status and JSON body) reaches the client unchanged."""
    async with http.post(proxy.data_url + "/pass/x", json={},
                         headers={"x-mock-status": "422", "x-mock-error-code": "bad_thing"}) as resp:
        assert resp.status == 422
        body = await resp.json()
    assert body["error"]["code"] == "bad_thing" and body["error"]["type"] == "mock_error"


async def test_body_limit_413_before_upstream(proxy, http, mock_provider, logs):
    """A body over max_request_body is 413 without touching the provider (sized or chunked)."""
    async with http.post(proxy.data_url + "/pass/x", data=b"x" * 2048) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["type"] == "body_too_large"

    async def chunks():
        for _ in range(8):
            yield b"y" * 256

    async with http.post(proxy.data_url + "/pass/x", data=chunks()) as resp:
        assert resp.status == 413
    async with http.post(proxy.data_url + "/pass/x", data=b"x" * 1024) as resp:
        assert resp.status == 200  # exactly at the limit is fine
    assert mock_provider.mock.calls == 1
    assert [line["status"] for line in access_lines(logs)] == [413, 413, 200]


async def test_client_disconnect_cancels_the_upstream_call(proxy, mock_provider, logs):
    """A client that hangs up mid-request cancels the upstream call: the provider sees its
    caller go away, and the request is logged once as client_disconnected (499)."""
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(proxy.data_url + "/pass/x", json={},
                                                headers={"x-mock-delay": "5s"}))
        await wait_for(lambda: mock_provider.mock.calls == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await wait_for(lambda: mock_provider.mock.cancelled == 1, timeout=3)
    await wait_for(lambda: len(access_lines(logs)) == 1)
    line = access_lines(logs)[0]
    assert line["status"] == 499 and line["outcome"] == "client_disconnected"
    assert line["t_total"] < 4000  # the proxy did not wait the provider's 5 s out


# ------------------------------------------------------------------------- pooling


async def test_one_pooled_session_per_provider(proxy, http, mock_provider):
    """Each provider has its own ClientSession, and sequential calls reuse one connection."""
    sessions = {name: p.client.session for name, p in proxy.runtime.providers.items()}
    assert len({id(s) for s in sessions.values()}) == len(sessions) == 3
    for _ in range(5):
        async with http.post(proxy.data_url + "/pass/x", json={}) as resp:
            assert resp.status == 200
    ports = {r["peer_port"] for r in mock_provider.mock.recent}
    assert len(ports) == 1


async def test_overload_answers_503(mock_provider, make_proxy, http):
    """Past server.max_concurrent_requests in flight, a request is shed with 503 overloaded."""
    proxy = await make_proxy(f"""
server: {{max_concurrent_requests: 2}}
providers: {{p: {{url: "{mock_provider.url}"}}}}
routes: [{{name: r, match: {{path_prefix: /}}, provider: p}}]
""")
    slow = [asyncio.create_task(http.post(proxy.data_url + "/x", headers={"x-mock-delay": "1s"}))
            for _ in range(2)]
    await wait_for(lambda: mock_provider.mock.calls == 2)
    async with http.post(proxy.data_url + "/x") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["type"] == "overloaded"
    for t in slow:
        async with await t as resp:
            assert resp.status == 200
    assert mock_provider.mock.calls == 2


async def test_slow_request_head_gets_408(mock_provider, make_proxy):
    """A request head that is still incomplete after header_read_timeout is answered 408
    and the connection closed (slowloris)."""
    proxy = await make_proxy(f"""
server: {{header_read_timeout: 200ms}}
providers: {{p: {{url: "{mock_provider.url}"}}}}
routes: [{{name: r, match: {{path_prefix: /}}, provider: p}}]
""")
    host, port = proxy.data_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    async with asyncio.timeout(5):
        raw = await reader.read()
    writer.close()
    assert parse_response(raw)[0] == 408
    assert mock_provider.mock.calls == 0


async def test_slow_request_body_bounded_by_total(mock_provider, make_proxy):
    """A body that trickles in past the route's total is answered 408, not waited on."""
    proxy = await make_proxy(f"""
providers: {{p: {{url: "{mock_provider.url}"}}}}
routes: [{{name: r, match: {{path_prefix: /}}, provider: p, timeout: {{total: 300ms}}}}]
""")
    host, port = proxy.data_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert mock_provider.mock.calls == 0


async def test_expect_100_continue(proxy, mock_provider):
    """``Expect: 100-continue`` gets its interim 100 at once (no client-side wait), and an
    oversized body is refused with 413 before the client sends it."""
    host, port = proxy.data_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /pass/x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                 b"Content-Length: 2\r\n\r\n")
    async with asyncio.timeout(5):
        interim = await reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"{}")
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(parse_response(head)[1]["content-length"]))
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(b"POST /pass/x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                 b"Content-Length: 999999\r\n\r\n")
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    assert mock_provider.mock.calls == 1


CLIENTS = """
server:
  trust_request_id: false
  clients: {{header: x-app-key, keys: ["{k1}", "{k2}"]}}
providers: {{p: {{url: "{mock}"}}}}
routes: [{{name: r, match: {{path_prefix: /}}, provider: p}}]
"""


async def test_client_keys(mock_provider, make_proxy, http, logs):
    """With server.clients: no key is 401, an unknown key 403, a listed key passes; the key
    never goes upstream and never reaches a log line."""
    k1, k2 = "app-key-one-123", "app-key-two-456"
    proxy = await make_proxy(CLIENTS.format(mock=mock_provider.url, k1=k1, k2=k2))
    for headers, status, kind in (({}, 401, "unauthorized"), ({"x-app-key": "nope"}, 403, "forbidden")):
        async with http.post(proxy.data_url + "/x", headers=headers) as resp:
            assert resp.status == status
            assert (await resp.json())["error"]["type"] == kind
    for key in (k1, k2):
        async with http.post(proxy.data_url + "/x", headers={"x-app-key": key}) as resp:
            assert resp.status == 200
        assert "x-app-key" not in last_request(mock_provider)["headers"]
    assert mock_provider.mock.calls == 2
    assert k1 not in repr(logs) and k2 not in repr(logs)


async def test_untrusted_request_id_is_replaced(mock_provider, make_proxy, http):
    """With trust_request_id: false, even a well-formed incoming id is replaced."""
    proxy = await make_proxy(CLIENTS.format(mock=mock_provider.url, k1="k" * 8, k2="j" * 8))
    async with http.post(proxy.data_url + "/x", headers={"x-app-key": "k" * 8,
                                                          "x-request-id": "mine-1"}) as resp:
        assert resp.status == 200 and resp.headers["x-request-id"] != "mine-1"
        assert last_request(mock_provider)["headers"]["x-request-id"] == resp.headers["x-request-id"]
