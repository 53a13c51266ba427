"""redact: mask personal data in the request body before it leaves for any provider.

``redact: [email, phone, kr_rrn, card_number]`` (route level, before canary, cache and
budget, so the cache key, the upstream and every tier only ever see the masked body).
Each match becomes ``[REDACTED:<kind>]``:

- ``email``: ``name@example.co.kr``
- ``phone``: Korean mobile (``010-1234-5678``, ``01012345678``, ``+82-10-1234-5678``),
  Korean landline (``02-123-4567``, ``031-123-4567``), E.164 (``+14155550132``,
  ``+1-415-555-0132``)
- ``kr_rrn``: resident registration number ``900101-1234567`` (valid YYMMDD, then 1-8)
- ``card_number``: 13-19 digits, optionally grouped by spaces or dashes, Luhn-valid

Where: every string value of a JSON body, at any depth (keys are left alone), and the
whole of a ``text/*`` body; any other body (images, forms, binary) passes unchanged. A
JSON body is re-encoded only when something was masked. Strings holding a ``data:`` URI
(inline base64 images) are skipped: they are not text, and a digit run inside base64 must
not be "masked" into a corrupt image. Digit patterns need a non-alphanumeric neighbour on
both sides for the same reason.

Kinds are applied in a fixed order (email, kr_rrn, card_number, phone), so a card number is
never half-masked as a phone number, and again until nothing new is found, so masking is
idempotent. Counted as
``rp_redactions_total{route,kind}``; the access log line gets ``redactions: {kind: n}``.
The originals are never logged.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from typing import Any

from proxy.call import Call, Handler, Reply
from proxy.config import RedactKind
from proxy.context import RouteContext

_D = "[0-9]"
#: digits must not touch another letter or digit: base64, hex ids and longer numbers
_START = r"(?<![A-Za-z0-9])"
_END = r"(?![A-Za-z0-9])"
_SEP = r"[-. ]?"

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    r"\.[A-Za-z]{2,63}(?![A-Za-z0-9-])")
_KR_RRN = re.compile(
    _START + r"[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])-[1-8][0-9]{6}" + _END)
#: a candidate: 13-19 digits in groups; which part is a card is decided by the Luhn check
_CARD = re.compile(_START + _D + r"(?:[ -]?" + _D + r"){12,18}" + _END)
_PHONES = (
    # E.164 and +82 numbers: "+", a country code, 7-14 more digits in groups
    re.compile(r"(?<![A-Za-z0-9+/])\+[1-9](?:[-. ]?[0-9]){7,14}" + _END),
    # Korean mobile: 010-1234-5678, 010 1234 5678, 01012345678
    re.compile(_START + r"01[016789]" + _SEP + r"[0-9]{3,4}" + _SEP + r"[0-9]{4}" + _END),
    # Korean landline: 02-123-4567, 031-123-4567, 070-1234-5678 (separators required)
    re.compile(_START + r"0(?:2|[3-6][1-5]|70|50[0-9]?)[-. )][0-9]{3,4}[-. ][0-9]{4}" + _END),
)
_HINT = re.compile(r"[0-9@]")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of ASCII digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


#: a digit's Luhn contribution when doubled
_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)
_DIGIT_GROUP = re.compile(_D + "+")


def _luhn_sums(digits: str) -> tuple[list[int], list[int]]:
    """Prefix sums of Luhn contributions, for spans whose last digit has an even / an odd
    index: ``digits[a:b]`` is Luhn-valid iff ``(sums[(b-1) & 1][b] - ...[a]) % 10 == 0``.
    (Each span's check is O(1): a run of 19 one-digit groups, "1 1 1 ...", has ~50 spans,
    and a body of them must not cost seconds.)"""
    even, odd = [0], [0]  # the span's last digit at an even index: odd indices are doubled
    for p, ch in enumerate(digits):
        d = ord(ch) - 48
        if p & 1:
            even.append(even[-1] + _DOUBLED[d])
            odd.append(odd[-1] + d)
        else:
            even.append(even[-1] + d)
            odd.append(odd[-1] + _DOUBLED[d])
    return even, odd


def _mask_cards(text: str, counts: dict[str, int]) -> str:
    """Mask Luhn-valid card numbers; a candidate run is searched group-aligned, so
    "ref 1 4111 1111 1111 1111" still masks the card that follows the stray digit."""
    def repl(m: re.Match[str]) -> str:
        run = m.group()
        groups = [(g.start(), g.end()) for g in _DIGIT_GROUP.finditer(run)]
        starts, ends, n = [], [], 0  # each group's span in the run's digits
        for start, end in groups:
            starts.append(n)
            n += end - start
            ends.append(n)
        sums = _luhn_sums("".join(run[start:end] for start, end in groups))
        out, pos, i = [], 0, 0
        while i < len(groups):
            a = starts[i]
            # only the groups j whose span from i holds 13..19 digits, longest first
            for j in range(bisect_right(ends, a + 19) - 1, bisect_left(ends, a + 13) - 1, -1):
                b = ends[j]
                prefix = sums[(b - 1) & 1]
                if (prefix[b] - prefix[a]) % 10 == 0:
                    out.append(run[pos:groups[i][0]])
                    out.append("[REDACTED:card_number]")
                    counts["card_number"] = counts.get("card_number", 0) + 1
                    pos, i = groups[j][1], j + 1
                    break
            else:
                i += 1
        out.append(run[pos:])
        return "".join(out)
    return _CARD.sub(repl, text)


def _masker(kind: str, patterns: tuple[re.Pattern[str], ...]) -> Callable[[str, dict[str, int]], str]:
    token = f"[REDACTED:{kind}]"

    def mask(text: str, counts: dict[str, int]) -> str:
        for pattern in patterns:
            text, n = pattern.subn(token, text)
            if n:
                counts[kind] = counts.get(kind, 0) + n
        return text
    return mask


#: the fixed application order (a card is not a phone; an RRN is not a card)
_ORDER: tuple[tuple[RedactKind, Callable[[str, dict[str, int]], str]], ...] = (
    ("email", _masker("email", (_EMAIL,))),
    ("kr_rrn", _masker("kr_rrn", (_KR_RRN,))),
    ("card_number", _mask_cards),
    ("phone", _masker("phone", _PHONES)),
)


class Redactor:
    """Masks the configured kinds in a string or a JSON document (pure, reusable)."""

    __slots__ = ("_maskers",)

    def __init__(self, kinds: list[RedactKind] | tuple[RedactKind, ...]) -> None:
        wanted = set(kinds)
        self._maskers = tuple(m for kind, m in _ORDER if kind in wanted)

    def text(self, text: str, counts: dict[str, int]) -> str:
        if not _HINT.search(text) or text.startswith("data:"):
            return text
        while True:  # again until nothing new: a mask can free its neighbour's boundary
            before = sum(counts.values())  # ("010-1234-5678+1-415-555-0132"); idempotence
            for mask in self._maskers:
                text = mask(text, counts)
            if sum(counts.values()) == before:
                return text

    def json(self, node: Any, counts: dict[str, int]) -> Any:
        """``node`` with every string value masked (containers are copied only if changed)."""
        if isinstance(node, str):
            return self.text(node, counts)
        if isinstance(node, dict):
            changed = False
            out = {}
            for k, v in node.items():
                nv = self.json(v, counts)
                changed = changed or nv is not v
                out[k] = nv
            return out if changed else node
        if isinstance(node, list):
            items = [self.json(v, counts) for v in node]
            return items if any(a is not b for a, b in zip(items, node, strict=True)) else node
        return node


class Redact:
    """Route stage: mask the request body before canary, cache, budget and tiers."""

    __slots__ = ("_counters", "_redactor")

    def __init__(self, ctx: RouteContext, kinds: list[RedactKind]) -> None:
        self._redactor = Redactor(kinds)
        metric = ctx.deps.metrics.redactions
        self._counters: dict[str, Any] = {k: metric.labels(ctx.route.name, k) for k in kinds}

    async def __call__(self, call: Call, next_: Handler) -> Reply:
        if call.body:
            counts: dict[str, int] = {}
            self._redact(call, counts)
            if counts:
                for kind, n in counts.items():
                    self._counters[kind].inc(n)
                call.log["redactions"] = counts
        return await next_(call)

    def _redact(self, call: Call, counts: dict[str, int]) -> None:
        ctype = call.headers.get("content-type", "").lower()
        if ctype.startswith("text/") and "json" not in ctype:
            self._redact_text(call, ctype, counts)
            return
        doc = call.json()
        if doc is None:
            if ctype.startswith("text/"):
                self._redact_text(call, ctype, counts)
            return
        masked = self._redactor.json(doc, counts)
        if counts:
            call.set_json(masked)

    def _redact_text(self, call: Call, ctype: str, counts: dict[str, int]) -> None:
        charset = "utf-8"
        if "charset=" in ctype:
            charset = ctype.split("charset=", 1)[1].split(";", 1)[0].strip().strip('"') or charset
        try:
            text = call.body.decode(charset)
        except (LookupError, UnicodeDecodeError):
            return  # not text we can read: passes unchanged
        masked = self._redactor.text(text, counts)
        if counts:
            call.body = masked.encode(charset, "replace")
            call.tier_bodies = None


def build_route(ctx: RouteContext) -> Redact | None:
    kinds = ctx.route.redact
    return Redact(ctx, kinds) if kinds else None
