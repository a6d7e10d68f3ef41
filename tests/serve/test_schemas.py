"""Property tests of request validation (hypothesis): what is accepted is exactly what is valid."""

from __future__ import annotations

import math
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dynprune.serve.schemas import MAX_MS, ClassifyRequest, MeanBudget, TimeBudget

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def fraction_ok(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x) and 0 < x <= 1


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-3, 3))
def test_a_number_is_accepted_iff_it_is_a_fraction_of_dense(x):
    try:
        req = ClassifyRequest.model_validate({"texts": ["a"], "budget": x})
    except ValidationError as err:
        assert not fraction_ok(x)
        assert err.errors()[0]["loc"] == ("budget",)
        return
    assert fraction_ok(x) and req.budget == float(x)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_budget_is_rejected_or_valid(value):
    try:
        req = ClassifyRequest.model_validate({"texts": ["a"], "budget": value})
    except ValidationError as err:
        assert all(e["loc"][0] == "budget" for e in err.errors())
        return
    b = req.budget
    if b is None:
        assert value is None
    elif isinstance(b, tuple):
        assert len(b) == len(value) > 0 and all(fraction_ok(v) for v in b)
    elif isinstance(b, MeanBudget):
        assert fraction_ok(b.mean) and (b.cap is None or b.mean <= b.cap <= 1)
    elif isinstance(b, TimeBudget):
        assert set(value) == {"ms"} and b.ms == value["ms"] and 0 < b.ms <= MAX_MS
    else:
        assert fraction_ok(b)


@settings(max_examples=300, deadline=None)
@given(
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-3, 10**6)
    | st.booleans()
    | st.text(max_size=3)
)
def test_a_time_budget_is_accepted_iff_it_is_a_positive_finite_number_of_ms(x):
    ok = not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x) and 0 < x <= MAX_MS
    try:
        req = ClassifyRequest.model_validate({"texts": ["a"], "budget": {"ms": x}})
    except ValidationError as err:
        assert not ok and err.errors()[0]["loc"] == ("budget",)
        return
    assert ok and req.budget == TimeBudget(ms=float(x))


def text_ok(t: str) -> bool:
    return bool(t.strip()) and not any(
        0xD800 <= ord(c) <= 0xDFFF or (c not in "\t\n\r" and unicodedata.category(c) == "Cc") for c in t
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(st.characters(exclude_categories=()), max_size=12), min_size=1, max_size=4))
def test_texts_are_accepted_iff_non_blank_valid_unicode_without_control_characters(texts):
    try:
        ClassifyRequest.model_validate({"texts": texts})
    except ValidationError as err:
        bad = [i for i, t in enumerate(texts) if not text_ok(t)]
        assert bad and err.errors()[0]["loc"] == ("texts", bad[0])
        return
    assert all(text_ok(t) for t in texts)


@pytest.mark.parametrize("extra", [{"x": 1}, {"Texts": ["a"]}, {"budgets": 0.5}])
def test_unknown_fields_are_rejected(extra):
    with pytest.raises(ValidationError) as err:
        ClassifyRequest.model_validate({"texts": ["a"], **extra})
    assert err.value.errors()[0]["type"] == "extra_forbidden"


def test_check_text_names_the_first_refused_character_for_every_code_point():
    """check_text's one regex refuses exactly the characters the per-character definition does
    (lone surrogates; category Cc except tab, newline, CR), naming the first one's position."""
    from dynprune.serve.schemas import check_text

    for code in [*range(0x10000), 0x1F600, 0xE0001, 0x10FFFF]:  # Cc and surrogates are all in the BMP
        ch = chr(code)
        refused = 0xD800 <= code <= 0xDFFF or (ch not in "\t\n\r" and unicodedata.category(ch) == "Cc")
        try:
            check_text(f"ok {ch} \x01")
        except ValueError as err:
            at = 3 if refused else 5
            assert f"U+{(code if refused else 1):04X} at character {at}" in str(err)
            assert ("surrogate" in str(err)) == (0xD800 <= code <= 0xDFFF)
            continue
        raise AssertionError(f"U+{code:04X}: the trailing control character was not refused")
