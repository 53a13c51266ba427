"""The upstream client over TLS: providers are https in production, so the hop must verify
the provider's certificate and name, and fail closed (a connect error) when it cannot."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import pytest
import trustme
from aiohttp import web

from proxy.mock import MockProvider

CONFIG = """
version: 1
providers:
  p1: {{url: "https://localhost:{port}", format: openai,
        headers: {{authorization: "Bearer sk-tls-test"}}}}
routes:
  - name: chat
    match: {{path_prefix: /v1/, methods: [POST]}}
    provider: p1
"""


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_mock(ca: trustme.CA) -> AsyncIterator[tuple[MockProvider, int]]:
    """The project's mock provider behind TLS, with a certificate for 'localhost' from ``ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    mock = MockProvider()
    runner = web.AppRunner(mock.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    yield mock, runner.addresses[0][1]
    await runner.cleanup()


async def test_verified_tls_hop(ca, tls_mock, make_proxy, http, monkeypatch, tmp_path):
    """A provider whose certificate chains to a trusted CA is reached over TLS, twice on one
    pooled connection, with the configured key and nothing else changed."""
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))  # OpenSSL's default verify paths read it
    mock, port = tls_mock
    proxy = await make_proxy(CONFIG.format(port=port))
    for _ in range(2):
        async with http.post(proxy.data_url + "/v1/chat/completions",
                             json={"model": "m", "messages": []}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["model"] == "m"
    seen = list(mock.recent)
    assert len(seen) == 2
    assert seen[0]["headers"]["authorization"] == "Bearer sk-tls-test"
    assert seen[0]["headers"]["host"] == f"localhost:{port}"


async def test_untrusted_certificate_fails_closed(tls_mock, make_proxy, http, monkeypatch,
                                                  tmp_path):
    """A certificate from an unknown CA is a connect error (502 upstream_error): the request
    and its key never reach the impostor."""
    other = trustme.CA()
    pem = tmp_path / "other.pem"
    other.cert_pem.write_to_path(str(pem))
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    mock, port = tls_mock
    proxy = await make_proxy(CONFIG.format(port=port))
    async with http.post(proxy.data_url + "/v1/chat/completions", json={}) as resp:
        body = await resp.json()
    assert resp.status == 502 and body["error"]["type"] == "upstream_error"
    assert mock.calls == 0


async def test_certificate_for_another_name_fails_closed(ca, tls_mock, make_proxy, http,
                                                         monkeypatch, tmp_path):
    """A trusted certificate for another name ('localhost' reached as 127.0.0.1) is refused:
    the hop checks the provider's name, not just the chain."""
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    mock, port = tls_mock
    proxy = await make_proxy(CONFIG.format(port=port).replace("https://localhost",
                                                              "https://127.0.0.1"))
    async with http.post(proxy.data_url + "/v1/chat/completions", json={}) as resp:
        assert resp.status == 502
    assert mock.calls == 0
