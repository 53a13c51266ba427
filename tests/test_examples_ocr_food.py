"""The menu-OCR and food-label example configs, run end to end against mock providers.

The YAML files are loaded as shipped; only the provider URLs and keys come from the env
(``${VISION_LLM_URL:-...}`` etc.), pointing at the project's mock on loopback.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import orjson

from proxy.clock import FakeClock
from proxy.loader import load_config
from tests.conftest import access_lines

EXAMPLES = Path(__file__).resolve().parent.parent / "config" / "examples"
OCR = EXAMPLES / "menu-ocr-tiering.yaml"
FOOD = EXAMPLES / "food-label-analysis.yaml"


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def sent_headers(seen: dict) -> dict[str, str]:
    """The headers a mock received, by lower-case name."""
    return {k.lower(): v for k, v in seen["headers"].items()}


KEYS = {OCR: {"OPENAI_API_KEY": "sk-test-vision-0001", "OCR_SECRET": "ocr-secret-0001"},
        FOOD: {"OPENAI_API_KEY": "sk-test-food-0001", "BACKUP_LLM_API_KEY": "sk-test-backup-0001",
               "PRODUCT_DB_KEY": "product-db-key-0001"}}


def test_examples_pass_check_with_their_keys_only():
    """Both files validate with nothing but their provider keys set (every other variable has
    a default)."""
    for path in (OCR, FOOD):
        loaded = load_config(path, env=KEYS[path])
        assert loaded.config.routes


# --------------------------------------------------------------------------- menu OCR


async def ocr_proxy(make_proxy, llm_url: str, ocr_url: str):
    env = {"VISION_LLM_URL": llm_url, "OCR_VENDOR_URL": ocr_url, **KEYS[OCR]}
    return await make_proxy(OCR.read_text(), env=env, path=str(OCR), clock=FakeClock())


async def ocr(http, proxy, image: str, headers=None, note: str | None = None):
    body = {"image_url": f"https://img.example/{image}.jpg", "locale": "ko-KR"}
    if note is not None:
        body["note"] = note
    async with http.post(proxy.data_url + "/v1/menu/ocr", json=body, headers=headers or {}) as resp:
        return resp.status, resp.headers, orjson.loads(await resp.read())


async def test_ocr_every_path(mock_provider, mock_provider2, make_proxy, http, logs):
    """Tier 1 good; low confidence or handwritten → tier 2; tier 1 down → tier 2; everything
    down or unsure → the degraded fallback; the status page counts it all."""
    proxy = await ocr_proxy(make_proxy, mock_provider.url, mock_provider2.url)
    llm, vendor = mock_provider.mock, mock_provider2.mock

    status, h, body = await ocr(http, proxy, "good")
    assert status == 200 and body["confidence"] == 0.92
    assert (h["x-rp-tier"], h["x-rp-provider"], h["x-rp-model"]) == ("1", "vision_llm", "gpt-4o-mini")
    assert "x-rp-fallback" not in h and h["x-rp-cache"] == "miss"
    sent = llm.recent[-1]
    assert orjson.loads(sent["body"])["model"] == "gpt-4o-mini"
    assert sent_headers(sent)["authorization"] == "Bearer sk-test-vision-0001"

    status, h, body = await ocr(http, proxy, "blurry", {"x-mock-confidence": "0.72"})
    assert status == 200 and body["confidence"] == 0.72  # under 0.75, over tier 2's 0.70
    assert (h["x-rp-tier"], h["x-rp-provider"], h["x-rp-fallback"]) == ("2", "ocr_vendor", "rejected")
    assert vendor.recent[-1]["path"] == "/v2/ocr"
    assert sent_headers(vendor.recent[-1])["x-ocr-secret"] == "ocr-secret-0001"

    status, h, body = await ocr(http, proxy, "handwritten", {"x-mock-handwritten": "true"})
    assert status == 200 and h["x-rp-tier"] == "2" and h["x-rp-fallback"] == "rejected"

    status, h, _ = await ocr(http, proxy, "outage", {"x-rp-fault": "abort=503;tier=1"})
    assert status == 200 and h["x-rp-tier"] == "2" and h["x-rp-fallback"] == "503"
    assert h["x-rp-attempts"] == "3"  # tier 1 tried twice (retry.attempts: 2), then tier 2

    status, h, body = await ocr(http, proxy, "bad-json", {"x-rp-fault": "bad_response;tier=1"})
    assert status == 200 and h["x-rp-tier"] == "2" and h["x-rp-fallback"] == "invalid_response"

    calls = vendor.calls
    status, h, body = await ocr(http, proxy, "down", {"x-mock-status": "503"})
    assert status == 200 and body["degraded"] is True and body["items"] == []
    assert h["x-rp-fallback"] == "exhausted" and "x-rp-tier" not in h
    assert vendor.calls == calls + 2  # tier 2 was tried too (and retried) before the fallback

    status, h, body = await ocr(http, proxy, "unsure", {"x-mock-confidence": "0.5"})
    assert status == 200 and body["degraded"] is True and h["x-rp-fallback"] == "exhausted"

    calls = llm.calls
    status, h, body = await ocr(http, proxy, "good")
    assert status == 200 and h["x-rp-cache"] == "hit" and llm.calls == calls

    lines = access_lines(logs)
    assert len(lines) == 8 and len({line["request_id"] for line in lines}) == 8
    assert [line["outcome"] for line in lines] == [
        "ok", "fallback", "fallback", "fallback", "fallback", "fallback_response",
        "fallback_response", "cache_hit"]
    async with http.get(proxy.admin_url + "/admin/status") as resp:
        route = (await resp.json())["routes"][0]
    assert route["name"] == "menu-ocr" and route["requests"] == 8
    assert route["by_tier"] == {"1": 1, "2": 4}  # the cache hit was answered by no tier
    assert route["fallback_rate"] == 6 / 8


async def test_ocr_real_outage_of_tier1(mock_provider2, make_proxy, http):
    """The vision LLM refusing connections (no rehearsal): the OCR vendor answers."""
    proxy = await ocr_proxy(make_proxy, dead_url(), mock_provider2.url)
    status, h, body = await ocr(http, proxy, "menu")
    assert status == 200 and body["confidence"] == 0.92
    assert h["x-rp-tier"] == "2" and h["x-rp-fallback"] == "connect_error"


async def test_ocr_note_is_redacted_before_any_tier(mock_provider, mock_provider2, make_proxy, http):
    """A user's note with a phone number, e-mail and card reaches both tiers masked."""
    proxy = await ocr_proxy(make_proxy, mock_provider.url, mock_provider2.url)
    note = "call 010-1234-5678, mail kim@example.kr, card 4111 1111 1111 1111"
    status, h, _ = await ocr(http, proxy, "noted", {"x-rp-fault": "abort=503;tier=1"}, note=note)
    assert status == 200 and h["x-rp-tier"] == "2"
    seen = orjson.loads(mock_provider2.mock.recent[-1]["body"])["note"]
    assert seen == "call [REDACTED:phone], mail [REDACTED:email], card [REDACTED:card_number]"


