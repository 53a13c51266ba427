"""accept (per-tier content conditions), validate (well-formed replies) and the JSONPath subset."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.accept import Condition, json_equal
from proxy.config import AcceptConfig
from proxy.jsonpath import MISSING, compile_path
from proxy.loader import ConfigError, parse_config
from tests.conftest import access_lines

# --------------------------------------------------------------------------- JSONPath subset


def test_jsonpath_subset_finds_values():
    """Dotted names, quoted names, indexes (negative too) resolve; absent steps are MISSING."""
    doc = {"a": {"b": [{"c": 1}, {"c": None}]}, "odd key": {"x-y": True}, "l": [1, 2, 3]}
    assert compile_path("$").find(doc) is doc
    assert compile_path("$.a.b[0].c").find(doc) == 1
    assert compile_path("$.a.b[1].c").find(doc) is None
    assert compile_path('$["odd key"][\'x-y\']').find(doc) is True
    assert compile_path("$.l[-1]").find(doc) == 3
    for missing in ("$.a.b[2].c", "$.a.x", "$.l[3]", "$.l[-4]", "$.a.b.c", "$.l.x", "$.a[0]"):
        assert compile_path(missing).find(doc) is MISSING, missing


@pytest.mark.parametrize("bad", ["", "a.b", "$.", "$..a", "$.*", "$[*]", "$[0:2]",
                                 "$[?(@.a)]", "$['a'", "$[01]", "$.a b", "$[\"a\\q\"]"])
def test_jsonpath_refuses_what_it_does_not_support(bad):
    """Wildcards, slices, filters, recursion and malformed paths fail at compile time."""
    with pytest.raises(ValueError, match="JSONPath"):
        compile_path(bad)


_KEY = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)
_DOC = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEY, inner, max_size=4),
    max_leaves=20)


@given(_DOC, st.data())
def test_jsonpath_quoted_steps_reach_every_value(doc, data):
    """Any value in any document is reached by the path spelled from its keys and indexes."""
    node, expr = doc, "$"
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        if isinstance(node, dict):
            key = data.draw(st.sampled_from(sorted(node)))
            expr += "[" + orjson.dumps(key).decode() + "]"
            node = node[key]
        else:
            i = data.draw(st.integers(-len(node), len(node) - 1))
            expr += f"[{i}]"
            node = node[i]
    assert compile_path(expr).find(doc) is node


# --------------------------------------------------------------------------- conditions


def cond(**kw) -> Condition:
    return Condition(AcceptConfig.model_validate(kw))


def test_condition_checks():
    """min/max are inclusive and numeric; equals and in are JSON-typed; exists both ways."""
    assert cond(json_path="$.c", min=0.75).failure({"c": 0.75}) is None
    assert "< min 0.75" in cond(json_path="$.c", min=0.75).failure({"c": 0.7499})
    assert "> max 1" in cond(json_path="$.c", max=1).failure({"c": 1.5})
    assert "not a number" in cond(json_path="$.c", min=0).failure({"c": True})
    assert "not a number" in cond(json_path="$.c", min=0).failure({"c": "0.9"})
    assert "missing" in cond(json_path="$.c", min=0).failure({})
    assert cond(json_path="$.h", equals=False).failure({"h": False}) is None
    assert cond(json_path="$.h", equals=False).failure({"h": 0}) is not None
    assert cond(json_path="$.h", equals=None).failure({"h": None}) is None
    assert cond(json_path="$.h", equals=None).failure({"h": 0}) is not None
    assert cond(**{"json_path": "$.s", "in": ["ok", 1]}).failure({"s": 1.0}) is None
    assert cond(**{"json_path": "$.s", "in": ["ok", 1]}).failure({"s": True}) is not None
    assert cond(json_path="$.x").failure({"x": None}) is None  # path alone: exists
    assert cond(json_path="$.x").failure({}) is not None
    assert cond(json_path="$.x", exists=False).failure({}) is None
    assert cond(json_path="$.x", exists=False).failure({"x": 1}) is not None


def test_condition_message_never_quotes_reply_strings():
    """A failure message may show a number from the reply, never a string (user content)."""
    why = cond(json_path="$.text", equals="ok").failure({"text": "secret menu text"})
    assert "secret" not in why and '"ok"' in why


@given(st.floats(0, 1), st.floats(0, 1))
def test_threshold_accepts_exactly_values_at_or_above_min(value, threshold):
    """accept {min: t} holds iff value >= t."""
    assert (cond(json_path="$.c", min=threshold).failure({"c": value}) is None) == (value >= threshold)


@given(_DOC)
def test_json_equal_is_reflexive_and_bool_is_not_number(doc):
    """json_equal(x, x) always; true never equals 1 and false never equals 0."""
    assert json_equal(doc, doc)
    assert not json_equal(True, 1) and not json_equal(False, 0) and json_equal(1, 1.0)


# --------------------------------------------------------------------------- config

BASE = """
version: 1
providers: {{p1: {{url: "http://127.0.0.1:1"}}}}
routes:
  - name: r
    match: {{path_prefix: /}}
    tiers:
      - provider: p1
        accept: {accept}
{extra}
"""


def load(accept: str, extra: str = ""):
    return parse_config(BASE.format(accept=accept, extra=extra), env={})


def errors(accept: str, extra: str = "") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(accept, extra)
    return info.value.errors


def test_accept_takes_one_condition_or_a_list():
    """accept: {...} and accept: [{...}, ...] both load, as a list of conditions."""
    one = load('{json_path: "$.confidence", min: 0.75}').config.routes[0].tiers[0].accept
    many = load('[{json_path: "$.confidence", min: 0.75}, {json_path: "$.handwritten", '
                'equals: false}]').config.routes[0].tiers[0].accept
    assert one is not None and len(one) == 1 and one[0].min == 0.75
    assert many is not None and [c.json_path for c in many] == ["$.confidence", "$.handwritten"]


def test_bad_accept_and_validate_are_located_errors():
    """Bad JSONPaths and incoherent checks fail `check` with YAML paths."""
    assert errors('{json_path: "$.a[*]"}')[0].startswith("routes[0].tiers[0].accept[0].json_path: ")
    assert "min must be <= max" in errors("{json_path: $.a, min: 2, max: 1}")[0]
    assert "exists: false" in errors("{json_path: $.a, exists: false, equals: 1}")[0]
    errs = errors("{json_path: $.a}", '    validate: {require: ["$.ok", "choices[0]"]}')
    assert errs[0].startswith("routes[0].validate.require: ") and "must start with '$'" in errs[0]


# --------------------------------------------------------------------------- end to end

E2E = """
version: 1
providers:
  p1: {{url: "{p1}", format: openai}}
  p2: {{url: "{p2}", format: generic}}
