"""Helpers for the deploy/operate tests: repo paths, metric names, PromQL names, headless Chromium.

- :func:`exported_metric_names` reads the names a live proxy really exports from its
  ``/metrics`` text (``# TYPE`` lines and samples; histograms add ``_bucket/_count/_sum``).
- :func:`promql_metric_names` pulls the metric names a PromQL expression references.
- :class:`PrometheusServer` is Debian's ``prometheus`` on a free loopback port (stopped by PID).
- :class:`Chromium` is Debian's ``chromium`` in headless mode, driven over the DevTools
  protocol (a small client on aiohttp's websocket): console errors, exceptions, DOM, screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent
PROM_DIR = REPO / "deploy" / "prometheus"

# A config that turns on what the status page, the dashboard and the alerts show: two tiers
# with a breaker, a budget, a canary. {mock} and {mock2} are the mock providers' URLs.
RICH_CONFIG = """
version: 1
providers:
  primary:
    url: "{mock}"
    format: openai
    circuit_breaker: {{failure_rate: 0.5, min_requests: 50, window: 30s, open_for: 15s}}
    pricing: {{"*": {{input: 1.0, output: 2.0}}}}
  backup:
    url: "{mock2}"
    format: openai
    pricing: {{"*": {{input: 0.5, output: 1.0}}}}
budgets:
  llm-daily:
    window: day
    limit_usd: 5
    thresholds: [{{at: 0.7, action: alert}}, {{at: 1.0, action: block}}]
  per-user:
    window: day
    limit_requests: 100
    per: header:x-user-id
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions, methods: [POST]}}
    tiers:
      - {{provider: primary, model: gpt-4o-mini}}
      - {{provider: backup, model: gpt-4o-mini}}
    budgets: [llm-daily, per-user]
    canary:
      weight: 50
      hash_on: header:x-user-id
      variant:
        tiers: [{{provider: backup, model: gpt-4.1-mini}}]
  - name: generic
    match: {{path_prefix: /v1/, methods: [POST]}}
    provider: primary
