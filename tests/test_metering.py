"""Metering: usage and the answering model per format, prices, costs, streams (DESIGN §3, §8)."""

from __future__ import annotations

import itertools
import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.call import Usage
from proxy.config import Price, UsagePaths
from proxy.loader import ConfigError, parse_config
from proxy.metering import match_price, usage_from
from proxy.usage import Found, StreamMeter, UsageReader
from tests.conftest import access_lines

PRICES = {"gpt-4o-mini": Price(input=0.15, output=0.60), "gpt-4o": Price(input=2.5, output=10.0),
          "gpt-4": Price(input=30.0, output=60.0), "*": Price(input=1.0, output=2.0)}


# --------------------------------------------------------------------------- prices


def test_price_lookup_order():
    """Exact first, then the longest key prefixing the model at a separator, then '*'."""
    assert match_price(PRICES, "gpt-4o") is PRICES["gpt-4o"]
    assert match_price(PRICES, "gpt-4o-mini-2024-07-18") is PRICES["gpt-4o-mini"]
    assert match_price(PRICES, "gpt-4o-2024-08-06") is PRICES["gpt-4o"]
    assert match_price(PRICES, "gpt-4-0613") is PRICES["gpt-4"]
    assert match_price(PRICES, "gpt-4.1") is PRICES["gpt-4"]  # '.' is a separator
    assert match_price(PRICES, "gpt-4o1") is PRICES["*"]  # no separator after 'gpt-4o'
    assert match_price(PRICES, None) is PRICES["*"]
    assert match_price({"a": PRICES["gpt-4"]}, "b") is None


@given(st.sampled_from(["gpt-4o-mini", "gpt-4o", "gpt-4"]), st.sampled_from("-.:@/_"),
       st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20))
def test_dated_snapshots_price_as_their_family(family, sep, suffix):
    """Any '<family><separator><suffix>' is priced as the longest family that prefixes it."""
    model = family + sep + suffix
    longest = max((k for k in PRICES if k != "*" and model.startswith(k)
                   and (model[len(k)] in "-.:@/_")), key=len)
    assert match_price(PRICES, model) is PRICES[longest]


