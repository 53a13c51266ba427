"""Destination integrity and admin access (issue #10, DESIGN §3 "the upstream host is always the
configured provider's"): no request field — Host, absolute-form target, path tricks, query,
forwarding headers, JSON fields such as ``api_base`` — makes the proxy connect anywhere but the
configured provider, checked against a real "attacker" listener that must see 0 connections;
and no spelling of an admin path, Host trick or cross-site page reaches an admin action."""

from __future__ import annotations

import orjson
import pytest

from tests.core_support import RawUpstream
from tests.hardening_support import exchange, metric

CONFIG = """
version: 1
server: {{admin_token: "{token}"}}
providers:
  p1: {{url: "{mock}", format: openai}}
  based: {{url: "{mock}/base", format: generic}}
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions}}
    tiers: [{{provider: p1, model: gpt-x}}]
    canary: {{weight: 0, hash_on: "header:x-user", variant: {{tiers: [{{provider: p1}}]}}}}
  - name: based
    match: {{path_prefix: /b/}}
    provider: based
  - name: ocr
    match: {{path: /ocr}}
    tiers: [{{provider: based, path: /v2/ocr}}]
  - name: any
    match: {{path_prefix: /}}
    provider: p1
"""


@pytest.fixture
async def attacker():
    upstream = await RawUpstream().start()
    yield upstream
    await upstream.stop()