routes:
  - name: r
    match: {{path_prefix: /v1/, methods: [POST]}}
    tiers:
      - provider: p1
        accept: {accept}
      - {{provider: p2, path: /v2/ocr}}
    faults: {{}}
{extra}
"""


async def proxy_for(make_proxy, m1, m2, *, accept="[]", extra=""):
    return await make_proxy(E2E.format(p1=m1.url, p2=m2.url, accept=accept, extra=extra))


async def post(http, proxy, path="/v1/ocr", headers=None, body=None):
    async with http.post(proxy.data_url + path, json=body or {"image": "x"},
                         headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.read()


async def test_accept_list_rejects_handwritten_and_tier2_answers(mock_provider, mock_provider2,
                                                                make_proxy, http, logs):
    """Every condition must hold: confidence is fine but handwritten → tier 2, reason rejected."""
    proxy = await proxy_for(make_proxy, mock_provider, mock_provider2, accept=(
        '[{json_path: "$.confidence", min: 0.75}, {json_path: "$.handwritten", equals: false}]'))
    status, headers, body = await post(http, proxy, headers={"x-mock-handwritten": "true"})
    assert status == 200 and headers["x-rp-tier"] == "2" and headers["x-rp-fallback"] == "rejected"
    assert orjson.loads(body)["handwritten"] is True  # tier 2 has no such condition
    (line,) = access_lines(logs)
    assert line["attempt_log"][0]["error"] == "rejected"
    moved = next(e for e in logs if e["event"] == "tier_fallback")
    assert "$.handwritten" in moved["detail"]
    status, headers, _ = await post(http, proxy, body={"image": "y"})
    assert status == 200 and headers["x-rp-tier"] == "1"


async def test_accept_judges_only_2xx(mock_provider, mock_provider2, make_proxy, http):
    """A 503 is the classifier's (reason 503), not a rejection."""
    proxy = await proxy_for(make_proxy, mock_provider, mock_provider2,
                            accept='{json_path: "$.confidence", min: 0.75}')
    status, headers, _ = await post(http, proxy, headers={"x-rp-fault": "abort=503;tier=1"})
    assert status == 200 and headers["x-rp-fallback"] == "503"