def test_unknown_tier_model_without_star_price_is_a_config_error():
    """A budgeted route whose tier model has no price and no '*' fails at load; a dated
    snapshot of a priced family loads."""
    text = """
providers:
  p: {{url: "http://127.0.0.1:1", format: openai, pricing: {{gpt-4o-mini: {{input: 1, output: 1}}}}}}
budgets:
  b: {{window: day, limit_usd: 1}}
routes:
  - name: r
    match: {{path_prefix: /}}
    tiers: [{{provider: p, model: {model}}}]
    budgets: [b]
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text.format(model="claude-3-opus"))
    assert err.value.errors == ["routes[0].tiers[0].model: provider 'p' has no price for model "
                                "'claude-3-opus' and no '*' price"]
    parse_config(text.format(model="gpt-4o-mini-2024-07-18"))
    unbudgeted = text.replace("    budgets: [b]\n", "")
    with pytest.raises(ConfigError):  # a typo in a priced provider's model is not free either
        parse_config(unbudgeted.format(model="gpt-4o-mnii"))


# --------------------------------------------------------------------------- reading usage


def test_reads_each_format():
    """Usage and the answering model from openai (chat and responses), anthropic (cache
    tokens as input), gemini (thoughts as output) and generic JSON paths."""
    chat = {"model": "gpt-4o-mini-2024-07-18", "usage": {"prompt_tokens": 11, "completion_tokens": 7},
            "choices": [{"message": {"content": "hello"}}]}
    responses = {"object": "response", "model": "gpt-4.1", "usage": {"input_tokens": 5, "output_tokens": 3},
                 "output": [{"type": "message", "content": [{"type": "output_text", "text": "hey"}]}]}
    anthropic = {"type": "message", "model": "claude-3-5-sonnet-20241022",
                 "content": [{"type": "text", "text": "hi"}],
                 "usage": {"input_tokens": 10, "cache_read_input_tokens": 90,
                           "cache_creation_input_tokens": 5, "output_tokens": 4}}
    gemini = {"modelVersion": "gemini-1.5-flash-002",
              "candidates": [{"content": {"parts": [{"text": "yo"}]}}],
              "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 6, "thoughtsTokenCount": 20}}
    generic = {"result": {"model": "ocr-v2", "tok": {"in": 3, "out": 9}}}
    assert UsageReader("openai", None).read(chat) == Found("gpt-4o-mini-2024-07-18", 11, 7, 5)
    assert UsageReader("openai", None).read(responses) == Found("gpt-4.1", 5, 3, 3)
    assert UsageReader("anthropic", None).read(anthropic) == Found("claude-3-5-sonnet-20241022", 105, 4, 2)
    assert UsageReader("gemini", None).read(gemini) == Found("gemini-1.5-flash-002", 8, 26, 2)
    paths = UsagePaths(model="$.result.model", input_tokens="$.result.tok.in",
                       output_tokens="$.result.tok.out")
    assert UsageReader("generic", paths).read(generic) == Found("ocr-v2", 3, 9, 0)
    assert UsageReader("generic", None).read(generic) == Found()


def test_missing_usage_is_estimated_and_flagged():
    """No usage: input = request bytes / 4, output = text characters / 4, flagged; a half
    the reply did give is kept as given."""
    assert usage_from(Found(), 401, 30) == Usage(101, 8, estimated=True)
    assert usage_from(Found(None, 50, None), 401, 30) == Usage(50, 8, estimated=True)
    assert usage_from(Found(None, 50, 5), 401, 30) == Usage(50, 5, estimated=False)


def sse(*events: dict) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


OPENAI_STREAM = sse(
    {"model": "gpt-4o-mini-2024-07-18", "choices": [{"delta": {"content": "Hello "}}], "usage": None},
    {"model": "gpt-4o-mini-2024-07-18", "choices": [{"delta": {"content": "world"}}], "usage": None},
    {"model": "gpt-4o-mini-2024-07-18", "choices": [],
     "usage": {"prompt_tokens": 12, "completion_tokens": 2}},
)
ANTHROPIC_STREAM = sse(
    {"type": "message_start", "message": {"model": "claude-3-5-haiku-20241022",
                                          "usage": {"input_tokens": 25, "output_tokens": 1}}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi there"}},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}},
    {"type": "message_stop"},
)
GEMINI_STREAM = sse(
    {"candidates": [{"content": {"parts": [{"text": "Hel"}]}}], "modelVersion": "gemini-2.0-flash",
     "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 1}},
    {"candidates": [{"content": {"parts": [{"text": "lo"}]}}], "modelVersion": "gemini-2.0-flash",
     "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 4}},
)
RESPONSES_STREAM = sse(
    {"type": "response.created", "response": {"model": "gpt-4.1-mini", "usage": None}},
    {"type": "response.output_text.delta", "delta": "Hi"},
    {"type": "response.output_text.delta", "delta": " you"},
    {"type": "response.completed", "response": {"model": "gpt-4.1-mini",
                                                "usage": {"input_tokens": 30, "output_tokens": 2},
                                                "output": [{"content": [{"text": "Hi you"}]}]}},
)


@pytest.mark.parametrize(("fmt", "body", "want"), [
    ("openai", OPENAI_STREAM, Found("gpt-4o-mini-2024-07-18", 12, 2, 11)),
    ("anthropic", ANTHROPIC_STREAM, Found("claude-3-5-haiku-20241022", 25, 15, 8)),
    ("gemini", GEMINI_STREAM, Found("gemini-2.0-flash", 9, 4, 5)),
    ("openai", RESPONSES_STREAM, Found("gpt-4.1-mini", 30, 2, 6)),
])
def test_stream_usage_per_format(fmt, body, want):
    """Each format's stream yields the final usage, the model and the streamed text length."""
    meter = StreamMeter(UsageReader(fmt, None), sse=True)
    meter.feed(body)
    assert meter.found == want


def test_anthropic_stream_cut_before_message_delta_estimates_output():
    """message_start's provisional output count is not taken as final: a stream cut before
    message_delta keeps the exact input and estimates the output from the text."""
    meter = StreamMeter(UsageReader("anthropic", None), sse=True)
    meter.feed(ANTHROPIC_STREAM.split(b"message_delta")[0])
    assert usage_from(meter.found, 0, meter.text_chars()) == Usage(25, 2, estimated=True)


@settings(max_examples=80)
@given(st.lists(st.integers(1, len(OPENAI_STREAM) - 1), max_size=12))
def test_stream_reading_does_not_depend_on_chunking(cuts):
    """However the bytes are split into chunks, the stream reads the same."""
    meter = StreamMeter(UsageReader("openai", None), sse=True)
    edges = [0, *sorted(set(cuts)), len(OPENAI_STREAM)]
    for a, b in itertools.pairwise(edges):
        meter.feed(OPENAI_STREAM[a:b])
    assert meter.found == Found("gpt-4o-mini-2024-07-18", 12, 2, 11)


# --------------------------------------------------------------------------- end to end