def hostile_requests(a: str) -> dict[str, tuple[bytes, str | None]]:
    """name -> (raw request, the raw path the provider must see; None: refused, never sent).
    ``a`` is the attacker's host:port."""
    def post(target: str, extra: str = "", body: bytes = b"{}") -> bytes:
        return (f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Content-Type: "
                f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode() + body

    json_fields = orjson.dumps({
        "model": f"{a}/v1", "api_base": f"http://{a}", "base_url": f"http://{a}/v1",
        "url": f"http://{a}/", "endpoint": f"//{a}", "messages": [{"content": f"x@{a}"}]})
    return {
        "absolute_form": (f"POST http://{a}/v1/chat/completions HTTP/1.1\r\nHost: {a}\r\n"
                          "Content-Length: 2\r\nConnection: close\r\n\r\n{}".encode(),
                          "/v1/chat/completions"),
        "absolute_form_https": (f"POST https://{a}/x HTTP/1.1\r\nHost: {a}\r\nContent-Length:"
                                " 0\r\nConnection: close\r\n\r\n".encode(), "/x"),
        "host_header": (post("/v1/chat/completions").replace(b"Host: 127.0.0.1",
                                                             f"Host: {a}".encode()),
                        "/v1/chat/completions"),
        "double_slash_authority": (post(f"//{a}/v1/x"), f"//{a}/v1/x"),
        "encoded_slashes": (post(f"/%2F%2F{a}/x"), f"/%2F%2F{a}/x"),
        "backslashes": (post(f"/\\\\{a}/x"), f"/\\\\{a}/x"),
        "encoded_backslashes": (post(f"/%5C%5C{a}/x"), f"/%5C%5C{a}/x"),
        "at_in_path": (post(f"/x@{a}/y"), f"/x@{a}/y"),
        "userinfo_target": (post(f"@{a}/x"), None),
        "dot_dot": (post("/v1/../../x"), None),
        "encoded_dot_dot": (post("/v1/%2e%2e/%2E%2E/x"), None),
        "dot_dot_encoded_slash": (post("/v1/..%2F..%2Fx"), None),
        "dot_dot_backslash": (post("/v1/..\\..\\x"), None),
        "based_dot_dot": (post("/b/%2e%2e/%2e%2e/x"), None),
        "based_path": (post("/b/x"), "/base/b/x"),
        "tier_path": (post("/ocr?next=http://evil"), "/base/v2/ocr?next=http://evil"),
        "query": (post(f"/q?url=http://{a}/&api_base=http%3A%2F%2F{a}&redirect=//{a}"),
                  f"/q?url=http://{a}/&api_base=http%3A%2F%2F{a}&redirect=//{a}"),
        "forwarding_headers": (post("/h", f"X-Forwarded-Host: {a}\r\nForwarded: host={a};"
                                    f"proto=http\r\nX-Forwarded-Proto: http\r\nX-Original-URL:"
                                    f" http://{a}/\r\nX-Rewrite-URL: //{a}/\r\nX-Forwarded-"
                                    f"Server: {a}\r\nX-Forwarded-Port: 1\r\n"), "/h"),
        "proxy_headers": (post("/p", f"Proxy-Connection: keep-alive\r\nProxy-Authorization:"
                               f" Basic eDp5\r\nVia: 1.1 {a}\r\n"), "/p"),
        "json_fields": (post("/v1/chat/completions", body=json_fields), "/v1/chat/completions"),
        "connect": (f"CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n\r\n".encode(), None),
        "options_star": (b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", None),
        "http10_absolute": (f"POST http://{a}/h10 HTTP/1.0\r\nContent-Length: 0\r\n\r\n"
                            .encode(), "/h10"),
    }


async def test_no_request_field_reaches_the_attacker(attacker, mock_provider, make_proxy, http):
    """Every hostile request is either refused (4xx, nothing sent) or sent to the configured
    provider with its own path: the attacker's listener sees 0 connections, the provider
    sees exactly the expected requests, and a JSON body's api_base/base_url/model fields are
    data, never a destination."""
    proxy = await make_proxy(CONFIG.format(mock=mock_provider.url, token=""))
    a = attacker.url.removeprefix("http://")
    cases = hostile_requests(a)
    for name, (raw, expected) in cases.items():
        before = mock_provider.mock.calls
        answer = await exchange(proxy.data_url, raw)
        if expected is None:
            assert 400 <= answer.status < 500, name
            assert mock_provider.mock.calls == before, name
            continue
        assert mock_provider.mock.calls == before + 1, name
        seen = (await (await http.get(mock_provider.url + "/mock/requests")).json())[-1]
        assert seen["raw_path"] == expected, name  # the path with its query, as received
        assert seen["headers"]["host"] == mock_provider.url.removeprefix("http://"), name
        assert "proxy-authorization" not in seen["headers"], name
    sent = await (await http.get(mock_provider.url + "/mock/requests")).json()
    chat = [r for r in sent if r["path"] == "/v1/chat/completions"]
    assert all(orjson.loads(r["body"])["model"] == "gpt-x" for r in chat)  # the tier's model
    assert attacker.connections == 0
    assert len(sent) == sum(1 for _, expected in cases.values() if expected is not None)


async def test_upstream_redirect_is_relayed_not_followed(attacker, mock_provider, make_proxy,
                                                         http):
    """A provider's redirect toward another host is relayed to the client as it came, never
    followed: the provider key does not travel to the Location."""
    proxy = await make_proxy(CONFIG.format(mock=mock_provider.url, token=""))
    for status in ("301", "302", "307", "308"):
        async with http.post(proxy.data_url + "/r", allow_redirects=False, headers={
                "x-mock-status": status, "x-mock-location": attacker.url + "/steal"}) as resp:
            assert resp.status == int(status)
            assert resp.headers["location"] == attacker.url + "/steal"
    assert attacker.connections == 0 and mock_provider.mock.calls == 4


ADMIN_PATHS = [
    "/admin/reload", "/Admin/reload", "/ADMIN/RELOAD", "/admin/../admin/reload",
    "//admin/reload", "///admin/reload", "/%61dmin/reload", "/admin/%2e%2e/admin/reload",
    "/admin/reload/", "/./admin/reload", "/admin//reload", "/healthz/../admin/reload",
    "/metrics/%2e%2e/admin/reload", "/admin%2freload", "/admin/reload%00", "/admin/reload;x",
    "/admin/reload?token=x", "http://127.0.0.1/admin/reload", "/admin/./reload",
    "/admin/%72eload", "/readyz/../admin/reload", "/admin/status", "//admin/status",
    "/admin/canary/chat", "/admin/circuit/p1/reset", "/admin/nowhere", "/nowhere",
]


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_admin_paths_need_the_token_however_spelled(method, mock_provider, make_proxy):
    """With admin_token set, every spelling of an admin path (case, encoding, dot segments,
    double slashes, absolute form), with any Host or forwarding header, answers 401 without
    the token: no reload happens and no status leaks. Only the probes, /metrics and the
    static page are open."""
    token = "adm-TOKEN-123456"
    proxy = await make_proxy(CONFIG.format(mock=mock_provider.url, token=token))
    for path in ADMIN_PATHS:
        for extra in ("", "X-Forwarded-For: 127.0.0.1\r\nX-Real-IP: 127.0.0.1\r\n",
                      "Authorization: Bearer wrong\r\n", f"Authorization: {token}\r\n"):
            for host in ("127.0.0.1", "localhost"):
                raw = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: 0"
                       "\r\nConnection: close\r\n\r\n").encode()
                answer = await exchange(proxy.admin_url, raw)
                assert answer.status == 401, (path, extra, answer)
                assert b"routes" not in answer.body and token.encode() not in answer.body
    text = proxy.deps.metrics.render().decode()
    assert metric(text, "rp_config_reloads_total", result="ok") == 1
    for path in ("/healthz", "/readyz", "/metrics", "/admin/"):
        raw = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        assert (await exchange(proxy.admin_url, raw)).status == 200, path
    raw = (f"POST /admin/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
           "Content-Length: 0\r\nConnection: close\r\n\r\n").encode()
    answer = await exchange(proxy.admin_url, raw)
    assert answer.status == 400  # authorised: the file "<test>" cannot be re-read
    assert orjson.loads(answer.body)["error"]["type"] == "invalid_config"


async def test_admin_actions_refused_to_web_pages(mock_provider, make_proxy):
    """A browser page cannot drive the admin plane: a POST whose Origin is another site or
    whose Sec-Fetch-Site says cross-site is refused (403, the canary weight unchanged), and
    without a token a POST through a DNS name (rebinding) is refused too; the same POST
    from a local tool (IP Host, no Origin) is accepted."""
    proxy = await make_proxy(CONFIG.format(mock=mock_provider.url, token=""))
    port = proxy.admin_url.rsplit(":", 1)[1]
    body = b'{"weight": 100}'

    def post(headers: str) -> bytes:
        return (f"POST /admin/canary/chat HTTP/1.1\r\n{headers}Content-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body

    refused = [
        f"Host: 127.0.0.1:{port}\r\nOrigin: http://evil.example\r\n",
        f"Host: 127.0.0.1:{port}\r\nOrigin: null\r\n",
        f"Host: 127.0.0.1:{port}\r\nSec-Fetch-Site: cross-site\r\n",
        f"Host: evil.example:{port}\r\n",  # DNS rebinding: the page's own name
        f"Host: evil.example:{port}\r\nOrigin: http://evil.example:{port}\r\n",
    ]
    for headers in refused:
        answer = await exchange(proxy.admin_url, post(headers))
        assert answer.status == 403, headers
        assert orjson.loads(answer.body)["error"]["type"] == "forbidden"
    assert proxy.runtime.registry["canary"]["chat"].status()["weight"] == 0
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        answer = await exchange(proxy.admin_url, post(
            f"Host: {host}\r\nOrigin: http://{host}\r\n"))
        assert answer.status == 200, host
    assert proxy.runtime.registry["canary"]["chat"].status()["weight"] == 100
    raw = f"GET /admin/status HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n".encode()
    assert (await exchange(proxy.admin_url, raw)).status == 200  # reads stay open
