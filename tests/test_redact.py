"""redact: PII masked in the request body before it leaves, counted, never logged."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.redact import Redactor, luhn_valid
from tests.conftest import access_lines

ALL = Redactor(["email", "phone", "kr_rrn", "card_number"])


def mask(text: str) -> tuple[str, dict[str, int]]:
    counts: dict[str, int] = {}
    return ALL.text(text, counts), counts


@pytest.mark.parametrize(("original", "kind"), [
    ("jane.doe+menu@example.co.kr", "email"),
    ("010-1234-5678", "phone"), ("01012345678", "phone"), ("+82-10-1234-5678", "phone"),
    ("02-123-4567", "phone"), ("031-123-4567", "phone"),
    ("+14155550132", "phone"), ("+1-415-555-0132", "phone"),
    ("900101-1234567", "kr_rrn"),
    ("4111 1111 1111 1111", "card_number"), ("4111-1111-1111-1111", "card_number"),
    ("378282246310005", "card_number"), ("6011000990139424", "card_number"),
])
def test_every_documented_format_is_masked_in_context(original, kind):
    """Each DESIGN §8 format becomes [REDACTED:<kind>], also inside a Korean sentence."""
    masked, counts = mask(f"연락처: {original}입니다, thanks")
    assert masked == f"연락처: [REDACTED:{kind}]입니다, thanks"
    assert counts == {kind: 1}


@pytest.mark.parametrize("text", [
    "price 12,000원, 2024-01-01 10:30", "order 12345678901234567890 (20 digits)",
    "4111 1111 1111 1112", "version 1.2.3", "user@localhost", "991332-1234567",
    "data:image/png;base64,iVBO+14155550132AAA01012345678",
])
def test_lookalikes_pass_unchanged(text):
    """Dates, prices, long ids, Luhn-invalid cards, impossible RRN dates, base64: untouched."""
    assert mask(text) == (text, {})


def test_only_configured_kinds_are_masked():
    """redact: [email] leaves phone numbers alone."""
    counts: dict[str, int] = {}
    assert Redactor(["email"]).text("a@b.io 010-1234-5678", counts) == "[REDACTED:email] 010-1234-5678"


def luhn_complete(prefix: str) -> str:
    """``prefix`` plus the check digit that makes it Luhn-valid."""
    return next(prefix + d for d in "0123456789" if luhn_valid(prefix + d))


_DIGITS = st.text("0123456789", min_size=12, max_size=18).filter(lambda s: s[0] != "0")


@given(_DIGITS, st.sampled_from(["", " ", "-"]))
def test_luhn_valid_numbers_are_masked(prefix, sep):
    """Any Luhn-valid 13-19 digit number, grouped by 4 with spaces or dashes or not, is masked."""
    number = luhn_complete(prefix)
    grouped = sep.join(number[i:i + 4] for i in range(0, len(number), 4)) if sep else number
    masked, counts = mask(f"card {grouped} exp 12/29")
    assert masked == "card [REDACTED:card_number] exp 12/29" and counts == {"card_number": 1}


@given(st.text("0123456789", min_size=13, max_size=19))
def test_luhn_invalid_digit_runs_are_not_masked(digits):
    """A 13-19 digit run that fails Luhn is not a card (and not anything else)."""
    if luhn_valid(digits):
        digits = digits[:-1] + str((int(digits[-1]) + 1) % 10)
    assert mask(f"ref {digits}.") == (f"ref {digits}.", {})


_PIECES = st.sampled_from([
    "jane@example.com", "010-1234-5678", "+1-415-555-0132", "900101-1234567", "02-123-4567",
    "4111 1111 1111 1111", "hello", " ", "12", "+", "-", "@", "전화", "\n", "4111"])


@given(st.lists(_PIECES | st.text(max_size=6), max_size=12))
def test_redaction_is_idempotent(parts):
    """Masking a masked text changes nothing more and finds nothing more."""
    once, _ = mask("".join(parts))
    twice, counts = mask(once)
    assert twice == once and counts == {}


def test_json_walks_every_string_value_at_any_depth():
    """Nested string values are masked, keys and non-strings are not; unchanged docs are reused."""
    doc = {"user@example.com": 1, "a": [{"b": "call 010-1234-5678"}, 4111111111111111],
           "c": {"d": ["x", "900101-1234567"]}}
    counts: dict[str, int] = {}
    out = ALL.json(doc, counts)
    assert out == {"user@example.com": 1, "a": [{"b": "call [REDACTED:phone]"}, 4111111111111111],
                   "c": {"d": ["x", "[REDACTED:kr_rrn]"]}}
    assert counts == {"phone": 1, "kr_rrn": 1}
    clean = {"a": ["b", {"c": 1}]}
    assert ALL.json(clean, {}) is clean


# --------------------------------------------------------------------------- end to end

CONFIG = """
version: 1
providers: {{p1: {{url: "{url}", format: generic}}}}
routes:
  - name: notes
    match: {{path_prefix: /v1/}}
    provider: p1
    redact: [email, phone, kr_rrn, card_number]