# --------------------------------------------------------------------------- food label


async def food_proxy(make_proxy, llm_url: str, other_url: str):
    env = {"OPENAI_URL": llm_url, "BACKUP_LLM_URL": other_url, "PRODUCT_DB_URL": other_url,
           "OPEN_FOOD_FACTS_URL": other_url, **KEYS[FOOD]}
    return await make_proxy(FOOD.read_text(), env=env, path=str(FOOD), clock=FakeClock())


async def barcode(http, proxy, code: str, headers=None):
    async with http.post(proxy.data_url + "/v1/barcode/lookup", json={"barcode": code},
                         headers=headers or {}) as resp:
        return resp.status, resp.headers, orjson.loads(await resp.read())


async def analyse(http, proxy, photo: str, headers=None):
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Read the nutrition facts and allergens."},
        {"type": "image_url", "image_url": {"url": f"https://img.example/{photo}.jpg"}}]}]}
    async with http.post(proxy.data_url + "/v1/chat/completions", json=body,
                         headers={"x-user-id": "u1", **(headers or {})}) as resp:
        return resp.status, resp.headers, orjson.loads(await resp.read())


async def test_food_barcode_lookup_tiers_and_cache(mock_provider, mock_provider2, make_proxy, http):
    """Barcode lookups: the product DB answers (validated), a repeat is a cache hit, and the
    second database takes over when the first is down."""
    proxy = await food_proxy(make_proxy, mock_provider.url, mock_provider2.url)
    db = mock_provider2.mock
    status, h, body = await barcode(http, proxy, "8801234567890")
    assert status == 200 and body["barcode"] == "8801234567890"
    assert h["x-rp-provider"] == "product_db" and db.recent[-1]["path"] == "/v1/products/lookup"
    status, h, _ = await barcode(http, proxy, "8801234567890")
    assert h["x-rp-cache"] == "hit" and db.calls == 1
    status, h, body = await barcode(http, proxy, "8809876543210", {"x-rp-fault": "abort=503;tier=1"})
    assert status == 200 and body["barcode"] == "8809876543210"
    assert h["x-rp-provider"] == "open_food_facts" and h["x-rp-fallback"] == "503"
    assert db.recent[-1]["path"] == "/api/v2/product"


