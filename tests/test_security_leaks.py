"""Key hygiene sweep (issue #10, DESIGN §3 "no key appears in any response, log line, metric,
admin answer or Redis key"): unique provider keys, a client key and an admin token are driven
through every error path — provider 4xx/5xx relays that echo the key back, timeouts,
resets, malformed replies, connect errors, broken streams, injected faults, invalid config
in ``check`` and in a reload, Redis killed mid-traffic, every admin endpoint — and then
searched for in every sink: response bodies and headers, the captured logs, the real
process's output, ``/metrics``, every ``/admin/*`` answer, and every Redis key and value."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import aiohttp
import redis
from aiohttp import web

from tests.conftest import free_port, wait_for
from tests.hardening_support import ROOT, CliProxy

CONFIG = """
version: 1
server:
  admin_token: ${{ADMIN_TOKEN}}
  clients: {{header: x-app-key, keys: ["${{APP_KEY}}"]}}
state: {{backend: redis, redis: {{url: "{redis}", timeout: 150ms}}}}
providers:
  p1:
    url: "{mock}"
    format: openai
    headers: {{authorization: "Bearer ${{P1_KEY}}"}}
    pricing: {{"*": {{input: 1, output: 1}}}}
    circuit_breaker: {{failure_rate: 0.9, min_requests: 500, window: 30s, open_for: 5s}}
  p2:
    url: "{mock2}"
    format: openai
    headers: {{authorization: "Token ${{P2_KEY}}", x-extra-secret: "${{P2_EXTRA}}"}}
    pricing: {{"*": {{input: 1, output: 1}}}}
  dead:
    url: "http://127.0.0.1:{dead}"
    headers: {{x-api-key: "${{P3_KEY}}"}}
    cost_per_request: 0.001
budgets:
  spend:
    window: day
    limit_usd: 1000
    per: "header:x-app-key"
    on_state_error: allow
    thresholds: [{{at: 0.5, action: alert}}, {{at: 1.0, action: block}}]
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions}}
    tiers: [{{provider: p1}}, {{provider: p2}}]
    timeout: {{attempt: 2s, total: 4s, first_byte: 300ms, idle: 1s}}
    retry: {{attempts: 2, backoff: {{initial: 10ms, max: 20ms}}}}
    cache: {{ttl: 60s, key: {{headers: [authorization, x-app-key]}}}}
    budgets: [spend]
    canary: {{weight: 50, hash_on: "header:x-app-key", variant: {{tiers: [{{provider: p1}}]}}}}
    faults: {{header: x-rp-fault}}
  - name: strict
    match: {{path_prefix: /v1/strict}}
    provider: p1
    validate: {{json: true, require: ["$.choices[0].message.content"]}}
  - name: dead
    match: {{path_prefix: /v1/dead}}
    provider: dead
"""


def make_secrets() -> dict[str, str]:
    return {name: f"sk-LEAK-{uuid.uuid4().hex}" for name in
            ("P1_KEY", "P2_KEY", "P2_EXTRA", "P3_KEY", "ADMIN_TOKEN", "APP_KEY")}


def fragments(secrets: dict[str, str]) -> list[str]:
    """Pieces of each secret long enough to be unique: a partial leak is a leak too."""
    return [s[i:i + 12] for s in secrets.values() for i in range(8, len(s) - 11, 6)]


class Sinks:
    """Everything the sweep collected, by where it came from."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, where: str, data: object) -> None:
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        self.items.append((where, data if isinstance(data, str) else repr(data)))

    async def response(self, where: str, resp: aiohttp.ClientResponse) -> int:
        self.add(where + " headers", list(resp.headers.items()))
        self.add(where + " body", await resp.read())
        return resp.status

    def hits(self, secrets: dict[str, str]) -> list[tuple[str, str]]:
        pieces = fragments(secrets)
        return [(where, piece) for where, text in self.items for piece in pieces
                if piece in text]


def redis_dump(url: str) -> list[tuple[bytes, object]]:
    """Every key of the Redis and its whole value, whatever its type."""
    client = redis.Redis.from_url(url)
    out: list[tuple[bytes, object]] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        value: object = kind
        if kind == b"string":
            value = client.get(key)
        elif kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"list":
            value = client.lrange(key, 0, -1)
        elif kind == b"set":
            value = client.smembers(key)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1, withscores=True)
        out.append((key, value))
    client.close()
    return out