CONFIG = """
version: 1
providers:
  oa:
    url: "{mock}"
    format: openai
    pricing:
      gpt-4o-mini: {{input: 0.15, output: 0.60}}
      gpt-4o: {{input: 2.50, output: 10.00}}
  an: {{url: "{mock}", format: anthropic, pricing: {{"*": {{input: 3, output: 15}}}}}}
  ge: {{url: "{mock}", format: gemini, pricing: {{gemini-1.5-flash: {{input: 0.075, output: 0.30}}}}}}
  ocr: {{url: "{mock}", format: generic, cost_per_request: 0.003}}
  ocr2: {{url: "{mock2}", format: generic, cost_per_request: 0.01}}
  bare: {{url: "{mock}"}}
routes:
  - name: chat
    match: {{path_prefix: /v1/chat/completions}}
    tiers: [{{provider: oa, model: gpt-4o}}]
  - name: messages
    match: {{path_prefix: /v1/messages}}
    provider: an
  - name: gemini
    match: {{path_prefix: /v1beta/}}
    provider: ge
  - name: ocr
    match: {{path_prefix: /v1/ocr}}
    tiers:
      - {{provider: ocr, path: /v1/generic, accept: {{json_path: "$.confidence", min: 0.9}}}}
      - {{provider: ocr2, path: /v1/generic}}
    faults: {{}}
  - name: bare
    match: {{path_prefix: /v1/generic}}
    provider: bare
"""


def cost(tin: int, tout: int, pin: float, pout: float) -> float:
    return (tin * pin + tout * pout) / 1e6