"""


def redactions(proxy, kind: str) -> float:
    return proxy.deps.metrics.registry.get_sample_value(
        "rp_redactions_total", {"route": "notes", "kind": kind}) or 0.0


async def test_upstream_sees_only_the_masked_json_body(mock_provider, make_proxy, http, logs):
    """The provider receives the masked body; counts go to metrics and the access log; the
    originals appear in no log line."""
    proxy = await make_proxy(CONFIG.format(url=mock_provider.url))
    body = {"image": "menu.jpg", "note": "text me at 010-1234-5678 or jane@example.com",
            "payment": {"card": "4111-1111-1111-1111", "ids": ["900101-1234567"]}}
    async with http.post(proxy.data_url + "/v1/ocr", json=body) as resp:
        assert resp.status == 200
    seen = orjson.loads(mock_provider.mock.recent[-1]["body"])
    assert seen == {"image": "menu.jpg",
                    "note": "text me at [REDACTED:phone] or [REDACTED:email]",
                    "payment": {"card": "[REDACTED:card_number]", "ids": ["[REDACTED:kr_rrn]"]}}
    assert {k: redactions(proxy, k) for k in ("email", "phone", "kr_rrn", "card_number")} == {
        "email": 1, "phone": 1, "kr_rrn": 1, "card_number": 1}
    (line,) = access_lines(logs)
    assert line["redactions"] == {"email": 1, "kr_rrn": 1, "card_number": 1, "phone": 1}
    dumped = orjson.dumps(logs).decode()
    for original in ("010-1234-5678", "jane@example.com", "4111-1111-1111-1111", "900101-1234567"):
        assert original not in dumped


async def test_text_bodies_are_masked_and_binary_passes(mock_provider, make_proxy, http):
    """text/* bodies are masked as text; an octet-stream body passes byte for byte."""
    proxy = await make_proxy(CONFIG.format(url=mock_provider.url))
    async with http.post(proxy.data_url + "/v1/notes", data=b"mail jane@example.com",
                         headers={"content-type": "text/plain; charset=utf-8"}) as resp:
        assert resp.status == 200
    assert mock_provider.mock.recent[-1]["body"] == "mail [REDACTED:email]"
    raw = b"\x89PNG jane@example.com 010-1234-5678"
    async with http.post(proxy.data_url + "/v1/upload", data=raw,
                         headers={"content-type": "application/octet-stream"}) as resp:
        assert resp.status == 200
    assert mock_provider.mock.recent[-1]["body"] == raw.decode("utf-8", "replace")
    assert redactions(proxy, "email") == 1


async def test_clean_body_is_forwarded_byte_for_byte(mock_provider, make_proxy, http):
    """Nothing to mask: the original bytes (formatting included) go upstream."""
    proxy = await make_proxy(CONFIG.format(url=mock_provider.url))
    raw = b'{ "note" : "nothing here",  "n": 1 }'
    async with http.post(proxy.data_url + "/v1/ocr", data=raw,
                         headers={"content-type": "application/json"}) as resp:
        assert resp.status == 200
    assert mock_provider.mock.recent[-1]["body"] == raw.decode()