async def drive_data_plane(sinks: Sinks, url: str, app_key: str) -> None:
    """Every error path of the data plane, once with the provider echoing its credentials."""
    base = {"x-app-key": app_key, "content-type": "application/json"}
    echo = {**base, "x-mock-echo-auth": "true"}
    chat = url + "/v1/chat/completions"
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    cases = {
        "ok": (chat, base),
        "401 echo": (chat, {**echo, "x-mock-status": "401"}),
        "403 echo": (chat, {**echo, "x-mock-status": "403"}),
        "422 echo": (chat, {**echo, "x-mock-status": "422"}),
        "429 echo": (chat, {**echo, "x-mock-status": "429", "x-mock-retry-after": "1"}),
        "500 echo": (chat, {**echo, "x-mock-status": "500"}),
        "503 echo": (chat, {**echo, "x-mock-status": "503"}),
        "timeout": (chat, {**base, "x-mock-delay": "1s"}),
        "reset": (chat, {**base, "x-mock-drop": "headers"}),
        "malformed": (url + "/v1/strict", {**base, "x-mock-body": "malformed"}),
        "strict echo": (url + "/v1/strict", {**echo, "x-mock-status": "400"}),
        "connect error": (url + "/v1/dead", base),
        "fault": (chat, {**base, "x-rp-fault": "abort=503"}),
        "bad fault": (chat, {**base, "x-rp-fault": "nonsense"}),
        "no client key": (chat, {"content-type": "application/json"}),
        "wrong client key": (chat, {"x-app-key": app_key[:-1] + "x"}),
        "client credentials": (chat, {**base, "authorization": "Bearer client-own",
                                      "x-api-key": "client-own"}),
        "no route": (url + "/nowhere", base),
        "cache bypass": (chat, {**base, "x-rp-cache": "bypass"}),
    }
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        for name, (target, headers) in cases.items():
            async with http.post(target, data=body, headers=headers) as resp:
                await sinks.response(f"data {name}", resp)
        stream = b'{"model": "m", "stream": true, "messages": []}'
        for name, headers in {"stream": base, "stream drop": {**base, "x-mock-drop": "mid-stream"},
                              "stream idle": {**base, "x-mock-chunk-delay": "1500ms"}}.items():
            async with http.post(chat, data=stream, headers=headers) as resp:
                await sinks.response(f"data {name}", resp)


async def drive_admin(sinks: Sinks, admin: str, token: str) -> None:
    auth = {"authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        for method, path, headers, body in [
            ("GET", "/healthz", {}, None), ("GET", "/readyz", {}, None),
            ("GET", "/metrics", {}, None), ("GET", "/admin/", {}, None),
            ("GET", "/admin/status", auth, None), ("GET", "/admin/status", {}, None),
            ("GET", "/admin/canary/chat/report", auth, None),
            ("GET", "/admin/canary/strict/report", auth, None),
            ("POST", "/admin/canary/chat", auth, b'{"weight": 40}'),
            ("POST", "/admin/canary/chat", auth, b"not json"),
            ("POST", "/admin/circuit/p1/reset", auth, None),
            ("POST", "/admin/circuit/nope/reset", auth, None),
            ("GET", "/admin/reload", auth, None), ("GET", "/admin/nowhere", auth, None),
            ("POST", "/admin/reload", {"authorization": "Bearer " + token[:-1]}, None),
        ]:
            async with http.request(method, admin + path, headers=headers, data=body) as resp:
                await sinks.response(f"admin {method} {path}", resp)


async def test_no_secret_anywhere(mock_provider, mock_provider2, make_proxy, redis_server,
                                  logs, tmp_path, capsys, monkeypatch):
    """0 hits: no fragment of any provider key, the client key or the admin token in any
    response (body or header), log line, process output, metric, admin answer or Redis key
    or value, after every error path including an invalid config and Redis going down."""
    secrets = make_secrets()
    for name, value in secrets.items():  # a reload reads the process environment
        monkeypatch.setenv(name, value)
    sinks = Sinks()
    cfg = tmp_path / "proxy.yaml"
    text = CONFIG.format(mock=mock_provider.url, mock2=mock_provider2.url, redis=redis_server.url,
                         dead=free_port())
    cfg.write_text(text)
    proxy = await make_proxy(text, path=str(cfg))

    await drive_data_plane(sinks, proxy.data_url, secrets["APP_KEY"])
    await drive_admin(sinks, proxy.admin_url, secrets["ADMIN_TOKEN"])

    # reloads: an invalid file holding the keys literally, a file whose env var is missing,
    # then the good one back
    auth = {"authorization": f"Bearer {secrets['ADMIN_TOKEN']}"}
    literal = text.replace("${P1_KEY}", secrets["P1_KEY"]).replace("${P2_KEY}", secrets["P2_KEY"])
    async with aiohttp.ClientSession() as http:
        for name, content in [
            ("invalid", literal.replace("format: openai", "format: nonsense", 1)
             .replace("limit_usd: 1000", "limit_usd: -1")),
            ("unparsable", literal + "\n  - [unclosed"),
            ("missing var", text.replace("${P1_KEY}", "${NOT_SET_ANYWHERE}")),
            ("good", text),
        ]:
            cfg.write_text(content)
            async with http.post(proxy.admin_url + "/admin/reload", headers=auth) as resp:
                assert (resp.status == 200) == (name == "good"), name
                await sinks.response(f"reload {name}", resp)

    # Redis down in the middle of traffic (cache fails open, the budget allows), then back
    redis_server.kill()
    await drive_data_plane(sinks, proxy.data_url, secrets["APP_KEY"])
    await drive_admin(sinks, proxy.admin_url, secrets["ADMIN_TOKEN"])
    assert any(e["event"] == "state_unavailable" for e in logs)
    redis_server.start()
    await drive_data_plane(sinks, proxy.data_url, secrets["APP_KEY"])
    await wait_for(lambda: proxy.deps.state.blind == frozenset(), 5)
    await drive_admin(sinks, proxy.admin_url, secrets["ADMIN_TOKEN"])
    for hook in proxy.runtime.registry.get("flush", {}).values():
        await hook()

    sinks.add("metrics", proxy.deps.metrics.render())
    sinks.add("logs", logs)
    stored = redis_dump(redis_server.url)
    assert stored, "the sweep should have written budgets, cache and canary state"
    sinks.add("redis", stored)
    sinks.add("pytest output", capsys.readouterr())

    hits = sinks.hits(secrets)
    print(f"leak sweep: {len(sinks.items)} sinks, {sum(len(t) for _, t in sinks.items)} "
          f"characters, {len(hits)} hits")
    assert hits == []
    # the sweep did reach the paths it claims to: the mock echoed a key, the proxy masked it
    assert any("[REDACTED]" in text for where, text in sinks.items if "echo" in where)


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RP_")}
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          env={**base, **env}, cwd=ROOT, timeout=60, check=False)


