"""cache_lifetime: how long a provider's answer may be reused, from Cache-Control and Age."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from saslauthd_oidc.providers.http import cache_lifetime


@pytest.mark.parametrize(
    ("cache_control", "age", "expected"),
    [
        ("max-age=120", None, 120.0),
        ("public, max-age=300", None, 300.0),
        ("MAX-AGE=300, Public", None, 300.0),
        ("max-age = 300", None, 300.0),
        ('max-age="600"', None, 600.0),
        ("max-age=0", None, 0.0),
        ("max-age=120", "20", 100.0),
        ("max-age=120", " 20 ", 100.0),
        ("max-age=120", "500", 0.0),  # older than its lifetime: stale, never negative
        ("max-age=120", "garbage", 120.0),  # a bad Age is ignored
        ("max-age=120", "-5", 120.0),
        ("max-age=99999999999999", None, 1e9),  # bounded
        ("no-store", None, 0.0),
        ("no-cache", None, 0.0),
        ("max-age=600, no-cache", None, 0.0),
        ("no-store, max-age=600", None, 0.0),
        ("private, NO-STORE", None, 0.0),
        ("s-maxage=600", None, None),  # for shared caches only
        ("public", None, None),
        ("", None, None),
        (None, None, None),
        (None, "30", None),
        ("max-age=", None, None),
        ("max-age=abc", None, None),
        ("max-age=-1", None, None),
        ("max-age=1.5", None, None),
        ("max-age=12x", None, None),
        (",,,", None, None),
    ],
)
def test_cache_lifetime(cache_control: str | None, age: str | None, expected: float | None) -> None:
    assert cache_lifetime(cache_control, age) == expected


@pytest.mark.parametrize("value", ["²", "١٢", "𝟙𝟚", "¹0"])
def test_non_ascii_digits_are_garbage(value: str) -> None:
    # str.isdigit() is true for these; they are not HTTP delta-seconds
    assert cache_lifetime(f"max-age={value}") is None
    assert cache_lifetime("max-age=60", value) == 60.0


@given(st.text(max_size=40), st.one_of(st.none(), st.text(max_size=12)))
def test_cache_lifetime_never_raises_and_is_never_negative(
    cache_control: str, age: str | None
) -> None:
    result = cache_lifetime(cache_control, age)
    assert result is None or 0.0 <= result <= 1e9


def test_huge_digit_strings_are_bounded_or_ignored() -> None:
    assert cache_lifetime("max-age=" + "9" * 20) == 1e9
    # int() refuses 4300+ digits; RFC 9111 1.2.2: too large means "very large"
    assert cache_lifetime("max-age=" + "9" * 5000) == 1e9
    assert cache_lifetime("max-age=" + "0" * 5000 + "60") == 60.0
    assert cache_lifetime("max-age=60", "9" * 5000) == 0.0
