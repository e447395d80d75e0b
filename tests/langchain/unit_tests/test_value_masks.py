"""Which texts may be written while a guided JSON integer, number or boolean value is being written."""

from __future__ import annotations

import pytest

from langchain_hogwild._value_masks import is_valid_value_text


@pytest.mark.parametrize(
    ("kind", "text", "end", "valid"),
    [
        ("integer", "", "", True),
        ("integer", " 4", "", True),
        ("integer", "-", "", True),
        ("integer", "42,", ",", True),
        ("integer", "42 }", "}", True),
        ("integer", "0", "", True),
        ("integer", "01", "", False),
        ("integer", "4.", "", False),
        ("integer", "four", "", False),
        ("number", "3.", "", True),
        ("number", "-0.5e", "", True),
        ("number", "3.5e-", "", True),
        ("number", "3.5e-2,", ",", True),
        ("number", "3.,", "", False),
        ("number", "e", "", False),
        ("number", "1..", "", False),
        ("boolean", "t", "", True),
        ("boolean", " fal", "", True),
        ("boolean", "true}", "}", True),
        ("boolean", "trux", "", False),
        ("boolean", "yes", "", False),
        ("boolean", "tru,", ",", False),
        ("integer", "42,", "}", False),  # the skeleton closes the object here, not a list of keys
        ("integer", "42},", "}", False),
        ("integer", "42 ", "", True),
        ("boolean", 'true,"', ",", False),
    ],
)
def test_value_text(kind, text, end, valid):
    assert is_valid_value_text(kind, text, end) is valid
