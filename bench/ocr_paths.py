"""One request per path through config/examples/menu-ocr-tiering.yaml, against mock providers.

Starts two mock providers (the vision LLM and the OCR vendor) and the real proxy with the
example file as shipped (provider URLs from the env), all on loopback, with the real clock:

1. tier 1 good
2. tier 1 low confidence (0.72 < 0.75) -> tier 2 (0.72 >= 0.70)
3. tier 1 down, rehearsed (x-rp-fault: abort=503;tier=1) -> tier 2
4. tier 1 down for real (its mock stopped: connection refused) -> tier 2
5. everything down (tier 1 refused, tier 2 answering 503) -> the fallback response

and prints each response's status, x-rp-* headers and body, then the request body the
upstream saw for a note full of personal data (from the mock's /mock/requests), the route's
/admin/status entry and the rp_fallbacks_total samples.

    python bench/ocr_paths.py
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import accesslog  # noqa: E402
from proxy.loader import load_config  # noqa: E402
from proxy.mock import start_mock  # noqa: E402
from proxy.server import ProxyServer  # noqa: E402

EXAMPLE = ROOT / "config" / "examples" / "menu-ocr-tiering.yaml"
SHOWN = ("x-rp-route", "x-rp-tier", "x-rp-provider", "x-rp-model", "x-rp-fallback",
         "x-rp-attempts", "x-rp-cache", "x-rp-cost-usd")


async def request(http: aiohttp.ClientSession, url: str, title: str, image: str,
                  headers: dict[str, str] | None = None, note: str | None = None) -> None:
    body = {"image_url": f"https://img.example/{image}.jpg", "locale": "ko-KR"}
    if note is not None:
        body["note"] = note
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.post(url + "/v1/menu/ocr", json=body, headers=headers or {}) as resp:
        data = await resp.read()
        elapsed_ms = (loop.time() - started) * 1000
        print(f"\n## {title}")
        if headers:
            print("request headers: " + ", ".join(f"{k}: {v}" for k, v in headers.items()))
        print(f"HTTP {resp.status} in {elapsed_ms:.1f} ms")
        for name in SHOWN:
            if name in resp.headers:
                print(f"  {name}: {resp.headers[name]}")
        print(f"  body: {data.decode()[:160]}")


async def main() -> None:
    accesslog.configure("warning", cache=False)
    llm, llm_runner, llm_url = await start_mock()
    vendor, vendor_runner, vendor_url = await start_mock()
    env = {"VISION_LLM_URL": llm_url, "OCR_VENDOR_URL": vendor_url,
           "OPENAI_API_KEY": "sk-bench-vision", "OCR_SECRET": "bench-ocr-secret"}
    proxy = ProxyServer(load_config(EXAMPLE, env=env))
    await proxy.start(listen="127.0.0.1:0", admin_listen="127.0.0.1:0")
    url = proxy.data_url
    print(f"proxy {url} with {EXAMPLE.relative_to(ROOT)}; vision_llm mock {llm_url}, "
          f"ocr_vendor mock {vendor_url}")
    try:
        async with aiohttp.ClientSession() as http:
            await request(http, url, "1. tier 1 good", "menu-good")
            await request(http, url, "2. tier 1 low confidence -> tier 2", "menu-blurry",
                          {"x-mock-confidence": "0.72"})
            await request(http, url, "3. tier 1 down (rehearsed) -> tier 2", "menu-outage",
                          {"x-rp-fault": "abort=503;tier=1"})
            note = ("전화 010-1234-5678, +1-415-555-0132, 메일 kim.minji@example.co.kr, "
                    "주민번호 900101-1234567, 카드 4111-1111-1111-1111")
            await request(http, url, "redaction: a note full of personal data", "menu-note",
                          note=note)
            async with http.get(llm_url + "/mock/requests") as resp:
                seen = (await resp.json())[-1]
            print("\n## the upstream's view of the redacted body (vision_llm /mock/requests)")
            print(f"client sent note: {note}")
            print(f"upstream got body: {seen['body']}")
            await llm_runner.cleanup()  # the vision LLM goes away for real
            await request(http, url, "4. tier 1 down (connection refused) -> tier 2", "menu-real")
            await request(http, url, "5. everything down -> fallback response", "menu-down",
                          {"x-mock-status": "503"})
            async with http.get(proxy.admin_url + "/admin/status") as resp:
                route = (await resp.json())["routes"][0]
            print("\n## /admin/status route entry")
            print(orjson.dumps({k: route[k] for k in ("name", "requests", "by_tier",
                                                      "fallback_rate", "latency_ms")}).decode())
            async with http.get(proxy.admin_url + "/metrics") as resp:
                metrics = await resp.text()
            print("\n## rp_fallbacks_total")
            for line in metrics.splitlines():
                if line.startswith("rp_fallbacks_total{"):
                    print(line)
            print(f"\nupstream calls: vision_llm {llm.calls}, ocr_vendor {vendor.calls}")
    finally:
        await proxy.stop()
        await vendor_runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
