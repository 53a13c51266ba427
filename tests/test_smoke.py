"""End-to-end smoke: the real proxy in front of the real mock provider on loopback."""

from __future__ import annotations

from tests.conftest import access_lines

CONFIG = """
version: 1
providers:
  p1: {{url: "{mock}", format: openai}}
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions, methods: [POST]}}
    provider: p1
"""


async def test_forwards_and_annotates(mock_provider, make_proxy, http, logs):
    """A request is forwarded to the configured provider and answered with x-rp-* headers."""
    proxy = await make_proxy(CONFIG.format(mock=mock_provider.url))
    async with http.post(proxy.data_url + "/v1/chat/completions",
                         json={"model": "m1", "messages": []}) as resp:
        body = await resp.json()
        assert resp.status == 200
        assert resp.headers["x-rp-route"] == "chat"
        assert resp.headers["x-rp-provider"] == "p1"
        assert resp.headers["x-rp-tier"] == "1"
        assert resp.headers["x-rp-attempts"] == "1"
    assert body["model"] == "m1"
    assert mock_provider.mock.calls == 1
    lines = access_lines(logs)
    assert len(lines) == 1 and lines[0]["status"] == 200 and lines[0]["outcome"] == "ok"


async def test_no_route_is_json_404(mock_provider, make_proxy, http):
    """An unmatched request gets the JSON error taxonomy, and no upstream call."""
    proxy = await make_proxy(CONFIG.format(mock=mock_provider.url))
    async with http.get(proxy.data_url + "/nowhere") as resp:
        assert resp.status == 404
        err = (await resp.json())["error"]
    assert err["type"] == "no_route" and err["request_id"] == resp.headers["x-request-id"]
    assert mock_provider.mock.calls == 0