"""


async def drive_traffic(http: aiohttp.ClientSession, data_url: str, n: int = 12) -> int:
    """Send ``n`` chat requests (every fourth forced to fall back); returns how many answered."""
    answered = 0
    for i in range(n):
        headers = {"x-user-id": f"user-{i % 5}"}
        if i % 4 == 3:
            headers["x-mock-status"] = "503"
        async with http.post(data_url + "/v1/chat/completions", headers=headers,
                             json={"model": "m", "messages": [], "max_tokens": 10}) as resp:
            await resp.read()
            answered += 1
    return answered


# --------------------------------------------------------------------------- metric names

_TYPE = re.compile(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (\w+)$", re.M)
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", re.M)


def exported_metric_names(metrics_text: str) -> set[str]:
    """Every series name a ``/metrics`` text can produce, as PromQL sees them."""
    names = set(_SAMPLE.findall(metrics_text))
    for name, kind in _TYPE.findall(metrics_text):
        names.add(name)
        if kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_count", f"{name}_sum"})
        elif kind == "summary":
            names.update({f"{name}_count", f"{name}_sum"})
    return names


_PROMQL_WORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan", "atan2",
})


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, labels, keywords or Grafana
    variables)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)   # strings
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)                                 # $__rate_interval, $route
    s = re.sub(r"\{[^}]*\}", " ", s)                                         # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                                        # ranges, subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+\S+", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


# --------------------------------------------------------------------------- headless Chromium

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
]


def chromium_exe() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise RuntimeError("chromium is not installed: .ci/run installs it (apt-get install chromium)")
    return exe


class Chromium:
    """A headless Chromium process with a fresh profile and a DevTools port (stopped by PID)."""

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="rp-chromium-")
        self.proc = subprocess.Popen(
            [chromium_exe(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws_url = f"ws://127.0.0.1:{port}{path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab over the DevTools protocol: navigate, evaluate, screenshot, and every console
    error, uncaught exception and failed load it reported (``errors``)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session_id: str) -> None:
        self._ws = ws
        self._session = session_id
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.errors: list[str] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, http: aiohttp.ClientSession, browser: Chromium) -> Page:
        ws = await http.ws_connect(browser.ws_url, max_msg_size=64 * 1024**2)
        await ws.send_json({"id": 0, "method": "Target.createTarget", "params": {"url": "about:blank"}})
        target = await _reply(ws, 0)
        await ws.send_json({"id": -1, "method": "Target.attachToTarget",
                            "params": {"targetId": target["targetId"], "flatten": True}})
        attached = await _reply(ws, -1)
        page = cls(ws, attached["sessionId"])
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            await page.send(method)
        return page

    async def _read(self) -> None:
        async for msg in self._ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._waiting:
                self._waiting.pop(data["id"]).set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                self.errors.append("console: " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                self.errors.append("exception: " + str(details.get("exception", {}).get(
                    "description", details.get("text"))))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                entry = params["entry"]
                self.errors.append(f"log/{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = fut
        await self._ws.send_json({"id": msg_id, "method": method, "params": params,
                                  "sessionId": self._session})
        data = await asyncio.wait_for(fut, 30)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return dict(data.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = await self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"page never satisfied {expression!r}; errors: {self.errors}")
            await asyncio.sleep(0.1)

    async def html(self) -> str:
        return str(await self.evaluate("document.documentElement.outerHTML"))

    async def screenshot(self) -> bytes:
        """The page as PNG bytes, beyond the viewport."""
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return base64.b64decode(shot["data"])

    async def close(self) -> None:
        self._reader.cancel()
        await self._ws.close()


async def _reply(ws: aiohttp.ClientWebSocketResponse, msg_id: int) -> dict[str, Any]:
    while True:
        data = json.loads((await asyncio.wait_for(ws.receive(), 30)).data)
        if data.get("id") == msg_id:
            if "error" in data:
                raise RuntimeError(str(data["error"]))
            return dict(data["result"])


# --------------------------------------------------------------------------- a real Prometheus


def tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise RuntimeError(f"{name} is not installed: .ci/run installs Debian's prometheus package")
    return exe


def scrape_config_for(target: str) -> str:
    """deploy/prometheus/prometheus.yml, pointed at one proxy, scraping and evaluating every second."""
    doc = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    doc["global"].update(scrape_interval="1s", evaluation_interval="1s")
    [job] = doc["scrape_configs"]
    job["scrape_timeout"] = "1s"
    job["static_configs"] = [{"targets": [target]}]
    return str(yaml.safe_dump(doc))


class PrometheusServer:
    """Debian's prometheus on a free loopback port with a temp storage dir, stopped by PID."""

    def __init__(self, config: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rp-prometheus-"))
        (self.dir / "prometheus.yml").write_text(config)
        shutil.copy(PROM_DIR / "alerts.yml", self.dir / "alerts.yml")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.dir / "prometheus.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def ready(self, http: aiohttp.ClientSession) -> bool:
        """Prometheus answers 503 until its storage and rules are loaded (slow on a busy host)."""
        async with http.get(self.url + "/-/ready") as resp:
            return resp.status == 200

    async def query(self, http: aiohttp.ClientSession, promql: str) -> list[dict[str, Any]]:
        """An instant query through the HTTP API; fails on a PromQL error."""
        async with http.get(self.url + "/api/v1/query", params={"query": promql}) as resp:
            body = await resp.json()
        assert body["status"] == "success", (promql, body)
        return list(body["data"]["result"])

    async def wait_for(self, http: aiohttp.ClientSession, promql: str,
                       timeout: float = 60.0) -> list[dict[str, Any]]:
        """Query until the answer is not empty (the first scrapes take a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, (self.dir / "prometheus.log").read_text()
            try:
                result = await self.query(http, promql) if await self.ready(http) else []
            except aiohttp.ClientConnectionError:
                result = []
            if result:
                return result
            assert time.monotonic() < deadline, f"Prometheus never answered {promql!r}"
            await asyncio.sleep(0.25)
