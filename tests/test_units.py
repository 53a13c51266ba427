"""Duration and size strings (DESIGN §2): parsing, formatting, round trips, rejections."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.units import format_duration, format_size, parse_duration, parse_size

DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KiB": 1024,
              "MiB": 1024**2, "GiB": 1024**3}


@pytest.mark.parametrize(("text", "seconds"), [
    ("250ms", 0.25), ("10s", 10.0), ("5m", 300.0), ("2h", 7200.0), ("30d", 2_592_000.0),
    ("1.5s", 1.5), ("100us", 1e-4), ("1h30m", 5400.0), ("6m0s", 360.0), (" 20ms ", 0.02),
    (3, 3.0), (0.5, 0.5),
])
def test_parse_duration_examples(text, seconds):
    """The contract's duration spellings parse to seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "10", "ms", "-1s", "10 s", "1.s", "5 minutes", "1e3s",
                                 "9" * 400 + "d", True, -1, float("inf"), float("nan"), None])
def test_parse_duration_rejects(bad):
    """Malformed, negative and non-finite durations raise ValueError (located by the loader)."""
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "size"), [
    ("512KiB", 524288), ("16MiB", 16 * 1024**2), ("1GiB", 1024**3), ("100KB", 100_000),
    ("1000", 1000), ("1000B", 1000), ("1.5MiB", 1572864), ("16 MiB", 16 * 1024**2), (42, 42),
])
def test_parse_size_examples(text, size):
    """The contract's size spellings parse to exact bytes."""
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "MiB", "-1", "1.5", "1e6", "16 mb", "16MiBs", "9" * 80,
                                 True, -5, 2.5, None])
def test_parse_size_rejects(bad):
    """Malformed, negative and fractional-byte sizes raise ValueError."""
    with pytest.raises(ValueError):
        parse_size(bad)


@given(st.integers(min_value=0, max_value=36_000), st.sampled_from(sorted(DURATION_UNITS)))
def test_duration_unit_scaling(n, unit):
    """``<n><unit>`` is n times the unit, for every unit."""
    assert parse_duration(f"{n}{unit}") == pytest.approx(n * DURATION_UNITS[unit])


@given(st.lists(st.tuples(st.integers(0, 1000), st.sampled_from(sorted(DURATION_UNITS))),
                min_size=1, max_size=4))
def test_compound_duration_is_the_sum(parts):
    """A compound duration (``1h30m``) is the sum of its parts."""
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_duration(text) == pytest.approx(sum(n * DURATION_UNITS[u] for n, u in parts))


@given(st.floats(min_value=0, max_value=3e9, allow_nan=False, allow_infinity=False))
def test_format_duration_round_trips(seconds):
    """format_duration's output parses back to the same duration (to the nanosecond)."""
    text = format_duration(seconds)
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-9)


@given(st.integers(min_value=0, max_value=36_000), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_format_duration_is_exact_for_whole_units(n, unit):
    """Whole config values come back exactly as the same duration."""
    seconds = parse_duration(f"{n}{unit}")
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(SIZE_UNITS)))
def test_size_unit_scaling(n, unit):
    """``<n><unit>`` is exactly n times the unit (binary and decimal)."""
    assert parse_size(f"{n}{unit}") == n * SIZE_UNITS[unit]


@given(st.integers(min_value=0, max_value=2**50))
def test_format_size_round_trips(size):
    """format_size's output parses back to exactly the same number of bytes."""
    assert parse_size(format_size(size)) == size


@given(st.text(max_size=30))
def test_parsers_only_ever_raise_value_error(text):
    """Any text either parses or raises ValueError: the loader can locate every mistake."""
    for parse in (parse_duration, parse_size):
        try:
            value = parse(text)
        except ValueError:
            continue
        assert value >= 0 and math.isfinite(value)


def test_durations_past_a_century_are_refused():
    """An absurd timer (a typo like 36500000d) is an error, not a silent never-firing timer."""
    with pytest.raises(ValueError):
        parse_duration("36501d")