async def test_food_label_analysis_tiers_and_validation(mock_provider, mock_provider2, make_proxy,
                                                        http):
    """Label analysis: gpt-4o first; a malformed reply moves to gpt-4o-mini; malformed
    everywhere serves the degraded chat-shaped answer."""
    proxy = await food_proxy(make_proxy, mock_provider.url, mock_provider2.url)
    status, h, body = await analyse(http, proxy, "label-1")
    assert status == 200 and (h["x-rp-tier"], h["x-rp-model"]) == ("1", "gpt-4o")
    assert body["model"] == "gpt-4o" and body["choices"][0]["message"]["content"]
    status, h, body = await analyse(http, proxy, "label-2", {"x-rp-fault": "bad_response;tier=1"})
    assert status == 200 and (h["x-rp-tier"], h["x-rp-model"]) == ("2", "gpt-4o-mini")
    assert h["x-rp-fallback"] == "invalid_response"
    status, h, body = await analyse(http, proxy, "label-3", {"x-mock-body": "malformed"})
    assert status == 200 and h["x-rp-fallback"] == "exhausted" and body["degraded"] is True
    assert "unavailable" in orjson.loads(body["choices"][0]["message"]["content"])["note"]
    assert mock_provider2.mock.by_path == {"/v1/chat/completions": 1}  # invalid: not retried


async def budget_entry(http, proxy, name: str, key: str = "global") -> dict:
    async with http.get(proxy.admin_url + "/admin/status") as resp:
        budgets = (await resp.json())["budgets"]
    return next((b for b in budgets if b["name"] == name and b["key"] == key), {})


async def spent_at_least(http, proxy, usd: float) -> None:
    """Budgets settle just after the reply: wait (bounded) until the spend shows."""
    for _ in range(500):
        if (await budget_entry(http, proxy, "llm-monthly")).get("spend_usd", 0) >= usd:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"llm-monthly never reached ${usd}")


async def test_food_cost_guardrails_downgrade_then_block(mock_provider, mock_provider2, make_proxy,
                                                         http):
    """At 85% of the monthly budget gpt-4o is skipped (x-rp-fallback: downgrade); at 100% the
    degraded answer is served (x-rp-fallback: budget) without calling any provider."""
    proxy = await food_proxy(make_proxy, mock_provider.url, mock_provider2.url)
    status, h, _ = await analyse(http, proxy, "big-1", {"x-mock-output-tokens": "17000000"})
    assert status == 200 and h["x-rp-model"] == "gpt-4o"  # 17M x $10/1M = $170 = 85%
    await spent_at_least(http, proxy, 170)
    status, h, _ = await analyse(http, proxy, "after-85", {"x-mock-output-tokens": "60000000"})
    assert status == 200 and (h["x-rp-tier"], h["x-rp-model"]) == ("2", "gpt-4o-mini")
    assert h["x-rp-fallback"] == "downgrade"  # 60M x $0.60/1M = $36: past the cap
    await spent_at_least(http, proxy, 200)
    calls = mock_provider.mock.calls
    status, h, body = await analyse(http, proxy, "after-100")
    assert status == 200 and body["degraded"] is True and h["x-rp-fallback"] == "budget"
    assert mock_provider.mock.calls == calls


async def test_food_daily_quota_per_user(mock_provider, mock_provider2, make_proxy, http):
    """30 label analyses a day per x-user-id; the 31st gets the degraded answer, another user
    is unaffected."""
    proxy = await food_proxy(make_proxy, mock_provider.url, mock_provider2.url)
    for i in range(30):
        status, h, _ = await analyse(http, proxy, f"q{i}", {"x-user-id": "heavy"})
        assert status == 200 and h["x-rp-tier"] == "1"
    for _ in range(500):
        entry = await budget_entry(http, proxy, "daily-label-quota", "heavy")
        if entry.get("requests", 0) >= 30:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the quota never counted 30 requests")
    status, h, body = await analyse(http, proxy, "q30", {"x-user-id": "heavy"})
    assert status == 200 and body["degraded"] is True and h["x-rp-fallback"] == "budget"
    status, h, _ = await analyse(http, proxy, "q30", {"x-user-id": "light"})
    assert status == 200 and h["x-rp-tier"] == "1" and "x-rp-fallback" not in h