def sent_tokens(mock) -> int:
    """Input tokens as the mock counts them for the last request it received."""
    return max(1, len(mock.recent[-1]["body"].encode()) // 4)


def metric(proxy, name: str, **labels) -> float:
    return proxy.deps.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def proxy(make_proxy, mock_provider, mock_provider2):
    return await make_proxy(CONFIG.format(mock=mock_provider.url, mock2=mock_provider2.url))


async def test_the_answering_model_prices_the_call(proxy, mock_provider, http, logs):
    """The tier asks for gpt-4o; the provider answers with a gpt-4o-mini snapshot: the call
    is priced as gpt-4o-mini, in the header, the log line and the metrics."""
    headers = {"x-mock-model": "gpt-4o-mini-2024-07-18", "x-mock-output-tokens": "40"}
    async with http.post(proxy.data_url + "/v1/chat/completions", headers=headers,
                         json={"model": "x", "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status == 200
        assert r.headers["x-rp-model"] == "gpt-4o-mini-2024-07-18"
        header_cost = float(r.headers["x-rp-cost-usd"])
    tin = sent_tokens(mock_provider.mock)
    want = cost(tin, 40, 0.15, 0.60)
    assert header_cost == pytest.approx(want, abs=1e-6)
    line = access_lines(logs)[-1]
    assert line["cost_usd"] == pytest.approx(want) and line["used_model"] == "gpt-4o-mini-2024-07-18"
    assert line["tokens"] == {"input": tin, "output": 40} and "tokens_estimated" not in line
    labels = {"provider": "oa", "model": "gpt-4o-mini-2024-07-18"}
    assert metric(proxy, "rp_tokens_total", kind="output", **labels) == 40
    assert metric(proxy, "rp_cost_usd_total", route="chat", **labels) == pytest.approx(want)


async def test_streamed_cost_matches_the_same_completion_buffered(proxy, mock_provider, http, logs):
    """A stream with a final usage chunk is metered exactly like the buffered completion."""
    costs = []
    for stream in (False, True):
        body = {"model": "x", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
        async with http.post(proxy.data_url + "/v1/chat/completions", json=body,
                             headers={"x-mock-output-tokens": "50"}) as r:
            await r.read()
            assert ("x-rp-cost-usd" in r.headers) is not stream
        costs.append(cost(sent_tokens(mock_provider.mock), 50, 2.5, 10.0))
    lines = access_lines(logs)
    assert [ln["cost_usd"] for ln in lines] == pytest.approx(costs)
    assert lines[1]["tokens"]["output"] == 50 and "tokens_estimated" not in lines[1]


async def test_stream_without_usage_is_estimated_never_free(proxy, mock_provider, http, logs):
    """No usage chunk: output ≈ streamed text / 4, input ≈ request bytes / 4, flagged."""
    body = orjson.dumps({"model": "x", "stream": True, "messages": []})
    async with http.post(proxy.data_url + "/v1/chat/completions", data=body) as r:
        await r.read()
    line = access_lines(logs)[-1]
    text = "".join(f"word{i} " for i in range(5))
    tin = math.ceil(len(body) / 4)
    assert line["tokens_estimated"] is True
    assert line["tokens"] == {"input": tin, "output": math.ceil(len(text) / 4)}
    assert line["cost_usd"] == pytest.approx(cost(tin, math.ceil(len(text) / 4), 2.5, 10.0))


async def test_broken_stream_is_metered_for_what_was_streamed(proxy, http, logs):
    """A stream that breaks mid-way still costs what was streamed (estimated)."""
    body = {"model": "x", "stream": True, "messages": []}
    async with http.post(proxy.data_url + "/v1/chat/completions", json=body,
                         headers={"x-mock-drop": "mid-stream"}) as r:
        await r.read()
    line = access_lines(logs)[-1]
    assert line["outcome"] == "stream_interrupted"
    assert line["tokens_estimated"] is True and line["cost_usd"] > 0


async def test_anthropic_and_gemini_replies(proxy, mock_provider, http, logs):
    """Anthropic usage and Gemini usageMetadata price their calls (Gemini's model from
    modelVersion, priced by prefix)."""
    async with http.post(proxy.data_url + "/v1/messages", json={"model": "claude-x", "messages": []},
                         headers={"x-mock-output-tokens": "100"}) as r:
        assert float(r.headers["x-rp-cost-usd"]) == pytest.approx(
            cost(sent_tokens(mock_provider.mock), 100, 3, 15), abs=1e-6)
    async with http.post(proxy.data_url + "/v1beta/models/gemini-1.5-flash-002:generateContent",
                         json={"contents": []}, headers={"x-mock-output-tokens": "1000"}) as r:
        assert float(r.headers["x-rp-cost-usd"]) == pytest.approx(
            cost(sent_tokens(mock_provider.mock), 1000, 0.075, 0.30), abs=1e-6)
    assert access_lines(logs)[-1]["used_model"] == "gemini-1.5-flash-002"


async def test_a_rejected_reply_was_still_billed(proxy, mock_provider, mock_provider2, http, logs):
    """Tier 1 answers 200 but fails accept; tier 2 answers: the call cost both replies."""
    async with http.post(proxy.data_url + "/v1/ocr", json={"image": "x"},
                         headers={"x-mock-confidence": "0.5"}) as r:
        assert r.status == 200 and r.headers["x-rp-tier"] == "2"
        assert r.headers["x-rp-cost-usd"] == "0.013000"
    assert metric(proxy, "rp_cost_usd_total", route="ocr", provider="ocr", model="unknown") == \
        pytest.approx(0.003)
    assert access_lines(logs)[-1]["cost_usd"] == pytest.approx(0.013)


async def test_injected_faults_cost_nothing(proxy, mock_provider, mock_provider2, http):
    """A fault injected on tier 1 never reaches the provider and is not metered."""
    async with http.post(proxy.data_url + "/v1/ocr", json={"image": "x"},
                         headers={"x-rp-fault": "abort=503;tier=1"}) as r:
        assert r.status == 200 and r.headers["x-rp-tier"] == "2"
        assert r.headers["x-rp-cost-usd"] == "0.010000"
    assert mock_provider.mock.calls == 0
    assert metric(proxy, "rp_cost_usd_total", route="ocr", provider="ocr", model="unknown") == 0


async def test_provider_errors_cost_nothing(proxy, http, logs):
    """A provider's error reply is relayed without a cost."""
    async with http.post(proxy.data_url + "/v1/messages", json={"model": "c"},
                         headers={"x-mock-status": "400"}) as r:
        assert r.status == 400 and "x-rp-cost-usd" not in r.headers
    assert access_lines(logs)[-1]["cost_usd"] is None


async def test_a_bare_provider_is_not_metered(proxy, http, logs):
    """A generic provider without prices or usage paths has no metering stage at all."""
    async with http.post(proxy.data_url + "/v1/generic", json={}) as r:
        assert r.status == 200 and "x-rp-cost-usd" not in r.headers
    line = access_lines(logs)[-1]
    assert line["cost_usd"] is None and line["tokens"] is None


async def test_unknown_answering_model_is_priced_high_not_free(make_proxy, mock_provider, http, logs):
    """A model the provider chose that has no price (and no '*') is priced at the
    provider's highest prices and logged once."""
    text = """
providers:
  p:
    url: "{mock}"
    format: openai
    pricing: {{cheap: {{input: 1, output: 2}}, dear: {{input: 5, output: 4}}}}
routes:
  - {{name: r, match: {{path_prefix: /}}, provider: p}}
"""
    proxy = await make_proxy(text.format(mock=mock_provider.url))
    for _ in range(2):
        async with http.post(proxy.data_url + "/v1/chat/completions", json={"model": "other"},
                             headers={"x-mock-output-tokens": "10"}) as r:
            assert float(r.headers["x-rp-cost-usd"]) == pytest.approx(
                cost(sent_tokens(mock_provider.mock), 10, 5, 4), abs=1e-6)
    warnings = [e for e in logs if e.get("event") == "price_unknown_model"]
    assert len(warnings) == 1 and warnings[0]["model"] == "other"