async def test_accept_on_malformed_body_is_invalid_response(mock_provider, mock_provider2,
                                                            make_proxy, http):
    """accept cannot judge a body that is not JSON: invalid_response, not a relayable rejection."""
    proxy = await proxy_for(make_proxy, mock_provider, mock_provider2,
                            accept='{json_path: "$.confidence", min: 0.75}')
    status, headers, _ = await post(http, proxy, headers={"x-rp-fault": "bad_response;tier=1"})
    assert status == 200 and headers["x-rp-fallback"] == "invalid_response"


async def test_validate_malformed_tier1_moves_to_tier2(mock_provider, mock_provider2, make_proxy,
                                                       http, logs):
    """validate json: a malformed 200 on tier 1 moves on with reason invalid_response."""
    proxy = await proxy_for(make_proxy, mock_provider, mock_provider2,
                            extra="    validate: {json: true}")
    status, headers, _ = await post(http, proxy, headers={"x-rp-fault": "bad_response;tier=1"})
    assert status == 200 and headers["x-rp-tier"] == "2"
    assert headers["x-rp-fallback"] == "invalid_response"
    assert access_lines(logs)[0]["attempt_log"][0]["error"] == "invalid_response"


async def test_validate_malformed_everywhere_is_502_invalid_response(mock_provider, mock_provider2,
                                                                     make_proxy, http):
    """Both providers answer malformed JSON (the mock's own x-mock-body): 502 invalid_response."""
    proxy = await proxy_for(make_proxy, mock_provider, mock_provider2,
                            extra="    validate: {json: true}")
    status, headers, body = await post(http, proxy, headers={"x-mock-body": "malformed"})
    err = orjson.loads(body)["error"]
    assert status == 502 and err["type"] == "invalid_response" and "not valid JSON" in err["message"]
    assert headers["x-rp-fallback"] == "invalid_response"
    assert mock_provider.mock.calls == 1 and mock_provider2.mock.calls == 1


async def test_validate_require_missing_path_fails_the_tier(mock_provider, mock_provider2,
                                                            make_proxy, http):
    """require: tier 1 (chat) has the path; tier 2's generic JSON lacks it: invalid_response."""
    proxy = await proxy_for(make_proxy, mock_provider, mock_provider2,
                            extra='    validate: {require: ["$.choices[0].message.content"]}')
    status, headers, _ = await post(http, proxy, "/v1/chat/completions", body={"messages": []})
    assert status == 200 and headers["x-rp-tier"] == "1"
    status, _, body = await post(http, proxy, "/v1/chat/completions",
                                 headers={"x-rp-fault": "abort=503;tier=1"}, body={"messages": []})
    err = orjson.loads(body)["error"]
    assert status == 502 and err["type"] == "invalid_response"
    assert "$.choices[0].message.content" in err["message"]


async def test_validate_leaves_streams_alone(mock_provider, mock_provider2, make_proxy, http):
    """A streamed reply is committed, not validated: it is relayed even though it lacks the path."""
    proxy = await proxy_for(make_proxy, mock_provider, mock_provider2,
                            extra='    validate: {require: ["$.nowhere"]}')
    async with http.post(proxy.data_url + "/v1/chat/completions",
                         json={"messages": [], "stream": True}) as resp:
        text = await resp.text()
        assert resp.status == 200 and resp.headers["x-rp-tier"] == "1"
    assert text.rstrip().endswith("data: [DONE]")
    assert mock_provider2.mock.calls == 0