async def test_no_secret_in_cli_output(mock_provider, mock_provider2, redis_server, tmp_path):
    """The real process: ``check`` of an invalid and of a valid file, ``run`` refusing an
    invalid file, and a running proxy taking echoed-key errors, a timeout and SIGTERM print
    no fragment of any secret on stdout or stderr."""
    secrets = make_secrets()
    text = CONFIG.format(mock=mock_provider.url, mock2=mock_provider2.url, redis=redis_server.url,
                         dead=free_port())
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(text)
    literal = text.replace("${P2_KEY}", secrets["P2_KEY"])
    bad.write_text(literal.replace("limit_usd: 1000", "limit_usd: -1")
                   .replace("weight: 50", "weight: 500"))
    outputs: list[tuple[str, bytes]] = []
    for name, args in [("check bad", ["check", "-c", str(bad)]),
                       ("check good", ["check", "-c", str(good)]),
                       ("run bad", ["run", "-c", str(bad)])]:
        done = run_cli(args, secrets)
        assert (done.returncode == 0) == (name == "check good"), (name, done)
        outputs.append((name, done.stdout + done.stderr))
    assert b"must be" in outputs[0][1]  # the errors were printed (masked), not swallowed

    proc = CliProxy(good, env=secrets)
    try:
        await proc.ready()
        await drive_data_plane(Sinks(), proc.url, secrets["APP_KEY"])
        await drive_admin(Sinks(), proc.admin_url, secrets["ADMIN_TOKEN"])
        proc.proc.send_signal(signal.SIGTERM)
        assert await proc.wait(20) == 0
    finally:
        proc.kill()
    outputs.append(("run", proc.output()))
    assert b'"event":"request"' in outputs[-1][1]
    sinks = Sinks()
    for name, data in outputs:
        sinks.add(name, data)
    hits = sinks.hits(secrets)
    print(f"cli leak sweep: {len(outputs)} outputs, {len(hits)} hits")
    assert hits == []


async def test_provider_echoing_a_key_in_a_header_or_stream(make_proxy, http, logs):
    """A provider that puts the key it received into a response header or a streamed error
    body: the header value is masked before it reaches the client, and error bodies are
    masked whether buffered or streamed."""
    secret = f"sk-LEAK-{uuid.uuid4().hex}"

    async def echo(request: web.Request) -> web.StreamResponse:
        got = request.headers.get("authorization", "")
        status = int(request.query.get("status", "200"))
        if request.query.get("stream"):
            resp = web.StreamResponse(status=status, headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(f"data: {{\"error\": \"bad key {got}\"}}\n\n".encode())
            await resp.write_eof()
            return resp
        return web.json_response({"error": f"bad key {got}"}, status=status,
                                 headers={"x-echo-auth": got, "www-authenticate": got})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        proxy = await make_proxy(f"""
providers: {{p: {{url: "http://127.0.0.1:{port}", headers: {{authorization: "Bearer {secret}"}}}}}}
routes: [{{name: r, match: {{path_prefix: /}}, provider: p}}]
""")
        sinks = Sinks()
        for query in ("status=401", "status=500", "status=401&stream=1"):
            async with http.get(proxy.data_url + "/x?" + query) as resp:
                await sinks.response(query, resp)
        sinks.add("logs", logs)
        assert sinks.hits({"k": secret}) == []
        assert sum("[REDACTED]" in text for _, text in sinks.items) >= 3  # it was echoed
    finally:
        await runner.cleanup()
